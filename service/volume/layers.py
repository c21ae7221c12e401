"""Creating and writing Precomputed layers: source layers, output and uncertainty layers (with their
provenance and the refusal to overwrite what is not ours), output geometry and downsampling."""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from .stores import VolumeError, normalize_url

from .info import (
    ALLOWED_DTYPES,
    Vec3,
    VolumeInfo,
    _check_box,
    _check_mip,
    _fmt_box,
    _as_vec3,
    _info_exists,
    _num,
    _open_cv,
    _run_io,
    _volume_info_from_dict,
)

# --------------------------------------------------------------------------------------
# Creating layers
# --------------------------------------------------------------------------------------


def _scale_entry(size, offset, res, chunk, encoding) -> dict:
    return {
        "key": "_".join(f"{float(r):g}" for r in res),
        "size": [int(v) for v in size],
        "voxel_offset": [int(v) for v in offset],
        "resolution": [_num(r) for r in res],
        "chunk_sizes": [[int(v) for v in chunk]],
        "encoding": encoding,
    }


def _layer_info(geometry: VolumeInfo, chunk_xyz: Vec3, dtype: str, encoding: str) -> dict:
    scales = [_scale_entry(geometry.size_xyz, geometry.voxel_offset_xyz, geometry.resolution_nm_xyz, chunk_xyz, encoding)]
    for f in geometry.downsample_factors_xyz:
        size = [math.ceil(s / fi) for s, fi in zip(geometry.size_xyz, f)]
        off = [o // fi for o, fi in zip(geometry.voxel_offset_xyz, f)]
        res = [r * fi for r, fi in zip(geometry.resolution_nm_xyz, f)]
        scales.append(_scale_entry(size, off, res, chunk_xyz, encoding))
    return {"type": "image", "data_type": dtype, "num_channels": 1, "scales": scales}


def _check_dtype(dtype: Any, field_name: str) -> str:
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in ALLOWED_DTYPES:
        raise VolumeError(field_name, f"dtype {name} is not allowed; allowed: {', '.join(ALLOWED_DTYPES)}")
    return name


def create_source_layer(
    url: str,
    volume_zyx: np.ndarray,
    resolution_nm_xyz: Sequence[float],
    voxel_offset_xyz: Sequence[int] = (0, 0, 0),
    chunk_size_xyz: Sequence[int] = (64, 64, 8),
    *,
    encoding: str = "raw",
    overwrite: bool = False,
) -> VolumeInfo:
    """Write a (Z, Y, X) array as a single-channel Precomputed image layer (demo and tests)."""
    url = normalize_url(url)
    vol = np.asarray(volume_zyx)
    if vol.ndim != 3 or min(vol.shape) < 1:
        raise VolumeError("volume", f"shape {vol.shape} must be a non-empty (Z, Y, X) array")
    dtype = _check_dtype(vol.dtype, "volume")
    res = tuple(float(r) for r in resolution_nm_xyz)
    if len(res) != 3 or min(res) <= 0:
        raise VolumeError("resolution", f"{list(resolution_nm_xyz)} must be three positive numbers (nm)")
    offset = _as_vec3(voxel_offset_xyz, "voxel_offset")
    chunk = _as_vec3(chunk_size_xyz, "chunk_size", positive=True)
    if not overwrite and _info_exists(url, "output"):
        raise VolumeError("output", f"a layer already exists at {url}; pass overwrite=True or choose another URL")
    z, y, x = vol.shape
    geometry = VolumeInfo((x, y, z), offset, res, chunk, dtype)  # type: ignore[arg-type]
    info = _layer_info(geometry, chunk, dtype, encoding)
    cv = _open_cv(url, 0, "output", info=info)
    _run_io(cv.commit_info, url, "output")
    info_out = _volume_info_from_dict(info, 0, url)
    write_zyx(url, info_out.start_zyx, vol)
    return info_out


def output_geometry(
    source: VolumeInfo,
    scale_xyz: Sequence[int] = (1, 1, 1),
    *,
    chunk_size_xyz: Sequence[int] | None = None,
    dtype: str | None = None,
) -> VolumeInfo:
    """Geometry of the restored layer for ``scale_xyz = (f, f, k)``.

    Isotropic z by odd k (h = (k−1)/2): z resolution/k, z offset k·offset + h, z size (Z−1)·k + 1
    (output voxel k·i + h is source section i; the layer spans the first to the last section). Lateral super-resolution by f: x,y resolution/f, size·f, offset·f.
    Denoise is (1, 1, 1). The default chunk size is the source's with z multiplied by k.
    """
    fx, fy, k = _as_vec3(scale_xyz, "scale", positive=True)
    if fx != fy:
        raise VolumeError("scale", f"lateral factors x={fx}, y={fy} differ; allowed: equal x and y factors")
    if k % 2 == 0:
        raise VolumeError(
            "scale",
            f"z factor k={k} is even: section i would sit at output voxel k·i+(k−1)/2 = {k}·i+{(k - 1) / 2}, "
            "half a voxel off the output grid; allowed: odd k (1, 3, 5, …)",
        )
    sx, sy, sz = source.size_xyz
    if k > 1 and sz < 2:
        raise VolumeError("source", f"isotropic restoration needs at least 2 sections; the source has {sz}")
    scale = (fx, fy, k)
    size = [int(s * f) for s, f in zip(source.size_xyz, scale)]
    offset = [int(o * f) for o, f in zip(source.voxel_offset_xyz, scale)]
    if k > 1:
        h = (k - 1) // 2
        size[2] = (sz - 1) * k + 1
        offset[2] = source.voxel_offset_xyz[2] * k + h
    size, offset = tuple(size), tuple(offset)
    res = tuple(float(r) / f for r, f in zip(source.resolution_nm_xyz, scale))
    if chunk_size_xyz is None:
        cx, cy, cz = source.chunk_size_xyz
        chunk = (cx, cy, cz * k)
    else:
        chunk = _as_vec3(chunk_size_xyz, "chunk_size", positive=True)
    if chunk[2] % k:
        raise VolumeError("chunk_size", f"output chunk z {chunk[2]} is not a multiple of k={k}; allowed: m·{k}")
    return VolumeInfo(
        size_xyz=size,  # type: ignore[arg-type]
        voxel_offset_xyz=offset,  # type: ignore[arg-type]
        resolution_nm_xyz=res,  # type: ignore[arg-type]
        chunk_size_xyz=chunk,  # type: ignore[arg-type]
        dtype=_check_dtype(dtype or source.dtype, "dtype"),
        scale_xyz=scale,  # type: ignore[arg-type]
    )


def downsample_factors(resolution_nm_xyz: Sequence[float], num_scales: int,
                       voxel_offset_xyz: Sequence[int] | None = None) -> tuple[Vec3, ...]:
    """Factors (relative to mip 0) of ``num_scales`` lower scales.

    Each step halves x and y; z is halved too when, before the step, the z resolution is at
    least as fine as the lateral one (isotropic or finer-in-z layers stay near-isotropic) and,
    when ``voxel_offset_xyz`` is given, the z offset stays divisible by the new z factor (so the
    lower scale is not shifted by half a voxel).
    """
    rx, _, rz = (float(r) for r in resolution_nm_xyz)
    oz = None if voxel_offset_xyz is None else int(voxel_offset_xyz[2])
    fx = fz = 1
    out = []
    for _ in range(int(num_scales)):
        zstep = 2 if rz * fz <= rx * fx * (1 + 1e-9) else 1
        if zstep == 2 and oz is not None and oz % (2 * fz):
            zstep = 1
        fx, fz = fx * 2, fz * zstep
        out.append((fx, fx, fz))
    return tuple(out)


def _geometry_key(info: dict) -> tuple:
    def scale_key(s: dict) -> tuple:
        return (
            tuple(int(v) for v in s["size"]),
            tuple(int(v) for v in s.get("voxel_offset", (0, 0, 0))),
            tuple(round(float(r), 6) for r in s["resolution"]),
            tuple(tuple(int(v) for v in c) for c in s["chunk_sizes"]),
            s.get("encoding", "raw"),
            s.get("sharding"),
        )

    return (
        info.get("type"),
        info.get("data_type"),
        int(info.get("num_channels", 1)),
        tuple(scale_key(s) for s in info.get("scales", [])),
    )


def _describe_info(info: dict) -> str:
    s = info["scales"][0]
    return (
        f"{info.get('data_type')} size {s['size']} offset {s.get('voxel_offset')} "
        f"resolution {s['resolution']} chunk {s['chunk_sizes'][0]} with {len(info['scales'])} scale(s)"
    )


def create_output_layer(
    url: str,
    geometry: VolumeInfo,
    chunk_size_xyz: Sequence[int],
    dtype: str,
    provenance: dict,
    num_downsample_scales: int = 1,
    overwrite_check_source_url: str | None = None,
    *,
    encoding: str = "raw",
    description: str = "emrestore restored layer",
    overwrite: bool = False,
    allow_foreign: bool = False,
    check_only: bool = False,
    field: str = "output",
) -> VolumeInfo:
    """Create (or resume) the restored layer; returns its mip-0 VolumeInfo.

    Writes an info with mip 0 and ``num_downsample_scales`` lower scales (see
    :func:`downsample_factors`) and a provenance file whose processing entry holds
    ``provenance``. The output chunk z must be a multiple of k. Refuses (field "output") the
    source URL itself and an existing layer of different geometry. An existing layer is written
    only when its emrestore provenance is this job's (``provenance`` equal: a resume, left
    untouched) or ``overwrite`` is set and it has emrestore provenance (then the new job is added
    to the provenance); a layer without emrestore provenance only with ``overwrite`` and
    ``allow_foreign`` (the operator's choice). ``check_only``: run every check, write nothing.
    Errors name ``field``.
    """
    url = normalize_url(url)
    chunk = _as_vec3(chunk_size_xyz, "chunk_size", positive=True)
    dtype = _check_dtype(dtype, "dtype")
    k = int(geometry.scale_xyz[2])
    if chunk[2] % k:
        raise VolumeError("chunk_size", f"output chunk z {chunk[2]} is not a multiple of k={k}; allowed: m·{k}")
    if not isinstance(num_downsample_scales, (int, np.integer)) or not 0 <= num_downsample_scales <= 16:
        raise VolumeError("num_downsample_scales", f"{num_downsample_scales!r}; allowed 0..16")
    factors = downsample_factors(geometry.resolution_nm_xyz, int(num_downsample_scales), geometry.voxel_offset_xyz)
    if factors:
        fmax = factors[-1]
        bad = [ax for ax, o, f in zip("xyz", geometry.voxel_offset_xyz, fmax) if o % f]
        if bad:
            raise VolumeError(
                "num_downsample_scales",
                f"voxel offset {list(geometry.voxel_offset_xyz)} is not divisible by the downsampling factor "
                f"{list(fmax)} of mip {len(factors)} along {', '.join(bad)}; use fewer downsampled scales",
            )
    try:
        provenance_json = json.loads(json.dumps(dict(provenance)))
    except (TypeError, ValueError) as exc:
        raise VolumeError("provenance", f"must be a JSON-serialisable dict ({exc})") from exc
    source_url = normalize_url(overwrite_check_source_url) if overwrite_check_source_url else None
    if source_url is not None and source_url == url:
        raise VolumeError(field, f"{url} is the source layer; the output must be a different URL")

    geometry = replace(geometry, chunk_size_xyz=chunk, dtype=dtype, downsample_factors_xyz=factors)
    info = _layer_info(geometry, chunk, dtype, encoding)
    result = replace(_volume_info_from_dict(info, 0, url), scale_xyz=geometry.scale_xyz)

    if _info_exists(url, field):
        existing_cv = _open_cv(url, 0, field)
        existing = existing_cv.info
        if _geometry_key(existing) != _geometry_key(info):
            raise VolumeError(
                field,
                f"an existing layer at {url} has a different geometry ({_describe_info(existing)}; "
                f"this job needs {_describe_info(info)}); choose a new output URL",
            )
        prov = existing_cv.provenance
        sources = prov.sources or []
        if isinstance(sources, str):
            sources = [sources]
        ours = [p.get("method") for p in (prov.processing or []) if isinstance(p, dict) and p.get("by") == "emrestore"]
        same = bool(ours) and json.dumps(ours[-1], sort_keys=True) == json.dumps(provenance_json, sort_keys=True)
        if not ours:
            if not (overwrite and allow_foreign):
                raise VolumeError(field, f"an existing layer at {url} was not written by emrestore; it is never "
                                         "overwritten (choose a new output URL)", "FAILED_PRECONDITION")
        elif (not overwrite and source_url is not None and sources
              and source_url not in [normalize_url(u) for u in sources]):
            raise VolumeError(
                field,
                f"the existing layer at {url} was restored from {', '.join(sources)[:200]}, not {source_url}; "
                "choose a new output URL", "FAILED_PRECONDITION",
            )
        elif not same:
            if not overwrite:
                m = ours[-1] if isinstance(ours[-1], dict) else {}
                raise VolumeError(field, f"the existing layer at {url} holds another emrestore job's output (model "
                                         f"{str(m.get('model'))[:200]}, steps {m.get('steps')}, samples {m.get('samples')}, "
                                         f"seed {m.get('seed')}); set overwrite to replace it, or choose a new output URL",
                                  "FAILED_PRECONDITION")
        if check_only or same:
            return result  # a resume: identical layer and job
        prov.processing.append({"method": provenance_json, "by": "emrestore", "overwrote": True,
                                "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
        if source_url is not None:
            prov.sources = [source_url]
        _run_io(existing_cv.commit_provenance, url, field)
        return result
    if check_only:
        return result

    cv = _open_cv(url, 0, "output", info=info)
    _run_io(cv.commit_info, url, "output")
    prov = cv.provenance
    prov.description = description
    if source_url is not None:
        prov.sources = [source_url]
    prov.processing.append(
        {
            "method": provenance_json,
            "by": "emrestore",
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    )
    _run_io(cv.commit_provenance, url, "output")
    return result


def create_uncertainty_layer(
    url: str,
    geometry: VolumeInfo,
    chunk_size_xyz: Sequence[int],
    provenance: dict,
    *,
    dtype: str = "float32",
    uint8_full_scale: float | None = None,
    num_downsample_scales: int = 1,
    overwrite_check_source_url: str | None = None,
    overwrite: bool = False,
    allow_foreign: bool = False,
    check_only: bool = False,
) -> VolumeInfo:
    """Create the per-voxel uncertainty layer (standard deviation of the K samples).

    float32 stores the standard deviation in data units; uint8 stores
    ``round(255·std/uint8_full_scale)`` clipped to 255, and ``uint8_full_scale`` is recorded in
    the provenance. Blocks are encoded with :func:`encode_uncertainty`.
    """
    dtype = _check_dtype(dtype, "dtype")
    if dtype not in ("float32", "uint8"):
        raise VolumeError("dtype", f"uncertainty dtype {dtype}; allowed: float32, uint8")
    if dtype == "uint8" and not (uint8_full_scale and uint8_full_scale > 0):
        raise VolumeError("uint8_full_scale", f"{uint8_full_scale!r}; a uint8 uncertainty layer needs a full scale > 0")
    meta = dict(provenance)
    meta["uncertainty"] = {
        "quantity": "standard deviation of the restoration samples",
        "dtype": dtype,
        "uint8_full_scale": float(uint8_full_scale) if dtype == "uint8" else None,
    }
    return create_output_layer(
        url,
        geometry,
        chunk_size_xyz,
        dtype,
        meta,
        num_downsample_scales,
        overwrite_check_source_url,
        description="emrestore uncertainty layer (std of samples)",
        overwrite=overwrite,
        allow_foreign=allow_foreign,
        check_only=check_only,
        field="uncertainty_output",
    )


def encode_uncertainty(std_zyx: np.ndarray, dtype: str = "float32", uint8_full_scale: float | None = None) -> np.ndarray:
    """Encode a standard-deviation block for an uncertainty layer of ``dtype``."""
    std = np.asarray(std_zyx, dtype=np.float64)
    if dtype == "float32":
        return std.astype(np.float32)
    if dtype == "uint8":
        if not (uint8_full_scale and uint8_full_scale > 0):
            raise VolumeError("uint8_full_scale", f"{uint8_full_scale!r}; must be > 0")
        return np.clip(np.rint(std * (255.0 / uint8_full_scale)), 0, 255).astype(np.uint8)
    raise VolumeError("dtype", f"uncertainty dtype {dtype}; allowed: float32, uint8")

# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def _check_aligned(info: VolumeInfo, start: Vec3, stop: Vec3, field_name: str) -> None:
    lo, hi, chunk = info.start_zyx, info.stop_zyx, info.chunk_zyx
    bad = []
    for ax, a, b, l, h, c in zip("zyx", start, stop, lo, hi, chunk):
        if (a - l) % c or ((b - l) % c and b != h):
            bad.append(ax)
    if bad:
        raise VolumeError(
            field_name,
            f"write box {_fmt_box(start, stop)} is not chunk-aligned along {', '.join(bad)} at mip {info.mip}: "
            f"edges must lie on offset + n·chunk (offset zyx {list(lo)}, chunk zyx {list(chunk)}) or at the upper bound {list(hi)}",
        )


def _write_cv(cv, url: str, info: VolumeInfo, start_zyx: Sequence[int], array_zyx: np.ndarray) -> None:
    arr = np.asarray(array_zyx)
    if arr.ndim != 3:
        raise VolumeError("array", f"shape {arr.shape} must be (Z, Y, X)")
    if arr.dtype.name != info.dtype:
        raise VolumeError("array", f"dtype {arr.dtype.name} does not match the layer dtype {info.dtype}")
    start = _as_vec3(start_zyx, "box")
    stop = tuple(int(a + s) for a, s in zip(start, arr.shape))
    start, stop = _check_box(info, start, stop, "box")
    _check_aligned(info, start, stop, "box")
    (z0, y0, x0), (z1, y1, x1) = start, stop
    data = np.asfortranarray(arr.transpose(2, 1, 0))[..., np.newaxis]

    def put():
        cv[x0:x1, y0:y1, z0:z1] = data

    _run_io(put, url, "output")


def write_zyx(url: str, start_zyx: Sequence[int], array_zyx: np.ndarray, mip: int = 0) -> None:
    """Write a (Z, Y, X) array at absolute voxel ``start_zyx`` of ``mip``; the box must be chunk-aligned.

    Edges must lie on the chunk grid, except a stop edge at the layer's upper bound.
    """
    url = normalize_url(url)
    cv = _open_cv(url, 0, "output")
    _check_mip(cv.info, mip, "output")
    cv.mip = int(mip)
    info = _volume_info_from_dict(cv.info, int(mip), url)
    _write_cv(cv, url, info, start_zyx, array_zyx)


def _pool_mean(arr: np.ndarray, f_zyx: Vec3) -> np.ndarray:
    """Average pooling by ``f_zyx``; windows cut by the array's end average what they hold."""
    fz, fy, fx = f_zyx
    z, y, x = arr.shape
    oz, oy, ox = -(-z // fz), -(-y // fy), -(-x // fx)
    pad = np.full((oz * fz, oy * fy, ox * fx), np.nan, dtype=np.float64)
    pad[:z, :y, :x] = arr
    blocks = pad.reshape(oz, fz, oy, fy, ox, fx)
    return np.nanmean(blocks, axis=(1, 3, 5))


def _to_dtype(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return arr.astype(np.float32)
    info = np.iinfo(dtype)
    return np.clip(np.rint(arr), info.min, info.max).astype(dtype)


def write_downsampled(url: str, start_zyx: Sequence[int], array_zyx: np.ndarray) -> list[int]:
    """Average-pool a mip-0 block and write it to every lower scale; returns the mips written.

    ``start_zyx``/``array_zyx`` are the mip-0 block (already written with :func:`write_zyx`).
    The block must follow ``VolumeInfo.write_alignment_zyx`` (block sizes a multiple of
    chunk·factor) so every pooled write is chunk-aligned; a block cut by the upper bound pools
    its partial windows over the voxels present.
    """
    url = normalize_url(url)
    cv = _open_cv(url, 0, "output")
    base = _volume_info_from_dict(cv.info, 0, url)
    arr = np.asarray(array_zyx)
    if arr.ndim != 3:
        raise VolumeError("array", f"shape {arr.shape} must be (Z, Y, X)")
    start = _as_vec3(start_zyx, "box")
    stop = tuple(int(a + s) for a, s in zip(start, arr.shape))
    start, stop = _check_box(base, start, stop, "box")
    written = []
    data = arr.astype(np.float64)
    for m, (fx, fy, fz) in enumerate(base.downsample_factors_xyz, start=1):
        f_zyx = (fz, fy, fx)
        bad = [ax for ax, a, b, h, f in zip("zyx", start, stop, base.stop_zyx, f_zyx) if a % f or (b % f and b != h)]
        if bad:
            raise VolumeError(
                "box",
                f"block {_fmt_box(start, stop)} cannot be pooled by {list(f_zyx)} (zyx) for mip {m} along "
                f"{', '.join(bad)}; block edges must be multiples of the factor",
            )
        pooled = _to_dtype(_pool_mean(data, f_zyx), base.dtype)
        m_start = tuple(a // f for a, f in zip(start, f_zyx))
        cv.mip = m
        info_m = _volume_info_from_dict(cv.info, m, url)
        _write_cv(cv, url, info_m, m_start, pooled)
        written.append(m)
    return written

