"""The one place TIFF stacks are read and written. Arrays are (Z, Y, X), as tifffile gives them.

Voxel sizes are (x, y, z) in nm, stored the ImageJ way: XResolution/YResolution in pixels per
unit, the z step as ImageJ 'spacing', and 'unit=nm' in the ImageJ description.
"""

from __future__ import annotations

import os
import uuid
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import tifffile

__all__ = ["ALLOWED_DTYPES", "StackNotFound", "read_stack", "write_stack", "read_voxel_size"]

ALLOWED_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))
_ALLOWED_TEXT = "uint8, uint16 or float32 (float64 is converted to float32)"
# Length units ImageJ may write, in nm.
_UNIT_NM = {
    "nm": 1.0, "nanometer": 1.0, "nanometers": 1.0,
    "um": 1e3, "µm": 1e3, "μm": 1e3, "\\u00b5m": 1e3, "micron": 1e3, "microns": 1e3,
    "micrometer": 1e3, "micrometers": 1e3,
    "mm": 1e6, "millimeter": 1e6, "cm": 1e7, "m": 1e9, "meter": 1e9,
    "angstrom": 0.1, "å": 0.1, "\\u00c5": 0.1,
}
_STACK_AXES = set("ZTIQ")  # axes tifffile may give to the page/section dimension


class StackNotFound(ValueError, FileNotFoundError):
    """The TIFF path does not exist (a ValueError that is also a FileNotFoundError)."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _open(path: Path) -> tifffile.TiffFile:
    if not path.exists():
        raise StackNotFound(f"{path}: file not found")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    try:
        return tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises TiffFileError and others for non-TIFF input
        raise ValueError(f"{path}: not a readable TIFF file ({_one_line(exc)})") from None


def read_stack(path, *, allow_2d: bool = True) -> np.ndarray:
    """Read a grayscale TIFF stack as a (Z, Y, X) array of uint8, uint16 or float32.

    A 2-D image becomes (1, Y, X) when allow_2d. float64 data is converted to float32.
    Raises ValueError (message starting with the path) for a missing file, non-TIFF,
    RGB/multichannel data, other dtypes, more than 3 non-singleton axes, or an empty array.
    """
    path = Path(path)
    with _open(path) as tif:
        if not tif.series:
            raise ValueError(f"{path}: TIFF has no image data")
        series = tif.series[0]
        axes, shape, dtype = series.axes, tuple(series.shape), np.dtype(series.dtype)
        for ax, n in zip(axes, shape):
            if ax in "SC" and n > 1:
                kind = "RGB" if ax == "S" and n in (3, 4) else "multichannel"
                raise ValueError(
                    f"{path}: {kind} image (axes {axes}, shape {shape}); expected one grayscale channel"
                )
        if dtype != np.float64 and dtype.newbyteorder("=") not in ALLOWED_DTYPES:
            raise ValueError(f"{path}: dtype {dtype} not supported; expected {_ALLOWED_TEXT}")
        if 0 in shape:
            raise ValueError(f"{path}: empty image (shape {shape})")
        try:
            arr = series.asarray()
        except Exception as exc:
            raise ValueError(f"{path}: cannot decode TIFF data ({_one_line(exc)})") from None
    if arr.size == 0:
        raise ValueError(f"{path}: empty image (shape {arr.shape})")
    arr = arr.astype(np.float32 if dtype == np.float64 else dtype.newbyteorder("="), copy=False)
    # Drop singleton axes other than Y and X; what is left must be (Y, X) or (stack, Y, X).
    if len(axes) != arr.ndim or "Y" not in axes or "X" not in axes:
        axes = "Q" * (arr.ndim - 2) + "YX"
    keep = [i for i, (ax, n) in enumerate(zip(axes, arr.shape)) if n > 1 or ax in "YX"]
    kept_axes = "".join(axes[i] for i in keep)
    stack_ok = len(kept_axes) == 2 or (len(kept_axes) == 3 and kept_axes[0] in _STACK_AXES)
    if kept_axes[-2:] != "YX" or not stack_ok:
        raise ValueError(f"{path}: expected a (Z, Y, X) stack, got axes {axes} with shape {shape}")
    arr = arr.reshape(tuple(arr.shape[i] for i in keep))
    if arr.ndim == 2:
        if not allow_2d:
            raise ValueError(f"{path}: 2-D image of shape {arr.shape}; expected a (Z, Y, X) stack")
        arr = arr[None]
    return np.ascontiguousarray(arr)


def _check_voxel_size(voxel_size_nm) -> tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in voxel_size_nm)
    except (TypeError, ValueError):
        vals = ()
    if len(vals) != 3 or not all(np.isfinite(v) and v > 0 for v in vals):
        raise ValueError(f"voxel_size_nm must be 3 finite numbers > 0 (x, y, z in nm), got {voxel_size_nm!r}")
    return vals


def _rational(value: float) -> tuple[int, int]:
    frac = Fraction(value).limit_denominator(2**31 - 1)
    num, den = frac.numerator, frac.denominator
    while num > 2**32 - 1:  # keep within TIFF RATIONAL (uint32) range
        num //= 2
        den = max(1, den // 2)
    return num, den


def write_stack(path, arr, voxel_size_nm=None) -> Path:
    """Write a (Z, Y, X) (or 2-D) uint8/uint16/float32 array as an ImageJ-compatible TIFF.

    voxel_size_nm: optional (x, y, z) in nm, stored as x/y resolution and ImageJ spacing with
    unit nm. float64 is written as float32. Parent directories are created; the file is written
    to a temporary name in the same directory and moved into place, so a failed write leaves
    no file behind. Returns the path.
    """
    path = Path(path)
    data = np.asarray(arr)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3 or data.size == 0:
        raise ValueError(f"arr must be a non-empty (Z, Y, X) or (Y, X) array, got shape {np.shape(arr)}")
    if data.dtype == np.float64:
        data = data.astype(np.float32)
    elif data.dtype.newbyteorder("=") not in ALLOWED_DTYPES:
        raise ValueError(f"arr dtype {data.dtype} not supported; expected {_ALLOWED_TEXT}")
    data = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("="))
    metadata: dict = {"axes": "ZYX"}
    kwargs: dict = {}
    if voxel_size_nm is not None:
        x, y, z = _check_voxel_size(voxel_size_nm)
        metadata.update(spacing=z, unit="nm")
        kwargs["resolution"] = (_rational(1.0 / x), _rational(1.0 / y))
    if path.exists() and path.is_dir():
        raise ValueError(f"{path}: is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name next to the target (so os.replace is atomic), created with normal permissions.
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tifffile.imwrite(tmp, data, imagej=True, metadata=metadata, **kwargs)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _resolution_size(tag, unit_nm: float) -> float | None:
    """Pixel size in nm from an X/YResolution tag (pixels per unit)."""
    if tag is None:
        return None
    value = tag.value
    if isinstance(value, tuple):
        num, den = value[0], value[1]
    else:
        num, den = value, 1
    if not num or not den:
        return None
    return float(den) / float(num) * unit_nm


def read_voxel_size(path) -> tuple[float, float, float] | None:
    """(x, y, z) voxel size in nm from ImageJ metadata (resolution, spacing, unit), or None.

    None when the file is not an ImageJ TIFF or lacks a length unit, the x/y resolution or
    the z spacing.
    """
    path = Path(path)
    with _open(path) as tif:
        meta = tif.imagej_metadata if tif.is_imagej else None
        if not meta:
            return None
        unit = str(meta.get("unit", "")).strip().lower()
        scale = _UNIT_NM.get(unit)
        spacing = meta.get("spacing")
        if scale is None or spacing is None:
            return None
        page = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
        x = _resolution_size(page.tags.get("XResolution"), scale)
        y = _resolution_size(page.tags.get("YResolution"), scale) or x
    try:
        z = float(spacing) * scale
    except (TypeError, ValueError):
        return None
    if x is None or y is None or not all(np.isfinite(v) and v > 0 for v in (x, y, z)):
        return None
    return (x, y, z)
