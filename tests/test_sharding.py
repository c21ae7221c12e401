"""Sharded image scales: our sharding parameters and shard shapes are cloud-volume's (igneous'
rule), a shard really is the box of chunks we write whole, and the pyramid and task grids of an
output layer (scales, write units, stages) cover every scale exactly once."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from service.volume import sharding as S
from service.volume.geometry import Box
from service.volume.grid import plan_stages
from service.volume.pyramid import LayerFormat, layer_scales, pyramid_factors

CASES = [((200_000, 200_000, 179_992), (64, 64, 9)), ((512, 512, 20), (64, 64, 15)), ((100, 90, 7), (16, 16, 3)),
         ((1000, 1000, 64), (64, 64, 64)), ((40_000, 30_000, 500), (128, 128, 16)), ((96, 80, 25), (32, 32, 15))]


@pytest.mark.parametrize("size, chunk", CASES)
@pytest.mark.parametrize("target", [2 ** 16, 2 ** 24, 2 ** 30, int(3.5e9)])
def test_sharding_parameters_are_cloud_volumes(size, chunk, target):
    from cloudvolume.datasource.precomputed import sharding as cvs
    for enc in ("raw", "jpeg"):
        ref = cvs.compute_shard_params_for_image(size, chunk, enc, "uint8", uncompressed_shard_bytesize=target).to_dict()
        ours = S.sharding_spec(size, chunk, 1, enc, target)
        for key in ("preshift_bits", "minishard_bits", "shard_bits", "hash", "data_encoding", "@type"):
            assert ours[key] == ref[key], (key, ours, ref)
        assert S.shard_shape(ours, size, chunk) == tuple(int(v) for v in cvs.image_shard_shape_from_spec(ref, size, chunk))
        assert S.check_spec(ours, size, chunk) is None


def test_a_shard_is_the_box_we_write_whole():
    """Every chunk of a grid, by its compressed Morton code: the chunks of one shard file are
    exactly one aligned box of shard_shape_chunks (so a task covering that box owns the file)."""
    from cloudvolume.datasource.precomputed.common import compressed_morton_code
    from cloudvolume.datasource.precomputed.sharding import ShardingSpecification
    for size, chunk, target in (((100, 90, 7), (16, 16, 3), 2 ** 12), ((300, 200, 40), (32, 32, 4), 2 ** 15),
                                ((64, 64, 64), (8, 8, 8), 2 ** 11)):
        spec = S.sharding_spec(size, chunk, 1, "raw", target)
        grid = S.grid_size(size, chunk)
        shape = S.shard_shape_chunks(spec, size, chunk)
        cvspec = ShardingSpecification.from_dict(spec)
        files: dict[str, set] = {}
        for p in itertools.product(*(range(g) for g in grid)):
            code = S.compressed_morton_code(p, grid)
            assert code == int(compressed_morton_code(p, grid))
            name = S.shard_filename(spec, S.shard_number(spec, code))
            assert name == cvspec.compute_shard_location(code).shard_number + ".shard"
            files.setdefault(name, set()).add(p)
        for name, pts in files.items():
            lo = [min(q[a] for q in pts) for a in range(3)]
            assert all(lo[a] % shape[a] == 0 for a in range(3)), (name, lo, shape)
            box = {q for q in itertools.product(*(range(lo[a], min(lo[a] + shape[a], grid[a])) for a in range(3)))}
            assert pts == box, (name, len(pts), len(box))
    bad = dict(spec, hash="murmurhash3_x86_128")
    assert "identity" in S.check_spec(bad, size, chunk)
    assert "share" in S.check_spec(dict(spec, shard_bits=0), size, chunk)


def test_pyramid_to_a_chunk_sized_top_and_stages_cover_each_scale_once():
    size, off, res, chunk = (200_000, 200_000, 179_992), (3, 5, 4), (5.0, 5.0, 50 / 9), (64, 64, 9)
    f = pyramid_factors(size, off, res, chunk)
    assert f[0] == (2, 2, 1) and f[1] == (4, 4, 2)  # z halves once its resolution is the finer
    top = layer_scales(size, off, res, chunk, 1, LayerFormat(), f)[-1]
    assert max(top.size_xyz[:2]) <= 64 < max(layer_scales(size, off, res, chunk, 1, LayerFormat(), f)[-2].size_xyz[:2])
    for fmt in (LayerFormat("jpeg", sharded=True), LayerFormat("raw")):
        scales = layer_scales(size, off, res, chunk, 1, fmt, f)
        whole = scales[0].bounds
        unit = scales[0].unit_zyx if fmt.sharded else (18, 128, 128)
        stages = plan_stages(scales, whole, unit, 1, 2 ** 30)
        written = [m for st in stages for m in range(st.base_mip, st.top_mip + 1)]
        assert written == list(range(len(scales)))  # every scale once, in order
        for st in stages:  # cells tile the scale: the last task ends at the bounds
            last = st.box(st.num_tasks - 1)
            assert last.stop == scales[st.base_mip].bounds.stop and st.box(0).start == scales[st.base_mip].bounds.start
        assert len(json.dumps([s.to_dict() for s in stages])) < 8000
        assert sum(s.num_tasks for s in stages) < 2e7


def test_stage_cells_are_whole_shards_and_tasks_are_computed_not_listed():
    size, off, res, chunk = (700, 500, 61), (7, 0, 2), (8.0, 8.0, 8.0), (32, 32, 15)
    scales = layer_scales(size, off, res, chunk, 1, LayerFormat("jpeg", sharded=True, shard_bytes=2 ** 16), None)
    s0 = scales[0]
    region = Box((2, 100, 64), (40, 300, 200)).snap(s0.unit_zyx, s0.bounds.start).intersect(s0.bounds)
    stages = plan_stages(scales, region, s0.unit_zyx, 1, 2 ** 30)
    for st in stages:
        sc = scales[st.base_mip]
        seen = set()
        for i in range(st.num_tasks):
            b = st.box(i)
            assert st.local_of(st.coords(i)) == i
            rel = [(a - o) for a, o in zip(b.start, sc.bounds.start)]
            assert all(r % u == 0 for r, u in zip(rel, sc.unit_zyx)), (st.index, b, sc.unit_zyx)
            for t in S.shard_boxes(b, sc.bounds, sc.unit_zyx):
                assert t not in seen
                seen.add(t)
    assert np.prod(stages[0].counts) == stages[0].num_tasks
