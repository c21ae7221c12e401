"""A job's work as grids, not lists: stages of write tasks over the scales of the output layer.

A **task** is what the ledger tracks (one lease, one completion marker): a box of one scale
(its *base*) that covers whole write units — shards when the layer is sharded (so no two
workers ever write the same shard), chunks otherwise — and is written together with every lower
scale whose units it also covers whole. Stage 0 restores the source into mip 0 (block by block,
``Block``: read box = write box + context, as in daisy); each later stage builds the next scales
from the one below it (read back from the layer, averaged), as igneous runs one downsample task
per shard and scale. A stage starts once the stage before it is complete.

Tasks of a stage are the cells of a grid anchored at the scale's voxel offset, clipped to the
job's box at that scale; task ``i`` ↔ (stage, cell) is computed on demand (x fastest, then y, z),
so a plan of 10⁷ tasks is a few hundred bytes. Cells of unsharded layers grow to about the
target task size (``cell_bytes``); a sharded cell is one shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from .geometry import Box, ceildiv
from .pyramid import ScaleSpec

Vec3 = tuple[int, int, int]


@dataclass(frozen=True)
class Stage:
    """One stage: cells of ``cell`` voxels (zyx) of scale ``base_mip``, anchored at ``origin``,
    the job's cells ``first … first + counts`` clipped to ``clip``; writes ``base_mip … top_mip``."""

    index: int
    base_mip: int
    top_mip: int
    origin: Vec3
    cell: Vec3
    first: Vec3
    counts: Vec3
    clip: Box
    first_task: int
    factor: Vec3 = (1, 1, 1)  # the base scale's factor relative to mip 0 (zyx)

    @property
    def num_tasks(self) -> int:
        return math.prod(self.counts)

    @property
    def stop_task(self) -> int:
        return self.first_task + self.num_tasks

    def coords(self, local: int) -> Vec3:
        """Grid coordinates (zyx, absolute cells) of the stage's ``local``-th task (x fastest)."""
        nz, ny, nx = self.counts
        z, rest = divmod(int(local), ny * nx)
        y, x = divmod(rest, nx)
        return (self.first[0] + z, self.first[1] + y, self.first[2] + x)

    def local_of(self, coords: Sequence[int]) -> int:
        nz, ny, nx = self.counts
        z, y, x = (int(c) - f for c, f in zip(coords, self.first))
        return (z * ny + y) * nx + x

    def cell_box(self, coords: Sequence[int]) -> Box:
        start = tuple(o + c * s for o, c, s in zip(self.origin, coords, self.cell))
        return Box(start, tuple(a + s for a, s in zip(start, self.cell))).intersect(self.clip)

    def box(self, local: int) -> Box:
        """The task's box (zyx, voxels of the base scale)."""
        return self.cell_box(self.coords(local))

    def cells_over(self, box: Box) -> tuple[Vec3, Vec3]:
        """(first, stop) grid coordinates of the job's cells that intersect ``box``."""
        lo = tuple(max(f, (a - o) // s) for a, o, s, f in zip(box.start, self.origin, self.cell, self.first))
        hi = tuple(min(f + n, ceildiv(b - o, s)) for b, o, s, f, n in
                   zip(box.stop, self.origin, self.cell, self.first, self.counts))
        return lo, hi  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "base_mip": self.base_mip, "top_mip": self.top_mip, "origin": list(self.origin),
                "cell": list(self.cell), "first": list(self.first), "counts": list(self.counts),
                "clip": self.clip.to_list(), "first_task": self.first_task, "factor": list(self.factor)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Stage":
        def v(key):
            return tuple(int(a) for a in d[key])
        return cls(index=int(d["index"]), base_mip=int(d["base_mip"]), top_mip=int(d["top_mip"]), origin=v("origin"),
                   cell=v("cell"), first=v("first"), counts=v("counts"), clip=Box.from_list(d["clip"]),
                   first_task=int(d["first_task"]), factor=tuple(int(a) for a in d.get("factor", (1, 1, 1))))

    def key(self) -> tuple:
        """What makes two stages' cells the same tasks (incremental runs compare these)."""
        return (self.base_mip, self.top_mip, self.origin, self.cell, self.factor)


def _maps_to_units(c: int, lo: int, hi: int, f: int, unit: int, start_j: int) -> bool:
    """Does coordinate ``c`` of a base scale (bounds lo..hi) fall on a unit boundary of a scale
    ``f`` times coarser (whose bounds start at ``start_j``)?"""
    if c == lo or c == hi:
        return True  # the scale's own bounds map onto the coarser scale's bounds
    return c % f == 0 and (c // f - start_j) % unit == 0


def aligned(base: ScaleSpec, origin: Sequence[int], cell: Sequence[int], clip: Box, lower: ScaleSpec) -> bool:
    """True when every task of this grid covers whole write units of ``lower`` (so the task can
    write that scale too, averaged from its own data)."""
    for ax in range(3):
        f, rem = divmod(lower.factor_zyx[ax], base.factor_zyx[ax])
        if rem:
            return False
        lo, hi = base.bounds.start[ax], base.bounds.stop[ax]
        u, sj = lower.unit_zyx[ax], lower.bounds.start[ax]
        edges = [clip.start[ax], clip.stop[ax]]
        o, s = origin[ax], cell[ax]
        first_inner = o + (((clip.start[ax] - o) // s) + 1) * s
        if first_inner < clip.stop[ax]:  # interior cell boundaries: o + n·s
            edges += [first_inner, first_inner + s] if first_inner + s < clip.stop[ax] else [first_inner]
            if first_inner + s < clip.stop[ax] and (s % f or (s // f) % u):
                return False
        if not all(_maps_to_units(c, lo, hi, f, u, sj) for c in edges):
            return False
    return True


def grown_cell(unit: Sequence[int], clip: Box, voxel_bytes: int, cell_bytes: int) -> Vec3:
    """``unit`` doubled along x, y, z in turn while the cell stays within ``cell_bytes`` and
    smaller than the box it tiles."""
    cell = [int(u) for u in unit]
    grew = True
    while grew:
        grew = False
        for ax in (2, 1, 0):
            if cell[ax] < clip.shape[ax] and math.prod(cell) * 2 * voxel_bytes <= cell_bytes:
                cell[ax] *= 2
                grew = True
    return tuple(cell)  # type: ignore[return-value]


def plan_stages(scales: Sequence[ScaleSpec], job_box: Box, stage0_unit: Sequence[int], voxel_bytes: int,
                cell_bytes: int) -> tuple[Stage, ...]:
    """The stages that write every scale of a job whose mip-0 box is ``job_box`` (already snapped
    to ``stage0_unit``: the restoration block, or the shard when sharded)."""
    stages: list[Stage] = []
    a, first_task = 0, 0
    while a < len(scales):
        sc = scales[a]
        if a == 0:
            clip, unit = job_box.intersect(sc.bounds), tuple(stage0_unit)
        else:
            clip = job_box.shrink_by(sc.factor_zyx).intersect(sc.bounds)
            clip = clip.snap(sc.unit_zyx, sc.bounds.start).intersect(sc.bounds)
            unit = sc.unit_zyx
        cell = unit if sc.sharding is not None else grown_cell(unit, clip, voxel_bytes, cell_bytes)
        origin = sc.bounds.start
        top = a
        while top + 1 < len(scales) and aligned(sc, origin, cell, clip, scales[top + 1]):
            top += 1
        first = tuple((s - o) // c for s, o, c in zip(clip.start, origin, cell))
        counts = tuple(ceildiv(e - o, c) - f for e, o, c, f in zip(clip.stop, origin, cell, first))
        st = Stage(len(stages), a, top, origin, cell, first, counts, clip, first_task, sc.factor_zyx)  # type: ignore[arg-type]
        stages.append(st)
        first_task += st.num_tasks
        a = top + 1
    return tuple(stages)


def stage_of(stages: Sequence[Stage], task: int) -> Stage:
    for st in stages:
        if st.first_task <= task < st.stop_task:
            return st
    raise IndexError(f"task {task} is not in the plan (0..{stages[-1].stop_task - 1 if stages else -1})")


def tiles(box: Box, size_zyx: Sequence[int]) -> Iterator[Box]:
    """Boxes of ``size`` tiling ``box`` from its start (the last ones clipped)."""
    return box.tiles(size_zyx)
