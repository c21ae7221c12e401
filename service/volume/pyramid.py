"""How an output layer is stored: its format (encoding, jpeg quality, sharded or not, target shard
size) and its pyramid — every scale down to a chunk-sized top — with each scale's bounds, chunk,
sharding and *write unit* (the box a task must write whole: a shard, or a chunk when unsharded).

Scales are absolute: voxel ``a`` of a scale with factor ``f`` (relative to mip 0) covers mip-0
voxels ``[a·f, (a+1)·f)``, so its centre is exactly where Neuroglancer draws it. A scale holds
every window that touches the data: ``[floor(start/f), ceil(stop/f))``; a window cut by the
data's edge averages the voxels it holds (no half-voxel shift whatever the voxel offset). Each
step halves x and y, and z too while the z resolution is at least as fine as the lateral one
(restored isotropic layers stay near-isotropic); the pyramid ends at the first scale whose x and y
fit in one chunk.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from .geometry import Box, ceildiv
from .sharding import shard_shape, sharding_spec

Vec3 = tuple[int, int, int]

ENCODINGS = ("raw", "png", "jpeg")
SHARDINGS = ("auto", "sharded", "unsharded")
#: jpeg quality when none is asked for and the source states none (bench/results/formats.md:
#: at 90 the restored FlyEM cube loses 0.2 dB against truth and keeps its gain over linear)
DEFAULT_JPEG_QUALITY = 90
#: target uncompressed bytes of one shard (and of one write task): igneous uses 3.5 GB for
#: transfers; a restoration task is ~10⁴× slower per voxel, so a smaller shard keeps one task
#: near a minute on a GPU and the work lost to a preempted worker small
DEFAULT_SHARD_BYTES = 2 ** 30
#: no layer has more scales than this (2^19 × 64 voxels is far beyond any EM volume)
MAX_SCALES = 20


@dataclass(frozen=True)
class LayerFormat:
    """How a layer's chunks are stored. ``jpeg_quality`` is used by jpeg only (1–100)."""

    encoding: str = "raw"
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    sharded: bool = False
    shard_bytes: int = DEFAULT_SHARD_BYTES

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "LayerFormat":
        d = d or {}
        return cls(encoding=str(d.get("encoding", "raw")), jpeg_quality=int(d.get("jpeg_quality", DEFAULT_JPEG_QUALITY)),
                   sharded=bool(d.get("sharded", False)), shard_bytes=int(d.get("shard_bytes", DEFAULT_SHARD_BYTES)))

    def describe(self) -> str:
        enc = f"jpeg (quality {self.jpeg_quality})" if self.encoding == "jpeg" else self.encoding
        return f"{enc}, {'sharded' if self.sharded else 'unsharded'}"


def downsample_step(resolution_nm_xyz: Sequence[float], factor_xyz: Sequence[int]) -> Vec3:
    """The next scale's factor: x and y halve; z halves too while the current z resolution is at
    least as fine as the lateral one."""
    rx, _, rz = (float(r) for r in resolution_nm_xyz)
    fx, fy, fz = (int(f) for f in factor_xyz)
    zstep = 2 if rz * fz <= rx * fx * (1 + 1e-9) else 1
    return (fx * 2, fy * 2, fz * zstep)


def downsample_factors(resolution_nm_xyz: Sequence[float], num_scales: int) -> tuple[Vec3, ...]:
    """Factors (relative to mip 0, xyz) of ``num_scales`` lower scales."""
    f: Vec3 = (1, 1, 1)
    out = []
    for _ in range(int(num_scales)):
        f = downsample_step(resolution_nm_xyz, f)
        out.append(f)
    return tuple(out)


def scale_bounds(start_zyx: Sequence[int], stop_zyx: Sequence[int], factor_zyx: Sequence[int]) -> Box:
    """Bounds of a scale: every window of ``factor`` that touches the mip-0 data."""
    return Box(start_zyx, stop_zyx).shrink_by(factor_zyx)


def pyramid_factors(size_xyz: Sequence[int], voxel_offset_xyz: Sequence[int],
                    resolution_nm_xyz: Sequence[float], chunk_xyz: Sequence[int]) -> tuple[Vec3, ...]:
    """Factors of every lower scale of a full pyramid (xyz): down to the first scale whose x and
    y fit in one chunk."""
    start = tuple(int(o) for o in voxel_offset_xyz)
    stop = tuple(o + int(s) for o, s in zip(start, size_xyz))
    f: Vec3 = (1, 1, 1)
    out: list[Vec3] = []

    def fits(fac) -> bool:
        return all(ceildiv(b, fi) - a // fi <= c for a, b, fi, c in zip(start[:2], stop[:2], fac[:2], chunk_xyz[:2]))

    while not fits(f) and len(out) < MAX_SCALES - 1:
        f = downsample_step(resolution_nm_xyz, f)
        out.append(f)
    return tuple(out)


@dataclass(frozen=True)
class ScaleSpec:
    """One scale of an output layer (zyx boxes; ``factor_zyx`` relative to mip 0)."""

    mip: int
    factor_zyx: Vec3
    bounds: Box
    resolution_nm_xyz: tuple[float, float, float]
    chunk_zyx: Vec3
    encoding: str
    sharding: dict | None = None
    jpeg_quality: int | None = None

    @property
    def key(self) -> str:
        return "_".join(f"{float(r):g}" for r in self.resolution_nm_xyz)

    @property
    def size_xyz(self) -> Vec3:
        return self.bounds.shape[::-1]  # type: ignore[return-value]

    @property
    def unit_zyx(self) -> Vec3:
        """The write unit: a shard (sharded) or a chunk."""
        if self.sharding is None:
            return self.chunk_zyx
        return shard_shape(self.sharding, self.size_xyz, self.chunk_zyx[::-1])[::-1]  # type: ignore[return-value]

    def units_in(self, box: Box) -> int:
        """How many write units (objects) a unit-aligned box of this scale holds."""
        b = box.intersect(self.bounds)
        if b.empty:
            return 0
        rel = b.translate(tuple(-s for s in self.bounds.start)).snap(self.unit_zyx)
        return math.prod(ceildiv(hi, u) - lo // u for lo, hi, u in zip(rel.start, rel.stop, self.unit_zyx))

    def chunks_in(self, box: Box) -> int:
        """How many chunks a box of this scale touches."""
        b = box.intersect(self.bounds)
        if b.empty:
            return 0
        rel = b.translate(tuple(-s for s in self.bounds.start))
        return math.prod(ceildiv(hi, c) - lo // c for lo, hi, c in zip(rel.start, rel.stop, self.chunk_zyx))

    def info_entry(self) -> dict:
        def num(v: float):
            return int(v) if float(v).is_integer() else float(v)

        e = {"key": self.key, "size": list(self.size_xyz), "voxel_offset": list(self.bounds.start[::-1]),
             "resolution": [num(r) for r in self.resolution_nm_xyz], "chunk_sizes": [list(self.chunk_zyx[::-1])],
             "encoding": self.encoding}
        if self.encoding == "jpeg" and self.jpeg_quality is not None:
            e["jpeg_quality"] = int(self.jpeg_quality)
        if self.sharding is not None:
            e["sharding"] = dict(self.sharding)
        return e


def layer_scales(size_xyz: Sequence[int], voxel_offset_xyz: Sequence[int], resolution_nm_xyz: Sequence[float],
                 chunk_xyz: Sequence[int], dtype_bytes: int, fmt: LayerFormat,
                 factors_xyz: Sequence[Sequence[int]] | None = None) -> list[ScaleSpec]:
    """Every scale of a layer stored as ``fmt``: mip 0 and the lower scales (``factors_xyz``, by
    default the full pyramid), each with its sharding (igneous' rule from the scale's own size)."""
    if factors_xyz is None:
        factors_xyz = pyramid_factors(size_xyz, voxel_offset_xyz, resolution_nm_xyz, chunk_xyz)
    start = tuple(int(o) for o in voxel_offset_xyz)[::-1]
    stop = tuple(int(o) + int(s) for o, s in zip(voxel_offset_xyz, size_xyz))[::-1]
    chunk_zyx = tuple(int(c) for c in chunk_xyz)[::-1]
    out = []
    for mip, f in enumerate([(1, 1, 1)] + [tuple(int(v) for v in f) for f in factors_xyz]):
        f_zyx = f[::-1]
        bounds = scale_bounds(start, stop, f_zyx)
        res = tuple(float(r) * fi for r, fi in zip(resolution_nm_xyz, f))
        spec = (sharding_spec(bounds.shape[::-1], chunk_zyx[::-1], dtype_bytes, fmt.encoding, fmt.shard_bytes)
                if fmt.sharded else None)
        out.append(ScaleSpec(mip, f_zyx, bounds, res, chunk_zyx, fmt.encoding, spec,  # type: ignore[arg-type]
                             fmt.jpeg_quality if fmt.encoding == "jpeg" else None))
    return out


def scales_from_info(info: dict) -> list[ScaleSpec]:
    """The scales of an existing layer's info (factors from the resolutions, relative to mip 0)."""
    scales = info["scales"]
    base = [float(r) for r in scales[0]["resolution"]]
    out = []
    for mip, s in enumerate(scales):
        res = tuple(float(r) for r in s["resolution"])
        f = tuple(max(1, int(round(r / b))) for r, b in zip(res, base))
        off = [int(v) for v in s.get("voxel_offset", (0, 0, 0))]
        size = [int(v) for v in s["size"]]
        bounds = Box(tuple(off[::-1]), tuple((o + n) for o, n in zip(off, size))[::-1])
        q = s.get("jpeg_quality")
        out.append(ScaleSpec(mip, f[::-1], bounds, res, tuple(int(c) for c in s["chunk_sizes"][0])[::-1],  # type: ignore[arg-type]
                             str(s.get("encoding", "raw")), s.get("sharding"), int(q) if q is not None else None))
    return out
