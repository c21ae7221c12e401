"""The worker: one entry point for local processes and Kubernetes Indexed Job pods.

``run_task(ledger_url, job_id, task_index, num_tasks)`` loads the job's persisted plan from the
ledger (it never re-plans) and runs, stage by stage, its contiguous share of each stage's tasks
(tasks.py: restore a shard-sized box block by block, or build lower scales): for each task
without a completion marker it takes a lease (renewed by a heartbeat), runs it, records a
completion marker with the output digest, and releases the lease. Once its share of a stage is
done it waits for the stage to complete, taking over tasks whose leases expired. Tasks are
idempotent: noise seeds derive from the job seed and each block, so a re-run writes the same bytes.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import numpy as np

from ..engine.model import RestorationModel
from ..volume import precomputed as pc
from ..volume.policy import StorePolicy
from .ledger import Ledger
from .plans import JobPlan, RestorePlan, TrainPlan, plan_from_dict
from ..volume.missing import fill_from_nearest
from ..volume.reader import LayerReader
from .tasks import (Cancelled, build_scales, read_block, restore_block, restore_cutout, restore_task,
                    write_restored)

__all__ = ["load_plan", "check_plan_stores", "restore_block", "restore_cutout", "process_block", "run_task",
           "free_tasks", "Cancelled", "store_cutout_result", "load_cutout_result", "check_info", "read_block",
           "report_missing", "missing_note", "layer_read"]

LEASE_TTL_S = float(os.environ.get("EMRESTORE_LEASE_TTL", "120"))


def load_plan(ledger: Ledger, job_id: str) -> JobPlan:
    """The job's persisted plan (never re-planned here); JobNotFound for unknown jobs, PlanMissing
    for jobs of older versions."""
    ledger.num_blocks(job_id)  # JobNotFound
    return plan_from_dict(ledger.get_plan(job_id), job_id)


def check_plan_stores(plan: JobPlan, policy: StorePolicy) -> None:
    """Workers re-check every URL of the plan they are handed against the store policy."""
    if isinstance(plan, RestorePlan):
        urls = [("source", plan.source), ("output", plan.output), ("model", plan.model_url),
                ("uncertainty_output", plan.uncertainty_output)]
    else:
        urls = [("source", plan.source), ("output_model", plan.output_model), ("base_model", plan.base_model),
                ("target", plan.target)]
    for field, url in urls:
        if url:
            policy.check(url, field)


class _Heartbeat:
    """Renews a block lease every ttl/3 seconds while the block is processed."""

    def __init__(self, ledger: Ledger, job_id: str, index: int, owner: str, ttl: float):
        self.args = (job_id, index, owner, ttl)
        self.ledger = ledger
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        job_id, index, owner, ttl = self.args
        while not self.stop.wait(ttl / 3):
            self.ledger.renew_lease(job_id, index, owner, ttl)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)


#: jobs for which this process has already reported a block that needs fine-tuning (one event
#: per worker process and job, not one per block of a dataset the model does not fit); a
#: long-lived pool worker forgets them after ``_FLAGGED_JOBS_KEPT`` jobs (at worst one more event)
_flagged_jobs: set[str] = set()
_FLAGGED_JOBS_KEPT = 1024


def check_info(res) -> dict:
    """A block marker's fields from the restore's needs-fine-tuning check: ``score`` and
    ``needs_finetuning``, or none when the check did not run (no uncertainty, no error head)."""
    if res is None or res.score is None:
        return {}
    return {"score": float(res.score), "needs_finetuning": bool(res.needs_finetuning)}


def layer_read(reader: LayerReader):
    """A ``read(plan, block)`` function over one reader (one per worker and layer: shard indexes
    and decoded chunks are reused across blocks)."""
    return lambda plan, block: reader.read(block.read, plan.mip)


def finish_task(ledger: Ledger, job_id: str, plan: RestorePlan, i: int, model, owner: str,
                cancelled=lambda: False, read=read_block, counts: dict | None = None, order=None) -> None:
    """Run task i and record its completion marker: restore it (stage 0; a cutout's arrays go to
    the ledger, read back by the server) or build its scales from the one below (later stages).
    With an uncertainty layer or samples ≥ 2 the marker holds the task's worst needs-fine-tuning
    score; the first flagged task a worker process restores for a job also becomes a
    ``needs_finetuning`` job event."""
    t0 = time.time()
    task = plan.blocks.task(i)
    info: dict = {"worker": owner}
    if not task.restores:
        info["sha256"] = build_scales(plan, task)
        info["scale"] = task.stage.base_mip
    elif plan.kind == "cutout":
        block = plan.blocks.blocks_in(task)[0]
        source = read(plan, block)
        mean, std, res = restore_cutout(plan, block, model, source)
        if getattr(source, "missing", None):
            info["source_missing"] = "all" if source.all_missing else "part"
        info.update(store_cutout_result(ledger, job_id, mean, std, res))
        info["voxels"] = int(mean.size)
    else:
        mean, std, res = restore_task(plan, task, model, cancelled, read, counts, order)
        if mean is None:  # no source under any of its blocks (missing tissue): nothing written
            info.update(voxels=0, source_missing="all", seconds=round(time.time() - t0, 3))
            ledger.mark_block_done(job_id, i, info)
            return
        info["sha256"] = write_restored(plan, task, mean, std)
        info["voxels"] = int(mean.size)
        info.update(check_info(res))
        if info.get("needs_finetuning") and job_id not in _flagged_jobs:
            if len(_flagged_jobs) >= _FLAGGED_JOBS_KEPT:
                _flagged_jobs.clear()
            _flagged_jobs.add(job_id)
            ledger.add_event(job_id, "needs_finetuning",
                             f"block {i}: needs-fine-tuning score {res.score:.2f} (the model mispredicts "
                             f"its own error on this data by that factor; fine-tune it on this dataset)",
                             block=i, score=float(res.score))
    info["seconds"] = round(time.time() - t0, 3)
    ledger.mark_block_done(job_id, i, info)


def process_block(ledger: Ledger, job_id: str, plan: RestorePlan, i: int, model,
                  data=None, owner: str = "", ttl: float = LEASE_TTL_S, read=None,
                  counts: dict | None = None, order=None) -> float | None:
    """Lease task i, run it, mark it done and release the lease: the one code path of
    Indexed-Job tasks and pool workers (bit-identical output). Returns the seconds it took, 0.0
    when it was already done (by anyone), None when another worker holds its lease. ``data``
    (the source of a one-block task) or ``read(plan, block)`` supplies source voxels (arrays, or
    the reader's Cutouts, which say what is missing); ``counts`` and ``order``: see finish_task."""
    if ledger.is_done(job_id, i):
        return 0.0
    if not ledger.try_acquire_lease(job_id, i, owner, ttl):
        return None
    try:
        if ledger.is_done(job_id, i):  # finished by another worker meanwhile
            return 0.0
        reader = read or read_block
        if data is not None:
            reader = (lambda p, b, _d=data: _d)  # noqa: E731 - the block already read
        with _Heartbeat(ledger, job_id, i, owner, ttl):
            t0 = time.time()
            finish_task(ledger, job_id, plan, i, model, owner, lambda: ledger.cancel_requested(job_id), reader,
                        counts, order)
            secs = time.time() - t0
        return max(secs, 1e-6)
    finally:
        ledger.release_lease(job_id, i, owner)


def free_tasks(ledger: Ledger, job_id: str, plan: RestorePlan, window: int = 65536):
    """Tasks of the job's current stage (the first incomplete one) that are neither done nor
    under a live lease, lowest first; nothing of a stage whose predecessor is incomplete. Reads
    the done bitmaps a window at a time (full groups are cached, never read again)."""
    busy = ledger.leased_blocks(job_id)
    for r in stage_ranges(plan):
        complete = True
        for lo in range(r.start, r.stop, window):
            hi = min(r.stop, lo + window)
            mask = ledger.done_mask(job_id, lo, hi)
            for off in np.flatnonzero(~mask):
                complete = False
                if lo + int(off) not in busy:
                    yield lo + int(off)
        if not complete:
            return


def stage_ranges(plan: RestorePlan) -> list[range]:
    """The task ranges of the plan's stages, in order (explicit blocks: one range)."""
    if not plan.blocks.stages:
        return [range(plan.blocks.num_tasks)]
    return [plan.blocks.stage_tasks(s.index) for s in plan.blocks.stages]


def my_share(r: range, task_index: int, num_tasks: int) -> range:
    """Task I of T takes a contiguous share of a stage (neighbouring cells: reads stay within
    the same source shards, and its done bits within its own groups)."""
    n = len(r)
    return range(r.start + n * task_index // num_tasks, r.start + n * (task_index + 1) // num_tasks)


def store_cutout_result(ledger: Ledger, job_id: str, mean: np.ndarray, std: np.ndarray | None,
                        res) -> dict:
    """Put a cutout's arrays into the ledger (``jobs/{id}/result.npz``); returns the marker info."""
    import io
    buf = io.BytesIO()
    arrays = {"mean": np.ascontiguousarray(mean)}
    if std is not None:
        arrays["std"] = np.ascontiguousarray(std)
    np.savez(buf, **arrays)
    ledger.put_result(job_id, buf.getvalue())
    info: dict = {}
    if res is not None:
        info["restore_seconds"] = round(float(res.seconds), 3)
        info.update(check_info(res))
    return info


def load_cutout_result(ledger: Ledger, job_id: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A cutout's arrays, taken out of the ledger (read once; the store keeps no copy)."""
    import io
    data = ledger.take_result(job_id)
    if data is None:
        raise FileNotFoundError(f"job {job_id}: no cutout result in the ledger")
    with np.load(io.BytesIO(data)) as z:
        return z["mean"], (z["std"] if "std" in z.files else None)


def run_task(ledger_url: str, job_id: str, task_index: int, num_tasks: int | None = None,
             owner: str | None = None, lease_ttl_s: float | None = None, log=print) -> int:
    """Run this worker's share of every stage; between stages, wait until the stage is complete,
    taking over tasks whose leases expired (a dead worker's). Returns the tasks this call did."""
    from ..volume.stores import register_from_env
    register_from_env()  # S3-compatible aliases named in $EMRESTORE_S3_ENDPOINTS
    ledger = Ledger(ledger_url)
    plan = load_plan(ledger, job_id)
    check_plan_stores(plan, StorePolicy.from_env())
    if isinstance(plan, TrainPlan):
        return run_training(ledger, job_id, plan, log=log)
    T = int(num_tasks or plan.num_tasks)
    if not 0 <= task_index < T:
        raise ValueError(f"task-index: {task_index} must be in [0, {T})")
    owner = owner or f"{socket.gethostname()}:{os.getpid()}:{task_index}"
    ttl = lease_ttl_s or LEASE_TTL_S
    model = RestorationModel.load(plan.model_url)
    done_count = 0
    poll = min(2.0, ttl / 8)
    reader = LayerReader(plan.source)  # one per worker and layer: shard indexes and chunks reused
    read, counts = layer_read(reader), {}

    def order(block):  # a task's blocks in the order of the source shard their read starts in
        return reader.shard_key(block.read, plan.mip)

    def run(i: int) -> bool | None:
        nonlocal done_count
        try:
            r = process_block(ledger, job_id, plan, i, model, None, owner, ttl, read, counts, order)
        except Cancelled:
            return None
        if r is None:
            return False
        if r > 0:
            done_count += 1
            log(f"[worker {task_index}] task {i} done in {r:.1f} s")
        return True

    for r in stage_ranges(plan):
        for i in my_share(r, task_index, T):
            if ledger.cancel_requested(job_id):
                log(f"[worker {task_index}] job cancelled; stopping")
                report_missing(ledger, job_id, counts, f"task {task_index}")
                return done_count
            if run(i) is False:
                log(f"[worker {task_index}] task {i} is leased by another worker; coming back to it")
        # the stage's rest: tasks of workers that died (expired leases) or are still running
        wait = 0.05
        while ledger.done_count(job_id, r.start, r.stop) < len(r):
            if ledger.cancel_requested(job_id):
                log(f"[worker {task_index}] job cancelled; stopping")
                report_missing(ledger, job_id, counts, f"task {task_index}")
                return done_count
            took = False
            for i in free_tasks(ledger, job_id, plan):
                if not r.start <= i < r.stop:
                    break
                res = run(i)
                if res is None:
                    report_missing(ledger, job_id, counts, f"task {task_index}")
                    return done_count
                took = took or res
            if not took:
                time.sleep(wait)
                wait = min(poll, wait * 2)
        report_missing(ledger, job_id, counts, f"task {task_index}")
    return done_count


def missing_note(events) -> str:
    """The finished job's note summing its ``missing_source`` events (empty when none)."""
    found = [e for e in events if e.kind == "missing_source"]
    skipped = sum(int(e.fields.get("skipped", 0)) for e in found)
    partial = sum(int(e.fields.get("partial", 0)) for e in found)
    if not (skipped or partial):
        return ""
    return f"; {skipped} skipped and {partial} partly written: source chunks missing (no data written as 0)"


def report_missing(ledger: Ledger, job_id: str, counts: dict, who: str) -> None:
    """One ``missing_source`` event summing the blocks a worker found without source chunks
    (skipped: nothing written) or partly without (their no-data voxels written as 0)."""
    skipped, partial = int(counts.get("skipped", 0)), int(counts.get("partial", 0))
    if skipped or partial:
        ledger.add_event(job_id, "missing_source",
                         f"{who}: {skipped} block(s) skipped, their source chunks do not exist (missing "
                         f"tissue; nothing written); {partial} block(s) read partly missing source chunks "
                         f"(output voxels restored from them written as 0: no data)",
                         skipped=skipped, partial=partial)
        counts.clear()


def _training_volume(plan: TrainPlan) -> np.ndarray:
    """The training region; missing chunks show the nearest present tissue (none: refused)."""
    from ..errors import FailedPrecondition
    cut = LayerReader(plan.source).read(plan.read, plan.mip)
    if cut.all_missing:
        raise FailedPrecondition("region", f"no source chunk exists in the training region {plan.read} "
                                           "(missing tissue); choose a region inside the tissue")
    if cut.missing:
        return fill_from_nearest(cut.data, cut.present, tuple(plan.voxel_size_nm)[::-1])
    return cut.data


def run_training(ledger: Ledger, job_id: str, plan: TrainPlan, log=print) -> int:
    """A train job is one block: read the training region, train, save the model."""
    from ..engine.pairs import IsotropicPairs, StackGapPairs
    from ..engine.tasks import make_task
    from ..engine.training import TrainConfig, train
    if ledger.is_done(job_id, 0):
        return 0
    owner = f"{socket.gethostname()}:{os.getpid()}:train"
    if not ledger.try_acquire_lease(job_id, 0, owner, LEASE_TTL_S):
        return 0
    try:
        vol = _training_volume(plan)
        task = make_task("isotropic", plan.factor)
        if plan.base_model:
            model = RestorationModel.load(plan.base_model)
            if plan.target:
                hi = pc.read_zyx(plan.target, plan.target_box.start, plan.target_box.stop)
                pairs = StackGapPairs(model.task, vol, hi)
            else:
                pairs = IsotropicPairs(model.task, vol, self_supervised=True)
            mode = "finetune"
            model.training = {"base": {"url": plan.base_model}}
        else:
            model = RestorationModel.create(task, plan.preset, voxel_size_nm=plan.voxel_size_nm,
                                            seed=plan.seed)
            # the physical gap: rows z/k apart at the source's lateral pixel (refused if out of range)
            pairs = IsotropicPairs(task, vol, self_supervised=True, voxel_size_nm=plan.voxel_size_nm)
            model.learn_gap(plan.voxel_size_nm, zoom=pairs.zoom)
            mode = "self-supervised"
        model.input_norm = model.target_norm = pairs.norm
        model.name = plan.output_model.rstrip("/").rsplit("/", 1)[-1]
        cfg = TrainConfig(steps=plan.steps, batch_size=plan.batch_size, patch=plan.patch,
                          lr=2e-4 if mode == "finetune" else 1e-3,
                          warmup=min(100, max(1, plan.steps // 5)), seed=plan.seed,
                          checkpoint_every=max(50, plan.steps // 10),
                          device=os.environ.get("EMRESTORE_DEVICE", "auto"))
        with _Heartbeat(ledger, job_id, 0, owner, LEASE_TTL_S):
            losses: list[float] = []
            train(model, pairs, cfg, out_url=plan.output_model, resume=True, progress=False,
                  mode=mode, log=losses)
        ledger.mark_block_done(job_id, 0, {"worker": owner, "final_loss": model.training.get("final_loss"),
                                           "model": plan.output_model})
        ledger.add_event(job_id, "trained", f"model saved to {plan.output_model} "
                                            f"(final loss {model.training.get('final_loss')})")
        return 1
    finally:
        ledger.release_lease(job_id, 0, owner)
