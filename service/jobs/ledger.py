"""Durable job ledger kept in a store reached through fsspec.

Layout under the ledger root URL::

    jobs/{job_id}/spec.json                  immutable job spec (JSON object)
    jobs/{job_id}/plan.json                  immutable typed plan (plans.py), written with the job
    jobs/{job_id}/state.json                 state, message, times, counters
    jobs/{job_id}/blocks/{index:08d}.done    completion marker of one block (task)
    jobs/{job_id}/done/{group:08d}.json      bitmap of the done blocks of one group of 4096
                                             (markers.py: progress without listing markers)
    jobs/{job_id}/leases/{index:08d}.json    lease on one block (owner, expiry)
    jobs/{job_id}/supervisor.json            lease of the server that supervises the job
    jobs/{job_id}/events/{ns:020d}-{writer}-{n:08d}.json   one object per event
    jobs/{job_id}/result.npz                 a cutout job's arrays (written once by its worker)

Objects are written through an atomic store (volume/objects.py), whose back-end decides how exact
leases are: see ``Ledger.lease_guarantee`` and volume/objects.py.

"""
from __future__ import annotations

import json
import secrets
import threading
import time
from typing import Any, Callable

from .ledger_pool import PoolQueries
from .markers import MARKERS_VERSION, DoneGroups
from ..volume.objects import DELETE, KEEP
from ..volume.stores import open_store

__all__ = [
    "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED",
    "STATES", "TERMINAL_STATES", "TRANSITIONS",
    "JobNotFound", "JobExists", "IllegalTransition",
    "JobRecord", "Event", "Lease", "Ledger",
    "new_job_id", "validate_job_id",
]

from .records import (  # noqa: F401 - re-exported: the ledger's vocabulary
    _CROCKFORD, _DONE_RE, _EVENT_ID_RE, _EVENT_NAME_RE, _JOB_ID_RE, _KIND_RE, _OWNER_RE, CANCELLED,
    FAILED, MAX_BLOCKS, MAX_PAGE_SIZE, MAX_TTL_S, PENDING, RUNNING, STATES, SUCCEEDED, TERMINAL_STATES,
    TRANSITIONS, Event, IllegalTransition, JobExists, JobNotFound, JobRecord, Lease, _check_int, _check_owner,
    _check_ttl, new_job_id, validate_job_id,
)


def _dumps(obj: Any, what: str) -> bytes:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"),
                          allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serializable: {exc}") from None


# ----------------------------------------------------------------- ledger

class Ledger(PoolQueries, DoneGroups):
    """Durable record of jobs, block completion, block leases and events.

    ``url``: ledger root (``file://``, a plain path, ``memory://``, ``s3://``
    or an alias known to ``service.volume.stores.open_fs``).
    ``storage_options``: fsspec options; when given, fsspec opens ``url`` directly.
    ``clock``: wall-clock seconds (injectable for tests).
    ``conditional_writes``: S3 only; None probes the server once, False forces
    the best-effort write-then-confirm mode.
    ``settle_s``: wait before the read-back in best-effort mode.
    """

    def __init__(self, url: str, *, storage_options: dict | None = None,
                 clock: Callable[[], float] = time.time,
                 conditional_writes: bool | None = None, settle_s: float = 0.25):
        if not isinstance(url, str) or not url:
            raise ValueError(f"url must be a non-empty ledger URL, got {url!r}")
        self.url = url
        self._store = open_store(url, storage_options, settle_s, conditional_writes)
        self._clock = clock
        self._num_blocks: dict[str, int] = {}
        self._ended_job_ids: set[str] = set()  # jobs seen ended (supervisor ticks, pool polls skip them)
        self._writer = secrets.token_hex(4)
        self._event_lock = threading.Lock()
        self._event_n = 0
        self._event_last_ns = 0
        self._groups_init()

    def __repr__(self) -> str:
        return f"Ledger({self.url!r})"

    @property
    def lease_guarantee(self) -> str:
        """'local-lock', 's3-conditional' or 'process-lock' (exact) or 'best-effort'."""
        return self._store.guarantee

    # -- keys
    @staticmethod
    def _k(job_id: str, *parts: str) -> str:
        return "/".join(("jobs", job_id) + parts)

    # -- jobs
    def create_job(self, spec: dict, num_blocks: int, job_id: str | None = None,
                   plan: dict | None = None, owner: str = "") -> JobRecord:
        """Record a new PENDING job (its spec, its plan, then its state); raises JobExists when
        ``job_id`` is taken. ``owner`` is the user who asked for it."""
        if not isinstance(spec, dict):
            raise ValueError(f"spec must be a JSON object (dict), got {type(spec).__name__}")
        spec_bytes = _dumps(spec, "spec")
        plan_bytes = _dumps(plan, "plan") if plan is not None else None
        _check_int("num_blocks", num_blocks, 0, MAX_BLOCKS)
        if not isinstance(owner, str) or len(owner) > 128:
            raise ValueError(f"owner must be a string of at most 128 characters, got {owner!r:.200}")
        job_id = new_job_id(self._clock()) if job_id is None else validate_job_id(job_id)
        lock = self._k(job_id, ".lock")
        if not self._store.create(self._k(job_id, "spec.json"), spec_bytes, lock):
            raise JobExists(f"job_id {job_id!r} already exists in ledger {self.url}")
        if plan_bytes is not None and not self._store.create(self._k(job_id, "plan.json"), plan_bytes, lock):
            raise JobExists(f"job_id {job_id!r} already exists in ledger {self.url}")
        now = self._clock()
        state = {
            "job_id": job_id, "state": PENDING, "message": "", "created": now,
            "updated": now, "num_blocks": num_blocks, "cancel_requested": False,
            "blocks_done": None, "owner": owner, "markers": MARKERS_VERSION,
        }
        if not self._store.create(self._k(job_id, "state.json"), _dumps(state, "state"), lock):
            raise JobExists(f"job_id {job_id!r} already exists in ledger {self.url}")
        self._num_blocks[job_id] = num_blocks
        self._grouped[job_id] = True
        self.add_event(job_id, "created", f"job created with {num_blocks} blocks",
                       num_blocks=num_blocks)
        return self._record(state, json.loads(spec_bytes), blocks_done=0)

    def _load_state(self, job_id: str) -> dict:
        data = self._store.read(self._k(validate_job_id(job_id), "state.json"))
        if data is None:
            raise JobNotFound(job_id, self.url)
        return json.loads(data)

    def get_plan(self, job_id: str) -> dict | None:
        """The job's persisted plan (JSON object), or None for jobs recorded without one."""
        data = self._store.read(self._k(validate_job_id(job_id), "plan.json"))
        return None if data is None else json.loads(data)

    def _load_spec(self, job_id: str) -> dict:
        data = self._store.read(self._k(job_id, "spec.json"))
        if data is None:
            raise JobNotFound(job_id, self.url)
        return json.loads(data)

    def _record(self, st: dict, spec: dict, blocks_done: int | None = None) -> JobRecord:
        if blocks_done is None:
            if st["state"] in TERMINAL_STATES and st.get("blocks_done") is not None:
                blocks_done = st["blocks_done"]
            else:
                blocks_done = self.done_count(st["job_id"])
        return JobRecord(
            job_id=st["job_id"], spec=spec, state=st["state"], message=st["message"],
            created=st["created"], updated=st["updated"], num_blocks=st["num_blocks"],
            blocks_done=blocks_done, cancel_requested=bool(st["cancel_requested"]),
            owner=str(st.get("owner") or ""))

    def get_job(self, job_id: str) -> JobRecord:
        """The job's record; raises JobNotFound."""
        st = self._load_state(job_id)
        self._num_blocks[job_id] = st["num_blocks"]
        return self._record(st, self._load_spec(job_id))

    def list_jobs(self, state: str | None = None, page_size: int = 50,
                  page_token: str | None = None) -> tuple[list[JobRecord], str | None]:
        """Jobs newest first, optionally only those in ``state``.

        Returns (records, next_page_token); the token is None on the last page.
        """
        if state is not None and state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)} or None, got {state!r}")
        _check_int("page_size", page_size, 1, MAX_PAGE_SIZE)
        if page_token is not None:
            try:
                validate_job_id(page_token)
            except ValueError:
                raise ValueError(f"page_token must be a token returned by list_jobs, "
                                 f"got {page_token!r}") from None
        ids = sorted((n for n in self._store.list("jobs") if _JOB_ID_RE.match(n)), reverse=True)
        if page_token is not None:
            ids = [i for i in ids if i < page_token]
        picked: list[dict] = []
        pos = 0
        while pos < len(ids) and len(picked) < page_size:
            chunk = ids[pos:pos + page_size]
            states = self._store.read_many(self._k(i, "state.json") for i in chunk)
            for i in chunk:
                pos += 1
                data = states.get(self._k(i, "state.json"))
                if data is None:
                    continue  # being created
                st = json.loads(data)
                if state is None or st["state"] == state:
                    picked.append(st)
                    if len(picked) == page_size:
                        break
        specs = self._store.read_many(self._k(st["job_id"], "spec.json") for st in picked)
        records = [self._record(st, json.loads(specs.get(self._k(st["job_id"], "spec.json"), b"{}")))
                   for st in picked]
        next_token = picked[-1]["job_id"] if records and pos < len(ids) else None
        return records, next_token

    def _change_state(self, job_id: str, change: Callable[[dict], dict | None]) -> dict:
        """Apply ``change`` to the state atomically; returns the resulting state."""
        key = self._k(validate_job_id(job_id), "state.json")
        result: dict = {}

        def fn(old: bytes | None):
            if old is None:
                raise JobNotFound(job_id, self.url)
            st = json.loads(old)
            new = change(st)
            result["st"] = new if new is not None else st
            return KEEP if new is None else _dumps(new, "state")

        self._store.update(key, fn, self._k(job_id, ".lock"))
        return result["st"]

    def set_state(self, job_id: str, state: str, message: str = "") -> JobRecord:
        """Move the job to ``state``; raises IllegalTransition for a disallowed change."""
        if state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}, got {state!r}")
        if not isinstance(message, str):
            raise ValueError(f"message must be a string, got {type(message).__name__}")
        count = self.done_count(job_id) if state in TERMINAL_STATES else None
        changed = []

        def change(st: dict):
            cur = st["state"]
            if cur == state:
                if cur in TERMINAL_STATES or st["message"] == message:
                    return None
            elif state not in TRANSITIONS[cur]:
                allowed = ", ".join(sorted(TRANSITIONS[cur])) or "none (terminal state)"
                raise IllegalTransition(
                    f"state: job {job_id} cannot change from {cur} to {state}; "
                    f"allowed: {allowed}")
            st = dict(st, state=state, message=message, updated=self._clock())
            if count is not None:
                st["blocks_done"] = count
            changed.append(cur)
            return st

        st = self._change_state(job_id, change)
        if changed and changed[0] != state:
            self.add_event(job_id, "state", message or state, state=state, previous=changed[0])
        return self._record(st, self._load_spec(job_id))

    def request_cancel(self, job_id: str) -> JobRecord:
        """Ask workers to stop; a PENDING job becomes CANCELLED at once.

        A RUNNING job stays RUNNING with ``cancel_requested`` set until the
        service sets CANCELLED; finished jobs are left unchanged.
        """
        count = self.done_count(job_id)
        changed = []

        def change(st: dict):
            if st["state"] in TERMINAL_STATES or st["cancel_requested"]:
                return None
            st = dict(st, cancel_requested=True, updated=self._clock())
            if st["state"] == PENDING:
                st.update(state=CANCELLED, message="cancelled before start", blocks_done=count)
            changed.append(st["state"])
            return st

        st = self._change_state(job_id, change)
        if changed:
            self.add_event(job_id, "cancel_requested", "cancel requested", state=changed[0])
        return self._record(st, self._load_spec(job_id))

    def cancel_requested(self, job_id: str) -> bool:
        """True when workers should stop: cancel was requested or the job ended. One read."""
        st = self._load_state(job_id)
        return bool(st["cancel_requested"]) or st["state"] in TERMINAL_STATES

    # -- blocks
    def num_blocks(self, job_id: str) -> int:
        n = self._num_blocks.get(job_id)
        if n is None:
            n = self._load_state(job_id)["num_blocks"]
            self._num_blocks[job_id] = n
        return n

    def _check_index(self, job_id: str, index: Any) -> int:
        n = self.num_blocks(validate_job_id(job_id))
        if isinstance(index, bool) or not isinstance(index, int) or not (0 <= index < n):
            raise ValueError(f"index must be an integer in [0, {n - 1}] for job {job_id}, "
                             f"got {index!r}")
        return index

    def mark_block_done(self, job_id: str, index: int, info: dict | None = None) -> bool:
        """Write the block's completion marker; True if new, False if it was already done."""
        self._check_index(job_id, index)
        info = {} if info is None else info
        if not isinstance(info, dict):
            raise ValueError(f"info must be a dict, got {type(info).__name__}")
        data = _dumps({"index": index, "done_at": self._clock(), "info": info}, "info")
        new = self._store.create(self._k(job_id, "blocks", f"{index:08d}.done"), data,
                                 self._k(job_id, ".lock"))
        if self._is_grouped(job_id):
            self._set_bit(job_id, index)  # after the marker: a lost bit is repaired by is_done
        return new

    def block_info(self, job_id: str, index: int) -> dict | None:
        """The completion marker of a block ({index, done_at, info}) or None."""
        self._check_index(job_id, index)
        data = self._store.read(self._k(job_id, "blocks", f"{index:08d}.done"))
        return None if data is None else json.loads(data)

    def _done_set(self, job_id: str) -> set[int]:
        out = set()
        for name in self._store.list(self._k(job_id, "blocks")):
            m = _DONE_RE.match(name)
            if m:
                out.add(int(m.group(1)))
        return out

    def done_blocks(self, job_id: str) -> set[int]:
        """Indices of completed blocks (small jobs; large ones use ``done_mask``/``done_count``)."""
        self.num_blocks(validate_job_id(job_id))  # JobNotFound for unknown jobs
        if not self._is_grouped(job_id):
            return self._done_set(job_id)
        return {int(i) for i in self.done_mask(job_id).nonzero()[0]}

    def progress(self, job_id: str) -> tuple[int, int]:
        """(blocks done, blocks in total)."""
        total = self.num_blocks(validate_job_id(job_id))
        return self.done_count(job_id), total

    # -- leases
    def _lease_key(self, job_id: str, index: int) -> str:
        return self._k(job_id, "leases", f"{index:08d}.json")

    @staticmethod
    def _parse_lease(data: bytes | None) -> dict | None:
        if data is None:
            return None
        try:
            d = json.loads(data)
            float(d["expires_at"]), str(d["owner"])
            return d
        except (ValueError, KeyError, TypeError):
            return {"owner": "", "token": "", "acquired": 0.0, "expires_at": 0.0}  # unreadable: free

    def try_acquire_lease(self, job_id: str, index: int, owner: str, ttl_s: float) -> bool:
        """Take the block's lease for ``ttl_s`` seconds if it is free, expired or already ours.

        Exactly one of several concurrent callers wins (see module docs for the
        best-effort stores). After winning, re-check the block's completion marker.
        """
        self._check_index(job_id, index)
        return self._acquire(job_id, self._lease_key(job_id, index), index, owner, ttl_s)

    def _acquire(self, job_id: str, key: str, index: int, owner: str, ttl_s: float) -> bool:
        _check_owner(owner)
        ttl = _check_ttl(ttl_s)
        lock = self._k(job_id, ".lock")
        token = secrets.token_hex(8)

        def lease_bytes(now: float, acquired: float | None = None) -> bytes:
            return _dumps({"job_id": job_id, "index": index, "owner": owner, "token": token,
                           "acquired": now if acquired is None else acquired,
                           "expires_at": now + ttl}, "lease")

        if self._store.read(key) is None and self._store.create(key, lease_bytes(self._clock()), lock):
            return True

        def fn(old: bytes | None):
            cur = self._parse_lease(old)
            now = self._clock()
            if cur is None or now > cur["expires_at"]:
                return lease_bytes(now)
            if cur["owner"] == owner:  # re-entrant: extend our own lease
                return lease_bytes(now, cur.get("acquired", now))
            return KEEP

        return self._store.update(key, fn, lock)

    def try_supervise(self, job_id: str, owner: str, ttl_s: float) -> bool:
        """Take (or extend) the job's supervisor lease: one server supervises a job at a time;
        another takes over when the holder stops renewing it for ``ttl_s`` seconds."""
        self.num_blocks(validate_job_id(job_id))  # JobNotFound
        return self._acquire(job_id, self._k(job_id, "supervisor.json"), -1, owner, ttl_s)

    def release_supervisor(self, job_id: str, owner: str) -> bool:
        """Drop ``owner``'s supervisor lease (a server shutting down hands its jobs on at once)."""
        def fn(old: bytes | None):
            cur = self._parse_lease(old)
            return DELETE if cur is not None and cur["owner"] == owner else KEEP
        return self._store.update(self._k(validate_job_id(job_id), "supervisor.json"), fn, self._k(job_id, ".lock"))

    def supervisor(self, job_id: str) -> str | None:
        """The owner of the job's supervisor lease when it has not expired, else None."""
        cur = self._parse_lease(self._store.read(self._k(validate_job_id(job_id), "supervisor.json")))
        if cur is None or not cur["owner"] or self._clock() > cur["expires_at"]:
            return None
        return cur["owner"]

    def renew_lease(self, job_id: str, index: int, owner: str, ttl_s: float) -> bool:
        """Extend ``owner``'s lease to now + ``ttl_s``; False if ``owner`` no longer holds it.

        An expired lease that nobody took over is still ``owner``'s and is renewed.
        """
        self._check_index(job_id, index)
        _check_owner(owner)
        ttl = _check_ttl(ttl_s)

        def fn(old: bytes | None):
            cur = self._parse_lease(old)
            if cur is None or cur["owner"] != owner:
                return KEEP
            return _dumps(dict(cur, expires_at=self._clock() + ttl), "lease")

        return self._store.update(self._lease_key(job_id, index), fn, self._k(job_id, ".lock"))

    def release_lease(self, job_id: str, index: int, owner: str) -> bool:
        """Drop ``owner``'s lease; False if ``owner`` did not hold it."""
        self._check_index(job_id, index)
        _check_owner(owner)

        def fn(old: bytes | None):
            cur = self._parse_lease(old)
            return DELETE if cur is not None and cur["owner"] == owner else KEEP

        return self._store.update(self._lease_key(job_id, index), fn, self._k(job_id, ".lock"))

    def get_lease(self, job_id: str, index: int) -> Lease | None:
        """The block's current lease (possibly expired) or None."""
        self._check_index(job_id, index)
        cur = self._parse_lease(self._store.read(self._lease_key(job_id, index)))
        if cur is None or not cur["owner"]:
            return None
        return Lease(job_id=job_id, index=index, owner=cur["owner"], token=cur.get("token", ""),
                     acquired=float(cur.get("acquired", 0.0)), expires_at=float(cur["expires_at"]))

    # -- events
    def add_event(self, job_id: str, kind: str, message: str = "", **fields: Any) -> Event:
        """Append an event (one object per event, name sortable by time)."""
        self.num_blocks(validate_job_id(job_id))
        if not isinstance(kind, str) or not _KIND_RE.match(kind):
            raise ValueError("kind must be 1-64 characters of a-z, 0-9 and '_.-' starting "
                             f"with a letter, got {kind!r}")
        if not isinstance(message, str):
            raise ValueError(f"message must be a string, got {type(message).__name__}")
        _dumps(fields, "event fields")
        t = self._clock()
        with self._event_lock:
            ns = max(int(t * 1e9), self._event_last_ns + 1)  # monotonic per writer
            self._event_last_ns = ns
            self._event_n += 1
            event_id = f"{ns:020d}-{self._writer}-{self._event_n:08d}"
        ev = Event(id=event_id, job_id=job_id, time=t, kind=kind, message=message,
                   fields=dict(fields))
        data = _dumps({"id": ev.id, "job_id": job_id, "time": t, "kind": kind,
                       "message": message, "fields": ev.fields}, "event")
        self._store.create(self._k(job_id, "events", f"{event_id}.json"), data,
                           self._k(job_id, ".lock"))
        return ev

    def events(self, job_id: str, after: str | None = None,
               limit: int | None = None) -> tuple[list[Event], str | None]:
        """Events in order after the cursor ``after``; returns (events, cursor).

        Pass the returned cursor as ``after`` to get only newer events. Order
        across writers follows their clocks.
        """
        self.num_blocks(validate_job_id(job_id))
        if after is not None and (not isinstance(after, str) or not _EVENT_ID_RE.match(after)):
            raise ValueError(f"after must be an event id / cursor returned by events(), got {after!r}")
        if limit is not None:
            _check_int("limit", limit, 1, 10 ** 6)
        names = sorted(n for n in self._store.list(self._k(job_id, "events"))
                       if _EVENT_NAME_RE.match(n))
        if after is not None:
            names = [n for n in names if n[:-5] > after]
        if limit is not None:
            names = names[:limit]
        keys = [self._k(job_id, "events", n) for n in names]
        got = self._store.read_many(keys)
        out = []
        for k in keys:
            data = got.get(k)
            if data is None:
                continue
            d = json.loads(data)
            out.append(Event(id=d["id"], job_id=d["job_id"], time=d["time"], kind=d["kind"],
                             message=d["message"], fields=d.get("fields", {})))
        cursor = names[-1][:-5] if names else after
        return out, cursor
