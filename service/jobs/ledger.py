"""Durable job ledger kept in a store reached through fsspec.

Layout under the ledger root URL::

    jobs/{job_id}/spec.json                  immutable job spec (JSON object)
    jobs/{job_id}/state.json                 state, message, times, counters
    jobs/{job_id}/blocks/{index:08d}.done    completion marker of one block
    jobs/{job_id}/leases/{index:08d}.json    lease on one block (owner, expiry)
    jobs/{job_id}/events/{ns:020d}-{writer}-{n:08d}.json   one object per event

Concurrency guarantees depend on the store (see ``Ledger.lease_guarantee``):

* local files (``file://`` or a plain path): new objects are published with
  ``os.link`` of a complete temp file (atomic exclusive create); every
  read-modify-write (state changes, lease takeover/renew/release) runs under an
  ``fcntl.flock`` on ``jobs/{job_id}/.lock`` and replaces files with
  write-temp + ``os.replace``. Exact between threads and processes on one host
  and on network filesystems whose locks work (NFSv4).
* S3 and S3-compatible stores: conditional PUT (``If-None-Match: *`` to
  create, ``If-Match: <etag>`` to replace) and conditional DELETE, probed once
  per ledger. Exact when the server enforces the conditions.
* S3 without conditional writes, and other fsspec stores: write, wait
  ``settle_s``, read back and confirm. Two writers can both win when one reads
  before the other's write and writes after the other's read-back; use it only
  where a duplicated block is acceptable (blocks are idempotent).
* ``memory://``: read-modify-write under a process-wide lock (exact in one
  process; the store is process-local anyway).

Lease expiry compares wall-clock times written by different hosts, so clocks
must be roughly in sync (well under the lease TTL).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import fsspec
import fsspec.asyn

__all__ = [
    "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED",
    "STATES", "TERMINAL_STATES", "TRANSITIONS",
    "JobNotFound", "JobExists", "IllegalTransition",
    "JobRecord", "Event", "Lease", "Ledger",
    "new_job_id", "validate_job_id",
]

PENDING = "PENDING"
RUNNING = "RUNNING"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
STATES = (PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})
# Allowed changes to a different state. Setting the current state again is
# allowed too: it updates the message of a live job and is a no-op on a
# finished one.
TRANSITIONS = {
    PENDING: frozenset({RUNNING, SUCCEEDED, FAILED, CANCELLED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}

MAX_BLOCKS = 10 ** 8          # block index is written with 8 digits
MAX_TTL_S = 7 * 24 * 3600.0
MAX_PAGE_SIZE = 1000

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_JOB_ID_RE = re.compile(r"^[0-7][0-9a-hjkmnp-tv-z]{25}$")
_OWNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
_KIND_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_EVENT_NAME_RE = re.compile(r"^(\d{20})-([0-9a-f]{8})-(\d{8})\.json$")
_EVENT_ID_RE = re.compile(r"^\d{20}-[0-9a-f]{8}-\d{8}$")
_DONE_RE = re.compile(r"^(\d{8})\.done$")


# ----------------------------------------------------------------- errors

class JobNotFound(KeyError):
    """No job with this id in the ledger."""

    def __init__(self, job_id: str, url: str = ""):
        self.job_id, self.url = job_id, url
        where = f" in ledger {url}" if url else ""
        super().__init__(f"job {job_id!r} not found{where}")

    def __reduce__(self):
        return type(self), (self.job_id, self.url)

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0])


class JobExists(ValueError):
    """A job with this id already exists."""


class IllegalTransition(ValueError):
    """The requested state change is not allowed from the current state."""


# ----------------------------------------------------------------- records

@dataclass(frozen=True)
class JobRecord:
    """A job as stored in the ledger.

    ``blocks_done`` is counted from the completion markers for live jobs and
    is the count taken when a job reached its terminal state for finished ones.
    """
    job_id: str
    spec: dict
    state: str
    message: str
    created: float
    updated: float
    num_blocks: int
    blocks_done: int
    cancel_requested: bool

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass(frozen=True)
class Event:
    """One event of a job; ``id`` is the cursor for ``Ledger.events(after=...)``."""
    id: str
    job_id: str
    time: float
    kind: str
    message: str
    fields: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Lease:
    """A lease on one block."""
    job_id: str
    index: int
    owner: str
    token: str
    acquired: float
    expires_at: float

    def expired(self, now: float) -> bool:
        return now > self.expires_at


# ----------------------------------------------------------------- ids and checks

_id_lock = threading.Lock()
_id_last = [0, 0]  # last (ms, random) handed out by this process


def new_job_id(now: float | None = None) -> str:
    """A new job id: a lowercase ULID (48-bit ms time + 80 random bits, 26 chars).

    Ids sort by creation time (strictly increasing within one process) and are
    valid DNS labels, so they can be used in Kubernetes object names.
    """
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    with _id_lock:
        if ms <= _id_last[0]:  # same millisecond (or clock went back): count up
            ms, rnd = _id_last[0], (_id_last[1] + 1) & ((1 << 80) - 1)
        else:
            rnd = secrets.randbits(80)
        _id_last[:] = [ms, rnd]
    value = (ms << 80) | rnd
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def validate_job_id(job_id: Any) -> str:
    """Return ``job_id`` if it is a ledger job id, else raise ValueError."""
    if not isinstance(job_id, str) or not _JOB_ID_RE.match(job_id):
        raise ValueError(
            f"job_id must be a 26-character lowercase ULID (digits and letters "
            f"{_CROCKFORD[10:]!r}, as made by new_job_id()), got {job_id!r}")
    return job_id


def _check_owner(owner: Any) -> str:
    if not isinstance(owner, str) or not _OWNER_RE.match(owner):
        raise ValueError(
            "owner must be 1-128 characters of letters, digits and '_.:@-' "
            f"starting with a letter or digit, got {owner!r}")
    return owner


def _check_ttl(ttl_s: Any) -> float:
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) \
            or not (0 < ttl_s <= MAX_TTL_S):
        raise ValueError(f"ttl_s must be a number in (0, {MAX_TTL_S:g}] seconds, got {ttl_s!r}")
    return float(ttl_s)


def _check_int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (lo <= value <= hi):
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _dumps(obj: Any, what: str) -> bytes:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"),
                          allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serializable: {exc}") from None


# ----------------------------------------------------------------- stores

_KEEP = object()     # update(): leave the object as it is
_DELETE = object()   # update(): remove the object


def _open_fs(url: str, storage_options: dict | None = None):
    """(fs, path) for a ledger URL: service.volume.stores.open_fs when present."""
    if storage_options is None:
        try:
            from service.volume import stores  # type: ignore
        except ModuleNotFoundError as exc:
            if exc.name not in ("service.volume.stores",):
                raise
            stores = None
        open_fs = getattr(stores, "open_fs", None)
        if open_fs is not None:
            return open_fs(url)
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


class _FsStore:
    """Generic fsspec store: weak read-modify-write (write, settle, read back)."""

    guarantee = "best-effort"
    _locks: dict = {}
    _locks_guard = threading.Lock()

    def __init__(self, fs, root: str, settle_s: float):
        self.fs = fs
        self.root = root.rstrip("/")
        self.settle_s = settle_s
        with self._locks_guard:  # one lock per store root shared by ledgers of this process
            self._lock = self._locks.setdefault((type(fs).__name__, self.root), threading.RLock())

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def read(self, key: str) -> bytes | None:
        try:
            data = self.fs.cat_file(self.path(key))
        except FileNotFoundError:
            return None
        return data or None   # an empty object is a deleted one (tombstone)

    def read_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        keys = list(keys)
        if not keys:
            return {}
        paths = {self.path(k): k for k in keys}
        got = self.fs.cat(list(paths), on_error="omit")
        out = {}
        for p, data in got.items():
            k = paths.get(p) or paths.get(self.fs._strip_protocol(p))
            if k is not None and isinstance(data, bytes) and data:
                out[k] = data
        return out

    def list(self, dir_key: str) -> list[str]:
        path = self.path(dir_key)
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]

    def _put(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self.path(key), data)

    def create(self, key: str, data: bytes, lock_key: str) -> bool:
        with self._lock:
            if self.read(key) is not None:
                return False
            self._put(key, data)
            return self._confirm(key, data)

    def update(self, key: str, fn: Callable, lock_key: str) -> bool:
        with self._lock:
            for _ in range(20):
                old = self.read(key)
                new = fn(old)
                if new is _KEEP:
                    return False
                if new is _DELETE:
                    if old is not None:
                        self._put(key, b"")
                    return True
                self._put(key, new)
                if self._confirm(key, new):
                    return True
            raise TimeoutError(f"ledger object {key} kept changing under concurrent writers")

    def _confirm(self, key: str, data: bytes) -> bool:
        if self.settle_s:
            time.sleep(self.settle_s)
        return self.read(key) == data


class _MemoryStore(_FsStore):
    """memory:// store: exact under a process-wide lock."""

    guarantee = "process-lock"

    def _confirm(self, key: str, data: bytes) -> bool:
        return True


class _LocalStore:
    """Local files: atomic exclusive create (link), flock'd read-modify-write."""

    guarantee = "local-lock"

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)

    def path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/"))

    def read(self, key: str) -> bytes | None:
        try:
            with open(self.path(key), "rb") as f:
                return f.read() or None
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        out = {}
        for k in keys:
            data = self.read(k)
            if data is not None:
                out[k] = data
        return out

    def list(self, dir_key: str) -> list[str]:
        try:
            return [n for n in os.listdir(self.path(dir_key)) if not n.startswith(".")]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _temp(self, final: str, data: bytes) -> str:
        d, name = os.path.split(final)
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".{name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _write(self, key: str, data: bytes) -> None:
        final = self.path(key)
        tmp = self._temp(final, data)
        try:
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _flock(self, lock_key: str):
        import fcntl
        path = self.path(lock_key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor drops the lock

    def create(self, key: str, data: bytes, lock_key: str) -> bool:
        final = self.path(key)
        tmp = self._temp(final, data)
        try:
            os.link(tmp, final)  # fails if final exists; readers never see a partial file
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP,
                                 errno.EMLINK, errno.EXDEV):
                raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        # No hard links here: exclusive create under the lock, so locked
        # readers never see the file half-written.
        with self._flock(lock_key):
            try:
                fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True

    def update(self, key: str, fn: Callable, lock_key: str) -> bool:
        with self._flock(lock_key):
            old = self.read(key)
            new = fn(old)
            if new is _KEEP:
                return False
            if new is _DELETE:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path(key))
                return True
            self._write(key, new)
            return True


def _s3_conflict(exc: BaseException) -> bool:
    """True when an S3 error means a failed condition (someone else wrote first)."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    resp = getattr(cause, "response", None) or {}
    code = (resp.get("Error") or {}).get("Code")
    status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
        return True
    if code is None and status is None:
        return isinstance(exc, FileExistsError)
    return status in (409, 412)


class _S3Store(_FsStore):
    """S3 through s3fs: conditional PUT/DELETE when the server enforces them."""

    def __init__(self, fs, root: str, settle_s: float, conditional: bool | None):
        super().__init__(fs, root, settle_s)
        self._conditional = conditional
        self._conditional_delete = conditional
        self._probe_lock = threading.Lock()

    @property
    def guarantee(self) -> str:  # type: ignore[override]
        return "s3-conditional" if self._cond() else "best-effort"

    def _bk(self, key: str) -> tuple[str, str]:
        bucket, k, _ = self.fs.split_path(self.path(key))
        return bucket, k

    def _call(self, method: str, key: str, **kw):
        bucket, k = self._bk(key)
        return self.fs.call_s3(method, Bucket=bucket, Key=k, **kw)

    def list(self, dir_key: str) -> list[str]:
        try:
            entries = self.fs.ls(self.path(dir_key), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]

    def _get(self, key: str) -> tuple[bytes | None, str | None]:
        """(data, etag); data None when missing or a tombstone."""
        bucket, k = self._bk(key)
        fs = self.fs

        async def go():
            try:
                resp = await fs._call_s3("get_object", Bucket=bucket, Key=k)
            except FileNotFoundError:
                return None, None
            try:
                body = await resp["Body"].read()
            finally:
                resp["Body"].close()
            return body, resp.get("ETag")

        data, etag = fsspec.asyn.sync(fs.loop, go)
        return (data or None), etag

    def _cond(self) -> bool:
        if self._conditional is None:
            with self._probe_lock:
                if self._conditional is None:
                    self._probe()
        return bool(self._conditional)

    def _probe(self) -> None:
        """Check once whether the server enforces If-None-Match / If-Match."""
        key = f"_probe/{uuid.uuid4().hex}"
        wrong = '"00000000000000000000000000000000"'

        def refused(method: str, **kw) -> bool:
            try:
                self._call(method, key, **kw)
            except Exception as exc:  # noqa: BLE001 - any refusal counts
                return _s3_conflict(exc)
            return False

        self._call("put_object", key, Body=b"probe")
        try:
            create_ok = refused("put_object", Body=b"x", IfNoneMatch="*")
            replace_ok = refused("put_object", Body=b"x", IfMatch=wrong)
            delete_ok = refused("delete_object", IfMatch=wrong)
        finally:
            with contextlib.suppress(Exception):
                self._call("delete_object", key)
        self._conditional = create_ok and replace_ok
        self._conditional_delete = self._conditional and delete_ok

    def create(self, key: str, data: bytes, lock_key: str) -> bool:
        if not self._cond():
            return super().create(key, data, lock_key)
        try:
            self._call("put_object", key, Body=data, IfNoneMatch="*")
            return True
        except Exception as exc:  # noqa: BLE001
            if not _s3_conflict(exc):
                raise
            # a retried PUT may have hit its own first write
            old, _ = self._get(key)
            if old == data:
                return True
            if old is not None:
                return False
        # a tombstone is there: replace it conditionally
        return self.update(key, lambda old: data if old is None else _KEEP, lock_key)

    def update(self, key: str, fn: Callable, lock_key: str) -> bool:
        if not self._cond():
            return super().update(key, fn, lock_key)
        for attempt in range(50):
            old, etag = self._get(key)
            new = fn(old)
            if new is _KEEP:
                return False
            try:
                if new is _DELETE:
                    if old is None:
                        return True
                    if self._conditional_delete:
                        self._call("delete_object", key, IfMatch=etag)
                    else:
                        self._call("put_object", key, Body=b"", IfMatch=etag)
                elif etag is None:
                    self._call("put_object", key, Body=new, IfNoneMatch="*")
                else:
                    self._call("put_object", key, Body=new, IfMatch=etag)
                self.fs.invalidate_cache(self.path(key))
                return True
            except Exception as exc:  # noqa: BLE001
                if not _s3_conflict(exc):
                    raise
            time.sleep(random.uniform(0, min(0.5, 0.01 * 2 ** attempt)))
        raise TimeoutError(f"ledger object {key} kept changing under concurrent writers")


def _make_store(fs, path: str, settle_s: float, conditional: bool | None):
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return _LocalStore(path)
    if "memory" in protocols:
        return _MemoryStore(fs, path, 0.0)
    if "s3" in protocols or "s3a" in protocols:
        return _S3Store(fs, path, settle_s, conditional)
    return _FsStore(fs, path, settle_s)


# ----------------------------------------------------------------- ledger

class Ledger:
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
        fs, path = _open_fs(url, storage_options)
        self._store = _make_store(fs, path, settle_s, conditional_writes)
        self._clock = clock
        self._num_blocks: dict[str, int] = {}
        self._writer = secrets.token_hex(4)
        self._event_lock = threading.Lock()
        self._event_n = 0
        self._event_last_ns = 0

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
    def create_job(self, spec: dict, num_blocks: int, job_id: str | None = None) -> JobRecord:
        """Record a new PENDING job; raises JobExists when ``job_id`` is taken."""
        if not isinstance(spec, dict):
            raise ValueError(f"spec must be a JSON object (dict), got {type(spec).__name__}")
        spec_bytes = _dumps(spec, "spec")
        _check_int("num_blocks", num_blocks, 0, MAX_BLOCKS)
        job_id = new_job_id(self._clock()) if job_id is None else validate_job_id(job_id)
        lock = self._k(job_id, ".lock")
        if not self._store.create(self._k(job_id, "spec.json"), spec_bytes, lock):
            raise JobExists(f"job_id {job_id!r} already exists in ledger {self.url}")
        now = self._clock()
        state = {
            "job_id": job_id, "state": PENDING, "message": "", "created": now,
            "updated": now, "num_blocks": num_blocks, "cancel_requested": False,
            "blocks_done": None,
        }
        if not self._store.create(self._k(job_id, "state.json"), _dumps(state, "state"), lock):
            raise JobExists(f"job_id {job_id!r} already exists in ledger {self.url}")
        self._num_blocks[job_id] = num_blocks
        self.add_event(job_id, "created", f"job created with {num_blocks} blocks",
                       num_blocks=num_blocks)
        return self._record(state, json.loads(spec_bytes), blocks_done=0)

    def _load_state(self, job_id: str) -> dict:
        data = self._store.read(self._k(validate_job_id(job_id), "state.json"))
        if data is None:
            raise JobNotFound(job_id, self.url)
        return json.loads(data)

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
                blocks_done = len(self._done_set(st["job_id"]))
        return JobRecord(
            job_id=st["job_id"], spec=spec, state=st["state"], message=st["message"],
            created=st["created"], updated=st["updated"], num_blocks=st["num_blocks"],
            blocks_done=blocks_done, cancel_requested=bool(st["cancel_requested"]))

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
            return _KEEP if new is None else _dumps(new, "state")

        self._store.update(key, fn, self._k(job_id, ".lock"))
        return result["st"]

    def set_state(self, job_id: str, state: str, message: str = "") -> JobRecord:
        """Move the job to ``state``; raises IllegalTransition for a disallowed change."""
        if state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}, got {state!r}")
        if not isinstance(message, str):
            raise ValueError(f"message must be a string, got {type(message).__name__}")
        count = len(self.done_blocks(job_id)) if state in TERMINAL_STATES else None
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
        count = len(self.done_blocks(job_id))
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
        return self._store.create(self._k(job_id, "blocks", f"{index:08d}.done"), data,
                                  self._k(job_id, ".lock"))

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
        """Indices of completed blocks, from one listing of the markers."""
        self.num_blocks(validate_job_id(job_id))  # JobNotFound for unknown jobs
        return self._done_set(job_id)

    def progress(self, job_id: str) -> tuple[int, int]:
        """(blocks done, blocks in total)."""
        total = self.num_blocks(validate_job_id(job_id))
        return len(self._done_set(job_id)), total

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
        _check_owner(owner)
        ttl = _check_ttl(ttl_s)
        key = self._lease_key(job_id, index)
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
            return _KEEP

        return self._store.update(key, fn, lock)

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
                return _KEEP
            return _dumps(dict(cur, expires_at=self._clock() + ttl), "lease")

        return self._store.update(self._lease_key(job_id, index), fn, self._k(job_id, ".lock"))

    def release_lease(self, job_id: str, index: int, owner: str) -> bool:
        """Drop ``owner``'s lease; False if ``owner`` did not hold it."""
        self._check_index(job_id, index)
        _check_owner(owner)

        def fn(old: bytes | None):
            cur = self._parse_lease(old)
            return _DELETE if cur is not None and cur["owner"] == owner else _KEEP

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
