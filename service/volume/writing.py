"""Writing restored data into a layer: a box of one scale, then the lower scales averaged from it.

Unsharded scales take chunk-aligned boxes (cloud-volume's non-aligned writes race). A sharded
scale is written one whole shard per object: the box must cover whole shards (or end at the
scale's bounds), and each shard is encoded and put in one write (one PUT on S3 and GCS; a
temporary file renamed over the old one on disks), so a worker killed in the middle leaves
either the old object or the new one — a re-run writes the same bytes (the task is idempotent). Averaging uses absolute windows: voxel ``a`` of a scale ``f`` times coarser averages
``[a·f, (a+1)·f)`` of the finer one, and a window cut by the data's edge averages what it holds.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Sequence

import numpy as np

from .geometry import Box
from .info import Vec3, VolumeInfo, _as_vec3, _check_box, _check_mip, _fmt_box, _open_cv, _run_io, _volume_info_from_dict
from .pyramid import scales_from_info
from .sharding import shard_boxes
from .stores import VolumeError, normalize_url

__all__ = ["write_zyx", "write_scales", "write_downsampled", "pool_mean", "layer_writer"]

_writers: "OrderedDict[str, object]" = OrderedDict()
_writers_lock = threading.Lock()
_MAX_WRITERS = 8


def layer_writer(url: str):
    """One CloudVolume per output layer and process, reused across tasks (the info is read once;
    creating a layer forgets the URL's writer, so a layer made again there is read afresh)."""
    url = normalize_url(url)
    with _writers_lock:
        cv = _writers.get(url)
        if cv is not None:
            _writers.move_to_end(url)
            return cv
    from cloudvolume.datasource.precomputed.common import cdn_cache_control
    cv = _open_cv(url, 0, "output")
    cv.emrestore_lock = threading.Lock()  # one write at a time per layer (cv.mip is shared state)
    # cloud-volume 12.15 hands cdn_cache (True) to S3 as is for shard files (unsharded chunks get
    # the header string): give it the string, the header it means
    cv.config.cdn_cache = cdn_cache_control(cv.config.cdn_cache)
    with _writers_lock:
        _writers[url] = cv
        while len(_writers) > _MAX_WRITERS:
            _writers.popitem(last=False)
    return cv


def forget_writer(url: str) -> None:
    with _writers_lock:
        _writers.pop(normalize_url(url), None)


def _check_aligned(info: VolumeInfo, unit: Vec3, start: Vec3, stop: Vec3, what: str) -> None:
    lo, hi = info.start_zyx, info.stop_zyx
    bad = [ax for ax, a, b, l, h, c in zip("zyx", start, stop, lo, hi, unit) if (a - l) % c or ((b - l) % c and b != h)]
    if bad:
        raise VolumeError(
            "box",
            f"write box {_fmt_box(start, stop)} is not {what}-aligned along {', '.join(bad)} at mip {info.mip}: "
            f"edges must lie on offset + n·{what} (offset zyx {list(lo)}, {what} zyx {list(unit)}) or at the upper bound {list(hi)}",
        )


def _put(cv, url: str, mip: int, start: Vec3, arr: np.ndarray, sharded: bool = False) -> None:
    (z0, y0, x0) = start
    z1, y1, x1 = (a + s for a, s in zip(start, arr.shape))
    data = np.asfortranarray(arr.transpose(2, 1, 0))[..., np.newaxis]

    def put():
        with cv.emrestore_lock:
            cv.mip = int(mip)
            cv.delete_black_uploads = sharded  # see _put_shard_file
            try:
                cv[x0:x1, y0:y1, z0:z1] = data
            finally:
                cv.delete_black_uploads = False

    _run_io(put, url, "output")


def _write_scale(cv, url: str, mip: int, start_zyx: Sequence[int], arr: np.ndarray) -> None:
    info = _volume_info_from_dict(cv.info, int(mip), url)
    if arr.ndim != 3:
        raise VolumeError("array", f"shape {arr.shape} must be (Z, Y, X)")
    if arr.dtype.name != info.dtype:
        raise VolumeError("array", f"dtype {arr.dtype.name} does not match the layer dtype {info.dtype}")
    start = _as_vec3(start_zyx, "box")
    stop = tuple(int(a + s) for a, s in zip(start, arr.shape))
    start, stop = _check_box(info, start, stop, "box")
    scale = scales_from_info(cv.info)[int(mip)]
    if scale.sharding is None:
        _check_aligned(info, info.chunk_zyx, start, stop, "chunk")
        _put(cv, url, mip, start, arr)
        return
    unit = scale.unit_zyx
    _check_aligned(info, unit, start, stop, "shard")
    box = Box(start, stop)
    for sb in shard_boxes(box, scale.bounds, unit):
        if not box.contains(sb):
            continue  # (cannot happen for an aligned box)
        part = np.ascontiguousarray(arr[sb.slices(start)])
        if url.startswith("file://"):
            _put_shard_file(cv, url, mip, scale.key, sb, part)
        else:  # S3 and GCS replace an object in one PUT: readers see the old shard or the new one
            _put(cv, url, mip, sb.start, part, sharded=True)


def _put_shard_file(cv, url: str, mip: int, key: str, box: Box, arr: np.ndarray) -> None:
    """A shard on a local disk: encoded by cloud-volume, written to a temporary file and renamed
    over the old one, so a worker killed while writing never leaves half a shard (cloud-files
    writes files in place).

    All-zero chunks (no data: a shard's blocks without source tissue) are left out of the shard,
    as they are absent from the source: readers fill them with 0. (cloud-volume 12.15 would
    otherwise encode the first zero chunk once and reuse its bytes for every other one, also for
    the smaller chunks at the scale's bounds, which then cannot be decoded.)"""
    import os
    import uuid

    from cloudvolume.lib import Bbox
    (z0, y0, x0), (z1, y1, x1) = box.start, box.stop
    data = np.asfortranarray(arr.transpose(2, 1, 0))[..., np.newaxis]

    def make():
        with cv.emrestore_lock:
            cv.mip = int(mip)
            cv.delete_black_uploads = True
            try:
                return cv.image.make_shard(data, Bbox((x0, y0, z0), (x1, y1, z1)), int(mip))
            finally:
                cv.delete_black_uploads = False

    filename, blob = _run_io(make, url, "output")
    d = os.path.join(url[len("file://"):], key)
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{filename}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, os.path.join(d, filename))


def write_zyx(url: str, start_zyx: Sequence[int], array_zyx: np.ndarray, mip: int = 0) -> None:
    """Write a (Z, Y, X) array at absolute voxel ``start_zyx`` of ``mip``: chunk-aligned boxes for
    unsharded scales, whole shards for sharded ones (edges on the grid, or at the upper bound)."""
    url = normalize_url(url)
    cv = layer_writer(url)
    _check_mip(cv.info, mip, "output")
    _write_scale(cv, url, int(mip), start_zyx, np.asarray(array_zyx))


def pool_mean(arr: np.ndarray, start_zyx: Sequence[int], f_zyx: Sequence[int]) -> tuple[np.ndarray, Vec3]:
    """Average pooling by ``f`` over absolute windows: returns the pooled array and its start
    (``floor(start/f)``); windows cut by the array's edges average the voxels they hold."""
    arr = np.asarray(arr)
    start = tuple(int(s) for s in start_zyx)
    fz, fy, fx = (int(f) for f in f_zyx)
    lead = tuple(s % f for s, f in zip(start, (fz, fy, fx)))
    out_start = tuple(s // f for s, f in zip(start, (fz, fy, fx)))
    z, y, x = arr.shape
    oz, oy, ox = (-(-(n + l) // f) for n, l, f in zip(arr.shape, lead, (fz, fy, fx)))
    pad = np.full((oz * fz, oy * fy, ox * fx), np.nan, dtype=np.float32)
    pad[lead[0]:lead[0] + z, lead[1]:lead[1] + y, lead[2]:lead[2] + x] = arr
    blocks = pad.reshape(oz, fz, oy, fy, ox, fx)
    with np.errstate(invalid="ignore"):
        return np.nanmean(blocks, axis=(1, 3, 5)), out_start  # type: ignore[return-value]


def _to_dtype(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return arr.astype(np.float32)
    info = np.iinfo(dtype)
    return np.clip(np.rint(arr), info.min, info.max).astype(dtype)


def write_scales(url: str, start_zyx: Sequence[int], array_zyx: np.ndarray, base_mip: int, top_mip: int) -> list[int]:
    """Write a box of scale ``base_mip`` and average it into every scale up to ``top_mip``
    (each written box must cover whole chunks, or shards, of its scale: grid.aligned); returns
    the mips written."""
    url = normalize_url(url)
    cv = layer_writer(url)
    _check_mip(cv.info, top_mip, "output")
    scales = scales_from_info(cv.info)
    arr = np.asarray(array_zyx)
    start = _as_vec3(start_zyx, "box")
    _write_scale(cv, url, base_mip, start, arr)
    written = [int(base_mip)]
    data, at = arr, start  # pooled in float32 (exact enough for means of ≤ 8 uint16 values)
    for m in range(base_mip + 1, top_mip + 1):
        prev = scales[m - 1]
        f = tuple(a // b for a, b in zip(scales[m].factor_zyx, prev.factor_zyx))
        data, at = pool_mean(data, at, f)
        _write_scale(cv, url, m, at, _to_dtype(data, cv.info["data_type"]))
        written.append(m)
    return written


def write_downsampled(url: str, start_zyx: Sequence[int], array_zyx: np.ndarray) -> list[int]:
    """Average a mip-0 block (already written with :func:`write_zyx`) into the lower scales of the
    layer, down to the first one the block does not cover whole (plans of format 1, whose blocks
    were aligned to mip 1); returns the mips written."""
    url = normalize_url(url)
    cv = layer_writer(url)
    n = len(cv.info["scales"])
    arr = np.asarray(array_zyx)
    start = _as_vec3(start_zyx, "box")
    base = _volume_info_from_dict(cv.info, 0, url)
    stop = tuple(int(a + s) for a, s in zip(start, arr.shape))
    _check_box(base, start, stop, "box")
    data, at, written = arr, start, []
    scales = scales_from_info(cv.info)
    for m in range(1, n):
        f = tuple(a // b for a, b in zip(scales[m].factor_zyx, scales[m - 1].factor_zyx))
        end = tuple(a + n for a, n in zip(at, data.shape))
        prev = scales[m - 1].bounds
        if any((a % fi and a != lo) or (e % fi and e != hi) for a, e, fi, lo, hi in zip(at, end, f, prev.start, prev.stop)):
            if m == 1:
                raise VolumeError("box", f"block {_fmt_box(start, stop)} cannot be pooled by {list(f)} (zyx) for "
                                         "mip 1; block edges must be multiples of the factor")
            break
        data, at = pool_mean(data, at, f)
        try:
            _write_scale(cv, url, m, at, _to_dtype(data, cv.info["data_type"]))
        except VolumeError:
            if m == 1:
                raise
            break  # not whole chunks of this scale: the block ends its reach here
        written.append(m)
    return written
