"""precomputed: layer validation, geometry of restored layers, aligned reads and writes."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
from cloudvolume import CloudVolume

from service.volume import precomputed as P
from service.volume.precomputed import (
    PermissionDenied,
    SourceNotFound,
    StoreUnreachable,
    VolumeError,
    VolumeInfo,
)
from service.volume.stores import register_s3_endpoint


def raw_layer(url, dtype="uint8", channels=1, layer_type="image", size=(32, 32, 4)):
    """A layer written directly with cloud-volume (for layers create_source_layer refuses)."""
    info = CloudVolume.create_new_info(channels, layer_type, dtype, "raw", [4, 4, 40], [0, 0, 0], list(size), chunk_size=[16, 16, 2])
    cv = CloudVolume(url, info=info, progress=False)
    cv.commit_info()
    return url


def src_info(size_xyz=(48, 40, 5), offset=(0, 0, 0), res=(4.0, 4.0, 40.0), chunk=(16, 16, 2), dtype="uint8"):
    return VolumeInfo(size_xyz, offset, res, chunk, dtype)


# ---------------------------------------------------------------- sources


def test_create_and_open_source(store_root, ramp_volume):
    vol = ramp_volume(5, 40, 48)
    made = P.create_source_layer(f"{store_root}/src", vol, (4, 4, 40), (8, 16, 2), (16, 16, 2))
    info = P.open_source(f"{store_root}/src")
    assert info == made
    assert info.size_xyz == (48, 40, 5)
    assert info.shape_zyx == (5, 40, 48)
    assert info.voxel_offset_xyz == (8, 16, 2)
    assert info.start_zyx == (2, 16, 8) and info.stop_zyx == (7, 56, 56)
    assert info.resolution_nm_xyz == (4.0, 4.0, 40.0)
    assert info.chunk_size_xyz == (16, 16, 2)
    assert (info.dtype, info.num_channels, info.layer_type) == ("uint8", 1, "image")
    back = P.read_zyx(f"{store_root}/src", info.start_zyx, info.stop_zyx)
    assert back.shape == (5, 40, 48) and back.dtype == np.uint8
    np.testing.assert_array_equal(back, vol)
    part = P.read_zyx(f"{store_root}/src", (3, 20, 10), (5, 23, 30))
    np.testing.assert_array_equal(part, vol[1:3, 4:7, 2:22])


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_allowed_dtypes(tmp_path, dtype):
    vol = np.random.default_rng(0).integers(0, 1000, size=(3, 20, 24)).astype(dtype)
    P.create_source_layer(str(tmp_path / "src"), vol, (4, 4, 40), chunk_size_xyz=(8, 8, 1))
    info = P.open_source(str(tmp_path / "src"))
    assert info.dtype == dtype
    np.testing.assert_array_equal(P.read_zyx(str(tmp_path / "src"), (0, 0, 0), (3, 20, 24)), vol)


def test_missing_info_is_source_not_found(store_root):
    url = f"{store_root}/nothing-here"
    with pytest.raises(SourceNotFound) as e:
        P.open_source(url)
    assert e.value.field == "source"
    assert "nothing-here/info" in str(e.value)


def test_wrong_dtype_rejected(tmp_path):
    raw_layer(f"file://{tmp_path}/int32", dtype="int32")
    with pytest.raises(VolumeError) as e:
        P.open_source(f"file://{tmp_path}/int32")
    assert e.value.field == "source"
    assert "int32" in str(e.value) and "uint8, uint16, float32" in str(e.value)


def test_two_channels_rejected(tmp_path):
    raw_layer(f"file://{tmp_path}/rgb", channels=2)
    with pytest.raises(VolumeError) as e:
        P.open_source(f"file://{tmp_path}/rgb")
    assert e.value.field == "source" and "2 channels" in str(e.value) and "allowed: 1" in str(e.value)


def test_segmentation_rejected(tmp_path):
    raw_layer(f"file://{tmp_path}/seg", dtype="uint32", layer_type="segmentation")
    with pytest.raises(VolumeError) as e:
        P.open_source(f"file://{tmp_path}/seg")
    assert e.value.field == "source" and "segmentation" in str(e.value)


def test_mip_out_of_range(tmp_path, ramp_volume):
    P.create_source_layer(str(tmp_path / "src"), ramp_volume(2, 16, 16), (4, 4, 40))
    with pytest.raises(VolumeError) as e:
        P.open_source(str(tmp_path / "src"), mip=3)
    assert e.value.field == "mip" and "0..0" in str(e.value)


def test_create_source_refuses_bad_input(tmp_path, ramp_volume):
    with pytest.raises(VolumeError) as e:
        P.create_source_layer(str(tmp_path / "a"), np.zeros((2, 8, 8), np.int64), (4, 4, 40))
    assert e.value.field == "volume"
    with pytest.raises(VolumeError) as e:
        P.create_source_layer(str(tmp_path / "a"), np.zeros((8, 8), np.uint8), (4, 4, 40))
    assert e.value.field == "volume"
    P.create_source_layer(str(tmp_path / "a"), ramp_volume(2, 8, 8), (4, 4, 40))
    with pytest.raises(VolumeError) as e:
        P.create_source_layer(str(tmp_path / "a"), ramp_volume(2, 8, 8), (4, 4, 40))
    assert e.value.field == "output"


@pytest.mark.parametrize(
    "start, stop, word",
    [
        ((0, 0, 0), (6, 10, 10), "outside"),
        ((-1, 0, 0), (2, 10, 10), "outside"),
        ((0, 0, 40), (2, 10, 50), "outside"),
        ((2, 0, 0), (2, 10, 10), "empty"),
        ((1, 5, 5), (2, 5, 9), "empty"),
    ],
)
def test_read_box_validation(tmp_path, ramp_volume, start, stop, word):
    P.create_source_layer(str(tmp_path / "src"), ramp_volume(5, 40, 48), (4, 4, 40))
    with pytest.raises(VolumeError) as e:
        P.read_zyx(str(tmp_path / "src"), start, stop)
    msg = str(e.value)
    assert e.value.field == "box"
    assert word in msg and "z 0:5, y 0:40, x 0:48" in msg


# ---------------------------------------------------------------- store failures


def test_unreachable_store(s3_endpoint):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    register_s3_endpoint("labclosed", f"http://127.0.0.1:{port}", "k", "s", cloud_volume_dir=s3_endpoint.cloud_volume_dir)
    with pytest.raises(StoreUnreachable) as e:
        P.open_source("labclosed://somebucket/src")
    assert e.value.field == "source" and "unreachable" in str(e.value)


def test_bad_credentials(s3_endpoint, ramp_volume):
    url = s3_endpoint.url("creds", "src")
    P.create_source_layer(url, ramp_volume(2, 16, 16), (4, 4, 40))
    register_s3_endpoint("labwrongkey", s3_endpoint.endpoint_url, s3_endpoint.access_key_id, "not-the-secret",
                         cloud_volume_dir=s3_endpoint.cloud_volume_dir)
    with pytest.raises(PermissionDenied) as e:
        P.open_source(f"labwrongkey://{s3_endpoint.bucket}/creds/src")
    assert e.value.field == "source"
    with pytest.raises(PermissionDenied):
        P.create_output_layer(
            f"labwrongkey://{s3_endpoint.bucket}/creds/out",
            P.output_geometry(P.open_source(url), (1, 1, 3)),
            (16, 16, 6), "uint8", {"task": "isotropic"},
        )
    assert P.open_source(url).size_xyz == (16, 16, 2)  # the right keys still work


# ---------------------------------------------------------------- output geometry


@pytest.mark.parametrize("k", [3, 5])
def test_output_geometry_isotropic(k):
    src = src_info(offset=(8, 16, 2))
    out = P.output_geometry(src, (1, 1, k))
    assert out.size_xyz == (48, 40, 4 * k + 1)  # first to last section centre
    assert out.voxel_offset_xyz == (8, 16, 2 * k + (k - 1) // 2)
    assert out.resolution_nm_xyz == pytest.approx((4.0, 4.0, 40.0 / k))
    assert out.chunk_size_xyz == (16, 16, 2 * k)
    assert out.scale_xyz == (1, 1, k)
    # section centres coincide with output voxel centres at j = k·i + (k−1)/2
    for i in range(2, 7):
        j = k * i + (k - 1) // 2
        assert (j + 0.5) * out.resolution_nm_xyz[2] == pytest.approx((i + 0.5) * 40.0)


def test_output_geometry_lateral_and_denoise():
    src = src_info(offset=(8, 16, 2))
    sr = P.output_geometry(src, (2, 2, 1))
    assert sr.size_xyz == (96, 80, 5) and sr.voxel_offset_xyz == (16, 32, 2)
    assert sr.resolution_nm_xyz == (2.0, 2.0, 40.0)
    dn = P.output_geometry(src, (1, 1, 1), dtype="float32")
    assert (dn.size_xyz, dn.voxel_offset_xyz, dn.resolution_nm_xyz, dn.dtype) == (src.size_xyz, src.voxel_offset_xyz, src.resolution_nm_xyz, "float32")


def test_even_k_refused():
    with pytest.raises(VolumeError) as e:
        P.output_geometry(src_info(), (1, 1, 4))
    assert e.value.field == "scale" and "half" in str(e.value) and "odd" in str(e.value)


@pytest.mark.parametrize("scale, field", [((2, 1, 1), "scale"), ((1, 1, 0), "scale"), ((1, 1), "scale")])
def test_bad_scale(scale, field):
    with pytest.raises(VolumeError) as e:
        P.output_geometry(src_info(), scale)
    assert e.value.field == field


def test_isotropic_needs_two_sections():
    with pytest.raises(VolumeError) as e:
        P.output_geometry(src_info(size_xyz=(48, 40, 1)), (1, 1, 3))
    assert e.value.field == "source"


def test_chunk_z_must_be_multiple_of_k(tmp_path):
    with pytest.raises(VolumeError) as e:
        P.output_geometry(src_info(), (1, 1, 3), chunk_size_xyz=(16, 16, 8))
    assert e.value.field == "chunk_size" and "multiple of k=3" in str(e.value)
    geo = P.output_geometry(src_info(), (1, 1, 3))
    with pytest.raises(VolumeError) as e:
        P.create_output_layer(str(tmp_path / "out"), geo, (16, 16, 8), "uint8", {})
    assert e.value.field == "chunk_size"
    assert not (tmp_path / "out").exists()


def test_downsample_factors():
    assert P.downsample_factors((4, 4, 40), 3) == ((2, 2, 1), (4, 4, 1), (8, 8, 1))
    assert P.downsample_factors((4, 4, 4), 2) == ((2, 2, 2), (4, 4, 4))
    assert P.downsample_factors((4, 4, 8), 3) == ((2, 2, 1), (4, 4, 2), (8, 8, 4))
    assert P.downsample_factors((4, 4, 40 / 3), 3) == ((2, 2, 1), (4, 4, 1), (8, 8, 2))


# ---------------------------------------------------------------- output layers


def make_source(root, ramp_volume, z=5, y=40, x=48, offset=(0, 0, 0)):
    P.create_source_layer(f"{root}/src", ramp_volume(z, y, x), (4, 4, 40), offset, (16, 16, 2))
    return P.open_source(f"{root}/src")


def test_create_output_layer_info_and_provenance(tmp_path, ramp_volume):
    src = make_source(f"file://{tmp_path}", ramp_volume)
    geo = P.output_geometry(src, (1, 1, 3))
    out = P.create_output_layer(f"file://{tmp_path}/out", geo, (16, 16, 6), "uint8", {"task": "isotropic", "k": 3},
                                num_downsample_scales=2, overwrite_check_source_url=src.url)
    assert out.downsample_factors_xyz == ((2, 2, 1), (4, 4, 1))
    assert out.write_alignment_zyx == (6, 64, 64)
    info = json.loads((tmp_path / "out" / "info").read_text())
    assert [s["resolution"] for s in info["scales"]] == [[4, 4, 40 / 3], [8, 8, 40 / 3], [16, 16, 40 / 3]]
    assert [s["size"] for s in info["scales"]] == [[48, 40, 13], [24, 20, 13], [12, 10, 13]]
    assert all(s["chunk_sizes"] == [[16, 16, 6]] for s in info["scales"])
    assert info["type"] == "image" and info["num_channels"] == 1 and info["data_type"] == "uint8"
    prov = json.loads((tmp_path / "out" / "provenance").read_text())
    assert prov["sources"] == [src.url]
    assert prov["processing"][-1]["method"] == {"task": "isotropic", "k": 3}
    reopened = P.open_layer(f"file://{tmp_path}/out")
    assert reopened.size_xyz == (48, 40, 13) and reopened.downsample_factors_xyz == out.downsample_factors_xyz


def test_isotropic_output_downsamples_z(tmp_path, ramp_volume):
    src = make_source(f"file://{tmp_path}", ramp_volume)
    geo = P.output_geometry(P.open_source(src.url), (1, 1, 5))  # 4 x 4 x 8 nm
    out = P.create_output_layer(f"file://{tmp_path}/out", geo, (16, 16, 10), "uint8", {}, num_downsample_scales=2)
    assert out.downsample_factors_xyz == ((2, 2, 1), (4, 4, 2))
    info = json.loads((tmp_path / "out" / "info").read_text())
    assert info["scales"][2]["resolution"] == [16, 16, 16]


def test_output_equal_to_source_refused(store_root, ramp_volume):
    src = make_source(store_root, ramp_volume)
    geo = P.output_geometry(src, (1, 1, 3))
    before = P.read_zyx(src.url, src.start_zyx, src.stop_zyx)
    with pytest.raises(VolumeError) as e:
        P.create_output_layer(f"{store_root}/src/", geo, (16, 16, 6), "uint8", {}, overwrite_check_source_url=f"{store_root}/src")
    assert e.value.field == "output" and "source" in str(e.value)
    assert P.open_source(src.url) == src
    np.testing.assert_array_equal(P.read_zyx(src.url, src.start_zyx, src.stop_zyx), before)


def test_existing_output_resume_and_conflict(tmp_path, ramp_volume):
    src = make_source(f"file://{tmp_path}", ramp_volume)
    geo = P.output_geometry(src, (1, 1, 3))
    url = f"file://{tmp_path}/out"
    first = P.create_output_layer(url, geo, (16, 16, 6), "uint8", {"run": 1})
    prov_before = (tmp_path / "out" / "provenance").read_text()
    again = P.create_output_layer(url, geo, (16, 16, 6), "uint8", {"run": 1})  # the same job: a resume
    assert again == first
    assert (tmp_path / "out" / "provenance").read_text() == prov_before
    # another job's output is not a resume: refused unless overwrite is asked, which records the new job
    with pytest.raises(VolumeError) as e:
        P.create_output_layer(url, geo, (16, 16, 6), "uint8", {"run": 2})
    assert e.value.code == "FAILED_PRECONDITION" and "overwrite" in str(e.value)
    assert (tmp_path / "out" / "provenance").read_text() == prov_before
    assert P.create_output_layer(url, geo, (16, 16, 6), "uint8", {"run": 2}, overwrite=True) == first
    assert '"run": 2' in (tmp_path / "out" / "provenance").read_text().replace('"run":2', '"run": 2')
    info_before = (tmp_path / "out" / "info").read_text()
    for kwargs in (
        dict(geometry=P.output_geometry(src, (1, 1, 5)), chunk_size_xyz=(16, 16, 10), dtype="uint8"),
        dict(geometry=geo, chunk_size_xyz=(16, 16, 12), dtype="uint8"),
        dict(geometry=geo, chunk_size_xyz=(16, 16, 6), dtype="float32"),
    ):
        with pytest.raises(VolumeError) as e:
            P.create_output_layer(url, provenance={}, **kwargs)
        assert e.value.field == "output" and "different geometry" in str(e.value)
    with pytest.raises(VolumeError):
        P.create_output_layer(url, geo, (16, 16, 6), "uint8", {}, num_downsample_scales=2)
    assert (tmp_path / "out" / "info").read_text() == info_before


def test_lower_scales_of_any_offset_hold_every_window(tmp_path, ramp_volume):
    """Scales are absolute (voxel a of factor f covers mip-0 voxels [a·f, (a+1)·f)): with an odd
    offset a lower scale starts at floor(offset/f) and ends at ceil(stop/f), and a window cut by
    the data's edge averages the voxels it holds (no half-voxel shift, no refused offset)."""
    src = make_source(f"file://{tmp_path}", ramp_volume, offset=(3, 0, 0))
    geo = P.output_geometry(src, (1, 1, 1))
    out = P.create_output_layer(f"file://{tmp_path}/out", geo, (16, 16, 2), "uint8", {}, num_downsample_scales=1)
    info = json.loads((tmp_path / "out" / "info").read_text())
    assert info["scales"][1]["voxel_offset"] == [1, 0, 0] and info["scales"][1]["size"] == [25, 20, 5]
    vol = ramp_volume(5, 40, 48)
    P.write_scales(out.url, out.start_zyx, vol, 0, 1)
    got = P.read_zyx(out.url, (0, 0, 1), (5, 20, 26), mip=1)
    padded = np.full((5, 40, 50), np.nan)
    padded[:, :, 1:49] = vol  # absolute x 3..50 sits at 1..48 of windows from x = 2
    expected = np.rint(np.nanmean(padded.reshape(5, 20, 2, 25, 2), axis=(2, 4)))
    np.testing.assert_array_equal(got, expected.astype(np.uint8))
    assert got[0, 0, 0] == vol[0, 0:2, 0].mean().round()  # the first window holds only x = 3


def test_bad_output_dtype_and_provenance(tmp_path, ramp_volume):
    src = make_source(f"file://{tmp_path}", ramp_volume)
    geo = P.output_geometry(src, (1, 1, 3))
    with pytest.raises(VolumeError) as e:
        P.create_output_layer(f"file://{tmp_path}/out", geo, (16, 16, 6), "int64", {})
    assert e.value.field == "dtype"
    with pytest.raises(VolumeError) as e:
        P.create_output_layer(f"file://{tmp_path}/out", geo, (16, 16, 6), "uint8", {"x": object()})
    assert e.value.field == "provenance"
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- writes


@pytest.fixture
def out_layer(tmp_path, ramp_volume):
    src = make_source(f"file://{tmp_path}", ramp_volume)
    geo = P.output_geometry(src, (1, 1, 3))
    return P.create_output_layer(f"file://{tmp_path}/out", geo, (16, 16, 6), "uint8", {}, num_downsample_scales=1)


@pytest.mark.parametrize(
    "start, shape",
    [((1, 0, 1), (6, 16, 16)), ((4, 0, 0), (6, 16, 16)), ((1, 0, 0), (6, 16, 10)), ((1, 0, 0), (4, 16, 16))],
)
def test_non_aligned_write_refused(out_layer, start, shape):
    with pytest.raises(VolumeError) as e:
        P.write_zyx(out_layer.url, start, np.ones(shape, np.uint8))
    assert e.value.field == "box" and "chunk-aligned" in str(e.value)
    assert P.read_zyx(out_layer.url, (1, 0, 0), (14, 40, 48), fill_missing=True).max() == 0


def test_aligned_write_and_upper_boundary(out_layer):
    # the layer spans z 1:14 (first to last section centre, k = 3): chunks start at 1, 7, 13
    a = np.full((6, 16, 16), 7, np.uint8)
    P.write_zyx(out_layer.url, (7, 16, 32), a)  # interior chunk
    edge = np.full((1, 8, 16), 9, np.uint8)  # z 13:14 and y 32:40 end at the volume's upper bound
    P.write_zyx(out_layer.url, (13, 32, 0), edge)
    np.testing.assert_array_equal(P.read_zyx(out_layer.url, (7, 16, 32), (13, 32, 48)), a)
    np.testing.assert_array_equal(P.read_zyx(out_layer.url, (13, 32, 0), (14, 40, 16)), edge)


def test_write_checks_dtype_and_bounds(out_layer):
    with pytest.raises(VolumeError) as e:
        P.write_zyx(out_layer.url, (1, 0, 0), np.ones((6, 16, 16), np.float32))
    assert e.value.field == "array" and "uint8" in str(e.value)
    with pytest.raises(VolumeError) as e:
        P.write_zyx(out_layer.url, (13, 0, 0), np.ones((6, 16, 16), np.uint8))
    assert e.value.field == "box" and "outside" in str(e.value)


def test_write_downsampled_average_pool(out_layer):
    rng = np.random.default_rng(1)
    block = rng.integers(0, 255, size=(13, 40, 48)).astype(np.uint8)  # the whole layer: one block
    P.write_zyx(out_layer.url, (1, 0, 0), block)
    assert P.write_downsampled(out_layer.url, (1, 0, 0), block) == [1]
    mip1 = P.read_zyx(out_layer.url, (1, 0, 0), (14, 20, 24), mip=1)
    expected = np.rint(block.astype(float).reshape(13, 20, 2, 24, 2).mean(axis=(2, 4)))
    np.testing.assert_array_equal(mip1, expected.astype(np.uint8))


def test_write_downsampled_partial_window_at_upper_bound(tmp_path, ramp_volume):
    src = make_source(f"file://{tmp_path}", ramp_volume, y=33, x=35)
    geo = P.output_geometry(src, (1, 1, 1))
    out = P.create_output_layer(f"file://{tmp_path}/dn", geo, (16, 16, 2), "float32", {}, num_downsample_scales=1)
    block = np.arange(2 * 1 * 3, dtype=np.float32).reshape(2, 1, 3) + np.zeros((2, 1, 3), np.float32)
    P.write_zyx(out.url, (2, 32, 32), block)
    P.write_downsampled(out.url, (2, 32, 32), block)
    got = P.read_zyx(out.url, (2, 16, 16), (4, 17, 18), mip=1, fill_missing=True)
    np.testing.assert_allclose(got[:, 0, 0], block[:, 0, 0:2].mean(axis=1))
    np.testing.assert_allclose(got[:, 0, 1], block[:, 0, 2])
    with pytest.raises(VolumeError) as e:
        P.write_downsampled(out.url, (1, 0, 0), np.zeros((1, 16, 16), np.float32))
    assert e.value.field == "box"


def test_uncertainty_layer(tmp_path, ramp_volume):
    src = make_source(f"file://{tmp_path}", ramp_volume)
    geo = P.output_geometry(src, (1, 1, 3))
    std = np.linspace(0, 0.2, 13 * 40 * 48).reshape(13, 40, 48)  # the layer spans z 1:14
    u8 = P.create_uncertainty_layer(f"file://{tmp_path}/unc8", geo, (16, 16, 6), {"task": "iso"}, dtype="uint8", uint8_full_scale=0.1)
    enc = P.encode_uncertainty(std, "uint8", 0.1)
    assert enc.dtype == np.uint8 and enc.max() == 255 and enc[0, 0, 0] == 0
    P.write_zyx(u8.url, (1, 0, 0), enc)
    np.testing.assert_array_equal(P.read_zyx(u8.url, (1, 0, 0), (14, 40, 48)), enc)
    prov = json.loads((tmp_path / "unc8" / "provenance").read_text())
    assert prov["processing"][-1]["method"]["uncertainty"]["uint8_full_scale"] == 0.1
    f32 = P.create_uncertainty_layer(f"file://{tmp_path}/unc32", geo, (16, 16, 6), {}, dtype="float32")
    P.write_zyx(f32.url, (1, 0, 0), P.encode_uncertainty(std))
    np.testing.assert_allclose(P.read_zyx(f32.url, (1, 0, 0), (14, 40, 48)), std.astype(np.float32))
    with pytest.raises(VolumeError):
        P.create_uncertainty_layer(f"file://{tmp_path}/bad", geo, (16, 16, 6), {}, dtype="uint8")
    assert not os.path.exists(tmp_path / "bad")


def test_resume_refuses_output_of_another_source(tmp_path, ramp_volume):
    src = make_source(f"file://{tmp_path}", ramp_volume)
    P.create_source_layer(f"file://{tmp_path}/other", ramp_volume(5, 40, 48), (4, 4, 40), (0, 0, 0), (16, 16, 2))
    geo = P.output_geometry(src, (1, 1, 3))
    url = f"file://{tmp_path}/out"
    P.create_output_layer(url, geo, (16, 16, 6), "uint8", {}, overwrite_check_source_url=src.url)
    P.create_output_layer(url, geo, (16, 16, 6), "uint8", {}, overwrite_check_source_url=src.url + "/")  # resume
    with pytest.raises(VolumeError) as e:
        P.create_output_layer(url, geo, (16, 16, 6), "uint8", {}, overwrite_check_source_url=f"file://{tmp_path}/other")
    assert e.value.field == "output" and "restored from" in str(e.value)


def test_volume_info_dict_round_trip():
    geo = P.output_geometry(src_info(offset=(8, 16, 2)), (1, 1, 3))
    assert VolumeInfo.from_dict(json.loads(json.dumps(geo.to_dict()))) == geo


def test_fsspec_memory_is_not_a_layer_store():
    with pytest.raises(VolumeError) as e:
        P.open_source("memory://layers/src")
    assert e.value.field == "source" and "memory://" in str(e.value)
