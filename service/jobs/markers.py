"""Which blocks of a job are done, without listing its completion markers (a mixin of ``Ledger``).

Every block has its completion marker (``jobs/{id}/blocks/{i:08d}.done``: who did it, digest,
score), written once. Progress, resumes and the pool read *groups* instead: ``jobs/{id}/done/
{g:08d}.json`` holds a bitmap of blocks ``g·GROUP … (g+1)·GROUP − 1`` and is updated (atomic
read-modify-write) after the marker is written. A job of 10⁷ tasks has ~2 500 group objects, and a
group that is full never changes, so a ledger remembers it and never reads it again. The marker
stays the authority: a block whose marker exists but whose bit was lost (a worker killed in
between, a best-effort store) is repaired by the next worker that looks at it (``is_done``).

Jobs recorded before groups existed (state without ``"markers": 2``) are counted by listing their
markers, as before.
"""

from __future__ import annotations

import base64
import json

import numpy as np

from .records import validate_job_id
from ..volume.objects import KEEP

#: blocks per group object (a 512-byte bitmap)
GROUP = 4096
MARKERS_VERSION = 2


class DoneGroups:
    """Needs the Ledger's ``_store``, ``_k``, ``num_blocks``, ``_load_state`` and ``_done_set``."""

    def _groups_init(self) -> None:
        self._full_groups: dict[str, set[int]] = {}
        self._grouped: dict[str, bool] = {}

    def _is_grouped(self, job_id: str) -> bool:
        v = self._grouped.get(job_id)
        if v is None:
            v = int(self._load_state(job_id).get("markers", 1)) >= MARKERS_VERSION
            self._grouped[job_id] = v
        return v

    def _group_key(self, job_id: str, g: int) -> str:
        return self._k(job_id, "done", f"{g:08d}.json")

    def _group_size(self, job_id: str, g: int) -> int:
        return max(0, min(GROUP, self.num_blocks(job_id) - g * GROUP))

    @staticmethod
    def _bits(data: bytes | None) -> np.ndarray:
        if not data:
            return np.zeros(GROUP, bool)
        raw = base64.b64decode(json.loads(data)["bits"])
        return np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[:GROUP].astype(bool)

    def _set_bit(self, job_id: str, index: int) -> None:
        g, r = divmod(index, GROUP)

        def fn(old: bytes | None):
            bits = self._bits(old)
            if bits[r]:
                return KEEP
            bits[r] = True
            packed = np.packbits(bits, bitorder="little").tobytes()
            return json.dumps({"group": g, "done": int(bits.sum()),
                               "bits": base64.b64encode(packed).decode()}).encode()

        self._store.update(self._group_key(job_id, g), fn, self._k(job_id, ".lock"))

    def _group_done(self, job_id: str, g: int) -> np.ndarray | None:
        """The bitmap of group g (cached once full); None when the group object is absent."""
        full = self._full_groups.setdefault(job_id, set())
        if g in full:
            return np.ones(GROUP, bool)
        data = self._store.read(self._group_key(job_id, g))
        if data is None:
            return None
        bits = self._bits(data)
        if bits[:self._group_size(job_id, g)].all():
            full.add(g)
        return bits

    def _groups(self, job_id: str, lo: int, hi: int) -> dict[int, np.ndarray]:
        """Bitmaps of the groups over blocks [lo, hi) that exist (full ones from the cache)."""
        full = self._full_groups.setdefault(job_id, set())
        g0, g1 = lo // GROUP, (hi - 1) // GROUP + 1 if hi > lo else lo // GROUP
        wanted = [g for g in range(g0, g1) if g not in full]
        out = {g: np.ones(GROUP, bool) for g in range(g0, g1) if g in full}
        if wanted:
            if len(wanted) > 64:  # a listing tells which groups exist: read only those
                names = set(self._store.list(self._k(job_id, "done")))
                wanted = [g for g in wanted if f"{g:08d}.json" in names]
            keys = {self._group_key(job_id, g): g for g in wanted}
            for key, data in self._store.read_many(list(keys)).items():
                g = keys[key]
                bits = self._bits(data)
                if bits[:self._group_size(job_id, g)].all():
                    full.add(g)
                out[g] = bits
        return out

    def done_mask(self, job_id: str, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Done flags of blocks [lo, hi) (default: all) as a bool array."""
        n = self.num_blocks(validate_job_id(job_id))
        hi = n if hi is None else min(int(hi), n)
        lo = max(0, int(lo))
        mask = np.zeros(max(0, hi - lo), bool)
        if hi <= lo:
            return mask
        if not self._is_grouped(job_id):
            for i in self._done_set(job_id):
                if lo <= i < hi:
                    mask[i - lo] = True
            return mask
        for g, bits in self._groups(job_id, lo, hi).items():
            a, b = max(lo, g * GROUP), min(hi, (g + 1) * GROUP)
            mask[a - lo:b - lo] = bits[a - g * GROUP:b - g * GROUP]
        return mask

    def done_count(self, job_id: str, lo: int = 0, hi: int | None = None) -> int:
        """How many of blocks [lo, hi) are done (group bitmaps; no marker listing)."""
        return int(self.done_mask(job_id, lo, hi).sum())

    def is_done(self, job_id: str, index: int) -> bool:
        """True when block ``index`` is done. A marker whose group bit is missing (lost between
        the two writes) gets its bit set here."""
        self.num_blocks(validate_job_id(job_id))
        if not self._is_grouped(job_id):
            return self._store.read(self._k(job_id, "blocks", f"{index:08d}.done")) is not None
        g, r = divmod(int(index), GROUP)
        bits = self._group_done(job_id, g)
        if bits is not None and bits[r]:
            return True
        if self._store.read(self._k(job_id, "blocks", f"{index:08d}.done")) is not None:
            self._set_bit(job_id, int(index))
            return True
        return False

    def mark_grouped(self, job_id: str, indices) -> int:
        """Mark blocks done in bulk, without markers (an incremental job inheriting the blocks an
        earlier job finished); returns how many groups were written."""
        idx = np.unique(np.asarray(list(indices), dtype=np.int64))
        written = 0
        for g in np.unique(idx // GROUP):
            sel = idx[(idx // GROUP) == g] - g * GROUP

            def fn(old: bytes | None, sel=sel, g=int(g)):
                bits = self._bits(old)
                bits[sel] = True
                packed = np.packbits(bits, bitorder="little").tobytes()
                return json.dumps({"group": g, "done": int(bits.sum()),
                                   "bits": base64.b64encode(packed).decode()}).encode()

            self._store.update(self._group_key(job_id, int(g)), fn, self._k(job_id, ".lock"))
            written += 1
        return written
