"""blocks: planning, isotropic section ranges, assembly, and the full read–restore–write round trip."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from service.volume import precomputed as P
from service.volume.blocks import (
    Block,
    Box,
    Plan,
    assemble_isotropic,
    crop_to_write_box,
    plan_blocks,
    sections_for_write_z,
)
from service.volume.precomputed import VolumeError, VolumeInfo


def source_info(z=5, y=40, x=48, offset_xyz=(0, 0, 0), chunk=(16, 16, 2)):
    return VolumeInfo((x, y, z), offset_xyz, (4.0, 4.0, 40.0), chunk, "uint8")


def output_info(src, scale, chunk, factors=()):
    geo = P.output_geometry(src, scale, chunk_size_xyz=chunk)
    from dataclasses import replace

    return replace(geo, downsample_factors_xyz=factors)


def interpolate(sections: np.ndarray, k: int) -> np.ndarray:
    """A stand-in engine: linear interpolation giving (n−1)·k+1 sections, restored[k·q] = sections[q]."""
    n = sections.shape[0]
    q = np.arange((n - 1) * k + 1)
    lo = np.minimum(q // k, n - 1)
    hi = np.minimum(lo + 1, n - 1)
    w = ((q % k) / k)[:, None, None]
    return (1 - w) * sections[lo].astype(np.float64) + w * sections[hi].astype(np.float64)


# ---------------------------------------------------------------- exhaustive isotropic z


@pytest.mark.parametrize("k", [3, 5, 7])
def test_isotropic_blocks_exhaustive(k):
    h = (k - 1) // 2
    for z_size, z_off, m, mult in itertools.product(range(2, 8), (0, 3), (1, 2, 3), (1, 2)):
        src = source_info(z=z_size, y=8, x=8, offset_xyz=(0, 0, z_off), chunk=(8, 8, 1))
        out = output_info(src, (1, 1, k), (8, 8, m * k))
        plan = plan_blocks(src, out, (1, 1, k), (8, 8, mult * m * k), 0)
        first, last = z_off, z_off + z_size - 1
        lo, hi = k * z_off + h, k * (z_off + z_size - 1) + h + 1  # first to last section centre
        assert plan.write_start[0] == lo and plan.write_stop[0] == hi
        count = np.zeros(hi - lo, int)
        for b in plan.blocks:
            j0, j1 = b.write_start[0], b.write_stop[0]
            i0, i1 = b.sections
            assert (j0 - lo) % (m * k) == 0 and ((j1 - lo) % (m * k) == 0 or j1 == hi)
            assert first <= i0 <= i1 <= last
            assert (b.read_start[0], b.read_stop[0]) == (i0, i1 + 1)
            count[j0 - lo:j1 - lo] += 1
            # every output voxel inside the data has both neighbouring sections in the read range
            for j in range(j0, j1):
                t = (j - h) / k
                if first <= t <= last:
                    assert i0 <= np.floor(t) and np.ceil(t) <= i1, (k, z_size, z_off, m, mult, j)
            # assembly: restored ramp value k·i + r + 1 at restored[k·(i−i0)+r]; outside data is 0
            n_rest = (i1 - i0) * k + 1
            restored = (k * i0 + np.arange(n_rest) + 1).astype(np.float32)[:, None, None] * np.ones((1, 8, 8), np.float32)
            got = assemble_isotropic(restored, i0, b, k, out.size_xyz[2])
            for jj, j in enumerate(range(j0, j1)):
                t = (j - h) / k
                expected = (j - h + 1) if first <= t <= last else 0
                assert np.all(got[jj] == expected), (k, z_size, z_off, m, j)
        assert np.all(count == 1)


def test_sections_formula_examples():
    # k = 3, h = 1: output voxels 0..2 around section 0, 3..5 around section 1, ...
    assert sections_for_write_z(0, 6, 3, 0, 9) == (0, 2)
    assert sections_for_write_z(6, 12, 3, 0, 9) == (1, 4)
    assert sections_for_write_z(24, 30, 3, 0, 9) == (7, 9)
    assert sections_for_write_z(27, 30, 3, 0, 9) == (8, 9)
    assert sections_for_write_z(4, 5, 3, 0, 9) == (1, 1)  # output 4 is section 1 itself


# ---------------------------------------------------------------- lateral and denoise


@pytest.mark.parametrize("f, ctx", [(1, 0), (1, 5), (2, 3)])
def test_lateral_blocks_cover_once_with_context(f, ctx):
    src = source_info(z=3, y=37, x=41, offset_xyz=(5, 0, 0), chunk=(8, 8, 1))
    out = output_info(src, (f, f, 1), (8, 8, 1))
    plan = plan_blocks(src, out, (f, f, 1), (16, 8, 2), ctx)
    (oz0, oy0, ox0), (oz1, oy1, ox1) = out.start_zyx, out.stop_zyx
    count = np.zeros(out.shape_zyx, int)
    for b in plan.blocks:
        assert b.sections is None
        z0, y0, x0 = b.write_start
        z1, y1, x1 = b.write_stop
        count[z0 - oz0:z1 - oz0, y0 - oy0:y1 - oy0, x0 - ox0:x1 - ox0] += 1
        assert (b.read_start[0], b.read_stop[0]) == (z0, z1)
        for ax, lo_s, hi_s in ((1, src.start_zyx[1], src.stop_zyx[1]), (2, src.start_zyx[2], src.stop_zyx[2])):
            w0, w1 = b.write_start[ax], b.write_stop[ax]
            r0, r1 = b.read_start[ax], b.read_stop[ax]
            assert r0 == max(lo_s, w0 // f - ctx) and r1 == min(hi_s, -(-w1 // f) + ctx)
        # a stand-in super-resolution engine: nearest upsampling of source coordinates
        ys = np.arange(b.read_start[1], b.read_stop[1])
        xs = np.arange(b.read_start[2], b.read_stop[2])
        read = (ys[:, None] * 1000 + xs[None, :])[None].repeat(b.read_shape[0], 0)
        restored = read.repeat(f, axis=1).repeat(f, axis=2)
        got = crop_to_write_box(restored, b, (f, f, 1))
        assert got.shape == b.write_shape
        wy = np.arange(y0, y1) // f
        wx = np.arange(x0, x1) // f
        np.testing.assert_array_equal(got[0], wy[:, None] * 1000 + wx[None, :])
    assert np.all(count == 1)


def test_blocks_are_chunk_aligned_and_clipped():
    src = source_info(z=5, y=40, x=48)
    out = output_info(src, (1, 1, 3), (16, 16, 6), factors=((2, 2, 1),))
    plan = plan_blocks(src, out, (1, 1, 3), (32, 32, 12), 4)
    assert len(plan) == 2 * 2 * 2
    assert [b.index for b in plan] == list(range(8))
    for b in plan:  # the chunk grid starts at the layer's offset (z 1: the first section's centre)
        for a, c, lo in zip(b.write_start, (6, 32, 32), out.start_zyx):
            assert (a - lo) % c == 0
        for a, b_, c, lo, hi in zip(b.write_start, b.write_stop, (6, 32, 32), out.start_zyx, out.stop_zyx):
            assert (b_ - lo) % c == 0 or b_ == hi
    last = plan.blocks[-1]
    assert last.write_start == (13, 32, 32) and last.write_stop == (14, 40, 48)
    assert last.read_start == (4, 28, 28) and last.read_stop == (5, 40, 48) and last.sections == (4, 4)
    first = plan.blocks[0]  # whole gaps: output z 1:13 needs sections 0 … 4, no gap shared with another block
    assert first.write_start[0] == 1 and first.write_stop[0] == 13 and first.sections == (0, 4)


# ---------------------------------------------------------------- regions


def test_region_snapped_outward_with_message():
    src = source_info(z=10, y=100, x=120)
    out = output_info(src, (1, 1, 3), (16, 16, 6))
    plan = plan_blocks(src, out, (1, 1, 3), (32, 32, 12), 2, region=((3, 10, 20), (5, 50, 70)))
    assert plan.region == Box((3, 10, 20), (5, 50, 70))
    # output z 9:15 -> 7:19 (chunk 6 from the offset 1); y 10:50 -> 0:64; x 20:70 -> 16:80 (chunk 16)
    assert plan.snapped_region == ((7, 0, 16), (19, 64, 80))
    assert (plan.write_start, plan.write_stop) == plan.snapped_region
    assert "snapped outward" in plan.message
    assert "z 3:5, y 10:50, x 20:70" in plan.message and "z 7:19, y 0:64, x 16:80" in plan.message
    covered = set()
    for b in plan.blocks:
        for z, y, x in itertools.product(*(range(a, c) for a, c in zip(b.write_start, b.write_stop))):
            assert (z, y, x) not in covered
            covered.add((z, y, x))
    assert len(covered) == 12 * 64 * 64


def test_region_snapping_clipped_at_upper_bound_and_aligned_message():
    src = source_info(z=5, y=40, x=48)
    out = output_info(src, (1, 1, 3), (16, 16, 6))
    plan = plan_blocks(src, out, (1, 1, 3), (16, 16, 6), 0, region=((4, 33, 40), (5, 40, 48)))
    assert plan.snapped_region == ((7, 32, 32), (14, 40, 48))
    aligned = plan_blocks(src, out, (1, 1, 3), (16, 16, 6), 0, region=((0, 0, 0), (5, 16, 16)))
    assert aligned.snapped_region == ((1, 0, 0), (14, 16, 16)) and "already lies on" in aligned.message


@pytest.mark.parametrize(
    "region, word",
    [
        (((0, 0, 0), (6, 40, 48)), "outside"),
        (((-1, 0, 0), (2, 40, 48)), "outside"),
        (((0, 0, 0), (2, 41, 48)), "outside"),
        (((2, 0, 0), (2, 40, 48)), "empty"),
        (((0, 10, 0), (5, 9, 48)), "empty"),
    ],
)
def test_region_errors(region, word):
    src = source_info(z=5, y=40, x=48)
    out = output_info(src, (1, 1, 3), (16, 16, 6))
    with pytest.raises(VolumeError) as e:
        plan_blocks(src, out, (1, 1, 3), (16, 16, 6), 0, region=region)
    assert e.value.field == "region"
    assert word in str(e.value) and "z 0:5, y 0:40, x 0:48" in str(e.value)


def test_plan_input_errors():
    src = source_info()
    out = output_info(src, (1, 1, 3), (16, 16, 6), factors=((2, 2, 1),))
    with pytest.raises(VolumeError) as e:
        plan_blocks(src, out, (1, 1, 3), (16, 16, 6), 0)  # needs 2·chunk laterally for mip 1
    assert e.value.field == "block_size"
    with pytest.raises(VolumeError) as e:
        plan_blocks(src, out, (1, 1, 3), (32, 32, 9), 0)
    assert e.value.field == "block_size"
    with pytest.raises(VolumeError) as e:
        plan_blocks(src, out, (1, 1, 3), (32, 32, 6), -1)
    assert e.value.field == "lateral_context"
    with pytest.raises(VolumeError) as e:
        plan_blocks(src, out, (1, 1, 5), (32, 32, 6), 0)
    assert e.value.field == "output"
    with pytest.raises(VolumeError) as e:
        plan_blocks(src, out, (1, 1, 2), (32, 32, 6), 0)
    assert e.value.field == "scale"


def test_plan_serialises():
    src = source_info()
    out = output_info(src, (1, 1, 3), (16, 16, 6))
    plan = plan_blocks(src, out, (1, 1, 3), (16, 16, 6), 3, region=((1, 1, 1), (3, 20, 20)))
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert Block.from_dict(plan.blocks[0].to_dict()) == plan.blocks[0]


def test_assemble_checks_shapes():
    src = source_info()
    out = output_info(src, (1, 1, 3), (16, 16, 6))
    b = plan_blocks(src, out, (1, 1, 3), (16, 16, 6), 2).blocks[0]
    i0, i1 = b.sections
    good = np.zeros(((i1 - i0) * 3 + 1,) + b.read_shape[1:], np.float32)
    assert assemble_isotropic(good, i0, b, 3).shape == b.write_shape
    with pytest.raises(VolumeError):
        assemble_isotropic(good[:, 1:], i0, b, 3)
    with pytest.raises(VolumeError):
        assemble_isotropic(good[:-3], i0, b, 3)


# ---------------------------------------------------------------- the full round trip


@pytest.mark.parametrize("k", [3, 5])
def test_round_trip(store_root, ramp_volume, k):
    """Create a source, plan, read, restore (interpolation), assemble, write, downsample, read back."""
    vol = ramp_volume(5, 40, 48)
    P.create_source_layer(f"{store_root}/src", vol, (4, 4, 40), (0, 0, 2), (16, 16, 2))
    src = P.open_source(f"{store_root}/src")
    geo = P.output_geometry(src, (1, 1, k))
    out = P.create_output_layer(f"{store_root}/out", geo, (16, 16, 2 * k), "uint8", {"task": "isotropic", "k": k},
                                num_downsample_scales=1, overwrite_check_source_url=src.url)
    h = (k - 1) // 2
    assert out.voxel_offset_xyz == (0, 0, 2 * k + h) and out.size_xyz == (48, 40, 4 * k + 1)
    plan = plan_blocks(src, out, (1, 1, k), (32, 32, 4 * k), 4)
    for b in plan.blocks:
        i0, i1 = b.sections
        sections = P.read_zyx(src.url, b.read_start, b.read_stop)
        restored = np.rint(interpolate(sections, k)).astype(np.uint8)
        block = assemble_isotropic(restored, i0, b, k, out.size_xyz[2])
        P.write_zyx(out.url, b.write_start, block)
        assert P.write_downsampled(out.url, b.write_start, block) == [1]

    got = P.read_zyx(out.url, out.start_zyx, out.stop_zyx)
    for i in range(5):  # source section i (absolute 2 + i) lands at output z k·(2+i) + h
        j = k * (2 + i) + h
        np.testing.assert_array_equal(got[j - out.start_zyx[0]], vol[i])
    full = np.rint(interpolate(vol, k)).astype(np.uint8)
    np.testing.assert_array_equal(got, full)
    mip1 = P.read_zyx(out.url, out.start_zyx, (out.stop_zyx[0], 20, 24), mip=1)
    expected = np.rint(full.astype(float).reshape(4 * k + 1, 20, 2, 24, 2).mean(axis=(2, 4))).astype(np.uint8)
    np.testing.assert_array_equal(mip1, expected)


# ---------------------------------------------------------------- Box


def test_box_algebra():
    b = Box((0, 10, 20), (5, 50, 70))
    assert b.shape == (5, 40, 50) and b.size == 5 * 40 * 50 and not b.empty
    assert Box.from_xyz((20, 10, 0), (70, 50, 5)) == b and b.start_xyz == (20, 10, 0) and b.stop_xyz == (70, 50, 5)
    assert b.intersect(Box((2, 0, 0), (10, 30, 30))) == Box((2, 10, 20), (5, 30, 30))
    assert Box((0, 0, 0), (1, 1, 1)).intersect(Box((2, 2, 2), (3, 3, 3))).empty
    assert b.grow((0, 2, 2)) == Box((0, 8, 18), (5, 52, 72))
    assert b.scale((3, 1, 1)) == Box((0, 10, 20), (15, 50, 70))
    assert Box((1, 1, 1), (5, 5, 5)).shrink_by((2, 2, 2)) == Box((0, 0, 0), (3, 3, 3))
    assert b.snap((6, 16, 16)) == Box((0, 0, 16), (6, 64, 80))
    assert Box((3, 10, 20), (5, 50, 70)).snap((6, 16, 16), (1, 0, 0)) == Box((1, 0, 16), (7, 64, 80))
    assert b.contains(Box((1, 10, 20), (2, 11, 21))) and not b.contains(Box((0, 0, 0), (1, 1, 1)))
    arr = np.arange(1000).reshape(10, 10, 10)
    np.testing.assert_array_equal(arr[Box((1, 2, 3), (2, 4, 6)).slices()], arr[1:2, 2:4, 3:6])
    np.testing.assert_array_equal(arr[Box((1, 2, 3), (2, 4, 6)).slices((1, 1, 1))], arr[0:1, 1:3, 2:5])
    tiles = list(Box((0, 0, 0), (1, 3, 5)).tiles((1, 2, 2)))
    assert len(tiles) == 6 and sum(t.size for t in tiles) == 15 and tiles[-1] == Box((0, 2, 4), (1, 3, 5))
    names = Box((0, 0, 0), (2, 64, 64)).chunk_names((2, 32, 32), Box((0, 0, 0), (2, 40, 64)))
    assert names == ["0-32_0-32_0-2", "32-64_0-32_0-2", "0-32_32-40_0-2", "32-64_32-40_0-2"]
    assert Box.from_list(json.loads(json.dumps(b.to_list()))) == b
    with pytest.raises(ValueError):
        Box((0, 0), (1, 1, 1))
