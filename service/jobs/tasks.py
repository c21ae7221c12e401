"""What one task of a restore plan does (worker.py runs them; the pool worker too).

- **Stage 0** (restoration): the task's mip-0 box is restored block by block (each block read
  while the model works on the previous one), assembled in memory, and written with every lower
  scale the task covers whole — one object per shard when sharded. The uncertainty goes to its
  own layer the same way, as uint8 (``plan.uncertainty_full_scale``).
- **Later stages** (the pyramid): the task's box of scale ``a`` is averaged from scale ``a − 1``
  read back from the layer (missing chunks read as 0) and written with the scales above it.

Everything written is a function of the plan and the task: noise seeds derive from the job seed
and each block's read origin, so a task re-run after a crash writes the same bytes.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..engine.normalize import IntensityNorm
from ..engine.restore import derive_seed, restore
from ..volume import precomputed as pc
from ..volume.blocks import Block, Task, assemble_isotropic, crop_to_write_box
from ..volume.missing import fill_from_nearest, output_present
from ..volume.reader import Cutout, LayerReader
from ..volume.writing import pool_mean
from .plans import RestorePlan


class Cancelled(Exception):
    """The job was cancelled while a task ran (nothing of the task was written)."""


def read_block(plan: RestorePlan, block: Block) -> Cutout:
    """The source voxels a block reads and which of them are missing (a one-shot reader; workers
    pass ``read`` functions over their own reader, one per worker and layer)."""
    return LayerReader(plan.source).read(block.read, plan.mip)


def restore_block(plan: RestorePlan, block: Block, model, source: np.ndarray | Cutout):
    """Restore one block's read box; returns (mean, std, result) cropped to the write box
    (``result`` carries timing and score; None when nothing had to be generated).

    ``source`` is the read box's voxels, or the reader's Cutout, which says which chunks are
    missing: then the output over missing voxels is 0 (no data) and the network sees the nearest
    present tissue there (volume/missing.py); ``mean`` is None when no output voxel has a source
    (the block is skipped)."""
    present = None
    if isinstance(source, Cutout):
        present, source = source.present, source.data
    if present is not None:
        valid = output_present(present, block, plan.scale_xyz)
        if not valid.any():
            return None, None, None
        source_nm_zyx = tuple(r * s for r, s in zip(plan.output_resolution_nm_xyz, plan.scale_xyz))[::-1]
        mean, std, res = restore_block(plan, block, model, fill_from_nearest(source, present, source_nm_zyx))
        mean[~valid] = 0
        if std is not None:
            std[~valid] = 0
        return mean, std, res
    norm = IntensityNorm.from_dict(plan.norm)
    fx, _, k = plan.scale_xyz
    # noise seed: job seed + the block's lateral origin; images (gaps/sections) add their global index
    seed = derive_seed(plan.seed, block.read.start[1], block.read.start[2])
    if k > 1 and source.shape[0] == 1:
        # the layer's last chunk can hold just the last section: nothing to generate
        mean = assemble_isotropic(source.astype(plan.output_dtype), block.sections[0], block, k)
        return mean, (np.zeros(mean.shape, np.float32) if plan.samples > 1 or plan.uncertainty_output else None), None
    extra = {"estimate": plan.estimate} if plan.estimate else {}
    # the source's voxel size (the engine refuses a z/xy ratio the model did not learn)
    source_nm_xyz = tuple(r * s for r, s in zip(plan.output_resolution_nm_xyz, plan.scale_xyz))
    res = restore(model, source, sampler=plan.sampler, steps=plan.steps, samples=plan.samples,
                  seed=seed, norm=norm, tile=plan.tile, overlap=plan.overlap,
                  image_ids_offset=block.read.start[0], out_dtype=plan.output_dtype,
                  device=os.environ.get("EMRESTORE_DEVICE", "auto"), voxel_size_nm=source_nm_xyz,
                  uncertainty=bool(plan.uncertainty_output), **extra)
    if k > 1:
        mean = assemble_isotropic(res.mean, block.sections[0], block, k)
        std = assemble_isotropic(res.std, block.sections[0], block, k) if res.std is not None else None
    else:
        mean = crop_to_write_box(res.mean, block, (fx, fx, 1))
        std = crop_to_write_box(res.std, block, (fx, fx, 1)) if res.std is not None else None
    return mean, std, res


def restore_cutout(plan: RestorePlan, block: Block, model, source: np.ndarray | Cutout):
    """A cutout's (mean, std, result): as :func:`restore_block`, but a cutout without any source
    (missing tissue) is all no data (zeros) rather than skipped."""
    mean, std, res = restore_block(plan, block, model, source)
    if mean is None:
        mean = np.zeros(block.write.shape, dtype=plan.output_dtype)
        std = np.zeros(block.write.shape, dtype=np.float32) if plan.samples > 1 else None
    return mean, std, res


def count_missing(counts: dict | None, source, mean) -> None:
    """Count a block read with missing source chunks: ``skipped`` (no output voxel has a source,
    nothing written) or ``partial`` (its no-data voxels written as 0)."""
    if counts is not None and isinstance(source, Cutout) and source.missing:
        key = "skipped" if mean is None else "partial"
        counts[key] = counts.get(key, 0) + 1


def encode_std(plan: RestorePlan, std: np.ndarray) -> np.ndarray:
    """The uncertainty as the layer stores it (uint8 with the plan's full scale; float32 for
    plans of older emrestore)."""
    if plan.uncertainty_full_scale:
        return pc.encode_uncertainty(std, "uint8", plan.uncertainty_full_scale)
    return pc.encode_uncertainty(std, "float32")


def restore_task(plan: RestorePlan, task: Task, model, cancelled=lambda: False, read=read_block,
                 counts: dict | None = None, order=None):
    """Restore a stage-0 task: (mean, std encoded or None, worst check result or None); mean is
    None when no block had any source (``restore_block`` gives None for a block whose source is
    all missing tissue: such a block stays 0, no data, and a task of only those writes nothing).
    ``counts`` counts blocks with missing source (:func:`count_missing`); ``order(block)`` is a
    sort key for the blocks (the worker's: the source shard a block's read starts in)."""
    blocks = plan.blocks.blocks_in(task)
    if order is not None:
        blocks = sorted(blocks, key=lambda b: (order(b), b.index))
    box = task.box
    mean_buf = np.zeros(box.shape, np.dtype(plan.output_dtype))
    std_buf = None
    worst = None
    restored = 0
    pool = ThreadPoolExecutor(max_workers=1)  # reads the next block while the model runs
    try:
        pending = pool.submit(read, plan, blocks[0]) if blocks else None
        for n, b in enumerate(blocks):
            data = pending.result()
            pending = pool.submit(read, plan, blocks[n + 1]) if n + 1 < len(blocks) else None
            if n and cancelled():
                raise Cancelled()
            mean, std, res = restore_block(plan, b, model, data)
            count_missing(counts, data, mean)
            if mean is None:
                continue
            restored += 1
            mean_buf[b.write.slices(box.start)] = mean
            if std is not None and plan.uncertainty_output:
                enc = encode_std(plan, std)
                if std_buf is None:
                    std_buf = np.zeros(box.shape, enc.dtype)
                std_buf[b.write.slices(box.start)] = enc
            if res is not None and res.score is not None and (worst is None or res.score > worst.score):
                worst = res
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    if blocks and not restored:
        return None, None, None
    return mean_buf, std_buf, worst


def _layers(plan: RestorePlan) -> list[str]:
    return [plan.output] + ([plan.uncertainty_output] if plan.uncertainty_output else [])


def write_restored(plan: RestorePlan, task: Task, mean: np.ndarray, std: np.ndarray | None) -> str:
    """Write a stage-0 task's arrays into its scales of the output (and uncertainty) layer."""
    if task.stage is None:  # explicit blocks (plans of format 1): mip 0 and every lower scale
        pc.write_zyx(plan.output, task.box.start, mean)
        pc.write_downsampled(plan.output, task.box.start, mean)
        if plan.uncertainty_output and std is not None:
            pc.write_zyx(plan.uncertainty_output, task.box.start, std)
            pc.write_downsampled(plan.uncertainty_output, task.box.start, std)
    else:
        top = task.stage.top_mip
        pc.write_scales(plan.output, task.box.start, mean, 0, top)
        if plan.uncertainty_output and std is not None:
            pc.write_scales(plan.uncertainty_output, task.box.start, std, 0, top)
    return hashlib.sha256(np.ascontiguousarray(mean).tobytes()).hexdigest()


def build_scales(plan: RestorePlan, task: Task, tile_xy: int = 1024) -> str:
    """A later stage's task: average its box of scale ``a`` from scale ``a − 1`` of each layer and
    write the scales ``a … top``; returns the digest of the output's scale-``a`` box. The box is
    built a slab at a time (one chunk of z, at most ``tile_xy`` square), so a task reads at most a
    few slabs of the scale below at once, whatever its shard's size."""
    from ..volume.pyramid import scales_from_info
    from ..volume.writing import _to_dtype, layer_writer
    st = task.stage
    a = st.base_mip
    digest = ""
    for url in _layers(plan):
        cv = layer_writer(url)
        scales = scales_from_info(cv.info)
        below, here = scales[a - 1], scales[a]
        f = tuple(x // y for x, y in zip(here.factor_zyx, below.factor_zyx))
        out = np.zeros(task.box.shape, np.dtype(cv.info["data_type"]))
        reader = LayerReader(url, "output")  # the scale below, complete (missing chunks read as 0)
        for tile in task.box.tiles((here.chunk_zyx[0], tile_xy, tile_xy)):
            read = tile.scale(f).intersect(below.bounds)
            data = reader.read(read, a - 1).data
            pooled, at = pool_mean(data, read.start, f)
            if tuple(at) != tile.start or pooled.shape != tile.shape:
                raise ValueError(f"task {task.index}: scale {a} box {tile} does not match the averaged "
                                 f"read of scale {a - 1} ({read}); the plan does not fit the layer")
            out[tile.slices(task.box.start)] = _to_dtype(pooled, cv.info["data_type"])
        pc.write_scales(url, task.box.start, out, a, st.top_mip)
        if url == plan.output:
            digest = hashlib.sha256(out.tobytes()).hexdigest()
    return digest
