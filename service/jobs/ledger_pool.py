"""Ledger queries of the warm pool (a mixin of ``ledger.Ledger``): live jobs with blocks left,
blocks under a live lease, and a cutout job's result object."""

from __future__ import annotations

from .records import MAX_PAGE_SIZE, PENDING, RUNNING, JobRecord, validate_job_id


class PoolQueries:
    """Needs the Ledger's ``_store``, ``_k``, ``_clock``, ``_parse_lease``, ``num_blocks`` and
    ``list_jobs``."""

    def pending_jobs(self) -> list[JobRecord]:
        """Live jobs (PENDING or RUNNING, no cancel requested) with blocks left, oldest first:
        what a pool worker may lease blocks of."""
        out = []
        for state in (PENDING, RUNNING):
            token = None
            while True:
                recs, token = self.list_jobs(state, MAX_PAGE_SIZE, token)
                out.extend(r for r in recs if not r.cancel_requested and r.blocks_done < r.num_blocks)
                if not token:
                    break
        return sorted(out, key=lambda r: r.job_id)

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
        """The job's result object, or None."""
        return self._store.read(self._k(validate_job_id(job_id), "result.npz"))

