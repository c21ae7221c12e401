"""Block planning: read region = write region + context, writes chunk-aligned (as in daisy).

Coordinates are absolute voxel coordinates in zyx order: write boxes in output voxels, read
boxes and regions in source voxels. For an isotropic task by odd k, output z voxel j lies at
source position ``t = (j − h)/k`` with ``h = (k−1)/2``, between sections ``floor(t)`` and
``ceil(t)``; a write block ``[j0, j1)`` therefore reads sections
``floor((j0 − h)/k) … ceil((j1 − 1 − h)/k)``, clipped to the source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from .geometry import Box, Vec3
from .precomputed import VolumeInfo, _as_vec3, _fmt_box, output_geometry
from .stores import VolumeError

__all__ = [
    "Block",
    "Box",
    "Plan",
    "plan_blocks",
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


@dataclass(frozen=True)
class Plan:
    """Blocks of a job and the output box they cover.

    ``region`` is the requested source box (or None for the whole volume); ``write_box`` is the
    output box actually written (snapped outward to the write grid) and ``message`` says so in
    words when a region was given.
    """

    blocks: tuple[Block, ...]
    scale_xyz: Vec3
    block_size_xyz: Vec3
    lateral_context: int
    write_box: Box
    region: Box | None = None
    message: str | None = None

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self) -> Iterator[Block]:
        return iter(self.blocks)

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
        """JSON-ready form."""
        return {
            "blocks": [b.to_dict() for b in self.blocks],
            "scale_xyz": list(self.scale_xyz),
            "block_size_xyz": list(self.block_size_xyz),
            "lateral_context": self.lateral_context,
            "write_box": self.write_box.to_list(),
            "region": self.region.to_list() if self.region is not None else None,
            "message": self.message,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        """Inverse of :meth:`to_dict`."""
        sx, sy, sz = (int(v) for v in d["scale_xyz"])
        bx, by, bz = (int(v) for v in d["block_size_xyz"])
        return cls(
            blocks=tuple(Block.from_dict(b) for b in d["blocks"]),
            scale_xyz=(sx, sy, sz),
            block_size_xyz=(bx, by, bz),
            lateral_context=int(d["lateral_context"]),
            write_box=Box.from_list(d["write_box"]),
            region=Box.from_list(d["region"]) if d.get("region") else None,
            message=d.get("message"),
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


def plan_blocks(
    source: VolumeInfo,
    output: VolumeInfo,
    scale_xyz: Sequence[int],
    block_size_xyz: Sequence[int],
    lateral_context: int,
    region: tuple[Sequence[int], Sequence[int]] | None = None,
) -> Plan:
    """Split the output (or the output box of ``region``) into chunk-aligned write blocks.

    ``block_size_xyz`` is in output voxels and must be a multiple of
    ``output.write_alignment_zyx`` (the chunk size, times the largest downsampling factor when
    the layer has lower scales). ``lateral_context`` is extra source voxels read on each side
    in x and y (clipped at the volume). ``region=(start_zyx, stop_zyx)`` in source voxels is
    mapped to output voxels and snapped outward to the write grid, clipped at the upper bound.
    """
    scale = _as_vec3(scale_xyz, "scale", positive=True)
    fx, fy, k = scale
    _check_output(source, output, scale)  # also validates the scale (odd k, fx == fy)
    if output.chunk_size_xyz[2] % k:
        raise VolumeError("chunk_size", f"output chunk z {output.chunk_size_xyz[2]} is not a multiple of k={k}; allowed: m·{k}")
    bx, by, bz = _as_vec3(block_size_xyz, "block_size", positive=True)
    block_zyx = (bz, by, bx)
    unit = output.write_alignment_zyx
    if any(b % u for b, u in zip(block_zyx, unit)):
        raise VolumeError(
            "block_size",
            f"{[bx, by, bz]} (xyz) is not a multiple of the write grid {[unit[2], unit[1], unit[0]]} (xyz: chunk size "
            "times the largest downsampling factor)",
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
        message = (
            f"region {_fmt_box(region_box.start, region_box.stop)} (source voxels) {verb} output chunk "
            f"boundaries (write grid zyx {list(unit)}): output voxels {_fmt_box(write_box.start, write_box.stop)} "
            f"are written, covering source voxels {_fmt_box(covered.start, covered.stop)}"
        )

    first_sec, last_sec = src.start[0], src.stop[0] - 1
    blocks: list[Block] = []
    for w in write_box.tiles(block_zyx):
        # lateral context around the source voxels under the write box, clipped to the source
        lateral = w.shrink_by(scale_zyx).grow((0, ctx, ctx)).intersect(src)
        if k > 1:
            i0, i1 = sections_for_write_z(w.start[0], w.stop[0], k, first_sec, last_sec)
            rz, sections = (i0, i1 + 1), (i0, i1)
        else:
            rz, sections = (w.start[0], w.stop[0]), None
        read = Box((rz[0],) + lateral.start[1:], (rz[1],) + lateral.stop[1:])
        blocks.append(Block(index=len(blocks), read=read, write=w, sections=sections))
    return Plan(
        blocks=tuple(blocks),
        scale_xyz=scale,
        block_size_xyz=(bx, by, bz),
        lateral_context=ctx,
        write_box=write_box,
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
