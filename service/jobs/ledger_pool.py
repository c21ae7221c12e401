"""Ledger queries of the supervisor and the warm pool (a mixin of ``ledger.Ledger``): live jobs,
live jobs with blocks left, blocks under a live lease, and a cutout job's result object."""

from __future__ import annotations

import json

from .records import _JOB_ID_RE, TERMINAL_STATES, JobRecord, validate_job_id
from ..volume.objects import DELETE, KEEP


class PoolQueries:
    """Needs the Ledger's ``_store``, ``_k``, ``_clock``, ``_parse_lease``, ``num_blocks``,
    ``_record`` and ``_ended_job_ids``."""

    def live_jobs(self) -> list[JobRecord]:
        """PENDING and RUNNING jobs, oldest first: what the manager supervises each tick and what
        pool workers lease from.

        A job that has ended never becomes live again (records.TRANSITIONS), so its id is
        remembered and its state is not read again: a call costs one listing plus one read per
        live (or new) job, not one read per job the ledger has ever held (finished jobs and
        cutouts accumulate there; the supervisor ticks several times a second)."""
        ended = self._ended_job_ids
        ids = sorted(n for n in self._store.list("jobs") if _JOB_ID_RE.match(n) and n not in ended)
        states = self._store.read_many(self._k(i, "state.json") for i in ids)
        live = []
        for i in ids:
            data = states.get(self._k(i, "state.json"))
            if data is None:
                continue  # being created
            st = json.loads(data)
            if st["state"] in TERMINAL_STATES:
                ended.add(i)
            else:
                live.append(st)
        specs = self._store.read_many(self._k(st["job_id"], "spec.json") for st in live)
        return [self._record(st, json.loads(specs.get(self._k(st["job_id"], "spec.json"), b"{}")))
                for st in live]

    def pending_jobs(self) -> list[JobRecord]:
        """Live jobs (no cancel requested) with blocks left, oldest first: what a pool worker may
        lease blocks of (it polls this every second or so; see ``live_jobs`` for the cost)."""
        return [r for r in self.live_jobs() if not r.cancel_requested and r.blocks_done < r.num_blocks]

    def leased_blocks(self, job_id: str) -> set[int]:
        """Indices of blocks whose lease has not expired (being worked on now)."""
        self.num_blocks(validate_job_id(job_id))
        names = [n for n in self._store.list(self._k(job_id, "leases")) if n.endswith(".json")]
        got = self._store.read_many(self._k(job_id, "leases", n) for n in names)
        now = self._clock()
        out = set()
        for data in got.values():
            cur = self._parse_lease(data)
            if cur is not None and cur["owner"] and now <= cur["expires_at"]:
                try:
                    out.add(int(cur["index"]))
                except (KeyError, TypeError, ValueError):
                    pass
        return out

    # -- results (a cutout job's arrays: written once by the worker, read by the server)
    def put_result(self, job_id: str, data: bytes) -> bool:
        """Store the job's result object (``jobs/{id}/result.npz``); False if one exists."""
        self.num_blocks(validate_job_id(job_id))
        if not isinstance(data, (bytes, bytearray)):
            raise ValueError(f"result must be bytes, got {type(data).__name__}")
        return self._store.create(self._k(job_id, "result.npz"), bytes(data), self._k(job_id, ".lock"))

    def get_result(self, job_id: str) -> bytes | None:
        """The job's result object, or None (also once taken)."""
        return self._store.read(self._k(validate_job_id(job_id), "result.npz")) or None

    def take_result(self, job_id: str) -> bytes | None:
        """Read the job's result object and remove it from the store, or None. A cutout's arrays
        are read once, by the server waiting for them: taking them keeps a viewer's restores
        from piling up arrays in the ledger (the job's record, marker and events stay)."""
        key = self._k(validate_job_id(job_id), "result.npz")
        taken: dict = {}

        def take(cur):
            taken["data"] = cur or None
            return DELETE if cur else KEEP

        self._store.update(key, take, self._k(job_id, ".lock"))
        return taken.get("data")

