"""Planning: a validated spec → a typed plan (plans.py), everything decided before anything is
written. Output geometry, dataset normalisation, incremental diffing (which blocks' chunks are
missing) and the training region are decided here, once; workers load the result.
"""

from __future__ import annotations

import posixpath
import threading
from dataclasses import dataclass, replace

import numpy as np

from ..engine.model import gap_mismatch
from ..engine.normalize import IntensityNorm
from ..errors import EmrestoreError, FailedPrecondition, ResourceExhausted
from ..volume import precomputed as pc
from ..volume.blocks import Block, Plan, plan_blocks
from ..volume.geometry import Box
from .models import ModelRegistry
from .plans import RestorePlan, TrainPlan
from .spec import LATERAL_CONTEXT, CutoutSpec, RestoreSpec, TrainSpec

#: Training reads at most this many source voxels (a centred region when the layer is larger).
MAX_TRAIN_VOXELS = 64 * 1024 * 1024


def scale_for(task: str, factor: int) -> tuple[int, int, int]:
    """Output voxels per source voxel, xyz."""
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


def existing_chunks(url: str, key: str) -> set[str]:
    """Names of the chunk files present at one scale of a layer (one listing)."""
    from cloudfiles import CloudFiles
    try:
        cf = CloudFiles(url)
        return {posixpath.basename(p) for p in cf.list(prefix=key + "/")}
    except Exception:  # noqa: BLE001 - an unreadable listing means nothing is known to exist
        return set()


def scale_keys(geom: pc.VolumeInfo) -> list[tuple[str, tuple[int, int, int], Box]]:
    """(key, factor zyx, bounds) of every scale of an output layer: mip 0 and its downsamplings."""
    out = []
    rx, ry, rz = geom.resolution_nm_xyz
    base = Box(geom.start_zyx, geom.stop_zyx)
    for fx, fy, fz in [(1, 1, 1)] + [tuple(f) for f in geom.downsample_factors_xyz]:
        key = "_".join(f"{r:g}" for r in (rx * fx, ry * fy, rz * fz))
        f_zyx = (int(fz), int(fy), int(fx))
        out.append((key, f_zyx, base.shrink_by(f_zyx)))
    return out


def missing_blocks(plan: Plan, geom: pc.VolumeInfo, urls: list[str]) -> list[Block]:
    """Blocks of ``plan`` with a chunk missing in any scale of any of the layers ``urls``."""
    chunk = geom.chunk_zyx
    todo: dict[int, Block] = {}
    for url in urls:
        for key, f, bounds in scale_keys(geom):
            have = existing_chunks(url, key)
            for b in plan.blocks:
                if b.index in todo:
                    continue
                w = b.write.shrink_by(f)
                if not set(w.chunk_names(chunk, bounds)) <= have:
                    todo[b.index] = b
    return [b for b in plan.blocks if b.index in todo]


@dataclass
class RestorePlanning:
    """A restore plan and what the manager writes before recording it."""
    plan: RestorePlan
    geometry: pc.VolumeInfo
    provenance: dict
    output_exists: bool


class Planner:
    def __init__(self, models: ModelRegistry, block_size_xyz=(256, 256, 0), tile: int = 256,
                 overlap: int = 32, output_chunk_xyz=None, max_cutout_voxels: int = 4_194_304):
        self.models = models
        self.block_size_xyz = tuple(block_size_xyz)
        self.tile, self.overlap = tile, overlap
        self.output_chunk_xyz = output_chunk_xyz
        self.max_cutout_voxels = max_cutout_voxels
        self._norms: dict[tuple, IntensityNorm] = {}
        self._lock = threading.Lock()

    def norm(self, url: str, mip: int) -> IntensityNorm:
        with self._lock:
            if (url, mip) not in self._norms:
                self._norms[(url, mip)] = dataset_norm(url, mip)
            return self._norms[(url, mip)]

    def output_geometry(self, src: pc.VolumeInfo, scale, dtype: str) -> pc.VolumeInfo:
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

    def block_size(self, geom: pc.VolumeInfo) -> tuple[int, int, int]:
        """The configured block size (xyz), rounded up to the layer's write grid."""
        uz, uy, ux = geom.write_alignment_zyx
        bx, by, bz = self.block_size_xyz
        r = lambda v, u: max(u, (max(v, 1) + u - 1) // u * u)  # noqa: E731
        return (r(bx, ux), r(by, uy), r(bz, uz) if bz else uz)

    def _model(self, name: str, samples: int) -> tuple[str, dict]:
        url = self.models.resolve(name)
        meta = self.models.metadata(url)
        if meta.get("kind", "diffusion") != "diffusion" and samples > 1:
            raise EmrestoreError("samples", "a regression model gives one output; use samples = 1")
        return url, meta

    # ------------------------------------------------------------------ restore
    def restore(self, spec: RestoreSpec) -> RestorePlanning:
        src = pc.open_source(spec.source, spec.mip)
        model_url, meta = self._model(spec.model, spec.samples)
        task, factor = meta["task"], int(meta["factor"])
        why = gap_mismatch(task, factor, meta.get("gap"), src.resolution_nm_xyz)
        if why:
            raise FailedPrecondition("model", f"{why[:300]} (source {spec.source[:120]})")
        scale = scale_for(task, factor)
        geom = self.output_geometry(src, scale, src.dtype)
        region = None
        if spec.region_start_xyz is not None:
            r = Box.from_xyz(spec.region_start_xyz, spec.region_stop_xyz)
            region = (r.start, r.stop)
        block_xyz = self.block_size(geom)
        full = plan_blocks(src, geom, scale, block_xyz, LATERAL_CONTEXT, region)
        out_exists = pc.object_exists(pc.normalize_url(spec.output).rstrip("/") + "/info", "output")
        blocks = full
        if spec.incremental and out_exists:
            urls = [spec.output] + ([spec.uncertainty_output] if spec.uncertainty_output else [])
            todo = missing_blocks(full, geom, urls)
            # re-indexed 0..n-1: ledger markers address the persisted plan's blocks
            blocks = replace(full, blocks=tuple(replace(b, index=i) for i, b in enumerate(todo)))
        norm = self.norm(spec.source, spec.mip)
        plan = RestorePlan(
            source=spec.source, mip=spec.mip, output=spec.output,
            uncertainty_output=spec.uncertainty_output or None, model_url=model_url, task=task,
            factor=factor, scale_xyz=scale, output_resolution_nm_xyz=tuple(geom.resolution_nm_xyz),
            output_dtype=src.dtype, norm=norm.to_dict(), sampler=spec.sampler, steps=spec.steps,
            samples=spec.samples, seed=spec.seed, estimate=spec.estimate, tile=self.tile,
            overlap=self.overlap, blocks=blocks, num_blocks_planned=len(full.blocks))
        provenance = {"source": spec.source, "model": model_url, "task": task, "factor": factor,
                      "sampler": spec.sampler, "steps": spec.steps, "samples": spec.samples, "seed": spec.seed}
        return RestorePlanning(plan, geom, provenance, out_exists)

    # ------------------------------------------------------------------ cutout
    def cutout(self, spec: CutoutSpec) -> tuple[RestorePlan, Block, pc.VolumeInfo]:
        """Plan one block (the cutout) with the same geometry as a job's block; nothing written."""
        src = pc.open_source(spec.source, spec.mip)
        model_url, meta = self._model(spec.model, spec.samples)
        why = gap_mismatch(meta["task"], int(meta["factor"]), meta.get("gap"), src.resolution_nm_xyz)
        if why:
            raise FailedPrecondition("model", f"{why[:300]} (source {spec.source[:120]})")
        scale = scale_for(meta["task"], int(meta["factor"]))
        region = Box.from_xyz(spec.region_start_xyz, spec.region_stop_xyz)
        bounds = Box(src.start_zyx, src.stop_zyx)
        if not bounds.contains(region):
            raise EmrestoreError("region", f"{list(region.start_xyz)}–{list(region.stop_xyz)} (xyz) lies outside "
                                         f"the source bounds {src.describe_bounds()} (zyx)")
        fx, _, k = scale
        if k > 1 and k % 2 == 0:
            raise EmrestoreError("model", f"an isotropic model by an even factor ({k}) would put sections half a "
                                        "voxel off the output grid; refused for cutouts as for layers")
        h = (k - 1) // 2
        (z0, y0, x0), (z1, y1, x1) = region.start, region.stop
        write = Box((z0 * k + h, y0 * fx, x0 * fx), ((z1 - 1) * k + h + 1, y1 * fx, x1 * fx))
        if write.size > self.max_cutout_voxels:
            raise ResourceExhausted("region", f"cutout would produce {write.size} voxels; the limit is "
                                              f"{self.max_cutout_voxels} output voxels — submit a region job instead")
        if k > 1 and z1 - z0 < 2:
            raise EmrestoreError("region", "an isotropic cutout needs at least 2 sections (z size ≥ 2)")
        lateral = region.grow((0, LATERAL_CONTEXT, LATERAL_CONTEXT)).intersect(bounds)
        block = Block(index=0, read=lateral, write=write, sections=(z0, z1 - 1) if k > 1 else None)
        norm = self.norm(spec.source, spec.mip)
        res_nm = tuple(r / f for r, f in zip(src.resolution_nm_xyz, scale))
        plan = RestorePlan(
            source=spec.source, mip=spec.mip, output="", uncertainty_output=None, model_url=model_url,
            task=meta["task"], factor=int(meta["factor"]), scale_xyz=scale, output_resolution_nm_xyz=res_nm,
            output_dtype=src.dtype, norm=norm.to_dict(), sampler=spec.sampler, steps=spec.steps,
            samples=spec.samples, seed=spec.seed, estimate=getattr(spec, "estimate", ""), tile=self.tile,
            overlap=self.overlap,
            blocks=Plan(blocks=(block,), scale_xyz=scale, block_size_xyz=write.shape[::-1],
                        lateral_context=LATERAL_CONTEXT, write_box=write, region=region),
            num_blocks_planned=1)
        return plan, block, src

    # ------------------------------------------------------------------ train
    def train(self, spec: TrainSpec) -> TrainPlan:
        spec.output_model = self.models.resolve(spec.output_model, "output_model")
        src = pc.open_source(spec.source, spec.mip)
        rx, ry, rz = src.resolution_nm_xyz
        factor = spec.factor or int(round(rz / rx))
        if factor < 2:
            raise EmrestoreError("factor", f"the layer's voxel size {list(src.resolution_nm_xyz)} nm is not "
                                         "anisotropic; give a factor in [2, 16]")
        if spec.base_model:
            spec.base_model = self.models.resolve(spec.base_model, "base_model")
            base = self.models.metadata(spec.base_model)
            if base["task"] != "isotropic":
                raise FailedPrecondition("base_model", f"model does {base['task']}, not isotropic")
            factor = int(base["factor"])
        bounds = Box(src.start_zyx, src.stop_zyx)
        read = bounds
        if spec.region_start_xyz is not None:
            read = Box.from_xyz(spec.region_start_xyz, spec.region_stop_xyz)
            if not bounds.contains(read):
                raise EmrestoreError("region", f"lies outside the source bounds {src.describe_bounds()}")
        lo, hi = list(read.start), list(read.stop)
        shape = [b - a for a, b in zip(lo, hi)]
        message = ""
        while np.prod(shape) > MAX_TRAIN_VOXELS:  # centred crop, halving the largest lateral side
            ax = 1 if shape[1] >= shape[2] else 2
            c = (lo[ax] + hi[ax]) // 2
            shape[ax] //= 2
            lo[ax] = c - shape[ax] // 2
            hi[ax] = lo[ax] + shape[ax]
            message = f"training region capped to {MAX_TRAIN_VOXELS} voxels: z,y,x {lo}–{hi}"
        read = Box(tuple(lo), tuple(hi))
        if shape[1] <= factor or shape[2] <= factor:
            raise EmrestoreError("region", f"lateral size {shape[2]}×{shape[1]} too small for factor {factor}")
        target_box = None
        if spec.target:
            tgt = pc.open_source(spec.target, spec.mip)
            k = factor
            target_box = Box((lo[0] * k, lo[1], lo[2]), ((hi[0] - 1) * k + 1, hi[1], hi[2]))
            if tgt.size_xyz[2] < target_box.stop[0]:
                raise EmrestoreError("target", f"has {tgt.size_xyz[2]} sections; needs {target_box.stop[0]}")
        return TrainPlan(source=spec.source, mip=spec.mip, output_model=spec.output_model, factor=factor,
                         read=read, voxel_size_nm=tuple(src.resolution_nm_xyz), preset=spec.preset,
                         steps=spec.steps, seed=spec.seed, batch_size=spec.batch_size, patch=spec.patch,
                         base_model=spec.base_model, target=spec.target, target_box=target_box,
                         message=message)
