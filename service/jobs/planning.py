"""Planning: a validated spec → a typed plan (plans.py), everything decided before anything is
written. Output geometry, dataset normalisation, incremental diffing (which blocks' chunks are
missing) and the training region are decided here, once; workers load the result.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

import numpy as np

from ..engine.model import gap_mismatch
from ..engine.normalize import IntensityNorm
from ..errors import EmrestoreError, FailedPrecondition, ResourceExhausted, quote
from ..volume import precomputed as pc
from ..volume.blocks import Block, Plan, plan_blocks, write_grid
from ..volume.geometry import Box
from ..volume.layers import check_format, layer_jobs
from ..volume.sharding import check_spec
from ..volume.pyramid import (
    DEFAULT_JPEG_QUALITY, DEFAULT_SHARD_BYTES, ENCODINGS, SHARDINGS, LayerFormat, layer_scales, pyramid_factors,
    scales_from_info,
)
from .models import ModelRegistry
from .plans import PlanMissing, RestorePlan, TrainPlan, plan_from_dict
from .spec import LATERAL_CONTEXT, CutoutSpec, RestoreSpec, TrainSpec

#: Training reads at most this many source voxels (a centred region when the layer is larger).
MAX_TRAIN_VOXELS = 64 * 1024 * 1024


def scale_for(task: str, factor: int) -> tuple[int, int, int]:
    """Output voxels per source voxel, xyz."""
    return {"isotropic": (1, 1, factor), "superres": (factor, factor, 1)}.get(task, (1, 1, 1))


#: dataset normalisation: at most NORM_CROPS crops of NORM_CROP² pixels × 1 section per scale tried
NORM_CROPS, NORM_CROP, NORM_MIN_VOXELS = 32, 256, 16_384


def _halton(n: int, base: int) -> np.ndarray:
    """The first n points of the van der Corput sequence in ``base`` (deterministic, well spread)."""
    out = np.zeros(n)
    for i in range(n):
        f, k, x = 1.0, i + 1, 0.0
        while k:
            f /= base
            x += f * (k % base)
            k //= base
        out[i] = x
    return out


def norm_crops(info: pc.VolumeInfo, n: int, crop: int = NORM_CROP) -> list[Box]:
    """``n`` crops of at most ``crop``² pixels × 1 section spread over the scale (a 3-D Halton
    sequence), each starting on a chunk corner so that it reads as few chunks as it can."""
    bounds = Box(info.start_zyx, info.stop_zyx)
    shape, chunk = bounds.shape, info.chunk_zyx
    ext = (1, min(crop, shape[1]), min(crop, shape[2]))
    out = []
    for fz, fy, fx in zip(_halton(n, 5), _halton(n, 3), _halton(n, 2)):
        start = []
        for f, a, size, e, c in zip((fz, fy, fx), bounds.start, shape, ext, chunk):
            p = a + int(f * (size - e + 1))
            if e > 1:  # snap down to the chunk grid, inside the layer
                p = max(a, a + (p - a) // c * c)
            start.append(min(p, a + size - e))
        out.append(Box(tuple(start), tuple(p + e for p, e in zip(start, ext))))
    return out


def dataset_norm(url: str, mip: int = 0) -> IntensityNorm:
    """Percentile normalisation of the whole dataset from a bounded sample: at most NORM_CROPS
    crops of NORM_CROP² pixels of one section, spread over the coarsest scale (≥ ``mip``) that
    still has sections of NORM_CROP² pixels and whose crops hold at least NORM_MIN_VOXELS voxels
    of tissue, trying finer scales (at most three in all) when the coarser ones are (almost)
    missing. Missing chunks are skipped, so absent tissue does not pull the percentiles towards
    0. Deterministic for the same layer; reads at most 3 × NORM_CROPS crops whatever its size."""
    from ..volume.reader import LayerReader
    reader = LayerReader(url)
    reader.volume_info(mip)  # checks the scale
    scales = [m for m in range(reader.num_scales - 1, mip - 1, -1)
              if min(reader.volume_info(m).size_xyz[:2]) >= NORM_CROP] or [mip]
    tried, best = 0, None
    for m in scales:
        info = reader.volume_info(m)
        parts = []
        for box in norm_crops(info, NORM_CROPS):
            cut = reader.read(box, m)
            parts.append(cut.data[cut.present] if cut.missing else cut.data.reshape(-1))
        sample = np.concatenate(parts)
        if best is None or sample.size > best.size:
            best = sample
        tried += 1
        if sample.size >= NORM_MIN_VOXELS or tried == 3:
            break
    if best is None or best.size == 0:
        raise FailedPrecondition("source", f"{url[:200]}: no chunk exists in {NORM_CROPS} crops spread over "
                                           f"{tried} scale(s): nothing to normalise (is the layer empty?)")
    return IntensityNorm.from_volume(best)


def source_format(url: str, mip: int = 0) -> dict:
    """How the source scale is stored: ``{"encoding", "sharded", "jpeg_quality"}``."""
    from ..volume.info import _read_info
    _, info = _read_info(url, "source")
    s = info["scales"][min(int(mip), len(info["scales"]) - 1)]
    return {"encoding": str(s.get("encoding", "raw")), "sharded": bool(s.get("sharding")),
            "jpeg_quality": s.get("jpeg_quality")}


def existing_layer(url: str, field: str) -> dict | None:
    """The info of an existing layer at ``url`` (None when there is none)."""
    from ..volume.info import _info_exists, _read_info
    if not _info_exists(pc.normalize_url(url), field):
        return None
    return _read_info(url, field)[1]


def output_format(src_dtype: str, src_fmt: dict, existing: dict | None, encoding: str = "",
                  jpeg_quality: int = 0, sharding: str = "auto", shard_bytes: int = DEFAULT_SHARD_BYTES,
                  region: bool = False) -> LayerFormat:
    """The output layer's format: what was asked for; else the existing layer's (a resume keeps
    its layer as it is); else the source's (a jpeg, sharded source gets jpeg, sharded outputs) —
    except that a region job's new layer is unsharded unless sharding is asked for: a sharded
    write covers whole shards (up to the 1 GiB target each), so a small region in the viewer
    would restore a whole shard around it.
    Refusals name the request field (output_encoding, jpeg_quality, output_sharding)."""
    if encoding and encoding not in ENCODINGS:
        raise EmrestoreError("output_encoding", f"{quote(encoding)}; allowed: {', '.join(ENCODINGS)} (or empty: as the source)")
    if sharding not in SHARDINGS:
        raise EmrestoreError("output_sharding", f"{quote(sharding)}; allowed: {', '.join(SHARDINGS)}")
    if jpeg_quality and not (isinstance(jpeg_quality, int) and 1 <= jpeg_quality <= 100):
        raise EmrestoreError("jpeg_quality", f"{quote(jpeg_quality)}; allowed: 1..100 (0: the default)")
    s0 = existing["scales"][0] if existing else None
    enc = encoding or (s0.get("encoding", "raw") if s0 else src_fmt.get("encoding", "raw"))
    if enc not in ENCODINGS:
        enc = "raw"  # e.g. a compressed_segmentation or jxl source: restored images are stored raw
    if not encoding and enc == "jpeg" and src_dtype != "uint8":
        enc = "raw"
    if enc == "png" and src_dtype not in ("uint8", "uint16") and not encoding:
        enc = "raw"
    q = jpeg_quality or (s0.get("jpeg_quality") if s0 else None) or src_fmt.get("jpeg_quality") or DEFAULT_JPEG_QUALITY
    if sharding == "auto":
        sharded = bool(s0.get("sharding")) if s0 else bool(src_fmt.get("sharded")) and not region
    else:
        sharded = sharding == "sharded"
    fmt = LayerFormat(encoding=enc, jpeg_quality=int(q), sharded=sharded, shard_bytes=int(shard_bytes))
    try:
        check_format(fmt, src_dtype)
    except pc.VolumeError as e:
        raise EmrestoreError(e.field, str(e).split(": ", 1)[-1]) from None
    return fmt


def uncertainty_full_scale(dtype: str, norm: IntensityNorm) -> float:
    """The std a uint8 uncertainty value of 255 stands for: 63.75 grey levels for uint8 sources
    (a quarter grey level per step; restored EM's error std is 5–15 grey levels), a quarter of
    the normalisation window for uint16 and float32 sources."""
    if dtype == "uint8":
        return 63.75
    return float(norm.hi - norm.lo) / 4.0


def inherited_tasks(ledger, plan: Plan, previous: list[str]) -> np.ndarray:
    """Tasks of ``plan`` that earlier jobs (ids, this ledger) with the same method already did:
    same stage cells (grid.Stage.key), done there, and — for later stages — every cell of the
    stage below that feeds them inherited too (else it is rebuilt). Reads the earlier jobs'
    done bitmaps, never their markers; returns sorted task indices."""
    inherited: list[np.ndarray] = []
    have_below = None  # bool grid of the previous stage: inherited cells
    for st in plan.stages:
        grid = np.zeros(st.counts, bool)
        for job_id in previous:
            try:
                old = plan_from_dict(ledger.get_plan(job_id), job_id)
            except (PlanMissing, KeyError, ValueError):
                continue
            if not isinstance(old, RestorePlan) or not old.blocks.stages:
                continue
            match = [o for o in old.blocks.stages if o.key() == st.key()]
            if not match:
                continue
            o = match[0]
            done = ledger.done_mask(job_id, o.first_task, o.stop_task).reshape(o.counts)
            lo = [max(a, b) for a, b in zip(st.first, o.first)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(st.first, st.counts, o.first, o.counts)]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            mine = tuple(slice(l - f, h - f) for l, h, f in zip(lo, hi, st.first))
            theirs = tuple(slice(l - f, h - f) for l, h, f in zip(lo, hi, o.first))
            grid[mine] |= done[theirs]
        if st.index > 0 and have_below is not None:
            prev = plan.stages[st.index - 1]
            for local in np.flatnonzero(grid):
                coords = st.coords(int(local))
                rel = tuple(x // y for x, y in zip(st.factor, prev.factor))
                need = st.cell_box(coords).scale(rel)
                lo, hi = prev.cells_over(need)
                sub = have_below[tuple(slice(a - f, b - f) for a, b, f in zip(lo, hi, prev.first))]
                if not sub.all():
                    grid.flat[local] = False
        have_below = grid
        inherited.append(st.first_task + np.flatnonzero(grid.reshape(-1)))
    return np.concatenate(inherited) if inherited else np.zeros(0, np.int64)


@dataclass
class RestorePlanning:
    """A restore plan and what the manager writes (or, on a dry run, reports) before recording it."""
    plan: RestorePlan
    geometry: pc.VolumeInfo
    provenance: dict
    output_exists: bool
    fmt: LayerFormat = LayerFormat()
    num_downsample_scales: int | None = None
    previous_jobs: tuple[str, ...] = ()   # earlier jobs of this method on the output (incremental)


class Planner:
    def __init__(self, models: ModelRegistry, block_size_xyz=(256, 256, 0), tile: int = 256,
                 overlap: int = 32, output_chunk_xyz=None, max_cutout_voxels: int = 4_194_304,
                 shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.models = models
        self.block_size_xyz = tuple(block_size_xyz)
        self.tile, self.overlap = tile, overlap
        self.output_chunk_xyz = output_chunk_xyz
        self.max_cutout_voxels = max_cutout_voxels
        self.shard_bytes = int(shard_bytes)
        self._norms: dict[tuple, IntensityNorm] = {}
        self._lock = threading.Lock()

    def norm(self, url: str, mip: int) -> IntensityNorm:
        with self._lock:
            if (url, mip) not in self._norms:
                self._norms[(url, mip)] = dataset_norm(url, mip)
            return self._norms[(url, mip)]

    def output_geometry(self, src: pc.VolumeInfo, scale, dtype: str, num_scales: int | None = None) -> pc.VolumeInfo:
        """The output's mip 0 with its lower scales' factors: the full pyramid (down to a
        chunk-sized top), or ``num_scales`` in all (an existing layer's count)."""
        k = scale[2]
        if self.output_chunk_xyz:
            chunk = tuple(self.output_chunk_xyz)
        else:
            cx, cy, _ = src.chunk_size_xyz
            cz = k * max(1, 16 // k) if k > 1 else src.chunk_size_xyz[2]
            chunk = (cx * scale[0], cy * scale[1], cz)
        geom = pc.output_geometry(src, scale, chunk_size_xyz=chunk, dtype=dtype)
        if num_scales is None:
            factors = pyramid_factors(geom.size_xyz, geom.voxel_offset_xyz, geom.resolution_nm_xyz, chunk)
        else:
            factors = pc.downsample_factors(geom.resolution_nm_xyz, max(0, num_scales - 1))
        return replace(geom, downsample_factors_xyz=factors)

    def block_size(self, scales) -> tuple[int, int, int]:
        """The configured block size (xyz), rounded up to the layer's write grid (the chunk times
        mip 1's factor; the chunk when sharded: a block is then part of a shard)."""
        uz, uy, ux = scales[0].chunk_zyx if scales[0].sharding is not None else write_grid(scales)
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
    def restore(self, spec: RestoreSpec, output_encoding: str = "", jpeg_quality: int = 0,
                output_sharding: str = "auto") -> RestorePlanning:
        """Plan a restore job: the output layer's format and pyramid, the stages of tasks, the
        normalisation; an incremental job also names the earlier jobs whose tasks it inherits.
        Reads the source's info, the output's info and provenance, and the normalisation crops;
        writes nothing."""
        src = pc.open_source(spec.source, spec.mip)
        model_url, meta = self._model(spec.model, spec.samples)
        if spec.uncertainty_output and spec.samples < 2 and not (meta.get("predictor_unet") or {}).get("error_head"):
            raise EmrestoreError("uncertainty_output", "this model has no error head (saved before it existed): "
                                                     "its uncertainty needs samples ≥ 2")
        task, factor = meta["task"], int(meta["factor"])
        why = gap_mismatch(task, factor, meta.get("gap"), src.resolution_nm_xyz)
        if why:
            raise FailedPrecondition("model", f"{why[:300]} (source {spec.source[:120]})")
        scale = scale_for(task, factor)
        existing = existing_layer(spec.output, "output")
        fmt = output_format(src.dtype, source_format(spec.source, spec.mip), existing, output_encoding,
                            jpeg_quality, output_sharding, self.shard_bytes,
                            region=spec.region_start_xyz is not None)
        n_scales = len(existing["scales"]) if existing else None
        geom = self.output_geometry(src, scale, src.dtype, n_scales)
        try:
            scales = layer_scales(geom.size_xyz, geom.voxel_offset_xyz, geom.resolution_nm_xyz, geom.chunk_size_xyz,
                                  np.dtype(src.dtype).itemsize, fmt, geom.downsample_factors_xyz)
        except ValueError as e:
            raise EmrestoreError("output_sharding", f"cannot shard this layer: {e}"[:300]) from None
        if existing and fmt.sharded:  # keep an existing layer's shards (they may follow another target size)
            old = scales_from_info(existing)
            if len(old) == len(scales):
                for o in old:
                    why = check_spec(o.sharding, o.size_xyz, o.chunk_zyx[::-1]) if o.sharding else None
                    if why:
                        raise EmrestoreError("output_sharding", f"the existing output layer's mip {o.mip} cannot be "
                                                              f"written shard by shard: {why}")
                scales = [replace(s, sharding=o.sharding) for s, o in zip(scales, old)]
        region = None
        if spec.region_start_xyz is not None:
            r = Box.from_xyz(spec.region_start_xyz, spec.region_stop_xyz)
            region = (r.start, r.stop)
        block_xyz = self.block_size(scales)
        whole = Box(geom.start_zyx, geom.stop_zyx)
        job_bytes = (whole.size if region is None else
                     Box.from_xyz(spec.region_start_xyz, spec.region_stop_xyz).size * int(np.prod(scale)))
        cell = int(min(fmt.shard_bytes, max(np.prod(block_xyz), job_bytes // 256) * np.dtype(src.dtype).itemsize))
        blocks = plan_blocks(src, geom, scale, block_xyz, LATERAL_CONTEXT, region, scales=scales, cell_bytes=cell)
        norm = self.norm(spec.source, spec.mip)
        provenance = {"source": spec.source, "model": model_url, "task": task, "factor": factor,
                      "sampler": spec.sampler, "steps": spec.steps, "samples": spec.samples, "seed": spec.seed}
        previous = tuple(layer_jobs(spec.output, provenance)) if (spec.incremental and existing) else ()
        plan = RestorePlan(
            source=spec.source, mip=spec.mip, output=spec.output,
            uncertainty_output=spec.uncertainty_output or None, model_url=model_url, task=task,
            factor=factor, scale_xyz=scale, output_resolution_nm_xyz=tuple(geom.resolution_nm_xyz),
            output_dtype=src.dtype, norm=norm.to_dict(), sampler=spec.sampler, steps=spec.steps,
            samples=spec.samples, seed=spec.seed, estimate=spec.estimate, tile=self.tile,
            overlap=self.overlap, blocks=blocks, num_blocks_planned=blocks.num_tasks,
            output_format=fmt.to_dict(),
            uncertainty_full_scale=uncertainty_full_scale(src.dtype, norm) if spec.uncertainty_output else None)
        return RestorePlanning(plan, geom, provenance, existing is not None, fmt, len(scales) - 1, previous)

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
            blocks=Plan(stages=(), scale_xyz=scale, block_size_xyz=write.shape[::-1],
                        lateral_context=LATERAL_CONTEXT, write_box=write, source_box=bounds, region=region,
                        explicit=(block,)),
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
