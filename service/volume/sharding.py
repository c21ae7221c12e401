"""Sharded image scales: ``neuroglancer_uint64_sharded_v1`` with ``hash: identity`` over
compressed Morton codes, the layout cloud-volume and igneous write and Neuroglancer reads.

What decides where a chunk goes (Neuroglancer's precomputed sharded format): a chunk at grid
position ``g`` (chunks from the scale's voxel offset) has the compressed Morton code ``m(g)`` —
the bits of x, y, z interleaved, each axis contributing only the ``ceil(log2(grid))`` bits its
grid needs — and lies in shard ``(m >> preshift_bits >> minishard_bits) & (2^shard_bits − 1)``.
With identity hashing and ``shard_bits`` = the bits left above preshift + minishard, a shard is
an aligned box of ``2^bx × 2^by × 2^bz`` chunks (:func:`shard_shape_chunks`): the box a write task
must cover whole (cloud-volume refuses, and tensorstore asks for, shard-aligned writes).

:func:`sharding_spec` derives the parameters from the scale's size and a target shard size in
uncompressed bytes, by igneous' rule (``igneous.task_creation.image.create_sharded_image_info``,
the same as cloud-volume's ``sharding.compute_shard_params_for_image``): the largest power of two
of chunks within the target, minishards of at most 4000 chunks with a shard index ≤ 8 KiB, and
every remaining Morton bit in ``shard_bits`` (so no two boxes share a shard file). Written here,
checked against cloud-volume's functions in tests/test_sharding.py.
"""

from __future__ import annotations

import math
from typing import Sequence

from .geometry import Box, ceildiv

Vec3 = tuple[int, int, int]

SHARDED_TYPE = "neuroglancer_uint64_sharded_v1"
#: igneous' target for one shard's uncompressed bytes (MEMORY_TARGET) — a transfer's; a
#: restoration task is slower per voxel, so the service's default is smaller (planning.py)
IGNEOUS_SHARD_BYTES = int(3.5e9)
MAX_SHARD_INDEX_BYTES = 8192
MAX_MINISHARD_INDEX_BYTES = 40000
MAX_LABELS_PER_MINISHARD = 4000


def grid_size(size_xyz: Sequence[int], chunk_xyz: Sequence[int]) -> Vec3:
    """Chunks per axis of a scale (xyz)."""
    return tuple(max(1, ceildiv(int(s), int(c))) for s, c in zip(size_xyz, chunk_xyz))  # type: ignore[return-value]


def _bits(n: int) -> int:
    return int(math.ceil(math.log2(n))) if n > 1 else 0


def morton_bits(grid_xyz: Sequence[int]) -> Vec3:
    """Bits of each axis in the compressed Morton code (``ceil(log2(grid))``)."""
    return tuple(_bits(int(g)) for g in grid_xyz)  # type: ignore[return-value]


def compressed_morton_code(point_xyz: Sequence[int], grid_xyz: Sequence[int]) -> int:
    """Compressed Morton code of a chunk's grid position (Neuroglancer's definition)."""
    bits = morton_bits(grid_xyz)
    code, j = 0, 0
    for i in range(max(bits) if any(bits) else 0):
        for ax in range(3):
            if i < bits[ax]:
                code |= ((int(point_xyz[ax]) >> i) & 1) << j
                j += 1
    return code


def morton_point(code: int, grid_xyz: Sequence[int]) -> Vec3:
    """The grid position (xyz) of a compressed Morton code (inverse of :func:`compressed_morton_code`)."""
    bits = morton_bits(grid_xyz)
    p, j = [0, 0, 0], 0
    for i in range(max(bits) if any(bits) else 0):
        for ax in range(3):
            if i < bits[ax]:
                p[ax] |= ((int(code) >> j) & 1) << i
                j += 1
    return tuple(p)  # type: ignore[return-value]


def shard_box_of(spec: dict, name: str, size_xyz: Sequence[int], chunk_xyz: Sequence[int],
                 offset_xyz: Sequence[int]) -> tuple[Vec3, Vec3] | None:
    """The voxel box (xyz start, stop) a shard file holds, from its name; None for other names."""
    stem = name[:-len(".shard")] if name.endswith(".shard") else None
    try:
        number = int(stem, 16) if stem else None
    except ValueError:
        number = None
    if number is None:
        return None
    low = int(spec["preshift_bits"]) + int(spec["minishard_bits"])
    grid = grid_size(size_xyz, chunk_xyz)
    first = morton_point(number << low, grid)
    shape = shard_shape(spec, size_xyz, chunk_xyz)
    start = tuple(int(o) + g * int(c) for o, g, c in zip(offset_xyz, first, chunk_xyz))
    stop = tuple(min(a + s, int(o) + int(n)) for a, s, o, n in zip(start, shape, offset_xyz, size_xyz))
    return start, stop  # type: ignore[return-value]


def sharding_spec(size_xyz: Sequence[int], chunk_xyz: Sequence[int], dtype_bytes: int, encoding: str,
                  target_bytes: int = IGNEOUS_SHARD_BYTES) -> dict:
    """Sharding parameters of one scale by igneous' rule (see the module docstring)."""
    size = [int(v) for v in size_xyz]
    chunk = [int(v) for v in chunk_xyz]
    grid = grid_size(size, chunk)
    num_chunks = grid[0] * grid[1] * grid[2]
    max_bits = sum(morton_bits(grid))
    chunk_bytes = chunk[0] * chunk[1] * chunk[2] * int(dtype_bytes)
    per_shard = max(1, math.ceil(int(target_bytes) / chunk_bytes))
    per_shard = 2 ** int(math.log2(per_shard))
    if num_chunks < per_shard:
        per_shard = 2 ** _bits(num_chunks)
    num_shards = num_chunks / per_shard

    def update_bits():
        shard_bits = int(math.ceil(math.log2(num_shards))) if num_shards > 0 else 0
        pre = int(math.ceil(math.log2(per_shard))) if per_shard > 0 else 0
        return shard_bits, min(pre, max_bits - shard_bits)

    shard_bits, preshift = update_bits()
    labels, minishard = per_shard, 0
    while labels > MAX_LABELS_PER_MINISHARD:
        labels /= 2
        minishard += 1
        too_big = 3 * 8 * labels > MAX_MINISHARD_INDEX_BYTES and minishard > preshift
        if too_big or 2 * 8 * 2 ** minishard > MAX_SHARD_INDEX_BYTES:
            minishard -= 1
            num_shards *= 2
            shard_bits, preshift = update_bits()
    preshift -= minishard
    if size[2] == chunk[2]:  # one chunk deep: igneous adds the z bits it gave up
        extra, i = preshift // 3, 0
        while i < extra:
            max_bits += 1
            preshift += 1
            if preshift % 3:
                i += 1
    shard_bits = max(max_bits - preshift - minishard, 0)
    if max_bits > 64 or preshift < 0:
        raise ValueError(f"sharding: a scale of {size} voxels in chunks of {chunk} cannot be sharded "
                         f"({max_bits} Morton bits; preshift {preshift})")
    return {"@type": SHARDED_TYPE, "hash": "identity", "preshift_bits": preshift,
            "minishard_bits": minishard, "shard_bits": shard_bits,
            "minishard_index_encoding": "gzip",
            "data_encoding": "raw" if encoding in ("jpeg", "png") else "gzip"}


def check_spec(spec: dict, size_xyz: Sequence[int], chunk_xyz: Sequence[int]) -> str | None:
    """Why an existing scale's sharding cannot be written shard by shard (None when it can):
    only identity hashing makes a shard a box of chunks, and ``shard_bits`` must hold every
    Morton bit above the shard's (otherwise several boxes share one shard file)."""
    if spec.get("@type") != SHARDED_TYPE:
        return f"sharding type {str(spec.get('@type'))[:60]!r}; allowed: {SHARDED_TYPE}"
    if spec.get("hash") != "identity":
        return f"hash {str(spec.get('hash'))[:40]!r}: only identity hashing puts a box of chunks in one shard"
    try:
        pre, mini, shard = (int(spec[k]) for k in ("preshift_bits", "minishard_bits", "shard_bits"))
    except (KeyError, TypeError, ValueError):
        return "preshift_bits, minishard_bits and shard_bits must be integers"
    if min(pre, mini, shard) < 0 or pre + mini >= 64:
        return f"preshift {pre} + minishard {mini} bits must be ≥ 0 and < 64"
    total = sum(morton_bits(grid_size(size_xyz, chunk_xyz)))
    if pre + mini + shard < total:
        return (f"shard_bits {shard} + preshift {pre} + minishard {mini} < the {total} Morton bits of the "
                "chunk grid: several boxes would share one shard file")
    return None


def shard_shape_chunks(spec: dict, size_xyz: Sequence[int], chunk_xyz: Sequence[int]) -> Vec3:
    """Chunks per shard along x, y, z: the low ``preshift + minishard`` Morton bits, dealt to the
    axes in the code's own order (an axis drops out once its grid needs no more bits)."""
    bits = morton_bits(grid_size(size_xyz, chunk_xyz))
    want = int(spec["preshift_bits"]) + int(spec["minishard_bits"])
    shape = [0, 0, 0]
    given = 0
    while given < want:
        changed = False
        for ax in range(3):
            if given < want and shape[ax] < bits[ax]:
                shape[ax] += 1
                given += 1
                changed = True
        if not changed:
            break
    return tuple(2 ** s for s in shape)  # type: ignore[return-value]


def shard_shape(spec: dict, size_xyz: Sequence[int], chunk_xyz: Sequence[int]) -> Vec3:
    """Voxels per shard along x, y, z (cloud-volume's ``image.shard_shape``)."""
    return tuple(int(c) * n for c, n in zip(chunk_xyz, shard_shape_chunks(spec, size_xyz, chunk_xyz)))  # type: ignore[return-value]


def shard_number(spec: dict, code: int) -> int:
    """The shard holding the chunk with Morton ``code`` (identity hash)."""
    pre, mini, bits = int(spec["preshift_bits"]), int(spec["minishard_bits"]), int(spec["shard_bits"])
    return ((code >> pre) >> mini) & ((1 << bits) - 1)


def shard_filename(spec: dict, number: int) -> str:
    """``{number:0Nx}.shard`` with N = ceil(shard_bits / 4) hex digits (Neuroglancer's name)."""
    return f"{number:x}".zfill(ceildiv(int(spec["shard_bits"]), 4)) + ".shard"


def shard_boxes(box: Box, bounds: Box, shape_zyx: Sequence[int]) -> list[Box]:
    """The shards (zyx boxes, clipped at ``bounds``, aligned to its start) a shard-aligned ``box``
    covers, in order."""
    out = []
    for t in Box(box.start, box.stop).tiles(shape_zyx):
        c = t.intersect(bounds)
        if not c.empty:
            out.append(c)
    return out
