"""Block planning: read region = write region + context, writes chunk-aligned (as in daisy).

Coordinates are absolute voxel coordinates in zyx order: write boxes in output voxels, read
boxes and regions in source voxels. For an isotropic task by odd k, output z voxel j lies at
source position ``t = (j − h)/k`` with ``h = (k−1)/2``, between sections ``floor(t)`` and
``ceil(t)``; a write block ``[j0, j1)`` therefore reads sections
``floor((j0 − h)/k) … ceil((j1 − 1 − h)/k)``, clipped to the source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import numpy as np

from .geometry import Box, Vec3, ceildiv
from .grid import Stage, plan_stages, stage_of
from .precomputed import VolumeInfo, _as_vec3, _fmt_box, output_geometry
from .pyramid import LayerFormat, ScaleSpec, layer_scales
from .stores import VolumeError

__all__ = [
    "Block",
    "Box",
    "Plan",
    "Task",
    "plan_blocks",
    "output_scales",
    "write_grid",
    "sections_for_write_z",
    "assemble_isotropic",
    "crop_to_write_box",
]

from .geometry import ceildiv as _ceildiv
from .geometry import floordiv as _floordiv


@dataclass(frozen=True)
class Block:
    """One unit of work: restore ``read`` (a box of source voxels) and write ``write`` (a box of
    output voxels), both zyx.

    ``sections=(i0, i1)`` is the inclusive range of source sections read by an isotropic task
    (None otherwise); the read z range is then ``[i0, i1 + 1)``.
    """

    index: int
    read: Box
    write: Box
    sections: tuple[int, int] | None = None

    # short-hands for the boxes' corners (zyx)
    @property
    def write_start(self) -> Vec3:
        return self.write.start

    @property
    def write_stop(self) -> Vec3:
        return self.write.stop

    @property
    def read_start(self) -> Vec3:
        return self.read.start

    @property
    def read_stop(self) -> Vec3:
        return self.read.stop

    @property
    def write_shape(self) -> Vec3:
        """Shape (Z, Y, X) of the write box."""
        return self.write.shape

    @property
    def read_shape(self) -> Vec3:
        """Shape (Z, Y, X) of the read box."""
        return self.read.shape

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (boxes as [start_zyx, stop_zyx])."""
        return {"index": self.index, "read": self.read.to_list(), "write": self.write.to_list(),
                "sections": list(self.sections) if self.sections is not None else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Block":
        """Inverse of :meth:`to_dict`."""
        sec = d.get("sections")
        return cls(index=int(d["index"]), read=Box.from_list(d["read"]), write=Box.from_list(d["write"]),
                   sections=(int(sec[0]), int(sec[1])) if sec is not None else None)


class _BlockCap(ValueError):
    pass


#: ``Plan.blocks`` lists blocks only up to this many (tests, cutouts, small regions); the
#: service walks tasks (``Plan.task``, ``Plan.blocks_in``) and never lists a whole dataset
MAX_LISTED_BLOCKS = 1_000_000


@dataclass(frozen=True)
class Task:
    """One ledger unit of a plan: ``box`` of scale ``stage.base_mip`` (None for explicit blocks)."""

    index: int
    box: Box
    stage: Stage | None = None

    @property
    def restores(self) -> bool:
        """True for stage-0 tasks (restoration); later stages build lower scales."""
        return self.stage is None or self.stage.index == 0


@dataclass(frozen=True)
class Plan:
    """A job's work: stages of tasks over the output layer's scales (grid.py), and the restoration
    blocks of stage 0 (read box = write box + context), computed on demand.

    ``write_box`` is the mip-0 box written (the region snapped outward to the write grid, or the
    whole layer) and ``message`` says so in words when a region was given. ``explicit`` lists the
    blocks of a plan without a layer (a cutout): each is one task.
    """

    stages: tuple[Stage, ...]
    scale_xyz: Vec3
    block_size_xyz: Vec3
    lateral_context: int
    write_box: Box
    source_box: Box
    region: Box | None = None
    message: str | None = None
    explicit: tuple[Block, ...] = ()

    # -- tasks
    @property
    def num_tasks(self) -> int:
        if self.explicit:
            return len(self.explicit)
        return self.stages[-1].stop_task if self.stages else 0

    def __len__(self) -> int:
        return self.num_tasks

    def task(self, index: int) -> Task:
        i = int(index)
        if self.explicit:
            return Task(i, self.explicit[i].write)
        st = stage_of(self.stages, i)
        return Task(i, st.box(i - st.first_task), st)

    def stage_tasks(self, stage: int) -> range:
        st = self.stages[stage]
        return range(st.first_task, st.stop_task)

    # -- restoration blocks of stage 0
    def _block(self, index: int, w: Box) -> Block:
        fx, _, k = self.scale_xyz
        lateral = w.shrink_by((k, fx, fx)).grow((0, self.lateral_context, self.lateral_context)).intersect(self.source_box)
        if k > 1:
            i0, i1 = sections_for_write_z(w.start[0], w.stop[0], k, self.source_box.start[0], self.source_box.stop[0] - 1)
            rz, sections = (i0, i1 + 1), (i0, i1)
        else:
            rz, sections = (w.start[0], w.stop[0]), None
        read = Box((rz[0],) + lateral.start[1:], (rz[1],) + lateral.stop[1:])
        return Block(index=index, read=read, write=w, sections=sections)

    def blocks_in(self, task: int | Task) -> list[Block]:
        """The restoration blocks of a stage-0 task (tiles of the block size from its start)."""
        t = task if isinstance(task, Task) else self.task(task)
        if self.explicit:
            return [self.explicit[t.index]]
        if not t.restores:
            return []
        bx, by, bz = self.block_size_xyz
        return [self._block(n, w) for n, w in enumerate(t.box.tiles((bz, by, bx)))]

    @property
    def num_blocks(self) -> int:
        """Restoration blocks in the whole job (without listing them)."""
        if self.explicit:
            return len(self.explicit)
        if not self.stages:
            return 0
        st = self.stages[0]
        block = self.block_size_xyz[::-1]
        total = 1
        for ax in range(3):
            n = 0
            for c in range(st.first[ax], st.first[ax] + st.counts[ax]):
                a = max(st.clip.start[ax], st.origin[ax] + c * st.cell[ax])
                b = min(st.clip.stop[ax], st.origin[ax] + (c + 1) * st.cell[ax])
                n += ceildiv(b - a, block[ax])
            total *= n
        return total

    def iter_blocks(self) -> Iterator[Block]:
        """Every restoration block of the job, numbered in task order."""
        n = 0
        for i in range(self.stages[0].num_tasks if self.stages else len(self.explicit)):
            for b in self.blocks_in(i):
                yield replace(b, index=n)
                n += 1

    @property
    def blocks(self) -> tuple[Block, ...]:
        """All restoration blocks (small plans only: at most ``MAX_LISTED_BLOCKS``)."""
        if self.explicit:
            return self.explicit
        if self.num_blocks > MAX_LISTED_BLOCKS:
            raise _BlockCap(f"this plan has {self.num_blocks} blocks; walk its tasks instead of listing them")
        return tuple(self.iter_blocks())

    def __iter__(self) -> Iterator[Block]:
        return self.iter_blocks()

    @property
    def write_start(self) -> Vec3:
        return self.write_box.start

    @property
    def write_stop(self) -> Vec3:
        return self.write_box.stop

    @property
    def snapped_region(self) -> tuple[Vec3, Vec3] | None:
        return (self.write_box.start, self.write_box.stop) if self.region is not None else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (a few hundred bytes whatever the job's size)."""
        return {
            "stages": [s.to_dict() for s in self.stages],
            "scale_xyz": list(self.scale_xyz),
            "block_size_xyz": list(self.block_size_xyz),
            "lateral_context": self.lateral_context,
            "write_box": self.write_box.to_list(),
            "source_box": self.source_box.to_list(),
            "region": self.region.to_list() if self.region is not None else None,
            "message": self.message,
            "explicit": [b.to_dict() for b in self.explicit],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        """Inverse of :meth:`to_dict`; also reads the block lists of plan format 1 (as explicit blocks)."""
        sx, sy, sz = (int(v) for v in d["scale_xyz"])
        bx, by, bz = (int(v) for v in d["block_size_xyz"])
        explicit = tuple(Block.from_dict(b) for b in d.get("explicit") or d.get("blocks") or ())
        write_box = Box.from_list(d["write_box"])
        return cls(
            stages=tuple(Stage.from_dict(s) for s in d.get("stages") or ()),
            scale_xyz=(sx, sy, sz),
            block_size_xyz=(bx, by, bz),
            lateral_context=int(d["lateral_context"]),
            write_box=write_box,
            source_box=Box.from_list(d["source_box"]) if d.get("source_box") else write_box,
            region=Box.from_list(d["region"]) if d.get("region") else None,
            message=d.get("message"),
            explicit=explicit,
        )


def sections_for_write_z(j0: int, j1: int, k: int, first_section: int, last_section: int) -> tuple[int, int]:
    """Inclusive source sections ``(i0, i1)`` needed to restore output z ``[j0, j1)`` by odd k."""
    h = (k - 1) // 2
    i0 = _floordiv(j0 - h, k)
    i1 = _ceildiv(j1 - 1 - h, k)
    return max(i0, first_section), min(i1, last_section)


def _check_output(source: VolumeInfo, output: VolumeInfo, scale: Vec3) -> None:
    expected = output_geometry(source, scale, dtype=output.dtype)
    if (
        expected.size_xyz != output.size_xyz
        or expected.voxel_offset_xyz != output.voxel_offset_xyz
        or not np.allclose(expected.resolution_nm_xyz, output.resolution_nm_xyz, rtol=1e-6)
    ):
        raise VolumeError(
            "output",
            f"output size {list(output.size_xyz)} offset {list(output.voxel_offset_xyz)} resolution "
            f"{list(output.resolution_nm_xyz)} does not match the source scaled by {list(scale)}: size "
            f"{list(expected.size_xyz)} offset {list(expected.voxel_offset_xyz)} resolution {list(expected.resolution_nm_xyz)}",
        )


def output_scales(output: VolumeInfo, fmt: LayerFormat | None = None) -> list[ScaleSpec]:
    """The scales of an output geometry: mip 0 and its ``downsample_factors_xyz``, stored as ``fmt``."""
    return layer_scales(output.size_xyz, output.voxel_offset_xyz, output.resolution_nm_xyz, output.chunk_size_xyz,
                        np.dtype(output.dtype).itemsize, fmt or LayerFormat(), output.downsample_factors_xyz)


def write_grid(scales: Sequence[ScaleSpec]) -> Vec3:
    """The grid (zyx) a job's mip-0 box snaps to: the shard when sharded; else the chunk times the
    first lower scale's factor (a block then writes mip 1 too)."""
    s0 = scales[0]
    if s0.sharding is not None:
        return s0.unit_zyx
    f = scales[1].factor_zyx if len(scales) > 1 else (1, 1, 1)
    return tuple(c * fi for c, fi in zip(s0.chunk_zyx, f))  # type: ignore[return-value]


def plan_blocks(
    source: VolumeInfo,
    output: VolumeInfo,
    scale_xyz: Sequence[int],
    block_size_xyz: Sequence[int],
    lateral_context: int,
    region: tuple[Sequence[int], Sequence[int]] | None = None,
    *,
    scales: Sequence[ScaleSpec] | None = None,
    cell_bytes: int | None = None,
) -> Plan:
    """Split the output (or the output box of ``region``) into stages of tasks and restoration blocks.

    ``block_size_xyz`` (output voxels) must be a multiple of the write grid (:func:`write_grid`:
    the chunk times mip 1's factor; unsharded layers). ``scales`` (default: ``output``'s own,
    unsharded raw) say how the layer is stored. ``lateral_context`` is extra source voxels read on
    each side in x and y (clipped at the volume). ``region=(start_zyx, stop_zyx)`` in source voxels
    is mapped to output voxels and snapped outward to the write grid (the shard when sharded),
    clipped at the upper bound. ``cell_bytes``: target bytes of one unsharded task (default: one block).
    """
    scale = _as_vec3(scale_xyz, "scale", positive=True)
    fx, fy, k = scale
    _check_output(source, output, scale)  # also validates the scale (odd k, fx == fy)
    if output.chunk_size_xyz[2] % k:
        raise VolumeError("chunk_size", f"output chunk z {output.chunk_size_xyz[2]} is not a multiple of k={k}; allowed: m·{k}")
    scales = list(scales) if scales is not None else output_scales(output)
    bx, by, bz = _as_vec3(block_size_xyz, "block_size", positive=True)
    block_zyx = (bz, by, bx)
    unit = write_grid(scales)
    sharded = scales[0].sharding is not None
    grid_unit = scales[0].chunk_zyx if sharded else unit
    if any(b % u for b, u in zip(block_zyx, grid_unit)):
        raise VolumeError(
            "block_size",
            f"{[bx, by, bz]} (xyz) is not a multiple of the write grid {list(grid_unit[::-1])} (xyz: chunk size "
            "times the first downsampling factor)",
        )
    try:
        ctx = int(lateral_context)
        if ctx != lateral_context or ctx < 0:
            raise ValueError
    except (TypeError, ValueError):
        raise VolumeError("lateral_context", f"{lateral_context!r}; allowed: an integer >= 0 (source voxels)") from None

    src = Box(source.start_zyx, source.stop_zyx)
    out = Box(output.start_zyx, output.stop_zyx)
    scale_zyx = (k, fy, fx)

    message = None
    region_box = None
    if region is None:
        write_box = out
    else:
        try:
            r_start, r_stop = region
        except (TypeError, ValueError):
            raise VolumeError("region", f"{region!r} must be (start_zyx, stop_zyx) in source voxels") from None
        region_box = Box(_as_vec3(r_start, "region"), _as_vec3(r_stop, "region"))
        if region_box.empty:
            raise VolumeError("region", f"{_fmt_box(region_box.start, region_box.stop)} is empty; it must lie "
                                        f"within the source bounds {_fmt_box(src.start, src.stop)}")
        if not src.contains(region_box):
            raise VolumeError("region", f"{_fmt_box(region_box.start, region_box.stop)} lies outside the source "
                                        f"bounds {_fmt_box(src.start, src.stop)}")
        # output voxels whose centres lie in the source box, clipped to the output layer (an
        # isotropic layer spans the first to the last section centre only)
        wanted = region_box.scale(scale_zyx).intersect(out)
        write_box = wanted.snap(unit, out.start).intersect(out)
        covered = write_box.shrink_by(scale_zyx)
        verb = "was snapped outward to" if write_box != wanted else "already lies on"
        what = "shards" if sharded else "chunk boundaries"
        message = (
            f"region {_fmt_box(region_box.start, region_box.stop)} (source voxels) {verb} output {what} "
            f"(write grid zyx {list(unit)}): output voxels {_fmt_box(write_box.start, write_box.stop)} "
            f"are written, covering source voxels {_fmt_box(covered.start, covered.stop)}"
        )
    voxel_bytes = np.dtype(output.dtype).itemsize
    stage0_unit = scales[0].unit_zyx if sharded else block_zyx
    stages = plan_stages(scales, write_box, stage0_unit, voxel_bytes,
                         cell_bytes if cell_bytes else math.prod(block_zyx) * voxel_bytes)
    return Plan(
        stages=stages,
        scale_xyz=scale,
        block_size_xyz=(bx, by, bz),
        lateral_context=ctx,
        write_box=write_box,
        source_box=src,
        region=region_box,
        message=message,
    )


def _lateral_slices(restored: np.ndarray, block: Block, f: int) -> tuple[slice, slice]:
    exp = tuple(s * f for s in block.read_shape[1:])
    if tuple(restored.shape[1:]) != exp:
        raise VolumeError(
            "restored",
            f"lateral shape {tuple(restored.shape[1:])} does not match the block's read box {block.read_shape[1:]} times {f} = {exp}",
        )
    (_, wy0, wx0), (_, wy1, wx1) = block.write_start, block.write_stop
    _, ry0, rx0 = block.read_start
    oy, ox = wy0 - f * ry0, wx0 - f * rx0
    return slice(oy, oy + (wy1 - wy0)), slice(ox, ox + (wx1 - wx0))


def assemble_isotropic(restored: np.ndarray, i0: int, block: Block, k: int, out_z_size: int | None = None) -> np.ndarray:
    """The block's write box from an isotropic restoration of sections ``i0 …``.

    ``restored`` is (Z', Y, X) with ``restored[k·(i − i0)]`` = source section i and the k−1
    restored sections between; Y, X are the block's read box. Output voxel j takes
    ``restored[j − (k−1)/2 − k·i0]``; voxels before the first or after the last restored
    section (outside the data; none in layers made by ``output_geometry``) are 0. ``out_z_size``, when given, is the output layer's z size
    and is checked against the block.
    """
    restored = np.asarray(restored)
    if restored.ndim != 3:
        raise VolumeError("restored", f"shape {restored.shape} must be (Z, Y, X)")
    if k < 1 or k % 2 == 0:
        raise VolumeError("scale", f"k={k}; allowed: odd k >= 1")
    if block.sections is not None:
        s0, s1 = block.sections
        if not (i0 <= s0 and i0 + (restored.shape[0] - 1) / k >= s1):
            raise VolumeError(
                "restored",
                f"{restored.shape[0]} sections from section {i0} by k={k} do not cover the block's sections {s0}..{s1}",
            )
    wz0, wz1 = block.write_start[0], block.write_stop[0]
    if out_z_size is not None and wz1 - wz0 > out_z_size:
        raise VolumeError("block", f"write z {wz0}:{wz1} is longer than the output z size {out_z_size}")
    ys, xs = _lateral_slices(restored, block, 1)
    h = (k - 1) // 2
    idx = np.arange(wz0, wz1) - h - k * i0
    inside = (idx >= 0) & (idx < restored.shape[0])
    out = np.zeros((wz1 - wz0, ys.stop - ys.start, xs.stop - xs.start), dtype=restored.dtype)
    out[inside] = restored[idx[inside], ys, xs]
    return out


def crop_to_write_box(restored: np.ndarray, block: Block, scale_xyz: Sequence[int] = (1, 1, 1)) -> np.ndarray:
    """The block's write box from a denoise/super-resolution result of the read box (k = 1).

    ``restored`` is (read Z, read Y·f, read X·f).
    """
    fx, fy, k = _as_vec3(scale_xyz, "scale", positive=True)
    if k != 1:
        raise VolumeError("scale", f"k={k}; use assemble_isotropic for isotropic blocks")
    restored = np.asarray(restored)
    if restored.ndim != 3 or restored.shape[0] != block.read_shape[0]:
        raise VolumeError("restored", f"shape {restored.shape} does not match the block's read z extent {block.read_shape[0]}")
    ys, xs = _lateral_slices(restored, block, fx)
    oz = block.write_start[0] - block.read_start[0]
    return np.ascontiguousarray(restored[oz:oz + block.write_shape[0], ys, xs])
