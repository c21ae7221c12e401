"""Box: an axis-aligned box of voxels in zyx order (in the manner of daisy/funlib's Roi).

Boxes, blocks, reads, writes and arrays are z, y, x. Values the outside world gives in x, y, z
(request fields, server settings, Precomputed info and chunk names) carry an ``_xyz`` suffix and
become boxes with :meth:`Box.from_xyz` (back with :attr:`Box.start_xyz` / :attr:`Box.stop_xyz`).
``start`` is inclusive, ``stop`` exclusive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

Vec3 = tuple[int, int, int]


def _vec(v: Sequence[Any], name: str) -> Vec3:
    try:
        t = tuple(int(a) for a in v)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {v!r} must be three integers") from None
    if len(t) != 3:
        raise ValueError(f"{name}: {v!r} must be three integers")
    return (t[0], t[1], t[2])


def floordiv(a: int, b: int) -> int:
    return a // b


def ceildiv(a: int, b: int) -> int:
    return -((-a) // b)


@dataclass(frozen=True)
class Box:
    """Voxels ``start ≤ p < stop`` (zyx)."""

    start: Vec3
    stop: Vec3

    def __post_init__(self):
        object.__setattr__(self, "start", _vec(self.start, "start"))
        object.__setattr__(self, "stop", _vec(self.stop, "stop"))

    # -- construction / conversion at the edges
    @classmethod
    def from_xyz(cls, start_xyz: Sequence[int], stop_xyz: Sequence[int]) -> "Box":
        s, e = _vec(start_xyz, "start"), _vec(stop_xyz, "stop")
        return cls(s[::-1], e[::-1])

    @property
    def start_xyz(self) -> Vec3:
        return self.start[::-1]  # type: ignore[return-value]

    @property
    def stop_xyz(self) -> Vec3:
        return self.stop[::-1]  # type: ignore[return-value]

    def to_list(self) -> list[list[int]]:
        return [list(self.start), list(self.stop)]

    @classmethod
    def from_list(cls, v: Sequence[Sequence[int]]) -> "Box":
        return cls(tuple(v[0]), tuple(v[1]))  # type: ignore[arg-type]

    # -- properties
    @property
    def shape(self) -> Vec3:
        return tuple(b - a for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def size(self) -> int:
        z, y, x = self.shape
        return max(0, z) * max(0, y) * max(0, x)

    @property
    def empty(self) -> bool:
        return any(b <= a for a, b in zip(self.start, self.stop))

    def contains(self, other: "Box") -> bool:
        return all(a <= c for a, c in zip(self.start, other.start)) and \
            all(d <= b for b, d in zip(self.stop, other.stop))

    # -- algebra
    def intersect(self, other: "Box") -> "Box":
        return Box(tuple(max(a, c) for a, c in zip(self.start, other.start)),  # type: ignore[arg-type]
                   tuple(min(b, d) for b, d in zip(self.stop, other.stop)))

    def grow(self, before: Sequence[int], after: Sequence[int] | None = None) -> "Box":
        after = before if after is None else after
        return Box(tuple(a - g for a, g in zip(self.start, before)),  # type: ignore[arg-type]
                   tuple(b + g for b, g in zip(self.stop, after)))

    def scale(self, factor_zyx: Sequence[int]) -> "Box":
        """Multiply by ``factor`` (source voxels → output voxels)."""
        return Box(tuple(a * f for a, f in zip(self.start, factor_zyx)),  # type: ignore[arg-type]
                   tuple(b * f for b, f in zip(self.stop, factor_zyx)))

    def shrink_by(self, factor_zyx: Sequence[int]) -> "Box":
        """Divide by ``factor``, rounding outward (output voxels → covering source voxels)."""
        return Box(tuple(floordiv(a, f) for a, f in zip(self.start, factor_zyx)),  # type: ignore[arg-type]
                   tuple(ceildiv(b, f) for b, f in zip(self.stop, factor_zyx)))

    def snap(self, grid_zyx: Sequence[int], origin: Sequence[int] = (0, 0, 0)) -> "Box":
        """Snap outward to a grid of ``grid`` voxels anchored at ``origin``."""
        return Box(tuple(o + floordiv(a - o, g) * g for a, o, g in zip(self.start, origin, grid_zyx)),  # type: ignore[arg-type]
                   tuple(o + ceildiv(b - o, g) * g for b, o, g in zip(self.stop, origin, grid_zyx)))

    def translate(self, offset: Sequence[int]) -> "Box":
        return Box(tuple(a + o for a, o in zip(self.start, offset)),  # type: ignore[arg-type]
                   tuple(b + o for b, o in zip(self.stop, offset)))

    def slices(self, origin: Sequence[int] = (0, 0, 0)) -> tuple[slice, slice, slice]:
        """Slices of this box in an array whose first voxel is ``origin``."""
        return tuple(slice(a - o, b - o) for a, b, o in zip(self.start, self.stop, origin))  # type: ignore[return-value]

    def tiles(self, size_zyx: Sequence[int]):
        """Boxes of ``size`` tiling this box from its start, the last ones clipped."""
        (z0, y0, x0), (z1, y1, x1) = self.start, self.stop
        bz, by, bx = size_zyx
        for z in range(z0, z1, bz):
            for y in range(y0, y1, by):
                for x in range(x0, x1, bx):
                    yield Box((z, y, x), (min(z + bz, z1), min(y + by, y1), min(x + bx, x1)))

    def chunk_names(self, chunk_zyx: Sequence[int], bounds: "Box") -> list[str]:
        """Precomputed chunk file names (``x0-x1_y0-y1_z0-z1``) of the chunks this chunk-aligned
        box covers, chunks clipped at ``bounds`` (the layer's extent)."""
        return [f"{c.start[2]}-{c.stop[2]}_{c.start[1]}-{c.stop[1]}_{c.start[0]}-{c.stop[0]}"
                for c in (t.intersect(bounds) for t in self.tiles(chunk_zyx)) if not c.empty]

    def __str__(self) -> str:
        return f"z,y,x {list(self.start)}–{list(self.stop)}"
