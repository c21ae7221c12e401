"""Outputs as labs store them, end to end: a jpeg, sharded source restored through the real gRPC
server and local worker processes into jpeg, sharded outputs (file:// and moto S3), read back with
cloud-volume, with a full, consistent pyramid; a worker killed in the middle of a shard; dry runs
that write nothing; refused formats naming their field; a 1 mm³ dataset planned as grids."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
import tracemalloc

import numpy as np
import pytest

from service.errors import EmrestoreError, status_of
from service.jobs.executors import InProcessExecutor
from service.jobs.manager import JobManager
from service.jobs.spec import RestoreSpec
from service.volume import precomputed as pc
from service.volume.pyramid import LayerFormat

JPEG_SHARDED = LayerFormat("jpeg", 95, sharded=True, shard_bytes=2 ** 16)


def jpeg_sharded_source(url, seed=5, z=7, y=64, x=96):
    """A jpeg, sharded phantom layer of (z + 2)/3 sections with offsets; returns what it holds."""
    from service.engine import phantom
    iso = phantom.make_phantom((z, y, x), seed=seed)
    stack = phantom.to_uint8(phantom.thick_sections(iso, 3, mode="sample"))
    pc.create_source_layer(url, stack, (8, 8, 24), (16, 0, 3), (32, 32, 3), fmt=JPEG_SHARDED)
    return pc.read_zyx(url, (3, 0, 16), (3 + stack.shape[0], y, x + 16))


def read_cv(url, mip=0):
    """The whole scale, read by cloud-volume itself (zyx)."""
    from cloudvolume import CloudVolume
    cv = CloudVolume(url, mip=mip, fill_missing=True, progress=False)
    return np.asarray(cv[cv.bounds])[..., 0].transpose(2, 1, 0)


def check_pyramid(url, tol):
    """Every lower scale is the average of the one below it (absolute windows)."""
    from service.volume.pyramid import scales_from_info
    from service.volume.writing import pool_mean
    info = json.loads(open(url[len("file://"):] + "/info").read()) if url.startswith("file://") else None
    scales = scales_from_info(info) if info else None
    if scales is None:
        from cloudvolume import CloudVolume
        scales = scales_from_info(CloudVolume(url).info)
    assert max(scales[-1].size_xyz[:2]) <= 32 < max(scales[-2].size_xyz[:2])  # down to a chunk-sized top
    for m in range(1, len(scales)):
        below, here = read_cv(url, m - 1).astype(float), read_cv(url, m).astype(float)
        f = tuple(a // b for a, b in zip(scales[m].factor_zyx, scales[m - 1].factor_zyx))
        pooled, at = pool_mean(below, scales[m - 1].bounds.start, f)
        assert tuple(at) == scales[m].bounds.start and pooled.shape == here.shape
        assert np.abs(pooled - here).mean() < tol, (m, np.abs(pooled - here).mean())
    return scales


@pytest.mark.parametrize("where", ["file", "s3"])
def test_jpeg_sharded_source_restored_into_jpeg_sharded_outputs(where, tiny_iso_model, tmp_path, monkeypatch, request):
    """The default output follows the source: jpeg, sharded, with a full pyramid; the uncertainty
    layer is uint8 (png, sharded like the output) with its full scale in its info."""
    from service.api.client import EmrestoreClient
    from service.api.server import build_server
    from service.jobs.executors import LocalExecutor

    monkeypatch.setenv("EMRESTORE_LEASE_TTL", "10")
    model_url, _ = tiny_iso_model
    if where == "file":
        root = f"file://{tmp_path}"
    else:
        root = request.getfixturevalue("s3_endpoint").url(f"outputs-{os.getpid()}-{time.time_ns()}")
    src = f"{root}/em"
    stack = jpeg_sharded_source(src)
    ledger = f"file://{tmp_path}/ledger"
    mgr = JobManager(ledger, LocalExecutor(ledger, log_dir=str(tmp_path / "logs"), env={"OMP_NUM_THREADS": "1"}),
                     poll_interval_s=0.3, block_size_xyz=(32, 32, 0), shard_bytes=2 ** 16)
    server, port = build_server(mgr, "127.0.0.1", 0)
    server.start()
    mgr.start()
    try:
        with EmrestoreClient(f"127.0.0.1:{port}") as c:  # the uncertainty on file:// (the slower path) only
            unc_kw = dict(uncertainty=f"{root}/unc", samples=2, steps=1) if where == "file" else {}
            job = c.restore_dataset(src, model_url, f"{root}/iso", **unc_kw)
            final = c.wait(job.job_id, timeout=240)
            assert final.state == "SUCCEEDED", final.message
        from cloudvolume import CloudVolume
        out = CloudVolume(f"{root}/iso", progress=False)
        s0 = out.info["scales"][0]
        assert s0["encoding"] == "jpeg" and s0["jpeg_quality"] == 95 and s0["sharding"]["hash"] == "identity"
        assert all(s.get("sharding") for s in out.info["scales"]) and len(out.info["scales"]) == 3
        got = read_cv(f"{root}/iso")
        h = 1  # k = 3: source section i (absolute 3 + i) sits at output z 3·(3 + i) + 1
        assert out.info["scales"][0]["voxel_offset"] == [16, 0, 3 * 3 + h]
        passed = got[::3].astype(float)
        psnr = 10 * np.log10(255 ** 2 / np.mean((passed - stack) ** 2))
        assert psnr > 35, psnr  # pass-through of jpeg sections: re-encoded at quality 95
        assert got[1::3].std() > 5
        check_pyramid(f"{root}/iso", tol=2.0)
        if where != "file":
            return
        unc = CloudVolume(f"{root}/unc", progress=False)
        assert unc.info["data_type"] == "uint8" and unc.info["scales"][0]["encoding"] == "png"
        assert unc.info["emrestore_uncertainty"]["uint8_full_scale"] == 63.75
        assert all(a.get("sharding") == b.get("sharding") or (a["sharding"]["shard_bits"], a["sharding"]["preshift_bits"])
                   == (b["sharding"]["shard_bits"], b["sharding"]["preshift_bits"])
                   for a, b in zip(unc.info["scales"], out.info["scales"]))
        u = read_cv(f"{root}/unc")
        assert u[::3].max() == 0 and u[1::3].mean() > 0
        names = os.listdir(tmp_path / "iso" / s0["key"])  # one object per shard: no chunk files
        assert names and all(n.endswith(".shard") for n in names)
    finally:
        server.stop(1).wait()
        mgr.close()


def _run_worker(ledger, job_id):
    from service.jobs.worker import run_task
    run_task(ledger, job_id, 0, 1, lease_ttl_s=2, log=lambda m: None)


def test_worker_killed_in_the_middle_of_a_shard_resumes_without_corrupting_it(tiny_iso_model, tmp_path, monkeypatch):
    """A shard task restores several blocks before it writes its shard in one object: a worker
    killed meanwhile leaves no marker and no half shard; the next worker (after the lease expires)
    redoes the task and the layer is byte for byte the one an uninterrupted run writes."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    model_url, _ = tiny_iso_model
    src = f"file://{tmp_path}/em"
    jpeg_sharded_source(src, z=13, x=64)
    ledger = f"file://{tmp_path}/ledger"
    mgr = JobManager(ledger, InProcessExecutor(), block_size_xyz=(32, 32, 0), shard_bytes=2 ** 16)
    spec = dict(source=src, model=model_url, samples=2, steps=1)
    killed = mgr.submit(RestoreSpec(output=f"file://{tmp_path}/a", **spec))
    plan = mgr.plan_of(killed.job_id)
    assert len(plan.blocks.blocks_in(0)) >= 3  # the first shard takes several blocks
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_run_worker, args=(ledger, killed.job_id))
    p.start()
    lease = tmp_path / "ledger" / "jobs" / killed.job_id / "leases" / "00000000.json"
    t0 = time.time()
    while not lease.exists() and time.time() - t0 < 60:
        time.sleep(0.02)
    time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    assert mgr.ledger.block_info(killed.job_id, 0) is None  # killed before the shard was done
    time.sleep(2.2)  # the dead worker's lease expires
    _run_worker(ledger, killed.job_id)
    assert mgr.ledger.done_count(killed.job_id) == killed.blocks_total
    whole = mgr.submit(RestoreSpec(output=f"file://{tmp_path}/b", **spec))
    _run_worker(ledger, whole.job_id)
    for m in range(len(plan.blocks.stages)):
        np.testing.assert_array_equal(read_cv(f"file://{tmp_path}/a", m), read_cv(f"file://{tmp_path}/b", m))


def test_dry_run_writes_nothing_and_bad_formats_name_their_field(tiny_iso_model, tmp_path, s3_endpoint):
    model_url, _ = tiny_iso_model
    root = s3_endpoint.url(f"dry-{os.getpid()}-{time.time_ns()}")
    src = f"{root}/em"
    jpeg_sharded_source(src, z=7, x=64)
    ledger = f"file://{tmp_path}/ledger"
    mgr = JobManager(ledger, InProcessExecutor(), block_size_xyz=(32, 32, 0), shard_bytes=2 ** 16)
    client = s3_endpoint.client()
    prefix = root.split("/", 3)[3]

    def objects():
        got = client.list_objects_v2(Bucket=s3_endpoint.bucket, Prefix=prefix).get("Contents", [])
        return sorted(o["Key"] for o in got)

    before = objects()
    est = mgr.submit(RestoreSpec(source=src, model=model_url, output=f"{root}/iso", uncertainty_output=f"{root}/unc",
                                 samples=2, steps=2), dry_run=True)
    assert objects() == before and mgr.ledger.list_jobs()[0] == []
    assert est["output_format"] == "jpeg (quality 95), sharded" and est["tasks"] >= 1
    layers = {r["layer"] for r in est["layers"]}
    assert layers == {"output", "uncertainty"} and all(r["objects"] >= 1 for r in est["layers"])
    assert est["evaluations_per_output_voxel"] == 2 * (1 + 2 * 2)
    assert est["gpu"]["gpu_hours"] > 0 and "H100" in est["gpu"]["basis"]
    from service.jobs.estimate import format_estimate
    text = format_estimate(est)
    assert "nothing written" in text and "GPU-hours" in text and "shards" in text
    # a region job's new layer: jpeg as the source but unsharded (a sharded write would restore the
    # whole shard around the region), unless sharding is asked for
    region = dict(region_start_xyz=(16, 0, 3), region_stop_xyz=(48, 32, 6))
    est = mgr.submit(RestoreSpec(source=src, model=model_url, output=f"{root}/r", **region), dry_run=True)
    assert est["output_format"] == "jpeg (quality 95), unsharded"
    est = mgr.submit(RestoreSpec(source=src, model=model_url, output=f"{root}/r", **region), dry_run=True,
                     output_sharding="sharded")
    assert est["output_format"] == "jpeg (quality 95), sharded"
    assert objects() == before and mgr.ledger.list_jobs()[0] == []
    # refusals: each names its field, and nothing is written
    u16 = f"{root}/em16"
    pc.create_source_layer(u16, np.zeros((5, 32, 32), np.uint16) + 7, (8, 8, 24), chunk_size_xyz=(32, 32, 3))
    before = objects()
    cases = [(dict(source=u16), dict(output_encoding="jpeg"), "output_encoding"),
             ({}, dict(output_encoding="webp"), "output_encoding"),
             ({}, dict(output_encoding="jpeg", jpeg_quality=101), "jpeg_quality"),
             ({}, dict(output_sharding="sometimes"), "output_sharding")]
    for spec_kw, kw, field in cases:
        spec = RestoreSpec(**{**dict(source=src, model=model_url, output=f"{root}/bad"), **spec_kw})
        with pytest.raises(EmrestoreError) as e:
            mgr.submit(spec, **kw)
        assert e.value.field == field, (kw, e.value)
        assert status_of(e.value)[0] == "INVALID_ARGUMENT"
    assert objects() == before and mgr.ledger.list_jobs()[0] == []
    # an existing output stored otherwise: asking for another encoding or sharding is refused
    mgr.submit(RestoreSpec(source=src, model=model_url, output=f"{root}/iso"))
    for kw, field in ((dict(output_encoding="raw"), "output_encoding"), (dict(output_sharding="unsharded"), "output_sharding")):
        with pytest.raises(EmrestoreError) as e:
            mgr.submit(RestoreSpec(source=src, model=model_url, output=f"{root}/iso"), **kw)
        assert e.value.field == field and "stored as jpeg (quality 95), sharded" in str(e.value)
        assert status_of(e.value)[0] == "FAILED_PRECONDITION"


def test_a_1mm3_dataset_plans_as_grids(tiny_iso_model, tmp_path):
    """1 mm³ at 8 × 8 × 24 nm (125 000² × 41 667 voxels, jpeg, sharded, 7 scales, no chunk
    written, only the info): the plan is a few stages of grids — a few kB in the ledger and a few
    MB of memory while planning — and nothing lists its ~10⁷ tasks."""
    from service.engine.normalize import IntensityNorm
    model_url, _ = tiny_iso_model
    src = tmp_path / "mm3"
    src.mkdir()
    scales = []
    for m in range(7):
        f = 2 ** m
        scales.append({"key": f"{8 * f}_{8 * f}_24", "size": [-(-125_000 // f), -(-125_000 // f), 41_667],
                       "voxel_offset": [0, 0, 0], "resolution": [8 * f, 8 * f, 24], "chunk_sizes": [[64, 64, 64]],
                       "encoding": "jpeg", "sharding": {"@type": "neuroglancer_uint64_sharded_v1", "hash": "identity",
                                                         "preshift_bits": 9, "minishard_bits": 6, "shard_bits": 15,
                                                         "minishard_index_encoding": "gzip", "data_encoding": "raw"}})
    (src / "info").write_text(json.dumps({"type": "image", "data_type": "uint8", "num_channels": 1, "scales": scales}))
    url = f"file://{src}"
    mgr = JobManager(f"file://{tmp_path}/ledger", InProcessExecutor(), block_size_xyz=(256, 256, 0))
    mgr.limits = type(mgr.limits)(**{**mgr.limits.__dict__, "max_job_voxels": 10 ** 17})
    mgr.planner._norms[(url, 0)] = IntensityNorm(20.0, 230.0)  # the normalisation read is tested with sources
    tracemalloc.start()
    est = mgr.submit(RestoreSpec(source=url, model=model_url, output=f"file://{tmp_path}/out"), dry_run=True)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 20e6, peak
    assert est["output_voxels"] > 1.9e15 and est["output_format"].startswith("jpeg") and "sharded" in est["output_format"]
    assert 1e6 < est["tasks"] < 1e8 and est["objects_total"] < 1e8
    assert not (tmp_path / "out").exists()
    st = mgr.submit(RestoreSpec(source=url, model=model_url, output=f"file://{tmp_path}/out"))
    job_dir = tmp_path / "ledger" / "jobs" / st.job_id
    ledger_bytes = sum(f.stat().st_size for f in job_dir.rglob("*") if f.is_file())
    assert ledger_bytes < 30_000, ledger_bytes
    assert st.blocks_total == est["tasks"] and st.blocks_done == 0
    assert mgr.get(st.job_id).spec["plan"]["num_tasks"] >= 1


def test_request_fields_through_grpc_cli_and_bridge(tiny_iso_model, tmp_path, capsys):
    """output_encoding, jpeg_quality, output_sharding and dry_run on the gRPC request, the CLI
    (--output-encoding, --jpeg-quality, --output-sharding, --dry-run) and the HTTP bridge: a dry
    run prints the price and writes nothing; a bad value is refused naming the field (or option)."""
    import grpc

    from service.api.client import EmrestoreClient
    from service.api.server import build_server
    from service.cli import main
    model_url, _ = tiny_iso_model
    src = f"file://{tmp_path}/em"
    jpeg_sharded_source(src)
    ledger = f"file://{tmp_path}/ledger"
    mgr = JobManager(ledger, InProcessExecutor(), block_size_xyz=(32, 32, 0), shard_bytes=2 ** 16)
    server, port = build_server(mgr, "127.0.0.1", 0)
    server.start()
    try:
        with EmrestoreClient(f"127.0.0.1:{port}") as c:
            dry = c.restore_dataset(src, model_url, f"file://{tmp_path}/out", output_encoding="raw",
                                    output_sharding="unsharded", dry_run=True)
            assert dry.job_id == "" and dry.dry_run["output_format"] == "raw, unsharded"
            assert dry.dry_run["tasks"] >= 1 and dry.dry_run["gpu"]["gpu_hours"] > 0
            for kw, field in ((dict(jpeg_quality=101), "jpeg_quality"), (dict(output_encoding="webp"), "output_encoding"),
                              (dict(output_sharding="maybe"), "output_sharding")):
                with pytest.raises(EmrestoreError) as e:
                    c.restore_dataset(src, model_url, f"file://{tmp_path}/out", **kw)
                assert e.value.field == field and e.value.code == grpc.StatusCode.INVALID_ARGUMENT.name, e.value
        assert not (tmp_path / "out").exists() and mgr.ledger.list_jobs()[0] == []
        rc = main(["submit", src, "--whole", "--model", model_url, "--output", f"file://{tmp_path}/out",
                   "--output-encoding", "jpeg", "--jpeg-quality", "80", "--dry-run", "--server", f"127.0.0.1:{port}"])
        out = capsys.readouterr().out
        assert rc == 0 and "dry run: nothing written" in out and "jpeg (quality 80), sharded" in out, out
        assert not (tmp_path / "out").exists() and mgr.ledger.list_jobs()[0] == []
        rc = main(["submit", src, "--whole", "--model", model_url, "--output", f"file://{tmp_path}/out",
                   "--jpeg-quality", "0", "--output-sharding", "sometimes", "--server", f"127.0.0.1:{port}"])
        err = capsys.readouterr().err
        assert rc == 2 and "--output-sharding" in err, err
    finally:
        server.stop(0).wait()
        mgr.close()
    from connector.bridge_protocol import parse_restore_request
    body = {"source": src, "model": "m", "region": {"start": [16, 0, 3], "stop": [48, 32, 5]}, "dry_run": True,
            "output_encoding": "jpeg", "jpeg_quality": 95, "output_sharding": "sharded"}
    kw = parse_restore_request(body)
    assert kw["dry_run"] is True and kw["output_encoding"] == "jpeg" and kw["jpeg_quality"] == 95
    with pytest.raises(EmrestoreError) as e:
        parse_restore_request({**body, "jpeg_quality": 0.5})
    assert e.value.field == "jpeg_quality"
    with pytest.raises(EmrestoreError) as e:
        parse_restore_request({**body, "output_encoding": "raw", "jpeg_quality": 95})
    assert e.value.field == "jpeg_quality"
