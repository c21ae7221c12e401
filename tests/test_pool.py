"""The warm worker pool (issue 11 items 1-2): ``emrestore worker --pool`` leasing blocks of any
job, interactive first, with a model cache; the pool executor and per-job execution; a killed
pool worker's block re-done bit-identically; cutouts run by a pool worker over the real gRPC
server; the queue-depth metric; the worker's device check."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from service.errors import FailedPrecondition
from service.jobs.executors import InProcessExecutor
from service.jobs.manager import JobManager
from service.jobs.pool import ModelCache, PoolWorker
from service.jobs.pool_executor import ExecutionRouter, LocalPool, PoolExecutor, queue_depth, serve_metrics
from service.jobs.spec import CutoutSpec, RestoreSpec
from service.jobs.worker import run_task
from service.volume import precomputed as pc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pooled_manager(ledger: str, block=(48, 48, 0), **kw) -> JobManager:
    router = ExecutionRouter(ledger, PoolExecutor(ledger, size=1), InProcessExecutor())
    return JobManager(ledger, router, models_dir=None, poll_interval_s=0.1, block_size_xyz=block, **kw)


def read_all(url):
    info = pc.open_layer(url)
    return pc.read_zyx(url, info.start_zyx, info.stop_zyx)


def reference(ledger: str, src: str, model_url: str, out: str, block=(48, 48, 0), **spec) -> np.ndarray:
    """The same job restored by the Indexed-Job worker code path (one task, in-process)."""
    m = pooled_manager(ledger, block=block)
    job = m.submit(RestoreSpec(source=src, model=model_url, output=out, execution="batch", **spec))
    assert job.state == "RUNNING" and m.executor.batch.launched == [job.job_id]
    assert run_task(ledger, job.job_id, 0, 1, log=lambda *_: None) == job.blocks_total
    return read_all(out)


def test_model_cache_is_an_lru_keyed_by_url_and_version():
    loads, versions = [], {"a": "1", "b": "1", "c": "1"}
    cache = ModelCache(2, loader=lambda u: loads.append(u) or f"model {u}@{versions[u]}",
                       version=lambda u: versions[u])
    assert cache.get("a") == "model a@1" and cache.get("a") == "model a@1"
    assert (cache.hits, cache.misses, loads) == (1, 1, ["a"])
    cache.get("b"), cache.get("a"), cache.get("c")      # c evicts b, the least recently used
    assert loads == ["a", "b", "c"] and len(cache) == 2
    cache.get("a")
    assert loads == ["a", "b", "c"]                      # still cached
    cache.get("b")
    assert loads[-1] == "b"                              # was evicted: loaded again
    versions["b"] = "2"                                  # the model at the URL was saved again
    assert cache.get("b") == "model b@2" and loads[-1] == "b" and len(cache) == 2
    with pytest.raises(ValueError, match="--max-models"):
        ModelCache(0)


def test_pool_leases_interactive_first_caches_the_model_and_matches_indexed_jobs(
        phantom_layer, tiny_iso_model, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    src, _ = phantom_layer
    model_url, _ = tiny_iso_model
    ledger = f"file://{tmp_path}/ledger"
    m = pooled_manager(ledger, block=(48, 96, 0))
    # a whole-dataset job first (batch priority, sent to the pool on purpose), then a region (interactive)
    whole = m.submit(RestoreSpec(source=src, model=model_url, output=f"file://{tmp_path}/whole", steps=2,
                                 execution="pool"))
    region = m.submit(RestoreSpec(source=src, model=model_url, output=f"file://{tmp_path}/region", steps=2,
                                  region_start_xyz=(0, 0, 2), region_stop_xyz=(96, 80, 6)))
    plan_w, plan_r = m.plan_of(whole.job_id), m.plan_of(region.job_id)
    assert (plan_w.priority, plan_w.execution) == ("batch", "pool")
    assert (plan_r.priority, plan_r.execution) == ("interactive", "pool")
    assert whole.blocks_total >= 2 and region.blocks_total >= 2
    assert m.executor.batch.launched == []  # nothing started: the blocks wait in the ledger
    assert "worker pool" in m.get(region.job_id).message
    # auto without a pool-sized region goes to the batch executor
    big = m.submit(RestoreSpec(source=src, model=model_url, output=f"file://{tmp_path}/big", steps=2))
    assert m.plan_of(big.job_id).execution == "batch" and m.executor.batch.launched == [big.job_id]
    m.cancel(big.job_id)

    # the queue depth, as the metric endpoint serves it
    q = queue_depth(m.ledger)
    assert q["interactive"] == {"waiting": region.blocks_total, "leased": 0}
    assert q["batch"] == {"waiting": whole.blocks_total, "leased": 0}
    httpd = serve_metrics(ledger, "127.0.0.1", 0, pool_size=1, max_batch_gpus=8)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{httpd.server_address[1]}/metrics", timeout=10).read().decode()
    finally:
        httpd.shutdown()
    assert f'emrestore_queue_blocks{{class="interactive"}} {region.blocks_total}' in body
    assert f'emrestore_queue_blocks{{class="batch"}} {whole.blocks_total}' in body
    assert "emrestore_pool_workers 1" in body and "emrestore_batch_gpus_max 8" in body

    worker = PoolWorker(ledger, owner="test:1:pool", log=lambda *_: None, poll_s=0.05)
    assert worker.run(idle_exit_s=0.2) == whole.blocks_total + region.blocks_total
    order = [job for job, _ in worker.stats.order]
    assert order == [region.job_id] * region.blocks_total + [whole.job_id] * whole.blocks_total
    assert (worker.cache.misses, worker.cache.hits) == (1, len(order) - 1)  # one load, then warm
    assert queue_depth(m.ledger)["interactive"]["waiting"] == 0
    m.tick()  # the supervisor finishes pool jobs from the ledger
    assert m.get(whole.job_id).state == m.get(region.job_id).state == "SUCCEEDED"

    # bit-identical to the Indexed-Job worker's output
    ref = reference(f"file://{tmp_path}/ledger2", src, model_url, f"file://{tmp_path}/ref", block=(48, 96, 0),
                    steps=2)
    np.testing.assert_array_equal(read_all(f"file://{tmp_path}/whole"), ref)


def test_execution_is_checked(phantom_layer, tiny_iso_model, tmp_path):
    src, _ = phantom_layer
    model_url, _ = tiny_iso_model
    ledger = f"file://{tmp_path}/ledger"
    spec = RestoreSpec(source=src, model=model_url, output=f"file://{tmp_path}/o", execution="gpu")
    with pytest.raises(ValueError, match="execution.*auto, pool, batch"):
        spec.validate()
    plain = JobManager(ledger, InProcessExecutor(), models_dir=None)
    with pytest.raises(FailedPrecondition, match="execution.*no worker pool"):
        plain.submit(RestoreSpec(source=src, model=model_url, output=f"file://{tmp_path}/o", execution="pool"))
    assert not os.path.exists(f"{tmp_path}/o")  # nothing written


def test_execution_is_a_request_field_over_grpc_and_on_the_cli(phantom_layer, tiny_iso_model, tmp_path, capsys):
    """``execution`` travels from the client (and ``emrestore submit --execution``) through the
    gRPC server into the persisted plan; a bad value or ``pool`` without a pool is refused with
    the field named, before anything is written."""
    from service.api.client import EmrestoreClient, EmrestoreError
    from service.cli import main as cli_main
    from service.api.server import build_server
    src, _ = phantom_layer
    model_url, _ = tiny_iso_model
    servers = []
    try:
        for name, manager in (("pooled", pooled_manager(f"file://{tmp_path}/l1")),
                              ("plain", JobManager(f"file://{tmp_path}/l2", InProcessExecutor(), models_dir=None))):
            server, port = build_server(manager, "127.0.0.1", 0)
            server.start()
            servers.append((name, manager, server, port))
        (_, pooled, _, pport), (_, plain, _, qport) = servers
        c = EmrestoreClient(f"127.0.0.1:{pport}")
        region = ((8, 8, 0), (56, 56, 8))
        auto = c.restore_region(src, model_url, f"file://{tmp_path}/a", *region)
        batch = c.restore_region(src, model_url, f"file://{tmp_path}/b", *region, execution="batch")
        assert pooled.plan_of(auto.job_id).execution == "pool"    # a small region: the warm pool
        assert pooled.plan_of(batch.job_id).execution == "batch"  # asked for: a batch task
        assert pooled.executor.batch.launched == [batch.job_id]
        with pytest.raises(EmrestoreError) as e:
            c.restore_region(src, model_url, f"file://{tmp_path}/c", *region, execution="gpu")
        assert e.value.code == "INVALID_ARGUMENT" and "execution" in str(e.value) and "pool, batch" in str(e.value)
        c.close()
        c = EmrestoreClient(f"127.0.0.1:{qport}")
        with pytest.raises(EmrestoreError) as e:
            c.restore_region(src, model_url, f"file://{tmp_path}/d", *region, execution="pool")
        assert e.value.code == "FAILED_PRECONDITION" and "execution" in str(e.value)
        c.close()
        for out in ("c", "d"):
            assert not os.path.exists(f"{tmp_path}/{out}")  # nothing written
        # the CLI flag reaches the same field
        rc = cli_main(["submit", src, "--region", "8,8,0:56,56,8", "--model", model_url,
                       "--output", f"file://{tmp_path}/e", "--execution", "batch", "--quiet",
                       "--server", f"127.0.0.1:{pport}"])
        job_id = capsys.readouterr().out.split()[0]
        assert rc == 0 and pooled.plan_of(job_id).execution == "batch"
        assert pooled.executor.batch.launched == [batch.job_id, job_id]
    finally:
        for _, manager, server, _ in servers:
            server.stop(0)
            manager.close()


def test_killed_pool_worker_block_is_re_leased_and_redone_bit_identically(
        phantom_layer, tiny_iso_model, tmp_path, monkeypatch):
    """A local pool process (``serve --pool-workers 1``) killed mid-block, as a preempted pod: the
    pool starts it again, the new process takes the block over once the lease expires, and the
    job's output is bit-identical to the Indexed-Job code path's."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    src, _ = phantom_layer
    model_url, _ = tiny_iso_model
    ledger = f"file://{tmp_path}/ledger"
    pool = LocalPool(ledger, 1, log_dir=str(tmp_path / "logs"),
                     env={"EMRESTORE_LEASE_TTL": "3", "EMRESTORE_DEVICE": "cpu"})
    router = ExecutionRouter(ledger, PoolExecutor(ledger, size=1), InProcessExecutor(), pool)
    m = JobManager(ledger, router, models_dir=None, poll_interval_s=0.2, block_size_xyz=(96, 96, 0))
    out = f"file://{tmp_path}/out"
    try:
        job = m.submit(RestoreSpec(source=src, model=model_url, output=out, steps=8, execution="pool"))
        pool.start()
        m.start()
        victim = old_pid = None
        t0 = time.time()
        while time.time() - t0 < 180 and victim is None:  # a block leased by the process, not done
            proc = pool.procs[0]
            done = m.ledger.done_blocks(job.job_id)
            for i in sorted(m.ledger.leased_blocks(job.job_id) - done):
                lease = m.ledger.get_lease(job.job_id, i)
                if lease is not None and lease.owner.split(":")[1] == str(proc.pid):
                    os.kill(proc.pid, signal.SIGKILL)  # as a preempted node would
                    victim, old_pid = i, proc.pid
                    break
            time.sleep(0.02)
        assert victim is not None, "the pool process never leased a block"
        assert m.ledger.block_info(job.job_id, victim) is None, "the killed block finished before the kill"
        assert m.ledger.get_lease(job.job_id, victim) is not None  # the dead worker's lease is left behind
        t0 = time.time()
        while time.time() - t0 < 240 and m.get(job.job_id).state not in ("SUCCEEDED", "FAILED", "CANCELLED"):
            time.sleep(0.3)
        st = m.get(job.job_id)
        assert st.state == "SUCCEEDED" and st.blocks_done == st.blocks_total
        new_pid = pool.procs[0].pid
        assert new_pid != old_pid  # the pool started the worker again
        assert m.ledger.block_info(job.job_id, victim)["info"]["worker"].split(":")[1] == str(new_pid)
    finally:
        m.close()  # stops the local pool too
    assert all(p.poll() is not None for p in pool.procs)
    ref = reference(f"file://{tmp_path}/ledger2", src, model_url, f"file://{tmp_path}/ref", block=(96, 96, 0),
                    steps=8)
    np.testing.assert_array_equal(read_all(out), ref)


def test_cutout_runs_on_a_pool_worker_over_grpc(phantom_layer, tiny_iso_model, tmp_path):
    from service.api.client import EmrestoreClient, EmrestoreError
    from service.api.server import build_server
    src, _ = phantom_layer
    model_url, _ = tiny_iso_model
    ledger = f"file://{tmp_path}/ledger"
    m = pooled_manager(ledger, cutout_timeout_s=60)
    m.start()
    server, port = build_server(m, "127.0.0.1", 0)
    server.start()
    worker = PoolWorker(ledger, owner="test:3:pool", log=lambda *_: None, poll_s=0.05)
    t = threading.Thread(target=worker.run, daemon=True)
    t.start()
    try:
        c = EmrestoreClient(f"127.0.0.1:{port}")
        mean, std, meta = c.cutout(src, model_url, (8, 8, 2), (72, 56, 6), steps=1, samples=2, seed=3)
        assert worker.stats.blocks == 1  # restored by the pool worker, not the server
        job_id = worker.stats.order[0][0]
        assert m.ledger.get_job(job_id).spec["kind"] == "cutout"
        # the server took the arrays out of the ledger (a viewer's restores do not pile up there);
        # the job's record and block marker stay
        assert m.ledger.get_result(job_id) is None and m.ledger.take_result(job_id) is None
        assert m.ledger.block_info(job_id, 0) is not None
        # the same bytes as the server's own (no-pool) cutout path
        plain = JobManager(f"file://{tmp_path}/ledger2", InProcessExecutor(), models_dir=None)
        ref = plain.cutout(CutoutSpec(source=src, model=model_url, region_start_xyz=(8, 8, 2),
                                      region_stop_xyz=(72, 56, 6), steps=1, samples=2, seed=3))
        np.testing.assert_array_equal(mean, ref.mean_zyx)
        np.testing.assert_array_equal(std, ref.std_zyx)
        assert meta["output_start_xyz"] == tuple(ref.output_start_xyz)
        # the service's limits still apply before any job is made
        m.max_cutout_voxels = 1000
        with pytest.raises(EmrestoreError) as e:
            c.cutout(src, model_url, (8, 8, 2), (72, 56, 6), steps=2)
        assert e.value.code == "RESOURCE_EXHAUSTED"
        assert worker.stats.blocks == 1
        c.close()
    finally:
        worker.stop()
        t.join(timeout=30)
        server.stop(0)
        m.close()


def test_cutout_without_a_pool_worker_times_out_and_is_cancelled(phantom_layer, tiny_iso_model, tmp_path):
    src, _ = phantom_layer
    model_url, _ = tiny_iso_model
    m = pooled_manager(f"file://{tmp_path}/ledger", cutout_timeout_s=0.5)
    with pytest.raises(Exception) as e:
        m.cutout(CutoutSpec(source=src, model=model_url, region_start_xyz=(8, 8, 2),
                            region_stop_xyz=(40, 24, 5), steps=1))
    assert getattr(e.value, "code", "") == "UNAVAILABLE" and "pool" in str(e.value)
    jobs, _ = m.ledger.list_jobs()
    assert len(jobs) == 1 and jobs[0].cancel_requested


@pytest.mark.parametrize("args", [["--pool"], ["--job", "01ARZ3NDEKTSV4RRFFQ69G5FAV", "--task-index", "0"]])
def test_worker_stops_at_start_when_cuda_is_required_but_unusable(tmp_path, args):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA is usable here")
    r = subprocess.run([sys.executable, "-m", "service.cli", "worker", "--ledger", f"file://{tmp_path}", *args],
                       cwd=ROOT, env=dict(os.environ, EMRESTORE_DEVICE="cuda"), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("emrestore: error: EMRESTORE_DEVICE=cuda: CUDA is required")


def test_pool_worker_arguments_are_checked(tmp_path):
    r = subprocess.run([sys.executable, "-m", "service.cli", "worker", "--pool", "--ledger", f"file://{tmp_path}",
                        "--job", "x"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "emrestore: error: INVALID_ARGUMENT: --pool" in r.stderr
