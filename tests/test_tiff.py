import os

import numpy as np
import pytest
import tifffile

from service.volume import tiff
from service.volume.tiff import read_stack, read_voxel_size, write_stack


def _stack(dtype, shape=(5, 24, 31), seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.random(shape).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)


def _assert_bad(path, match, **kwargs):
    with pytest.raises(ValueError, match=match) as info:
        read_stack(path, **kwargs)
    msg = str(info.value)
    assert msg.startswith(str(path)) and "\n" not in msg
    return msg


# --- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_round_trip_with_voxel_size(tmp_path, dtype):
    arr = _stack(dtype)
    path = write_stack(tmp_path / "vol.tif", arr, voxel_size_nm=(4.0, 5.5, 50.0))
    assert path == tmp_path / "vol.tif"
    out = read_stack(path)
    assert out.dtype == np.dtype(dtype) and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)
    assert read_voxel_size(path) == pytest.approx((4.0, 5.5, 50.0), rel=1e-6)


def test_written_file_is_imagej_with_nm_unit(tmp_path):
    path = write_stack(tmp_path / "v.tif", _stack(np.uint8), voxel_size_nm=(8, 8, 40))
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej
        meta = tif.imagej_metadata
        assert meta["unit"] == "nm" and meta["spacing"] == pytest.approx(40.0)
        assert meta["slices"] == 5
        x_num, x_den = tif.pages[0].tags["XResolution"].value
        assert x_den / x_num == pytest.approx(8.0)


def test_irrational_voxel_size_round_trip(tmp_path):
    path = write_stack(tmp_path / "v.tif", _stack(np.uint8), voxel_size_nm=(3.3, 4.123456, 33.3333))
    assert read_voxel_size(path) == pytest.approx((3.3, 4.123456, 33.3333), rel=1e-6)


def test_float64_written_and_read_as_float32(tmp_path):
    arr = _stack(np.float64)
    write_stack(tmp_path / "a.tif", arr)
    out = read_stack(tmp_path / "a.tif")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, arr, rtol=1e-6)
    tifffile.imwrite(tmp_path / "b.tif", arr)  # float64 written by someone else
    out = read_stack(tmp_path / "b.tif")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, arr, rtol=1e-6)


def test_2d_image_becomes_single_section(tmp_path):
    img = _stack(np.uint16, shape=(20, 30))
    tifffile.imwrite(tmp_path / "img.tif", img)
    out = read_stack(tmp_path / "img.tif")
    assert out.shape == (1, 20, 30)
    np.testing.assert_array_equal(out[0], img)
    _assert_bad(tmp_path / "img.tif", "2-D", allow_2d=False)
    write_stack(tmp_path / "w.tif", img)
    assert read_stack(tmp_path / "w.tif").shape == (1, 20, 30)


def test_plain_tifffile_and_big_endian_stacks(tmp_path):
    arr = _stack(np.uint16)
    tifffile.imwrite(tmp_path / "plain.tif", arr)
    np.testing.assert_array_equal(read_stack(tmp_path / "plain.tif"), arr)
    tifffile.imwrite(tmp_path / "be.tif", arr.astype(">u2"), byteorder=">")
    out = read_stack(tmp_path / "be.tif")
    assert out.dtype == np.dtype("=u2")
    np.testing.assert_array_equal(out, arr)


def test_singleton_axes_are_dropped(tmp_path):
    arr = _stack(np.uint8)
    tifffile.imwrite(tmp_path / "tz.tif", arr[:, None], imagej=True, metadata={"axes": "ZCYX"})
    np.testing.assert_array_equal(read_stack(tmp_path / "tz.tif"), arr)


# --- voxel size metadata ------------------------------------------------------------------


def test_voxel_size_absent(tmp_path):
    write_stack(tmp_path / "a.tif", _stack(np.uint8))
    assert read_voxel_size(tmp_path / "a.tif") is None
    tifffile.imwrite(tmp_path / "b.tif", _stack(np.uint8), resolution=(0.25, 0.25))
    assert read_voxel_size(tmp_path / "b.tif") is None  # not ImageJ: no z spacing or unit


def test_voxel_size_from_plain_imagej_in_microns(tmp_path):
    tifffile.imwrite(
        tmp_path / "um.tif",
        _stack(np.uint8),
        imagej=True,
        resolution=(1 / 0.004, 1 / 0.006),
        metadata={"axes": "ZYX", "spacing": 0.05, "unit": "micron"},
    )
    assert read_voxel_size(tmp_path / "um.tif") == pytest.approx((4.0, 6.0, 50.0), rel=1e-6)


def test_voxel_size_bad_path(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        read_voxel_size(tmp_path / "nope.tif")


# --- bad input ----------------------------------------------------------------------------


def test_missing_file(tmp_path):
    _assert_bad(tmp_path / "missing.tif", "not found")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError, for NOT_FOUND mapping
        read_stack(tmp_path / "missing.tif")


def test_directory_is_not_a_file(tmp_path):
    _assert_bad(tmp_path, "not a file")


def test_not_a_tiff(tmp_path):
    path = tmp_path / "notes.tif"
    path.write_text("# not an image\nsecond line\n")
    _assert_bad(path, "not a readable TIFF")
    png = tmp_path / "img.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    _assert_bad(png, "TIFF")


def test_rgb_rejected(tmp_path):
    tifffile.imwrite(tmp_path / "rgb.tif", _stack(np.uint8, shape=(16, 16, 3)), photometric="rgb")
    _assert_bad(tmp_path / "rgb.tif", "RGB")
    tifffile.imwrite(tmp_path / "rgbs.tif", _stack(np.uint8, shape=(4, 16, 16, 3)), photometric="rgb")
    _assert_bad(tmp_path / "rgbs.tif", "RGB")


def test_multichannel_rejected(tmp_path):
    arr = _stack(np.uint16, shape=(3, 2, 16, 16))
    tifffile.imwrite(tmp_path / "c.tif", arr, imagej=True, metadata={"axes": "ZCYX"})
    _assert_bad(tmp_path / "c.tif", "multichannel")


def test_too_many_axes_rejected(tmp_path):
    arr = _stack(np.uint8, shape=(2, 3, 16, 16))
    tifffile.imwrite(tmp_path / "tz.tif", arr, imagej=True, metadata={"axes": "TZYX"})
    _assert_bad(tmp_path / "tz.tif", r"\(Z, Y, X\)")


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.uint32, np.float16])
def test_unsupported_dtype_rejected(tmp_path, dtype):
    path = tmp_path / "d.tif"
    tifffile.imwrite(path, np.ones((2, 8, 8), dtype=dtype))
    msg = _assert_bad(path, "dtype")
    assert "uint8, uint16 or float32" in msg


def test_empty_rejected(tmp_path):
    path = tmp_path / "empty.tif"
    with pytest.warns(UserWarning):
        tifffile.imwrite(path, np.zeros((0, 8, 8), dtype=np.uint8))
    _assert_bad(path, "empty")


# --- write_stack --------------------------------------------------------------------------


def test_write_creates_parents_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "a" / "b" / "vol.tif"
    write_stack(path, _stack(np.uint8))
    assert path.is_file()
    assert sorted(os.listdir(path.parent)) == ["vol.tif"]


def test_write_failure_leaves_nothing_and_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "vol.tif"
    old = _stack(np.uint8, seed=1)
    write_stack(path, old)

    def broken_imwrite(file, data, **kwargs):
        with open(file, "wb") as fh:
            fh.write(b"II*\0partial")
        raise OSError("disk full")

    monkeypatch.setattr(tiff.tifffile, "imwrite", broken_imwrite)
    with pytest.raises(OSError, match="disk full"):
        write_stack(path, _stack(np.uint8, seed=2))
    with pytest.raises(OSError):
        write_stack(tmp_path / "new.tif", _stack(np.uint8, seed=2))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["vol.tif"]
    np.testing.assert_array_equal(read_stack(path), old)


@pytest.mark.parametrize(
    "arr,match",
    [
        (np.zeros((2, 3, 8, 8), np.uint8), "shape"),
        (np.zeros((8,), np.uint8), "shape"),
        (np.zeros((0, 8, 8), np.uint8), "shape"),
        (np.zeros((2, 8, 8), bool), "dtype"),
        (np.zeros((2, 8, 8), np.int16), "dtype"),
    ],
)
def test_write_bad_array(tmp_path, arr, match):
    path = tmp_path / "sub" / "x.tif"
    with pytest.raises(ValueError, match=match):
        write_stack(path, arr)
    assert not (tmp_path / "sub").exists()


@pytest.mark.parametrize("voxel", [(4, 4), (4, 4, 0), (4, -1, 40), (4, 4, float("nan")), "abc", 5])
def test_write_bad_voxel_size(tmp_path, voxel):
    with pytest.raises(ValueError, match="voxel_size_nm"):
        write_stack(tmp_path / "x.tif", np.zeros((2, 8, 8), np.uint8), voxel_size_nm=voxel)
    assert not (tmp_path / "x.tif").exists()
