"""Test layers laid out the way labs store them (issue 23): uint8 jpeg (or raw, png), sharded
(``neuroglancer_uint64_sharded_v1``, identity hash) or not, any chunk size and voxel offset,
several scales, and chunks outside the tissue **never written**.

Written with cloud-volume's own codecs and shard synthesis (``chunks.encode``,
``ShardingSpecification.synthesize_shards``) and cloud-files (any store URL it reaches: file://,
an S3 alias, gs:// against the emulator), not through emrestore's writer, so a test reads what
another tool wrote. Shared by the reading tests (part A) and the output tests (part B).

    info = write_layer(url, vol_zyx, (8, 8, 24), voxel_offset_xyz=(40, 24, 3),
                       chunk_xyz=(32, 32, 3), encoding="jpeg", sharded=True,
                       absent=[Box((3, 24, 104), (12, 56, 136))], scales=2)
"""

from __future__ import annotations

import json
from typing import Callable, Sequence

import numpy as np

from service.volume.geometry import Box


def sharding_spec(preshift_bits: int = 1, minishard_bits: int = 1, shard_bits: int = 2) -> dict:
    """A small identity-hash sharding spec (FlyEM uses preshift 9 / minishard 6 / shard 15–16 on
    64³ chunks; test layers have a few dozen chunks, so a few bits each)."""
    return {"@type": "neuroglancer_uint64_sharded_v1", "preshift_bits": preshift_bits, "hash": "identity",
            "minishard_bits": minishard_bits, "shard_bits": shard_bits,
            "minishard_index_encoding": "gzip", "data_encoding": "raw"}


def downsample2(vol: np.ndarray) -> np.ndarray:
    """Halve y and x by 2×2 averaging (z kept), as igneous does for anisotropic layers."""
    z, y, x = vol.shape
    v = vol[:, : y - y % 2 or y, : x - x % 2 or x].astype(np.float32)
    if v.shape[1] >= 2 and v.shape[2] >= 2:
        v = v.reshape(z, v.shape[1] // 2, 2, v.shape[2] // 2, 2).mean(axis=(2, 4))
    out = np.zeros((z, -(-y // 2), -(-x // 2)), np.float32)
    out[:, : v.shape[1], : v.shape[2]] = v
    if y % 2:
        out[:, -1, : v.shape[2]] = vol[:, -1, : v.shape[2] * 2].reshape(z, -1, 2).mean(axis=2)[:, : v.shape[2]]
    if x % 2:
        out[:, :, -1] = out[:, :, -2] if out.shape[2] > 1 else vol[:, ::2, -1]
    return np.rint(out).astype(vol.dtype)


def write_layer(url: str, volume_zyx: np.ndarray, resolution_nm_xyz: Sequence[float],
                voxel_offset_xyz: Sequence[int] = (0, 0, 0), chunk_xyz: Sequence[int] = (32, 32, 3), *,
                encoding: str = "jpeg", jpeg_quality: int = 95, sharded: bool | dict = False,
                absent: Sequence[Box] | Callable[[Box], bool] = (), scales: int = 1) -> dict:
    """Write ``volume_zyx`` as a Precomputed image layer at ``url`` and return its info.

    ``absent``: boxes in mip-0 voxels (zyx, absolute); a chunk of any scale whose footprint (in
    mip-0 voxels) lies inside one of them is not written — a whole shard of them leaves no shard
    file — or a predicate on that footprint. ``scales``: mip 0 plus ``scales − 1`` lower scales,
    each halving x and y. ``sharded``: True (``sharding_spec()``) or a spec dict, for every scale.
    """
    from cloudfiles import CloudFiles
    from cloudvolume import chunks
    from cloudvolume.datasource.precomputed.common import compressed_morton_code
    from cloudvolume.datasource.precomputed.sharding import ShardingSpecification

    vol = np.asarray(volume_zyx)
    spec = sharding_spec() if sharded is True else (sharded or None)
    is_absent = absent if callable(absent) else (lambda b: any(a.contains(b) for a in absent))
    cx, cy, cz = (int(v) for v in chunk_xyz)
    info = {"type": "image", "data_type": str(vol.dtype), "num_channels": 1, "scales": []}
    files: dict[str, bytes] = {}
    level, f = vol, 1
    for mip in range(scales):
        z, y, x = level.shape
        ox, oy, oz = voxel_offset_xyz[0] // f, voxel_offset_xyz[1] // f, voxel_offset_xyz[2]
        res = [resolution_nm_xyz[0] * f, resolution_nm_xyz[1] * f, resolution_nm_xyz[2]]
        key = "_".join(f"{r:g}" for r in res)
        scale = {"key": key, "size": [x, y, z], "voxel_offset": [ox, oy, oz], "resolution": res,
                 "chunk_sizes": [[cx, cy, cz]], "encoding": encoding}
        if encoding == "jpeg":
            scale["jpeg_quality"] = jpeg_quality
        if spec:
            scale["sharding"] = dict(spec)
        info["scales"].append(scale)
        grid = (-(-x // cx), -(-y // cy), -(-z // cz))
        by_code: dict[int, bytes] = {}
        for gz in range(grid[2]):
            for gy in range(grid[1]):
                for gx in range(grid[0]):
                    lo = (gz * cz, gy * cy, gx * cx)
                    hi = (min(lo[0] + cz, z), min(lo[1] + cy, y), min(lo[2] + cx, x))
                    foot = Box((oz + lo[0], (oy + lo[1]) * f, (ox + lo[2]) * f),
                               (oz + hi[0], (oy + hi[1]) * f, (ox + hi[2]) * f))
                    if is_absent(foot):
                        continue
                    part = level[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
                    data = chunks.encode(np.asfortranarray(part.transpose(2, 1, 0)[..., None]), encoding,
                                         compression_params={"level": jpeg_quality} if encoding == "jpeg" else {})
                    if spec:
                        by_code[int(compressed_morton_code((gx, gy, gz), grid))] = data
                    else:
                        name = f"{ox + lo[2]}-{ox + hi[2]}_{oy + lo[1]}-{oy + hi[1]}_{oz + lo[0]}-{oz + hi[0]}"
                        files[f"{key}/{name}"] = data
        if spec and by_code:
            sspec = ShardingSpecification.from_dict(spec)
            for name, data in sspec.synthesize_shards(by_code).items():
                files[f"{key}/{name}"] = data
        level, f = downsample2(level), f * 2
    cf = CloudFiles(url)
    cf.put_json("info", info)
    for k, v in files.items():  # one call each: cloud-files' thread queue sleeps 0.1 s per batch
        cf.put(k, v, compress=None, raw=True, content_type="application/octet-stream")
    return json.loads(json.dumps(info))
