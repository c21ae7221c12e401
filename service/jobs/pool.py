"""The warm pool worker: ``emrestore worker --pool --ledger URL``.

A long-lived worker that leases any pending block of any job in the ledger — interactive jobs
(restore-regions, cutouts) before whole-dataset (batch) jobs, older jobs first within a priority —
and runs it with the Indexed-Job worker's code path (``worker.process_block``: bit-identical
output). Models stay loaded between blocks in a small LRU cache keyed by model URL and version
(model.json's ``saved`` time), so a warm worker starts an interactive block without a model load.

A killed pool worker loses only its lease: the block is re-leased after the lease expires and
re-done with the same bytes (noise seeds derive from the job seed and the block). Train jobs are
not run here (they run as batch tasks).
"""

from __future__ import annotations

import os
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass

from ..volume.reader import ReaderCache
from .ledger import Ledger
from .plans import PRIORITIES, PlanMissing, RestorePlan, plan_from_dict


class ModelCache:
    """LRU cache of loaded models keyed by (URL, version); ``loader(url)`` loads one."""

    def __init__(self, max_models: int = 2, loader=None, version=None):
        if max_models < 1:
            raise ValueError(f"--max-models: must be ≥ 1, got {max_models}")
        self.max_models = max_models
        self._loader = loader
        self._version = version
        self._models: OrderedDict[tuple[str, str], object] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _default_version(url: str) -> str:
        from ..engine.model import read_metadata
        meta = read_metadata(url)
        return f"{meta.get('saved', '')}|{meta.get('code_version', '')}"

    def get(self, url: str):
        version = (self._version or self._default_version)(url)
        key = (url, version)
        if key in self._models:
            self._models.move_to_end(key)
            self.hits += 1
            return self._models[key]
        self.misses += 1
        if self._loader is None:
            from ..engine.model import RestorationModel
            model = RestorationModel.load(url)
        else:
            model = self._loader(url)
        # a newer version of the same URL replaces the old one
        for old in [k for k in self._models if k[0] == url]:
            del self._models[old]
        self._models[key] = model
        while len(self._models) > self.max_models:
            self._models.popitem(last=False)
        return model

    def __len__(self) -> int:
        return len(self._models)


def _rank(plan) -> int:
    p = getattr(plan, "priority", "batch")
    return PRIORITIES.index(p) if p in PRIORITIES else len(PRIORITIES)


@dataclass
class PoolStats:
    blocks: int = 0
    polls: int = 0
    order: list | None = None  # (job_id, block index) in the order this worker finished them


class PoolWorker:
    """One pool worker over a ledger. ``run()`` loops until idle for ``idle_exit_s`` (None: forever)
    or ``stop()``; ``step()`` does at most one block (used by run() and by tests)."""

    def __init__(self, ledger_url: str, owner: str | None = None, max_models: int = 2,
                 lease_ttl_s: float | None = None, poll_s: float = 0.5, log=print, cache=None):
        from ..volume.stores import register_from_env
        from .worker import LEASE_TTL_S
        register_from_env()
        self.ledger = Ledger(ledger_url)
        self.owner = owner or f"{socket.gethostname()[:100]}:{os.getpid()}:pool"
        self.ttl = float(lease_ttl_s or LEASE_TTL_S)
        self.poll_s = poll_s
        self.log = log
        self.cache = cache or ModelCache(max_models)
        self.readers = ReaderCache()  # one LayerReader per source layer, reused across blocks and jobs
        self.stats = PoolStats(order=[])
        self._plans: dict[str, object] = {}
        self._bad: set[str] = set()
        self._stopped = False
        self._current: str | None = None

    def stop(self) -> None:
        self._stopped = True

    def _plan(self, job_id: str):
        plan = self._plans.get(job_id)
        if plan is None:
            plan = plan_from_dict(self.ledger.get_plan(job_id), job_id)
            self._plans[job_id] = plan
        return plan

    def candidates(self) -> list[tuple[str, RestorePlan]]:
        """Live restore/cutout jobs with blocks left, interactive first, then oldest first."""
        out = []
        for rec in self.ledger.pending_jobs():
            if rec.job_id in self._bad:
                continue
            try:
                plan = self._plan(rec.job_id)
            except (PlanMissing, ValueError, KeyError) as e:
                self._bad.add(rec.job_id)
                self.log(f"[pool {self.owner}] skipping job {rec.job_id}: {e}")
                continue
            if isinstance(plan, RestorePlan):
                out.append((rec.created, rec.job_id, plan))
        out.sort(key=lambda t: (_rank(t[2]), t[0], t[1]))
        return [(j, p) for _, j, p in out]

    def step(self) -> bool:
        """Lease and run one block of the highest-priority job that has a free one; True if a
        block was done by this worker."""
        from .worker import Cancelled, free_tasks, layer_read, process_block, report_missing
        self.stats.polls += 1
        self._current = None
        for job_id, plan in self.candidates():
            for i in free_tasks(self.ledger, job_id, plan):
                if self._stopped or self.ledger.cancel_requested(job_id):
                    break
                self._current = job_id
                model = self.cache.get(plan.model_url)
                counts: dict = {}
                reader = self.readers.get(plan.source)
                try:
                    secs = process_block(self.ledger, job_id, plan, i, model, None, self.owner, self.ttl,
                                         layer_read(reader), counts, lambda b: reader.shard_key(b.read, plan.mip))
                except Cancelled:
                    break
                finally:  # pool jobs are interactive (a few tasks): one summary event per task with missing source
                    report_missing(self.ledger, job_id, counts, f"pool worker {self.owner}, task {i}")
                if secs is None or secs == 0.0:
                    continue  # leased or finished by another worker meanwhile
                self.stats.blocks += 1
                self.stats.order.append((job_id, i))
                self.log(f"[pool {self.owner}] job {job_id} ({plan.priority}) task {i} done in {secs:.1f} s")
                return True
        return False

    def run(self, idle_exit_s: float | None = None) -> int:
        """Work until stopped, or until no block was found for ``idle_exit_s`` seconds."""
        idle_since = time.monotonic()
        while not self._stopped:
            try:
                worked = self.step()
            except Exception as e:  # noqa: BLE001 - a bad block must not stop the pool; lease expires
                from ..errors import status_of
                code, msg = status_of(e)
                self.log(f"[pool {self.owner}] error: {code}: {msg}")
                if self._current is not None:
                    try:  # the pool executor turns repeated failures into a failed job
                        self.ledger.add_event(self._current, "worker_failed",
                                              f"pool worker {self.owner}: {code}: {msg}"[:500])
                    except Exception:  # noqa: BLE001 - the ledger may be what failed
                        pass
                worked = False
                time.sleep(self.poll_s)
            if worked:
                idle_since = time.monotonic()
                continue
            if idle_exit_s is not None and time.monotonic() - idle_since >= idle_exit_s:
                break
            time.sleep(self.poll_s)
        return self.stats.blocks
