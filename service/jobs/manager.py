"""The job manager: takes validated specs, has them planned (planning.py), writes the output
layers and records job + plan in the ledger, launches executors, and supervises jobs to a
terminal state (running completion hooks before SUCCEEDED). Stateless over the ledger: a
restarted manager picks up every PENDING/RUNNING job and relaunches what is missing.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np

from ..errors import EmrestoreError, FailedPrecondition, PermissionDenied, ResourceExhausted
from ..volume import precomputed as pc
from ..volume.geometry import Box
from ..volume.policy import StorePolicy, inside
from ..volume.reader import ReaderCache
from . import admission
from .admission import WorkLimits  # noqa: F401 - re-exported (serve, tests)
from .completion import CompletedJob, CompletionHook, failure_messages
from .cutouts import CutoutResult, Cutouts  # noqa: F401 - CutoutResult re-exported
from .executors import Executor
from .ledger import CANCELLED, FAILED, PENDING, RUNNING, SUCCEEDED, TERMINAL_STATES, Ledger, new_job_id
from .models import ModelRegistry
from .estimate import estimate, uncertainty_format
from .planning import Planner, dataset_norm, inherited_tasks, scale_for  # noqa: F401 - re-exported
from .plans import PlanMissing, RestorePlan, plan_from_dict
from .spec import RestoreSpec, TrainSpec, list_request
from .worker import missing_note

MAX_RELAUNCHES = 2
#: a restore-region of at most this many blocks is interactive (leased first by the pool, and run
#: there by default); whole-dataset jobs and larger regions are batch work
INTERACTIVE_MAX_BLOCKS = 16


@dataclass
class JobStatus:
    job_id: str
    kind: str
    state: str
    message: str
    blocks_done: int
    blocks_total: int
    voxels_per_second: float
    eta_seconds: float
    created: float
    updated: float
    spec: dict
    outputs: dict = field(default_factory=dict)
    events: list = field(default_factory=list)       # messages, oldest first
    event_log: list = field(default_factory=list)    # {kind, message, time}, oldest first
    owner: str = ""


def _plan_summary(plan) -> dict:
    """The part of a plan shown with the job (GetJob's spec.plan); the block list is left out."""
    if isinstance(plan, RestorePlan):
        return {"model_url": plan.model_url, "task": plan.task, "factor": plan.factor,
                "scale_xyz": list(plan.scale_xyz), "block_size_xyz": list(plan.blocks.block_size_xyz),
                "num_blocks_planned": plan.num_blocks_planned, "num_tasks": plan.num_tasks,
                "stages": [[s.base_mip, s.top_mip, s.num_tasks] for s in plan.blocks.stages],
                "output_format": plan.output_format, "uncertainty_full_scale": plan.uncertainty_full_scale,
                "output_resolution_nm_xyz": list(plan.output_resolution_nm_xyz),
                "write_box_zyx": plan.blocks.write_box.to_list(), "region_message": plan.blocks.message}
    return {"factor": plan.factor, "read_box_zyx": plan.read.to_list(), "num_tasks": 1,
            "voxel_size_nm": list(plan.voxel_size_nm)}


class JobManager(Cutouts):
    def __init__(self, ledger_url: str, executor: Executor, models_dir: str | None = None,
                 max_cutout_voxels: int = 4_194_304, poll_interval_s: float = 0.5,
                 block_size_xyz: tuple[int, int, int] = (256, 256, 0), tile: int = 256,
                 overlap: int = 32, output_chunk_xyz: tuple[int, int, int] | None = None,
                 completion_hooks: list[CompletionHook] | None = None, store_policy: StorePolicy | None = None,
                 limits: WorkLimits | None = None, allow_foreign_overwrite: bool = False,
                 interactive_max_blocks: int = INTERACTIVE_MAX_BLOCKS, cutout_timeout_s: float = 120.0,
                 shard_bytes: int | None = None):
        self.ledger = Ledger(ledger_url)
        self.ledger_url = ledger_url
        self.executor = executor
        self.models = ModelRegistry(models_dir)
        self.models_dir = models_dir
        self.planner = Planner(self.models, block_size_xyz, tile, overlap, output_chunk_xyz, max_cutout_voxels,
                               **({"shard_bytes": shard_bytes} if shard_bytes else {}))
        self.readers = ReaderCache()  # cutouts: one reader per source layer (shard indexes reused)
        self.poll_interval_s = poll_interval_s
        self.completion_hooks = list(completion_hooks or [])
        self.policy = store_policy or StorePolicy(None)
        self.limits = limits or WorkLimits()
        self.allow_foreign_overwrite = allow_foreign_overwrite
        self.supervisor_id = f"{socket.gethostname()[:60]}:{os.getpid()}:{secrets.token_hex(3)}"
        self.supervisor_ttl_s = max(30.0, 20 * poll_interval_s)
        self._messages_seen: dict[str, int] = {}
        self._supervised: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()
        self._launches: dict[str, int] = {}
        self._rate: dict[str, tuple[float, int]] = {}  # job → (time first seen running, blocks done then)
        self._plans: dict[str, object] = {}
        self.interactive_max_blocks = interactive_max_blocks
        self.cutout_timeout_s = cutout_timeout_s

    @property
    def has_pool(self) -> bool:
        """True when the executor has a warm pool (pool_executor.ExecutionRouter)."""
        return getattr(self.executor, "pool", None) is not None

    def _placement(self, spec: RestoreSpec, n: int) -> tuple[str, str]:
        """(priority, execution) of a restore job: interactive for a region of at most
        ``interactive_max_blocks`` blocks; ``auto`` runs interactive jobs on the pool and the rest
        as batch tasks; without a pool everything is batch."""
        interactive = spec.region_start_xyz is not None and n <= self.interactive_max_blocks
        priority = "interactive" if interactive else "batch"
        if not self.has_pool:
            if spec.execution == "pool":
                raise FailedPrecondition("execution", "pool: this server has no worker pool "
                                                      "(serve --pool-workers N or --pool-size N)")
            return priority, "batch"
        if spec.execution == "auto":
            return priority, "pool" if interactive else "batch"
        return priority, spec.execution

    @property
    def max_cutout_voxels(self) -> int:
        """Largest cutout in output voxels (the planner refuses larger ones)."""
        return self.planner.max_cutout_voxels

    @max_cutout_voxels.setter
    def max_cutout_voxels(self, value: int) -> None:
        self.planner.max_cutout_voxels = value

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._supervise, daemon=True, name="job-supervisor")
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.executor.shutdown()
        for job_id in list(self._supervised):  # hand the jobs on to the next server at once
            try:
                self.ledger.release_supervisor(job_id, self.supervisor_id)
            except Exception as e:  # noqa: BLE001 - the lease expires anyway
                print(f"[supervisor] releasing {job_id}: {type(e).__name__}: {e}", flush=True)

    def _supervise_lease(self, job_id: str) -> bool:
        ok = self.ledger.try_supervise(job_id, self.supervisor_id, self.supervisor_ttl_s)
        if ok:
            self._supervised.add(job_id)
        return ok

    # ------------------------------------------------------------------ models
    def resolve_model(self, name_or_url: str, field: str = "model") -> str:
        return self.models.resolve(name_or_url, field)

    def list_models(self) -> list[dict]:
        return self.models.list()

    def describe_model(self, name_or_url: str) -> dict:
        return self.models.describe(name_or_url)

    # ------------------------------------------------------------------ submit
    def submit(self, spec: RestoreSpec | TrainSpec, owner: str = "", *, output_encoding: str = "",
               jpeg_quality: int = 0, output_sharding: str = "auto", dry_run: bool = False):
        """Validate, check the store policy and the limits, plan, write the layers, record the
        job and its plan, launch. Nothing is written before every check has passed.

        Restore jobs: ``output_encoding`` (raw, png, jpeg; empty: as the source or the existing
        layer), ``jpeg_quality`` (1–100; 0: default), ``output_sharding`` (auto, sharded,
        unsharded). ``dry_run``: every check and the whole plan, nothing written — returns the
        estimate (estimate.py) instead of a job."""
        if isinstance(spec, RestoreSpec):
            spec.validate()
            output_encoding = output_encoding or spec.output_encoding
            jpeg_quality = jpeg_quality or spec.jpeg_quality
            output_sharding = output_sharding if output_sharding != "auto" else spec.output_sharding
            dry_run = dry_run or spec.dry_run
            if not dry_run:
                admission.check_owner_quota(self.ledger, self.limits, owner)
            return self._submit_restore(spec, owner, output_encoding, jpeg_quality, output_sharding, dry_run)
        if isinstance(spec, TrainSpec):
            spec.validate()
            admission.check_owner_quota(self.ledger, self.limits, owner)
            return self._submit_train(spec, owner)
        raise EmrestoreError("spec", f"unknown job kind {type(spec).__name__}")

    def _num_tasks(self, spec_parallelism: int, n: int) -> int:
        return max(1, min(n, spec_parallelism or self.executor.default_parallelism))

    def _submit_restore(self, spec: RestoreSpec, owner: str, output_encoding: str = "", jpeg_quality: int = 0,
                        output_sharding: str = "auto", dry_run: bool = False):
        admission.check_targets(self.completion_hooks, list(spec.register_in or []))
        admission.check_restore_stores(self.policy, spec, self.resolve_model, self.models_dir)
        admission.check_sampling_work(self.limits, spec.samples, spec.steps)
        p = self.planner.restore(spec, output_encoding, jpeg_quality, output_sharding)
        n = p.plan.blocks.num_tasks
        if p.plan.blocks.write_box.size > self.limits.max_job_voxels:
            raise ResourceExhausted("region", f"the job would write {p.plan.blocks.write_box.size} output voxels; "
                                              f"the limit is {self.limits.max_job_voxels} per job")
        priority, execution = self._placement(spec, p.plan.blocks.num_blocks)
        first_stage = p.plan.blocks.stages[0].num_tasks if p.plan.blocks.stages else n
        plan = replace(p.plan, num_tasks=self._num_tasks(spec.parallelism, first_stage), priority=priority,
                       execution=execution)
        job_id = new_job_id(time.time())
        geom = p.geometry
        common = dict(num_downsample_scales=p.num_downsample_scales, overwrite_check_source_url=spec.source,
                      overwrite=spec.overwrite, allow_foreign=self.allow_foreign_overwrite, job_id=job_id)
        layers = [lambda check: pc.create_output_layer(spec.output, geom, geom.chunk_size_xyz, geom.dtype, p.provenance,
                                                       fmt=p.fmt, check_only=check, **common)]
        if spec.uncertainty_output:
            ufmt = uncertainty_format(p.fmt, np.dtype(geom.dtype).itemsize)
            layers.append(lambda check: pc.create_uncertainty_layer(
                spec.uncertainty_output, geom, geom.chunk_size_xyz, p.provenance, dtype="uint8",
                uint8_full_scale=plan.uncertainty_full_scale, fmt=ufmt, check_only=check, **common))
        for create in layers:  # every check on both layers first
            create(True)
        if dry_run:
            meta = self.models.metadata(plan.model_url)
            return estimate(replace(p, plan=plan), meta.get("preset"))
        for create in layers:
            create(False)
        rec = self.ledger.create_job(spec.to_dict(), n, job_id=job_id, plan=plan.to_dict(), owner=owner)
        self._supervise_lease(rec.job_id)
        if plan.blocks.message:
            self.ledger.add_event(rec.job_id, "planned", plan.blocks.message)
        inherited = inherited_tasks(self.ledger, plan.blocks, list(p.previous_jobs)) if p.previous_jobs else []
        if len(inherited):
            self.ledger.mark_grouped(rec.job_id, inherited)
            self.ledger.add_event(rec.job_id, "incremental", f"{len(inherited)} of {n} task(s) were done by earlier "
                                  f"job(s) {', '.join(p.previous_jobs)[:300]} of this method; they are kept")
        if n == 0 or len(inherited) >= n:
            self.ledger.set_state(rec.job_id, RUNNING, "nothing to do")
            self._complete(rec.job_id, plan, owner)
            self.ledger.set_state(rec.job_id, SUCCEEDED, "incremental: every task was done by an earlier job")
        else:
            self._launch(rec.job_id, plan.num_tasks)
        return self.get(rec.job_id)

    def _submit_train(self, spec: TrainSpec, owner: str) -> JobStatus:
        self.policy.check(spec.source, "source")
        if spec.target:
            self.policy.check(spec.target, "target")
        if spec.base_model:
            self.policy.check(self.resolve_model(spec.base_model, "base_model"), "base_model")
        out_model = self.policy.check(self.resolve_model(spec.output_model, "output_model"), "output_model")
        if inside(out_model, self.policy.check(spec.source, "source")):
            raise PermissionDenied("output_model", "lies inside the source layer")
        self._check_existing_model(spec)
        plan = self.planner.train(spec)
        rec = self.ledger.create_job(spec.to_dict(), 1, plan=plan.to_dict(), owner=owner)
        self._supervise_lease(rec.job_id)
        if plan.message:
            self.ledger.add_event(rec.job_id, "planned", plan.message)
        self._launch(rec.job_id, 1)
        return self.get(rec.job_id)

    def _check_existing_model(self, spec: TrainSpec) -> None:
        """A train job into an existing model of another task or factor is refused up front."""
        url = self.resolve_model(spec.output_model, "output_model")
        try:
            meta = self.models.metadata(url)
        except (FileNotFoundError, ValueError, KeyError):
            return  # no model there yet (or unreadable: training writes a new one)
        if meta.get("task") != spec.task or (spec.factor and int(meta.get("factor") or 0) != spec.factor):
            raise FailedPrecondition("output_model", f"an existing model of task {str(meta.get('task'))[:40]} "
                                                     f"(factor {meta.get('factor')}) is there; choose a new name")

    def _launch(self, job_id: str, num_tasks: int) -> None:
        with self._lock:
            self._launches[job_id] = self._launches.get(job_id, 0) + 1
        self.executor.launch(job_id, num_tasks, num_tasks)
        rec = self.ledger.get_job(job_id)
        where = getattr(self.executor, "executor_for", None)
        name = where(job_id).name if where else self.executor.name
        msg = "queued for the worker pool" if name == "pool" else f"running {num_tasks} task(s) on the {name} executor"
        if rec.state == PENDING:
            self.ledger.set_state(job_id, RUNNING, msg)

    def plan_of(self, job_id: str):
        """The job's typed plan (cached: plans are immutable); PlanMissing for old jobs."""
        with self._lock:
            plan = self._plans.get(job_id)
        if plan is None:
            plan = plan_from_dict(self.ledger.get_plan(job_id), job_id)
            with self._lock:
                self._plans[job_id] = plan
        return plan

    # ------------------------------------------------------------------ queries
    def get(self, job_id: str) -> JobStatus:
        rec = self.ledger.get_job(job_id)
        spec = dict(rec.spec)
        now = time.time()
        rate, eta = 0.0, 0.0
        block_voxels = 0
        try:
            plan = self.plan_of(job_id)
            spec["plan"] = _plan_summary(plan)
            if isinstance(plan, RestorePlan):  # voxels per task (stage 0 holds the restoration)
                block_voxels = plan.blocks.write_box.size // max(1, plan.blocks.num_tasks)
        except PlanMissing:
            pass  # a job of an older emrestore: shown without its plan
        with self._lock:
            if rec.state == RUNNING and job_id not in self._rate:
                self._rate[job_id] = (now, rec.blocks_done)
            t0, d0 = self._rate.get(job_id, (now, rec.blocks_done))
        if rec.state == RUNNING and now > t0 and rec.blocks_done > d0:
            bps = (rec.blocks_done - d0) / (now - t0)
            rate = bps * block_voxels
            eta = (rec.num_blocks - rec.blocks_done) / bps
        outputs = {key: spec[key] for key in ("output", "uncertainty_output", "output_model") if spec.get(key)}
        evs = self.ledger.events(job_id)[0][-20:]
        return JobStatus(job_id=rec.job_id, kind=spec.get("kind", "restore"), state=rec.state,
                         message=rec.message, blocks_done=rec.blocks_done, blocks_total=rec.num_blocks,
                         voxels_per_second=rate, eta_seconds=eta, created=rec.created, updated=rec.updated,
                         spec=spec, outputs=outputs, events=[e.message for e in evs if e.message],
                         event_log=[{"kind": e.kind, "message": e.message, "time": e.time} for e in evs],
                         owner=rec.owner)

    def list(self, state: str | None = None, page_size: int = 50, page_token: str | None = None):
        state, page_size, page_token = list_request(state or "", page_size, page_token or "")
        try:
            recs, token = self.ledger.list_jobs(state, page_size, page_token or None)
        except ValueError:
            raise EmrestoreError("page_token", f"{page_token!r:.200} is not a token returned by a previous list") from None
        return [self.get(r.job_id) for r in recs], token or ""

    def cancel(self, job_id: str) -> JobStatus:
        rec = self.ledger.get_job(job_id)
        if rec.state in TERMINAL_STATES:
            raise FailedPrecondition("job_id", f"job {job_id} is already {rec.state}")
        self.ledger.request_cancel(job_id)
        self.executor.cancel(job_id)
        rec = self.ledger.get_job(job_id)
        if rec.state not in TERMINAL_STATES:
            self.ledger.set_state(job_id, CANCELLED, "cancelled by request")
        return self.get(job_id)

    def watch(self, job_id: str, timeout_s: float | None = None,
              stop: threading.Event | None = None) -> Iterator[JobStatus]:
        last = None
        t_end = None if timeout_s is None else time.time() + timeout_s
        while True:
            st = self.get(job_id)
            key = (st.state, st.blocks_done, st.message, len(st.events))
            if key != last:
                last = key
                yield st
            if st.state in TERMINAL_STATES:
                return
            if (t_end is not None and time.time() > t_end) or (stop is not None and stop.is_set()):
                return
            time.sleep(self.poll_interval_s)

    # ------------------------------------------------------------------ supervisor
    def _supervise(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - keep supervising; the error goes to the log
                print(f"[supervisor] {type(e).__name__}: {e}", flush=True)
            self._stop.wait(self.poll_interval_s)

    def tick(self) -> None:
        """One supervision pass over the live jobs (ended ones are not read again)."""
        for rec in self.ledger.live_jobs():
            self._supervise_job(rec)

    def _needs_finetuning_note(self, job_id: str, plan: RestorePlan) -> str:
        """The final message's note when workers flagged blocks as needing fine-tuning (their
        ``needs_finetuning`` events; only jobs with an uncertainty layer or samples ≥ 2 run the check)."""
        if plan.samples < 2 and not plan.uncertainty_output:
            return ""
        events, _ = self.ledger.events(job_id)
        flagged = [e for e in events if e.kind == "needs_finetuning"]
        if not flagged:
            return ""
        worst = max(flagged, key=lambda e: float(e.fields.get("score", 0.0)))
        return (f"; NEEDS FINE-TUNING: the model mispredicts its own error on this data (score "
                f"{float(worst.fields.get('score', 0.0)):.2f} on block {worst.fields.get('block')}); "
                f"fine-tune it on this dataset")

    def _supervise_job(self, rec) -> None:
        job_id = rec.job_id
        if not self._supervise_lease(job_id):
            return  # another server supervises this job (its lease is live)
        if rec.cancel_requested:
            self.executor.cancel(job_id)
            self.ledger.set_state(job_id, CANCELLED, "cancelled by request")
            return
        try:
            plan = self.plan_of(job_id)
        except PlanMissing as e:
            self.ledger.set_state(job_id, FAILED, str(e))
            return
        if rec.blocks_done >= rec.num_blocks:
            if rec.state == PENDING:
                self.ledger.set_state(job_id, RUNNING, "")
            msg = f"{rec.num_blocks} block(s) done"
            if isinstance(plan, RestorePlan):
                self._complete(job_id, plan, rec.owner)  # hooks first: SUCCEEDED means registered too
                msg += missing_note(self.ledger.events(job_id)[0]) + self._needs_finetuning_note(job_id, plan)
            self.ledger.set_state(job_id, SUCCEEDED, msg)
            return
        if not self.executor.known(job_id):
            # restarted service: relaunch; workers skip blocks that are already done
            self.ledger.add_event(job_id, "resumed", f"resuming with {rec.num_blocks - rec.blocks_done} block(s) left")
            self._launch(job_id, plan.num_tasks)
            return
        st = self.executor.status(job_id)
        seen = self._messages_seen.get(job_id, 0)
        for m in st.messages[seen:]:  # a worker crash or retry is an event of the job
            self.ledger.add_event(job_id, "worker_failed", str(m)[:500])
        self._messages_seen[job_id] = max(seen, len(st.messages))
        if st.finished:
            self._messages_seen.pop(job_id, None)
            launches = self._launches.get(job_id, 1)
            if launches <= MAX_RELAUNCHES:
                self.ledger.add_event(job_id, "relaunched",
                                      f"{rec.num_blocks - rec.blocks_done} block(s) left after the workers ended; relaunching")
                self._launch(job_id, plan.num_tasks)
            else:
                why = "; ".join(st.messages[-3:]) or "workers ended with blocks left"
                self.ledger.set_state(job_id, FAILED, why)

    def _complete(self, job_id: str, plan: RestorePlan, owner: str) -> None:
        """Run the completion hooks of a restore job; each message is a ``registered`` event, a
        failure a ``registration_failed`` event (it never fails the finished restoration)."""
        spec = self.ledger.get_job(job_id).spec
        targets = list(spec.get("register_in") or [])
        if not targets:
            return
        if not self.completion_hooks:
            if targets:
                self.ledger.add_event(job_id, "registration_failed",
                                      "the server has no registration targets configured")
            return
        done = CompletedJob(job_id=job_id, owner=owner, source=plan.source, output=plan.output,
                            uncertainty=plan.uncertainty_output, register_in=targets,
                            region=Box(plan.blocks.write_box.start, plan.blocks.write_box.stop),
                            voxel_size_nm_xyz=tuple(plan.output_resolution_nm_xyz))
        for hook in self.completion_hooks:
            try:
                for msg in hook(done):
                    self.ledger.add_event(job_id, "registered", str(msg))
            except Exception as e:  # noqa: BLE001 - recorded as events of the job
                for kind, msg in failure_messages(e):
                    self.ledger.add_event(job_id, kind, msg)

