"""Creating Precomputed layers: source layers (demo, tests, benchmarks), output and uncertainty
layers stored as a :class:`~.pyramid.LayerFormat` (raw, png or jpeg; sharded or not; every scale
down to a chunk-sized top), with their provenance (the emrestore jobs that wrote them) and the
refusal to overwrite what is not ours. Writing boxes is writing.py's."""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from .info import ALLOWED_DTYPES, Vec3, VolumeInfo, _as_vec3, _info_exists, _open_cv, _run_io, _volume_info_from_dict
from .pyramid import LayerFormat, ScaleSpec, downsample_factors, layer_scales, pyramid_factors
from .stores import VolumeError, normalize_url
from .writing import forget_writer, write_zyx

#: key of the uncertainty layer's own metadata in its info (read by viewers and connectors)
UNCERTAINTY_INFO_KEY = "emrestore_uncertainty"

__all__ = ["create_source_layer", "output_geometry", "downsample_factors", "create_output_layer",
           "create_uncertainty_layer", "encode_uncertainty", "layer_info", "layer_jobs", "UNCERTAINTY_INFO_KEY"]


def layer_info(scales: Sequence[ScaleSpec], dtype: str, extra: dict | None = None) -> dict:
    """The info file of a single-channel image layer with these scales."""
    info = {"type": "image", "data_type": dtype, "num_channels": 1, "scales": [s.info_entry() for s in scales]}
    info.update(extra or {})
    return info


def _check_dtype(dtype: Any, field_name: str) -> str:
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in ALLOWED_DTYPES:
        raise VolumeError(field_name, f"dtype {name} is not allowed; allowed: {', '.join(ALLOWED_DTYPES)}")
    return name


def check_format(fmt: LayerFormat, dtype: str, field_name: str = "output_encoding") -> None:
    """Refuse a format the dtype cannot be stored as (errors name ``output_encoding``)."""
    from .pyramid import ENCODINGS
    if fmt.encoding not in ENCODINGS:
        raise VolumeError(field_name, f"{str(fmt.encoding)[:40]!r}; allowed: {', '.join(ENCODINGS)}")
    if fmt.encoding == "jpeg" and dtype != "uint8":
        raise VolumeError(field_name, f"jpeg stores uint8 only; this layer is {dtype} (allowed: raw, png for uint16, raw for float32)")
    if fmt.encoding == "png" and dtype not in ("uint8", "uint16"):
        raise VolumeError(field_name, f"png stores uint8 and uint16; this layer is {dtype} (allowed: raw)")
    if fmt.encoding == "jpeg" and not 1 <= int(fmt.jpeg_quality) <= 100:
        raise VolumeError("jpeg_quality", f"{fmt.jpeg_quality}; allowed: 1..100")


def create_source_layer(
    url: str,
    volume_zyx: np.ndarray,
    resolution_nm_xyz: Sequence[float],
    voxel_offset_xyz: Sequence[int] = (0, 0, 0),
    chunk_size_xyz: Sequence[int] = (64, 64, 8),
    *,
    encoding: str = "raw",
    fmt: LayerFormat | None = None,
    overwrite: bool = False,
) -> VolumeInfo:
    """Write a (Z, Y, X) array as a single-channel, single-scale Precomputed image layer (demo,
    tests, benchmarks); ``fmt`` (or ``encoding``) says how it is stored (jpeg, sharded, …)."""
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
    fmt = fmt or LayerFormat(encoding=encoding)
    check_format(fmt, dtype, "encoding")
    if not overwrite and _info_exists(url, "output"):
        raise VolumeError("output", f"a layer already exists at {url}; pass overwrite=True or choose another URL")
    z, y, x = vol.shape
    scales = layer_scales((x, y, z), offset, res, chunk, vol.dtype.itemsize, fmt, factors_xyz=())
    info = layer_info(scales, dtype)
    cv = _open_cv(url, 0, "output", info=info)
    _run_io(cv.commit_info, url, "output")
    forget_writer(url)
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


def _scale_key(s: dict) -> tuple:
    return (
        tuple(int(v) for v in s["size"]),
        tuple(int(v) for v in s.get("voxel_offset", (0, 0, 0))),
        tuple(round(float(r), 6) for r in s["resolution"]),
        tuple(tuple(int(v) for v in c) for c in s["chunk_sizes"]),
    )


def _format_key(s: dict) -> tuple:
    return (s.get("encoding", "raw"), s.get("jpeg_quality") if s.get("encoding") == "jpeg" else None)


def _describe_info(info: dict) -> str:
    s = info["scales"][0]
    return (
        f"{info.get('data_type')} size {s['size']} offset {s.get('voxel_offset')} "
        f"resolution {s['resolution']} chunk {s['chunk_sizes'][0]} with {len(info['scales'])} scale(s)"
    )


def describe_format(info: dict) -> str:
    """``jpeg (quality 90), sharded`` for a layer's info (its mip 0)."""
    s = info["scales"][0]
    enc = s.get("encoding", "raw")
    if enc == "jpeg" and s.get("jpeg_quality") is not None:
        enc = f"jpeg (quality {s['jpeg_quality']})"
    return f"{enc}, {'sharded' if s.get('sharding') else 'unsharded'}"


def _compare(existing: dict, info: dict, url: str, field: str) -> None:
    """Refuse an existing layer that differs from what the job writes, naming what differs:
    dtype or geometry (``field``), encoding (``output_encoding``), sharding (``output_sharding``)."""
    old, new = existing.get("scales", []), info["scales"]
    if (existing.get("type"), existing.get("data_type"), int(existing.get("num_channels", 1))) != \
            (info["type"], info["data_type"], 1) or [_scale_key(s) for s in old] != [_scale_key(s) for s in new]:
        extra = ""
        if existing.get("data_type") == "float32" and info["data_type"] == "uint8" and field == "uncertainty_output":
            extra = " (a float32 uncertainty layer of an older emrestore: uncertainty layers are uint8 now)"
        raise VolumeError(field, f"an existing layer at {url} has a different geometry ({_describe_info(existing)}; "
                                 f"this job needs {_describe_info(info)}){extra}; choose a new output URL")
    layer = "uncertainty layer" if field == "uncertainty_output" else "output layer"
    if [_format_key(s) for s in old] != [_format_key(s) for s in new]:
        raise VolumeError("output_encoding", f"the existing {layer} at {url} is stored as {describe_format(existing)}; "
                                             f"this job would write {describe_format(info)}: ask for its encoding, "
                                             "or choose a new URL", "FAILED_PRECONDITION")
    if [s.get("sharding") for s in old] != [s.get("sharding") for s in new]:
        raise VolumeError("output_sharding", f"the existing {layer} at {url} is stored as {describe_format(existing)} "
                                             f"with other shards than this job's ({describe_format(info)}): ask for its "
                                             "sharding, or choose a new URL", "FAILED_PRECONDITION")


def _entry(prov) -> list[dict]:
    return [p for p in (prov.processing or []) if isinstance(p, dict) and p.get("by") == "emrestore"]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def layer_jobs(url: str, method: dict) -> list[str]:
    """Ids of the emrestore jobs that wrote ``url`` with this ``method`` (its provenance's last
    emrestore entry, when the method is the same), oldest first; [] when none or no layer."""
    url = normalize_url(url)
    if not _info_exists(url, "output"):
        return []
    ours = _entry(_open_cv(url, 0, "output").provenance)
    if not ours or json.dumps(ours[-1].get("method"), sort_keys=True) != json.dumps(method, sort_keys=True):
        return []
    return [str(j) for j in ours[-1].get("jobs", [])]


def create_output_layer(
    url: str,
    geometry: VolumeInfo,
    chunk_size_xyz: Sequence[int],
    dtype: str,
    provenance: dict,
    num_downsample_scales: int | None = None,
    overwrite_check_source_url: str | None = None,
    *,
    fmt: LayerFormat | None = None,
    encoding: str | None = None,
    description: str = "emrestore restored layer",
    overwrite: bool = False,
    allow_foreign: bool = False,
    check_only: bool = False,
    field: str = "output",
    job_id: str | None = None,
    extra_info: dict | None = None,
) -> VolumeInfo:
    """Create (or resume) the restored layer; returns its mip-0 VolumeInfo.

    Writes an info with mip 0 and ``num_downsample_scales`` lower scales (None: the full pyramid,
    down to a chunk-sized top; see pyramid.py), each stored as ``fmt``, and a provenance file whose
    emrestore entry holds ``provenance`` (the method) and the ids of the jobs that wrote it
    (``job_id``). The output chunk z must be a multiple of k. Refuses the source URL itself and
    an existing layer of another geometry (``field``), encoding (``output_encoding``) or sharding
    (``output_sharding``). An existing layer is written only when its emrestore provenance is
    this method (a resume or an incremental run: the job id is added) or ``overwrite`` is set
    and it has emrestore provenance (a new entry); a layer without emrestore provenance only with
    ``overwrite`` and ``allow_foreign`` (the operator's choice). ``check_only``: every check,
    nothing written.
    """
    url = normalize_url(url)
    chunk = _as_vec3(chunk_size_xyz, "chunk_size", positive=True)
    dtype = _check_dtype(dtype, "dtype")
    fmt = fmt or LayerFormat(encoding=encoding or "raw")
    check_format(fmt, dtype)
    k = int(geometry.scale_xyz[2])
    if chunk[2] % k:
        raise VolumeError("chunk_size", f"output chunk z {chunk[2]} is not a multiple of k={k}; allowed: m·{k}")
    if num_downsample_scales is None:
        factors = pyramid_factors(geometry.size_xyz, geometry.voxel_offset_xyz, geometry.resolution_nm_xyz, chunk)
    elif isinstance(num_downsample_scales, (int, np.integer)) and 0 <= num_downsample_scales <= 16:
        factors = downsample_factors(geometry.resolution_nm_xyz, int(num_downsample_scales))
    else:
        raise VolumeError("num_downsample_scales", f"{num_downsample_scales!r}; allowed 0..16")
    try:
        provenance_json = json.loads(json.dumps(dict(provenance)))
    except (TypeError, ValueError) as exc:
        raise VolumeError("provenance", f"must be a JSON-serialisable dict ({exc})") from exc
    source_url = normalize_url(overwrite_check_source_url) if overwrite_check_source_url else None
    if source_url is not None and source_url == url:
        raise VolumeError(field, f"{url} is the source layer; the output must be a different URL")

    geometry = replace(geometry, chunk_size_xyz=chunk, dtype=dtype, downsample_factors_xyz=factors)
    try:
        scales = layer_scales(geometry.size_xyz, geometry.voxel_offset_xyz, geometry.resolution_nm_xyz, chunk,
                              np.dtype(dtype).itemsize, fmt, factors)
    except ValueError as e:
        raise VolumeError("output_sharding", f"{e}"[:300]) from None
    info = layer_info(scales, dtype, extra_info)
    result = replace(_volume_info_from_dict(info, 0, url), scale_xyz=geometry.scale_xyz)
    jobs = [job_id] if job_id else []

    if _info_exists(url, field):
        existing_cv = _open_cv(url, 0, field)
        _compare(existing_cv.info, info, url, field)
        prov = existing_cv.provenance
        sources = prov.sources or []
        if isinstance(sources, str):
            sources = [sources]
        ours = _entry(prov)
        same = bool(ours) and json.dumps(ours[-1].get("method"), sort_keys=True) == json.dumps(provenance_json, sort_keys=True)
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
        elif not same and not overwrite:
            m = ours[-1].get("method") if isinstance(ours[-1].get("method"), dict) else {}
            raise VolumeError(field, f"the existing layer at {url} holds another emrestore job's output (model "
                                     f"{str(m.get('model'))[:200]}, steps {m.get('steps')}, samples {m.get('samples')}, "
                                     f"seed {m.get('seed')}); set overwrite to replace it, or choose a new output URL",
                              "FAILED_PRECONDITION")
        if check_only:
            return result
        if same:  # a resume or an incremental run of the same method: record the job
            if job_id and job_id not in ours[-1].setdefault("jobs", []):
                ours[-1]["jobs"].append(job_id)
                _run_io(existing_cv.commit_provenance, url, field)
            return result
        prov.processing.append({"method": provenance_json, "by": "emrestore", "overwrote": True, "date": _now(),
                                "jobs": jobs})
        if source_url is not None:
            prov.sources = [source_url]
        _run_io(existing_cv.commit_provenance, url, field)
        return result
    if check_only:
        return result

    cv = _open_cv(url, 0, "output", info=info)
    _run_io(cv.commit_info, url, "output")
    forget_writer(url)
    prov = cv.provenance
    prov.description = description
    if source_url is not None:
        prov.sources = [source_url]
    prov.processing.append({"method": provenance_json, "by": "emrestore", "date": _now(), "jobs": jobs})
    _run_io(cv.commit_provenance, url, "output")
    return result


def create_uncertainty_layer(
    url: str,
    geometry: VolumeInfo,
    chunk_size_xyz: Sequence[int],
    provenance: dict,
    *,
    dtype: str = "uint8",
    uint8_full_scale: float | None = None,
    num_downsample_scales: int | None = None,
    overwrite_check_source_url: str | None = None,
    fmt: LayerFormat | None = None,
    overwrite: bool = False,
    allow_foreign: bool = False,
    check_only: bool = False,
    job_id: str | None = None,
) -> VolumeInfo:
    """Create the per-voxel uncertainty layer (standard deviation of the output's error).

    uint8 (the default) stores ``round(255·std/uint8_full_scale)`` clipped to 255; the full scale
    (the std that 255 stands for, in the source's data units) is recorded in the info
    (``emrestore_uncertainty``) and in the provenance. float32 (layers of older emrestore) stores
    the std itself. Blocks are encoded with :func:`encode_uncertainty`.
    """
    dtype = _check_dtype(dtype, "dtype")
    if dtype not in ("float32", "uint8"):
        raise VolumeError("dtype", f"uncertainty dtype {dtype}; allowed: float32, uint8")
    if dtype == "uint8" and not (uint8_full_scale and uint8_full_scale > 0):
        raise VolumeError("uint8_full_scale", f"{uint8_full_scale!r}; a uint8 uncertainty layer needs a full scale > 0")
    described = {
        "quantity": "standard deviation of the restored value's error, in the source's data units",
        "dtype": dtype,
        "uint8_full_scale": float(uint8_full_scale) if dtype == "uint8" else None,
    }
    if dtype == "uint8":
        described["decode"] = "std = value / 255 × uint8_full_scale"
    meta = dict(provenance)
    meta["uncertainty"] = described
    fmt = fmt or LayerFormat()
    if dtype != "uint8" and fmt.encoding != "raw":
        fmt = replace(fmt, encoding="raw")
    return create_output_layer(
        url, geometry, chunk_size_xyz, dtype, meta, num_downsample_scales, overwrite_check_source_url,
        fmt=fmt, description="emrestore uncertainty layer (std of the restored value's error)", overwrite=overwrite,
        allow_foreign=allow_foreign, check_only=check_only, field="uncertainty_output", job_id=job_id,
        extra_info={UNCERTAINTY_INFO_KEY: described},
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


def uncertainty_full_scale(info: dict) -> float | None:
    """The full scale of a uint8 uncertainty layer's info (None for float32 or foreign layers)."""
    meta = info.get(UNCERTAINTY_INFO_KEY) or {}
    v = meta.get("uint8_full_scale")
    return float(v) if v else None


_ = Vec3  # re-exported type
