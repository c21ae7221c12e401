"""The job manager: validates requests, plans them, records them in the ledger, launches
executors and supervises jobs to a terminal state. Stateless over the ledger: a restarted manager
picks up every PENDING/RUNNING job and relaunches what is missing (done blocks are skipped).
"""

from __future__ import annotations

import os
import posixpath
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np

from ..engine.model import RestorationModel, list_models, read_metadata
from ..engine.normalize import IntensityNorm
from ..engine.restore import derive_seed, restore
from ..errors import FailedPrecondition, NotFound, RequestError, ResourceExhausted
from ..volume import precomputed as pc
from ..volume.blocks import plan_blocks
from .executors import Executor
from .ledger import CANCELLED, FAILED, PENDING, RUNNING, SUCCEEDED, TERMINAL_STATES, Ledger
from .spec import LATERAL_CONTEXT, CutoutSpec, RestoreSpec, TrainSpec

#: Training reads at most this many source voxels (a centred region when the layer is larger).
MAX_TRAIN_VOXELS = 64 * 1024 * 1024
MAX_RELAUNCHES = 2


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
    events: list = field(default_factory=list)


@dataclass
class CutoutResult:
    mean_zyx: np.ndarray
    std_zyx: np.ndarray | None
    output_start_xyz: tuple
    resolution_nm_xyz: tuple
    dtype: str
    message: str


def scale_for(task: str, factor: int) -> tuple[int, int, int]:
    return {"isotropic": (1, 1, factor), "superres": (factor, factor, 1)}.get(task, (1, 1, 1))


def dataset_norm(url: str, mip: int = 0, max_sections: int = 8, max_side: int = 1024) -> IntensityNorm:
    """Percentile normalisation from evenly spaced sections of the coarsest scale that still has
    sections of at most ``max_side`` pixels — statistics of the whole dataset, computed once."""
    info = pc.open_source(url, mip)
    m = mip
    while True:
        try:
            nxt = pc.open_layer(url, m + 1, "source")
        except (ValueError, KeyError, IndexError):
            break
        if max(info.size_xyz[:2]) <= max_side:
            break
        info, m = nxt, m + 1
    z0, z1 = info.start_zyx[0], info.stop_zyx[0]
    zs = np.unique(np.linspace(z0, z1 - 1, min(max_sections, z1 - z0)).round().astype(int))
    (_, y0, x0), (_, y1, x1) = info.start_zyx, info.stop_zyx
    sy = max(1, (y1 - y0) // max_side)
    sx = max(1, (x1 - x0) // max_side)
    parts = [pc.read_zyx(url, (int(z), y0, x0), (int(z) + 1, y1, x1), m)[:, ::sy, ::sx] for z in zs]
    return IntensityNorm.from_volume(np.concatenate([p.reshape(-1) for p in parts]))


def _chunk_names(info: pc.VolumeInfo, start_zyx, stop_zyx) -> list[str]:
    """Precomputed chunk file names (``x0-x1_y0-y1_z0-z1``) covering a chunk-aligned box."""
    lo, hi, ch = info.start_zyx, info.stop_zyx, info.chunk_zyx
    out = []
    for z in range(start_zyx[0], stop_zyx[0], ch[0]):
        for y in range(start_zyx[1], stop_zyx[1], ch[1]):
            for x in range(start_zyx[2], stop_zyx[2], ch[2]):
                z1, y1, x1 = min(z + ch[0], hi[0]), min(y + ch[1], hi[1]), min(x + ch[2], hi[2])
                out.append(f"{x}-{x1}_{y}-{y1}_{z}-{z1}")
    return out


def existing_chunks(url: str, key: str) -> set[str]:
    """Names of the chunk files present at one scale of a layer (one listing)."""
    from cloudfiles import CloudFiles
    try:
        cf = CloudFiles(url)
        return {posixpath.basename(p) for p in cf.list(prefix=key + "/")}
    except Exception:  # noqa: BLE001 - an unreadable listing means nothing is known to exist
        return set()


class JobManager:
    def __init__(self, ledger_url: str, executor: Executor, models_dir: str | None = None,
                 max_cutout_voxels: int = 4_194_304, poll_interval_s: float = 0.5,
                 block_size_xyz: tuple[int, int, int] = (256, 256, 0), tile: int = 256,
                 overlap: int = 32, output_chunk_xyz: tuple[int, int, int] | None = None):
        self.ledger = Ledger(ledger_url)
        self.ledger_url = ledger_url
        self.executor = executor
        self.models_dir = models_dir
        self.max_cutout_voxels = max_cutout_voxels
        self.poll_interval_s = poll_interval_s
        self.block_size_xyz = block_size_xyz
        self.output_chunk_xyz = output_chunk_xyz
        self.tile, self.overlap = tile, overlap
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()
        self._launches: dict[str, int] = {}
        self._rate: dict[str, tuple[float, int]] = {}  # job → (time first seen running, blocks done then)
        self._models: dict[str, RestorationModel] = {}
        self._norms: dict[tuple, IntensityNorm] = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._supervise, daemon=True, name="job-supervisor")
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        shutdown = getattr(self.executor, "shutdown", None)
        if shutdown:
            shutdown()

    # ------------------------------------------------------------------ models
    def resolve_model(self, name_or_url: str) -> str:
        if "://" in name_or_url or os.path.isabs(name_or_url):
            return name_or_url
        if self.models_dir is None:
            raise RequestError("model", f"{name_or_url!r} is not a URL and the server has no model directory")
        return self.models_dir.rstrip("/") + "/" + name_or_url

    def list_models(self) -> list[dict]:
        return list_models(self.models_dir) if self.models_dir else []

    def describe_model(self, name_or_url: str) -> dict:
        url = self.resolve_model(name_or_url)
        meta = read_metadata(url)
        meta["url"] = url
        return meta

    def _model(self, url: str) -> RestorationModel:
        with self._lock:
            if url not in self._models:
                self._models[url] = RestorationModel.load(url)
            return self._models[url]

    def _norm(self, url: str, mip: int) -> IntensityNorm:
        with self._lock:
            if (url, mip) not in self._norms:
                self._norms[(url, mip)] = dataset_norm(url, mip)
            return self._norms[(url, mip)]

    # ------------------------------------------------------------------ submit
    def submit(self, spec: RestoreSpec | TrainSpec) -> JobStatus:
        if isinstance(spec, RestoreSpec):
            return self._submit_restore(spec.validate())
        if isinstance(spec, TrainSpec):
            return self._submit_train(spec.validate())
        raise RequestError("spec", f"unknown job kind {type(spec).__name__}")

    def _output_geometry(self, src: pc.VolumeInfo, scale, dtype: str):
        k = scale[2]
        if self.output_chunk_xyz:
            chunk = tuple(self.output_chunk_xyz)
        else:
            cx, cy, _ = src.chunk_size_xyz
            cz = k * max(1, 16 // k) if k > 1 else src.chunk_size_xyz[2]
            chunk = (cx * scale[0], cy * scale[1], cz)
        geom = pc.output_geometry(src, scale, chunk_size_xyz=chunk, dtype=dtype)
        factors = pc.downsample_factors(geom.resolution_nm_xyz, 1, geom.voxel_offset_xyz)
        return replace(geom, downsample_factors_xyz=factors)

    def _block_size(self, geom: pc.VolumeInfo) -> tuple[int, int, int]:
        uz, uy, ux = geom.write_alignment_zyx
        bx, by, bz = self.block_size_xyz
        r = lambda v, u: max(u, (max(v, 1) + u - 1) // u * u)
        return (r(bx, ux), r(by, uy), r(bz, uz) if bz else uz)

    def _submit_restore(self, spec: RestoreSpec) -> JobStatus:
        src = pc.open_source(spec.source, spec.mip)
        model_url = self.resolve_model(spec.model)
        meta = read_metadata(model_url)
        task, factor = meta["task"], int(meta["factor"])
        scale = scale_for(task, factor)
        if meta.get("kind", "diffusion") != "diffusion" and spec.samples > 1:
            raise RequestError("samples", "a regression model gives one output; use samples = 1")
        geom = self._output_geometry(src, scale, src.dtype)
        region = None
        if spec.region_start_xyz is not None:
            s, e = spec.region_start_xyz, spec.region_stop_xyz
            region = ((s[2], s[1], s[0]), (e[2], e[1], e[0]))
        block_xyz = self._block_size(geom)
        plan = plan_blocks(src, geom, scale, block_xyz, LATERAL_CONTEXT, region)
        indices = list(range(len(plan.blocks)))
        out_exists = pc.object_exists(pc.normalize_url(spec.output).rstrip("/") + "/info", "output")
        if spec.incremental and out_exists:
            key = "_".join(f"{r:g}" for r in geom.resolution_nm_xyz)
            have = existing_chunks(spec.output, key)
            indices = [b.index for b in plan.blocks
                       if not set(_chunk_names(geom, b.write_start, b.write_stop)) <= have]
        norm = self._norm(spec.source, spec.mip)
        job = spec.to_dict()
        job["plan"] = {
            "model_url": model_url, "task": task, "factor": factor, "scale_xyz": list(scale),
            "block_size_xyz": list(block_xyz), "lateral_context": LATERAL_CONTEXT,
            "norm": norm.to_dict(), "output_dtype": src.dtype, "tile": self.tile, "overlap": self.overlap,
            "block_indices": indices if spec.incremental else None, "num_blocks_planned": len(plan.blocks),
            "output_resolution_nm_xyz": list(geom.resolution_nm_xyz),
            "region_message": plan.message,
        }
        n = len(indices)
        parallelism = spec.parallelism or getattr(self.executor, "default_parallelism", 1)
        job["plan"]["num_tasks"] = max(1, min(n, parallelism))
        provenance = {"source": spec.source, "model": model_url, "task": task, "factor": factor,
                      "sampler": spec.sampler, "steps": spec.steps, "samples": spec.samples, "seed": spec.seed}
        # everything validated: now write
        pc.create_output_layer(spec.output, geom, geom.chunk_size_xyz, src.dtype, provenance,
                               num_downsample_scales=len(geom.downsample_factors_xyz),
                               overwrite_check_source_url=spec.source)
        if spec.uncertainty_output:
            pc.create_uncertainty_layer(spec.uncertainty_output, geom, geom.chunk_size_xyz, provenance,
                                        num_downsample_scales=len(geom.downsample_factors_xyz),
                                        overwrite_check_source_url=spec.source)
        rec = self.ledger.create_job(job, n)
        if plan.message:
            self.ledger.add_event(rec.job_id, "planned", plan.message)
        if n == 0:
            self.ledger.set_state(rec.job_id, RUNNING, "nothing to do")
            self.ledger.set_state(rec.job_id, SUCCEEDED, "incremental: every block's output already exists")
        else:
            self._launch(rec.job_id, job)
        return self.get(rec.job_id)

    def _submit_train(self, spec: TrainSpec) -> JobStatus:
        spec.output_model = self.resolve_model(spec.output_model)
        src = pc.open_source(spec.source, spec.mip)
        rx, ry, rz = src.resolution_nm_xyz
        factor = spec.factor or int(round(rz / rx))
        if factor < 2:
            raise RequestError("factor", f"the layer's voxel size {list(src.resolution_nm_xyz)} nm is not "
                                         "anisotropic; give a factor in [2, 16]")
        if spec.base_model:
            base = read_metadata(self.resolve_model(spec.base_model))
            if base["task"] != "isotropic":
                raise FailedPrecondition("base_model", f"model does {base['task']}, not isotropic")
            factor = int(base["factor"])
            spec.base_model = self.resolve_model(spec.base_model)
        lo, hi = src.start_zyx, src.stop_zyx
        if spec.region_start_xyz is not None:
            s, e = spec.region_start_xyz, spec.region_stop_xyz
            lo, hi = (s[2], s[1], s[0]), (e[2], e[1], e[0])
            if any(a < l for a, l in zip(lo, src.start_zyx)) or any(b > h for b, h in zip(hi, src.stop_zyx)):
                raise RequestError("region", f"lies outside the source bounds {src.describe_bounds()}")
        shape = [b - a for a, b in zip(lo, hi)]
        message = ""
        while np.prod(shape) > MAX_TRAIN_VOXELS:  # centred crop, halving the largest lateral side
            ax = 1 if shape[1] >= shape[2] else 2
            c = (lo[ax] + hi[ax]) // 2
            shape[ax] //= 2
            lo = tuple(c - shape[ax] // 2 if i == ax else v for i, v in enumerate(lo))
            hi = tuple(lo[ax] + shape[ax] if i == ax else v for i, v in enumerate(hi))
            message = f"training region capped to {MAX_TRAIN_VOXELS} voxels: z,y,x {list(lo)}–{list(hi)}"
        if shape[1] <= factor or shape[2] <= factor:
            raise RequestError("region", f"lateral size {shape[2]}×{shape[1]} too small for factor {factor}")
        job = spec.to_dict()
        job["plan"] = {"factor": factor, "read_start_zyx": list(lo), "read_stop_zyx": list(hi),
                       "voxel_size_nm": list(src.resolution_nm_xyz), "num_tasks": 1}
        if spec.target:
            tgt = pc.open_source(spec.target, spec.mip)
            k = factor
            job["plan"]["target_box_zyx"] = [[lo[0] * k, lo[1], lo[2]], [(hi[0] - 1) * k + 1, hi[1], hi[2]]]
            if tgt.size_xyz[2] < (hi[0] - 1) * k + 1:
                raise RequestError("target", f"has {tgt.size_xyz[2]} sections; needs {(hi[0] - 1) * k + 1}")
        rec = self.ledger.create_job(job, 1)
        if message:
            self.ledger.add_event(rec.job_id, "planned", message)
        self._launch(rec.job_id, job)
        return self.get(rec.job_id)

    def _launch(self, job_id: str, job: dict) -> None:
        with self._lock:
            self._launches[job_id] = self._launches.get(job_id, 0) + 1
        n = int(job["plan"]["num_tasks"])
        self.executor.launch(job_id, n, n)
        rec = self.ledger.get_job(job_id)
        if rec.state == PENDING:
            self.ledger.set_state(job_id, RUNNING, f"running {n} task(s) on the {self.executor.name} executor")

    # ------------------------------------------------------------------ queries
    def get(self, job_id: str) -> JobStatus:
        rec = self.ledger.get_job(job_id)
        spec = rec.spec
        now = time.time()
        rate, eta = 0.0, 0.0
        total_vox = 0
        if spec.get("kind") == "restore":
            res = spec["plan"]["output_resolution_nm_xyz"]
            bx, by, bz = spec["plan"]["block_size_xyz"]
            total_vox = bx * by * bz
        with self._lock:
            if rec.state == RUNNING and job_id not in self._rate:
                self._rate[job_id] = (now, rec.blocks_done)
            t0, d0 = self._rate.get(job_id, (now, rec.blocks_done))
        if rec.state == RUNNING and now > t0 and rec.blocks_done > d0:
            bps = (rec.blocks_done - d0) / (now - t0)
            rate = bps * total_vox
            eta = (rec.num_blocks - rec.blocks_done) / bps
        outputs = {}
        for key in ("output", "uncertainty_output", "output_model"):
            if spec.get(key):
                outputs[key] = spec[key]
        events = [e.message for e in self.ledger.events(job_id)[0][-20:] if e.message]
        return JobStatus(job_id=rec.job_id, kind=spec.get("kind", "restore"), state=rec.state,
                         message=rec.message, blocks_done=rec.blocks_done, blocks_total=rec.num_blocks,
                         voxels_per_second=rate, eta_seconds=eta, created=rec.created, updated=rec.updated,
                         spec=spec, outputs=outputs, events=events)

    def list(self, state: str | None = None, page_size: int = 50, page_token: str | None = None):
        if state is not None and state not in (PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED):
            raise RequestError("state", f"{state!r}; allowed: PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED")
        if not isinstance(page_size, int) or not 1 <= page_size <= 1000:
            raise RequestError("page_size", f"{page_size!r} must be in [1, 1000]")
        try:
            recs, token = self.ledger.list_jobs(state, page_size, page_token or None)
        except ValueError:
            raise RequestError("page_token", f"{page_token!r} is not a token returned by a previous list") from None
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

    # ------------------------------------------------------------------ cutout
    def cutout(self, spec: CutoutSpec) -> CutoutResult:
        spec.validate()
        src = pc.open_source(spec.source, spec.mip)
        model_url = self.resolve_model(spec.model)
        meta = read_metadata(model_url)
        scale = scale_for(meta["task"], int(meta["factor"]))
        s, e = spec.region_start_xyz, spec.region_stop_xyz
        lo, hi = (s[2], s[1], s[0]), (e[2], e[1], e[0])
        if any(a < l for a, l in zip(lo, src.start_zyx)) or any(b > h for b, h in zip(hi, src.stop_zyx)):
            raise RequestError("region", f"{list(s)}–{list(e)} (xyz) lies outside the source bounds "
                                         f"{src.describe_bounds()} (zyx)")
        fx, _, k = scale
        nz = (hi[0] - lo[0] - 1) * k + 1 if k > 1 else hi[0] - lo[0]
        n_out = nz * (hi[1] - lo[1]) * fx * (hi[2] - lo[2]) * fx
        if n_out > self.max_cutout_voxels:
            raise ResourceExhausted("region", f"cutout would produce {n_out} voxels; the limit is "
                                              f"{self.max_cutout_voxels} output voxels — submit a region job instead")
        if k > 1 and hi[0] - lo[0] < 2:
            raise RequestError("region", "an isotropic cutout needs at least 2 sections (z size ≥ 2)")
        ctx = LATERAL_CONTEXT
        rlo = (lo[0], max(src.start_zyx[1], lo[1] - ctx), max(src.start_zyx[2], lo[2] - ctx))
        rhi = (hi[0], min(src.stop_zyx[1], hi[1] + ctx), min(src.stop_zyx[2], hi[2] + ctx))
        data = pc.read_zyx(spec.source, rlo, rhi, spec.mip)
        model = self._model(model_url)
        res = restore(model, data, sampler=spec.sampler, steps=spec.steps, samples=spec.samples,
                      seed=derive_seed(spec.seed, rlo[1], rlo[2]), norm=self._norm(spec.source, spec.mip),
                      tile=self.tile, overlap=self.overlap, image_ids_offset=rlo[0],
                      device=os.environ.get("EMRESTORE_DEVICE", "auto"))
        ys = slice((lo[1] - rlo[1]) * fx, (hi[1] - rlo[1]) * fx)
        xs = slice((lo[2] - rlo[2]) * fx, (hi[2] - rlo[2]) * fx)
        mean = np.ascontiguousarray(res.mean[:, ys, xs])
        std = np.ascontiguousarray(res.std[:, ys, xs]) if res.std is not None else None
        h = (k - 1) // 2
        out_start = (s[0] * fx, s[1] * fx, s[2] * k + h if k > 1 else s[2])
        res_nm = tuple(r / f for r, f in zip(src.resolution_nm_xyz, scale))
        msg = f"restored {mean.shape[0]} sections of {mean.shape[1]}×{mean.shape[2]} in {res.seconds:.1f} s"
        if res.score is not None:
            msg += f"; uncertainty score {res.score:.4f}" + (" (needs fine-tuning)" if res.needs_finetuning else "")
        return CutoutResult(mean, std, out_start, res_nm, str(mean.dtype), msg)

    # ------------------------------------------------------------------ supervisor
    def _supervise(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - keep supervising; the error goes to the log
                print(f"[supervisor] {type(e).__name__}: {e}", flush=True)
            self._stop.wait(self.poll_interval_s)

    def tick(self) -> None:
        """One supervision pass over the live jobs."""
        live = []
        for state in (PENDING, RUNNING):
            token = None
            while True:
                recs, token = self.ledger.list_jobs(state, 200, token)
                live.extend(recs)
                if not token:
                    break
        for rec in live:
            self._supervise_job(rec)

    def _supervise_job(self, rec) -> None:
        job_id, spec = rec.job_id, rec.spec
        if rec.cancel_requested:
            self.executor.cancel(job_id)
            self.ledger.set_state(job_id, CANCELLED, "cancelled by request")
            return
        if rec.blocks_done >= rec.num_blocks:
            if rec.state == PENDING:
                self.ledger.set_state(job_id, RUNNING, "")
            self._on_success(job_id, spec)  # register outputs first: SUCCEEDED means registered too
            self.ledger.set_state(job_id, SUCCEEDED, f"{rec.num_blocks} block(s) done")
            return
        known = getattr(self.executor, "known", None)
        if known is not None and not known(job_id):
            # restarted service: relaunch; workers skip blocks that are already done
            self.ledger.add_event(job_id, "resumed", f"resuming with {rec.num_blocks - rec.blocks_done} block(s) left")
            self._launch(job_id, spec)
            return
        st = self.executor.status(job_id)
        if st.finished:
            launches = self._launches.get(job_id, 1)
            if launches <= MAX_RELAUNCHES:
                self.ledger.add_event(job_id, "relaunched",
                                      f"{rec.num_blocks - rec.blocks_done} block(s) left after the workers ended; relaunching")
                self._launch(job_id, spec)
            else:
                why = "; ".join(st.messages[-3:]) or "workers ended with blocks left"
                self.ledger.set_state(job_id, FAILED, why)

    def _on_success(self, job_id: str, spec: dict) -> None:
        targets = spec.get("register_in") or []
        if not targets:
            return
        try:
            from connector.registry import register_job_outputs
        except ImportError:
            self.ledger.add_event(job_id, "register", "connectors are not installed; outputs not registered")
            return
        try:
            messages = register_job_outputs(job_id, spec, targets)
        except Exception as e:  # noqa: BLE001 - registration never fails a finished restoration
            messages = [f"registration failed: {type(e).__name__}: {e}"]
        for msg in messages:
            self.ledger.add_event(job_id, "register", msg)
