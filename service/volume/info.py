"""Precomputed layer geometry (VolumeInfo) and reading through cloud-volume: opening layers,
reading boxes. Coordinates are absolute voxels, zyx; cloud-volume's xyzc arrays are converted
here. See precomputed.py for the output-layer frame."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import EmrestoreError
from .stores import (
    SourceNotFound,
    StoreError,
    VolumeError,
    backend_for,
    join_url,
    normalize_url,
    object_exists,
    translate_store_error,
)


ALLOWED_DTYPES = ("uint8", "uint16", "float32")

Vec3 = tuple[int, int, int]


@dataclass(frozen=True)
class VolumeInfo:
    """Geometry of one scale of a single-channel Precomputed image layer (xyz order, as in the info file).

    ``scale_xyz`` is the factor relative to the source for an output geometry (1,1,1 for
    sources). ``downsample_factors_xyz`` lists the factors of the lower scales relative to this
    one (mip 1, 2, … of an output layer).
    """

    size_xyz: Vec3
    voxel_offset_xyz: Vec3
    resolution_nm_xyz: tuple[float, float, float]
    chunk_size_xyz: Vec3
    dtype: str
    num_channels: int = 1
    layer_type: str = "image"
    scale_xyz: Vec3 = (1, 1, 1)
    downsample_factors_xyz: tuple[Vec3, ...] = ()
    url: str | None = field(default=None, compare=False)
    mip: int = field(default=0, compare=False)

    @property
    def shape_zyx(self) -> Vec3:
        """Array shape of the whole scale, (Z, Y, X)."""
        x, y, z = self.size_xyz
        return (z, y, x)

    @property
    def start_zyx(self) -> Vec3:
        """First voxel (the voxel offset), zyx."""
        x, y, z = self.voxel_offset_xyz
        return (z, y, x)

    @property
    def stop_zyx(self) -> Vec3:
        """One past the last voxel, zyx."""
        return tuple(int(a + b) for a, b in zip(self.start_zyx, self.shape_zyx))  # type: ignore[return-value]

    @property
    def chunk_zyx(self) -> Vec3:
        """Chunk size, zyx."""
        x, y, z = self.chunk_size_xyz
        return (z, y, x)

    @property
    def write_alignment_zyx(self) -> Vec3:
        """Grid that block writes must follow so that mip 0 and every lower scale stay chunk-aligned."""
        fx, fy, fz = (1, 1, 1)
        for f in self.downsample_factors_xyz:
            fx, fy, fz = max(fx, f[0]), max(fy, f[1]), max(fz, f[2])
        cz, cy, cx = self.chunk_zyx
        return (cz * fz, cy * fy, cx * fx)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "size_xyz": list(self.size_xyz),
            "voxel_offset_xyz": list(self.voxel_offset_xyz),
            "resolution_nm_xyz": list(self.resolution_nm_xyz),
            "chunk_size_xyz": list(self.chunk_size_xyz),
            "dtype": self.dtype,
            "num_channels": self.num_channels,
            "layer_type": self.layer_type,
            "scale_xyz": list(self.scale_xyz),
            "downsample_factors_xyz": [list(f) for f in self.downsample_factors_xyz],
            "url": self.url,
            "mip": self.mip,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VolumeInfo":
        """Inverse of :meth:`to_dict`."""

        def ints(v):
            return tuple(int(x) for x in v)

        return cls(
            size_xyz=ints(d["size_xyz"]),  # type: ignore[arg-type]
            voxel_offset_xyz=ints(d["voxel_offset_xyz"]),  # type: ignore[arg-type]
            resolution_nm_xyz=tuple(float(x) for x in d["resolution_nm_xyz"]),  # type: ignore[arg-type]
            chunk_size_xyz=ints(d["chunk_size_xyz"]),  # type: ignore[arg-type]
            dtype=str(d["dtype"]),
            num_channels=int(d.get("num_channels", 1)),
            layer_type=str(d.get("layer_type", "image")),
            scale_xyz=ints(d.get("scale_xyz", (1, 1, 1))),  # type: ignore[arg-type]
            downsample_factors_xyz=tuple(ints(f) for f in d.get("downsample_factors_xyz", ())),  # type: ignore[arg-type]
            url=d.get("url"),
            mip=int(d.get("mip", 0)),
        )

    def describe_bounds(self) -> str:
        """``z a:b, y c:d, x e:f`` for messages."""
        return _fmt_box(self.start_zyx, self.stop_zyx)


def _fmt_box(start: Sequence[int], stop: Sequence[int]) -> str:
    return ", ".join(f"{ax} {int(a)}:{int(b)}" for ax, a, b in zip("zyx", start, stop))


def _as_vec3(value: Any, name: str, *, positive: bool = False, nonneg: bool = False) -> Vec3:
    try:
        vals = tuple(int(v) for v in value)
        ok = len(vals) == 3 and all(float(v) == int(v) for v in value)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise VolumeError(name, f"{value!r} must be three integers")
    if positive and min(vals) < 1:
        raise VolumeError(name, f"{list(vals)} must be three integers >= 1")
    if nonneg and min(vals) < 0:
        raise VolumeError(name, f"{list(vals)} must be three integers >= 0")
    return vals  # type: ignore[return-value]


def _num(v: float) -> float | int:
    """An int when integral (keeps info files readable), else the float."""
    return int(v) if float(v).is_integer() else float(v)


# --------------------------------------------------------------------------------------
# cloud-volume access
# --------------------------------------------------------------------------------------


def _open_cv(url: str, mip: int, field_name: str, **kwargs):
    from cloudvolume import CloudVolume
    from cloudvolume.exceptions import InfoUnavailableError

    opts = dict(
        mip=mip,
        progress=False,
        cache=False,
        bounded=True,
        fill_missing=False,
        non_aligned_writes=False,
        delete_black_uploads=False,
        parallel=1,
    )
    opts.update(kwargs)
    try:
        return CloudVolume(url, **opts)
    except InfoUnavailableError as exc:
        raise SourceNotFound(field_name, f"no Precomputed info file at {join_url(url, 'info')}") from exc
    except Exception as exc:  # noqa: BLE001 - translated when it is a store failure
        err = translate_store_error(exc, url, field_name)
        if err is not None:
            raise err from exc
        raise


def _run_io(fn, url: str, field_name: str):
    """``fn()``; a store's failure becomes a VolumeError naming the store (UNAVAILABLE,
    PERMISSION_DENIED, NOT_FOUND, or INTERNAL for a reply we cannot use) — never the
    INVALID_ARGUMENT a library's ValueError would otherwise be answered with."""
    try:
        return fn()
    except EmrestoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - translated: a store failure, not the user's
        err = translate_store_error(exc, url, field_name)
        if err is None:
            err = StoreError(field_name, f"the store holding {url[:200]} failed ({type(exc).__name__}: "
                                         f"{' '.join(str(exc).split())[:200]})")
        raise err from exc


def _info_exists(url: str, field_name: str) -> bool:
    backend, url = backend_for(url)
    if not backend.volumes:
        raise VolumeError(field_name, f"{url}: cloud-volume cannot reach {backend.name}; use file://, s3://, gs:// "
                                      "or a registered alias")
    if url.startswith("mem://"):  # cloud-files' memory store: only cloud-files sees it
        from cloudfiles import CloudFiles

        return bool(_run_io(lambda: CloudFiles(url).exists("info"), url, field_name))
    return object_exists(join_url(url, "info"), field=field_name)


def _factors_from_info(info: dict, mip: int) -> tuple[Vec3, ...]:
    scales = info["scales"]
    base = np.asarray(scales[mip]["resolution"], dtype=float)
    out = []
    for s in scales[mip + 1:]:
        ratio = np.asarray(s["resolution"], dtype=float) / base
        r = np.rint(ratio)
        if np.allclose(ratio, r, rtol=1e-6) and r.min() >= 1:
            out.append(tuple(int(v) for v in r))
    return tuple(out)


def _volume_info_from_dict(info: dict, mip: int, url: str | None) -> VolumeInfo:
    s = info["scales"][mip]
    return VolumeInfo(
        size_xyz=tuple(int(v) for v in s["size"]),  # type: ignore[arg-type]
        voxel_offset_xyz=tuple(int(v) for v in s.get("voxel_offset", (0, 0, 0))),  # type: ignore[arg-type]
        resolution_nm_xyz=tuple(float(v) for v in s["resolution"]),  # type: ignore[arg-type]
        chunk_size_xyz=tuple(int(v) for v in s["chunk_sizes"][0]),  # type: ignore[arg-type]
        dtype=str(info["data_type"]),
        num_channels=int(info.get("num_channels", 1)),
        layer_type=str(info.get("type", "image")),
        downsample_factors_xyz=_factors_from_info(info, mip),
        url=url,
        mip=mip,
    )


def _check_mip(info: dict, mip: int, field_name: str) -> None:
    n = len(info.get("scales", []))
    if not isinstance(mip, (int, np.integer)) or not 0 <= int(mip) < n:
        raise VolumeError("mip", f"{mip!r} is not a scale of {field_name}; allowed 0..{n - 1}")


def _read_info(url: str, field_name: str) -> tuple[str, dict]:
    url = normalize_url(url)
    if not _info_exists(url, field_name):
        raise SourceNotFound(field_name, f"no Precomputed info file at {join_url(url, 'info')}")
    try:
        info = _open_cv(url, 0, field_name).info
    except (ValueError, KeyError, IndexError, TypeError) as e:  # bad JSON, cloud-volume's own checks
        if isinstance(e, EmrestoreError):
            raise
        raise VolumeError(field_name, f"the info file at {join_url(url, 'info')[:200]} is not valid: "
                                      f"{' '.join(str(e).split())[:200]}") from None
    _validate_info(info, url, field_name)
    return url, info


def _validate_info(info: Any, url: str, field_name: str) -> None:
    """A readable Precomputed image info (every scale: size, resolution, chunk sizes), else
    INVALID_ARGUMENT naming the field and what is wrong."""
    where = f"the info file at {join_url(url, 'info')[:200]}"
    if not isinstance(info, dict):
        raise VolumeError(field_name, f"{where} is not a JSON object")
    if info.get("data_type") not in ALLOWED_DTYPES:
        raise VolumeError(field_name, f"{where}: data_type {str(info.get('data_type'))[:40]!r}; allowed: "
                                      f"{', '.join(ALLOWED_DTYPES)}")
    scales = info.get("scales")
    if not isinstance(scales, list) or not scales:
        raise VolumeError(field_name, f"{where} has no scales")
    for i, sc in enumerate(scales):
        try:
            size = [int(v) for v in sc["size"]]
            res = [float(v) for v in sc["resolution"]]
            chunk = [int(v) for v in sc["chunk_sizes"][0]]
            offset = [int(v) for v in sc.get("voxel_offset", (0, 0, 0))]
        except (KeyError, TypeError, ValueError, IndexError):
            raise VolumeError(field_name, f"{where}: scale {i} needs size, resolution and chunk_sizes "
                                          "(three numbers each)") from None
        if len(size) != 3 or len(res) != 3 or len(chunk) != 3 or len(offset) != 3:
            raise VolumeError(field_name, f"{where}: scale {i}: size, resolution, chunk_sizes and voxel_offset "
                                          "need three numbers each")
        if min(size) < 1 or min(chunk) < 1 or not all(r > 0 and r == r and r != float("inf") for r in res):
            raise VolumeError(field_name, f"{where}: scale {i}: size {size[:3]} and chunk sizes must be ≥ 1, "
                                          f"resolution {res[:3]} > 0")


def open_layer(url: str, mip: int = 0, field_name: str = "layer") -> VolumeInfo:
    """Geometry of an existing layer at ``mip``, without the source checks of :func:`open_source`."""
    url, info = _read_info(url, field_name)
    _check_mip(info, mip, field_name)
    return _volume_info_from_dict(info, int(mip), url)


def open_source(url: str, mip: int = 0) -> VolumeInfo:
    """Validate and describe a source layer: single-channel image, dtype uint8/uint16/float32.

    Raises SourceNotFound (no info file), StoreUnreachable, PermissionDenied or VolumeError,
    each with field "source" (or "mip").
    """
    url, info = _read_info(url, "source")
    layer_type = info.get("type")
    channels = int(info.get("num_channels", 1))
    dtype = str(info.get("data_type"))
    if layer_type != "image":
        raise VolumeError("source", f"{url} is a {layer_type!r} layer; allowed: 'image'")
    if channels != 1:
        raise VolumeError("source", f"{url} has {channels} channels; allowed: 1")
    if dtype not in ALLOWED_DTYPES:
        raise VolumeError("source", f"{url} has dtype {dtype}; allowed: {', '.join(ALLOWED_DTYPES)}")
    _check_mip(info, mip, "source")
    return _volume_info_from_dict(info, int(mip), url)


def _check_box(info: VolumeInfo, start_zyx: Sequence[int], stop_zyx: Sequence[int], field_name: str) -> tuple[Vec3, Vec3]:
    start = _as_vec3(start_zyx, field_name)
    stop = _as_vec3(stop_zyx, field_name)
    lo, hi = info.start_zyx, info.stop_zyx
    if any(b <= a for a, b in zip(start, stop)):
        raise VolumeError(field_name, f"box {_fmt_box(start, stop)} is empty; it must lie within {_fmt_box(lo, hi)}")
    if any(a < l for a, l in zip(start, lo)) or any(b > h for b, h in zip(stop, hi)):
        raise VolumeError(field_name, f"box {_fmt_box(start, stop)} lies outside the layer bounds {_fmt_box(lo, hi)}")
    return start, stop
