"""The worker: one entry point for local processes and Kubernetes Indexed Job pods.

``run_task(ledger_url, job_id, task_index, num_tasks)`` loads the job's persisted plan from the
ledger (it never re-plans) and processes blocks task_index, task_index + T, … of it: for each block without a completion marker it takes a lease
(renewed by a heartbeat), reads the source region (the next block is read while the model works
on this one), restores it, writes the output chunks (mip 0, lower scales, uncertainty), records a
completion marker with the output digest, and releases the lease. Blocks are idempotent: noise
seeds derive from the job seed and the block, so a re-run writes the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..engine.model import RestorationModel
from ..engine.normalize import IntensityNorm
from ..engine.restore import derive_seed, restore
from ..volume import precomputed as pc
from ..volume.blocks import Block, assemble_isotropic, crop_to_write_box
from ..volume.policy import StorePolicy
from .ledger import Ledger
from .plans import JobPlan, RestorePlan, TrainPlan, plan_from_dict

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


def restore_block(plan: RestorePlan, block: Block, model: RestorationModel, source: np.ndarray):
    """Restore one block's read box; returns (mean, std, result) cropped to the write box
    (``result`` carries timing and score; None when nothing had to be generated)."""
    norm = IntensityNorm.from_dict(plan.norm)
    fx, _, k = plan.scale_xyz
    # noise seed: job seed + the block's lateral origin; images (gaps/sections) add their global index
    seed = derive_seed(plan.seed, block.read.start[1], block.read.start[2])
    if k > 1 and source.shape[0] == 1:
        # the layer's last chunk can hold just the last section: nothing to generate
        mean = assemble_isotropic(source.astype(plan.output_dtype), block.sections[0], block, k)
        return mean, (np.zeros(mean.shape, np.float32) if plan.samples > 1 else None), None
    extra = {"estimate": plan.estimate} if plan.estimate else {}
    # the source's voxel size (the engine refuses a z/xy ratio the model did not learn)
    source_nm_xyz = tuple(r * s for r, s in zip(plan.output_resolution_nm_xyz, plan.scale_xyz))
    res = restore(model, source, sampler=plan.sampler, steps=plan.steps, samples=plan.samples,
                  seed=seed, norm=norm, tile=plan.tile, overlap=plan.overlap,
                  image_ids_offset=block.read.start[0], out_dtype=plan.output_dtype,
                  device=os.environ.get("EMRESTORE_DEVICE", "auto"), voxel_size_nm=source_nm_xyz, **extra)
    if k > 1:
        mean = assemble_isotropic(res.mean, block.sections[0], block, k)
        std = assemble_isotropic(res.std, block.sections[0], block, k) if res.std is not None else None
    else:
        mean = crop_to_write_box(res.mean, block, (fx, fx, 1))
        std = crop_to_write_box(res.std, block, (fx, fx, 1)) if res.std is not None else None
    return mean, std, res


def write_block(plan: RestorePlan, block: Block, mean: np.ndarray, std: np.ndarray | None) -> str:
    """Write the block's chunks in every scale of the output (and uncertainty) layer."""
    pc.write_zyx(plan.output, block.write.start, mean)
    pc.write_downsampled(plan.output, block.write.start, mean)
    if plan.uncertainty_output and std is not None:
        enc = pc.encode_uncertainty(std, "float32")
        pc.write_zyx(plan.uncertainty_output, block.write.start, enc)
        pc.write_downsampled(plan.uncertainty_output, block.write.start, enc)
    return hashlib.sha256(np.ascontiguousarray(mean).tobytes()).hexdigest()


#: jobs for which this process has already reported a block that needs fine-tuning (one event
#: per worker process and job, not one per block of a dataset the model does not fit); a
#: long-lived pool worker forgets them after ``_FLAGGED_JOBS_KEPT`` jobs (at worst one more event)
_flagged_jobs: set[str] = set()
_FLAGGED_JOBS_KEPT = 1024


def check_info(res) -> dict:
    """A block marker's fields from the restore's needs-fine-tuning check: ``score`` and
    ``needs_finetuning``, or none when the check did not run (samples < 2, no error head)."""
    if res is None or res.score is None:
        return {}
    return {"score": float(res.score), "needs_finetuning": bool(res.needs_finetuning)}


def finish_block(ledger: Ledger, job_id: str, plan: RestorePlan, i: int, mean, std, res,
                 owner: str, secs: float) -> None:
    """Store a restored block and record its completion marker: output chunks for a job, the
    arrays in the ledger for a cutout (plan.kind == "cutout", read back by the server). With
    samples ≥ 2 the marker holds the block's needs-fine-tuning score; the first flagged block a
    worker process restores for a job also becomes a ``needs_finetuning`` job event."""
    info = {"worker": owner, "seconds": round(secs, 3), "voxels": int(mean.size)}
    if plan.kind == "cutout":
        info.update(store_cutout_result(ledger, job_id, mean, std, res))
    else:
        info["sha256"] = write_block(plan, plan.block(i), mean, std)
        info.update(check_info(res))
        if info.get("needs_finetuning") and job_id not in _flagged_jobs:
            if len(_flagged_jobs) >= _FLAGGED_JOBS_KEPT:
                _flagged_jobs.clear()
            _flagged_jobs.add(job_id)
            ledger.add_event(job_id, "needs_finetuning",
                             f"block {i}: needs-fine-tuning score {res.score:.2f} (the model mispredicts "
                             f"its own error on this data by that factor; fine-tune it on this dataset)",
                             block=i, score=float(res.score))
    ledger.mark_block_done(job_id, i, info)


def process_block(ledger: Ledger, job_id: str, plan: RestorePlan, i: int, model: RestorationModel,
                  data: np.ndarray | None, owner: str, ttl: float, read=None) -> float | None:
    """Lease block i, restore and store it, mark it done and release the lease: the one code path
    of Indexed-Job tasks and pool workers (bit-identical output). Returns the seconds it took,
    0.0 when it was already done (by anyone), None when another worker holds its lease.
    ``data`` may be None: then ``read(i)`` reads the block once the lease is held."""
    if i in ledger.done_blocks(job_id):
        return 0.0
    if not ledger.try_acquire_lease(job_id, i, owner, ttl):
        return None
    try:
        if ledger.block_info(job_id, i) is not None:  # finished by another worker meanwhile
            return 0.0
        with _Heartbeat(ledger, job_id, i, owner, ttl):
            t0 = time.time()
            if data is None:
                data = read(i)
            mean, std, res = restore_block(plan, plan.block(i), model, data)
            secs = time.time() - t0
            finish_block(ledger, job_id, plan, i, mean, std, res, owner, secs)
        return max(secs, 1e-6)
    finally:
        ledger.release_lease(job_id, i, owner)


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
    """Process this task's blocks; returns the number of blocks this call completed."""
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
    blocks = plan.blocks.blocks
    mine = list(range(task_index, len(blocks), T))
    model = RestorationModel.load(plan.model_url)
    done_count = 0
    pool = ThreadPoolExecutor(max_workers=1)  # reads the next block while the model runs

    def read(i):
        b = blocks[i]
        return pc.read_zyx(plan.source, b.read.start, b.read.stop, plan.mip)

    todo = [i for i in mine if i not in ledger.done_blocks(job_id)]

    def process(i: int, data: np.ndarray) -> bool:
        """True when block i is done (by us or by another worker), False when leased elsewhere."""
        nonlocal done_count
        r = process_block(ledger, job_id, plan, i, model, data, owner, ttl)
        if r is None:
            return False
        if r > 0:
            done_count += 1
            log(f"[worker {task_index}] block {i} done in {r:.1f} s")
        return True

    deferred = []
    pending = pool.submit(read, todo[0]) if todo else None
    for n, i in enumerate(todo):
        data = pending.result()
        pending = pool.submit(read, todo[n + 1]) if n + 1 < len(todo) else None
        if ledger.cancel_requested(job_id):
            log(f"[worker {task_index}] job cancelled; stopping")
            pool.shutdown(wait=False, cancel_futures=True)
            return done_count
        if not process(i, data):
            log(f"[worker {task_index}] block {i} is leased by another worker; coming back to it")
            deferred.append(i)
    # blocks leased by others: wait until they are done, or take them over when the lease expires
    deadline = time.time() + 2 * ttl + 10
    while deferred and time.time() < deadline and not ledger.cancel_requested(job_id):
        time.sleep(min(5.0, ttl / 4))
        done_now = ledger.done_blocks(job_id)
        deferred = [i for i in deferred if i not in done_now and not process(i, read(i))]
    pool.shutdown(wait=False, cancel_futures=True)
    return done_count


def run_training(ledger: Ledger, job_id: str, plan: TrainPlan, log=print) -> int:
    """A train job is one block: read the training region, train, save the model."""
    from ..engine.pairs import IsotropicPairs, StackGapPairs
    from ..engine.tasks import make_task
    from ..engine.training import TrainConfig, train
    if 0 in ledger.done_blocks(job_id):
        return 0
    owner = f"{socket.gethostname()}:{os.getpid()}:train"
    if not ledger.try_acquire_lease(job_id, 0, owner, LEASE_TTL_S):
        return 0
    try:
        vol = pc.read_zyx(plan.source, plan.read.start, plan.read.stop, plan.mip)
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
