"""Jobs end to end: manager + ledger + local worker processes + precomputed layers on file://."""

import os
import signal
import time
from dataclasses import replace

import numpy as np
import pytest

from service.engine.model import RestorationModel
from service.engine.network import UNet
from service.errors import EmrestoreError, FailedPrecondition, ResourceExhausted, status_of
from service.jobs.executors import InProcessExecutor, LocalExecutor
from service.jobs.manager import JobManager
from service.jobs.spec import CutoutSpec, RestoreSpec, TrainSpec
from service.volume import precomputed as pc


def wait_state(mgr, job_id, states=("SUCCEEDED", "FAILED", "CANCELLED"), timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        st = mgr.get(job_id)
        if st.state in states:
            return st
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {mgr.get(job_id).state} after {timeout} s")


@pytest.fixture
def manager(tmp_path, monkeypatch):
    monkeypatch.setenv("EMRESTORE_LEASE_TTL", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    made = []

    def make(block=(64, 64, 0), parallelism=1):
        ledger = f"file://{tmp_path}/ledger"
        m = JobManager(ledger, LocalExecutor(ledger, default_parallelism=parallelism,
                                             log_dir=str(tmp_path / "logs")),
                       models_dir=None, poll_interval_s=0.2, block_size_xyz=block)
        m.start()
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def read_all(url, fill_missing=False):
    info = pc.open_layer(url)
    return pc.read_zyx(url, info.start_zyx, info.stop_zyx, fill_missing=fill_missing)


def test_region_job_writes_restored_layer(manager, phantom_layer, tiny_iso_model, tmp_path):
    src, stack = phantom_layer
    model_url, _ = tiny_iso_model
    mgr = manager()
    out = f"file://{tmp_path}/out"
    st = mgr.submit(RestoreSpec(source=src, model=model_url, output=out, region_start_xyz=(10, 10, 2),
                                region_stop_xyz=(40, 40, 5), steps=3))
    assert st.state == "RUNNING" and st.blocks_total >= 1
    assert any("snapped outward" in e for e in st.events)
    st = wait_state(mgr, st.job_id)
    assert st.state == "SUCCEEDED", st.message
    info = pc.open_layer(out)
    assert info.resolution_nm_xyz == (8.0, 8.0, 8.0)
    assert info.voxel_offset_xyz == (0, 0, 1) and info.size_xyz == (96, 80, 25)
    written = pc.read_zyx(out, info.start_zyx, info.stop_zyx, fill_missing=True)
    # the snapped box holds restored data: source sections at their centres, generated between
    sec = 3  # source section 3 sits at output z 3·3 + 1 = 10, relative index 9
    np.testing.assert_array_equal(written[9, 0:64, 0:64], stack[sec, 0:64, 0:64])
    assert written[10, 0:64, 0:64].std() > 0
    assert written[:, 64:, 64:].max() == 0  # outside the snapped region nothing was written
    # the full pyramid: halving x, y and z (8 nm isotropic) down to a chunk-sized top (24×20)
    assert info.downsample_factors_xyz == ((2, 2, 2), (4, 4, 4))
    mip1 = pc.read_zyx(out, (0, 0, 0), (8, 32, 32), mip=1)  # the snapped box at the lower scale
    assert mip1.std() > 0
    top = pc.read_zyx(out, (0, 0, 0), (4, 16, 16), mip=2)
    np.testing.assert_allclose(top.astype(float), mip1.astype(float).reshape(4, 2, 16, 2, 16, 2).mean((1, 3, 5)),
                               atol=0.51)


def test_whole_job_is_deterministic_and_incremental(manager, phantom_layer, tiny_iso_model, tmp_path):
    src, stack = phantom_layer
    model_url, _ = tiny_iso_model
    mgr = manager(parallelism=2)
    a, b = f"file://{tmp_path}/a", f"file://{tmp_path}/b"
    ua = f"file://{tmp_path}/ua"
    # the uncertainty layer from the model's error head alone (one sample) beside a job with 2 samples
    ja = mgr.submit(RestoreSpec(source=src, model=model_url, output=a, uncertainty_output=ua, samples=1, steps=1))
    jb = mgr.submit(RestoreSpec(source=src, model=model_url, output=b, uncertainty_output=None, samples=2, steps=1,
                                parallelism=1))
    assert wait_state(mgr, ja.job_id).state == "SUCCEEDED"
    assert wait_state(mgr, jb.job_id).state == "SUCCEEDED"
    va, vb = read_all(a), read_all(b)
    np.testing.assert_array_equal(va, vb)  # 2 workers vs 1 worker: the same bytes
    np.testing.assert_array_equal(va[::3], stack)  # every source section at its centre
    unc = read_all(ua)  # uint8, its full scale (the std 255 stands for) in the layer's info
    assert unc.dtype == np.uint8 and np.all(unc[::3] == 0) and unc[1::3].mean() > 0
    import json
    assert json.loads((tmp_path / "ua" / "info").read_text())["emrestore_uncertainty"]["uint8_full_scale"] == 63.75
    # each block's needs-fine-tuning score is in its marker; none of this in-domain job is flagged
    restoring = mgr.plan_of(ja.job_id).blocks.stage_tasks(0)  # later stages build the pyramid
    scores = [mgr.ledger.block_info(ja.job_id, i)["info"]["score"] for i in restoring]
    assert all(s > 0 for s in scores) and "NEEDS FINE-TUNING" not in mgr.get(ja.job_id).message, scores
    # incremental: the layer's provenance names the jobs of this method, their done bitmaps say
    # what is done → nothing to do (no chunk is listed)
    again = mgr.submit(RestoreSpec(source=src, model=model_url, output=a, incremental=True, samples=1, steps=1,
                                   uncertainty_output=ua))
    assert again.state == "SUCCEEDED" and again.blocks_done == again.blocks_total == ja.blocks_total
    # a job that stopped before its second task: the incremental run redoes that task and the
    # scales built from it, nothing else, and writes the same bytes
    import shutil
    from service.jobs.markers import GROUP
    n = ja.blocks_total
    shutil.rmtree(tmp_path / "ledger" / "jobs" / again.job_id / "done")
    shutil.rmtree(tmp_path / "ledger" / "jobs" / ja.job_id / "done")
    mgr.ledger._full_groups.clear()
    mgr.ledger.mark_grouped(ja.job_id, [i for i in range(n) if i != 1])
    assert n < GROUP and mgr.ledger.done_count(ja.job_id) == n - 1
    plan = mgr.plan_of(ja.job_id)
    redo = plan.blocks.task(1).box
    key = "_".join(f"{r:g}" for r in pc.open_layer(a).resolution_nm_xyz)
    info = pc.open_layer(a)
    from service.volume.geometry import Box
    for name in redo.chunk_names(info.chunk_zyx, Box(info.start_zyx, info.stop_zyx)):
        os.remove(tmp_path / "a" / key / (name + ".gz") if (tmp_path / "a" / key / (name + ".gz")).exists()
                  else tmp_path / "a" / key / name)
    inc = mgr.submit(RestoreSpec(source=src, model=model_url, output=a, incremental=True, samples=1, steps=1,
                                 uncertainty_output=ua))
    later = n - plan.blocks.stages[0].num_tasks  # tasks of the pyramid's later stages
    assert inc.blocks_total == n and n - 1 - later <= inc.blocks_done < n - 1
    assert any(f"of {n} task(s)" in e and "kept" in e for e in inc.events), inc.events
    assert wait_state(mgr, inc.job_id).state == "SUCCEEDED"
    np.testing.assert_array_equal(read_all(a), vb)
    np.testing.assert_array_equal(read_all(ua), unc)


def test_job_on_data_the_model_does_not_fit_says_it_needs_finetuning(manager, tiny_iso_model, tmp_path):
    """With samples ≥ 2 each block runs the needs-fine-tuning check; on data unlike the model's
    training data (texture-free noise) the worker records the block's score, emits one
    ``needs_finetuning`` event, and the finished job's message says so. The output is written."""
    model_url, _ = tiny_iso_model
    noise = np.random.default_rng(0).integers(0, 256, (9, 64, 64)).astype(np.uint8)
    src = f"file://{tmp_path}/noise"
    pc.create_source_layer(src, noise, (8, 8, 24), (0, 0, 0), (32, 32, 3))
    mgr = manager()
    out = f"file://{tmp_path}/out"
    st = mgr.submit(RestoreSpec(source=src, model=model_url, output=out, samples=2, steps=1))
    st = wait_state(mgr, st.job_id)
    assert st.state == "SUCCEEDED" and "NEEDS FINE-TUNING" in st.message, st.message
    marker = mgr.ledger.block_info(st.job_id, 0)["info"]
    assert marker["needs_finetuning"] and marker["score"] > 1.25
    events, _ = mgr.ledger.events(st.job_id)
    flagged = [e for e in events if e.kind == "needs_finetuning"]
    assert len(flagged) == 1 and flagged[0].fields["score"] == marker["score"]
    assert read_all(out)[::3].tolist() == noise.tolist()  # restored and written all the same


def test_kill_worker_and_restart_service(manager, phantom_layer, tiny_iso_model, tmp_path):
    """A worker killed mid-block and a restarted service: no block lost, output bit-identical."""
    src, _ = phantom_layer
    model_url, _ = tiny_iso_model
    ref_mgr = manager()
    region = dict(region_start_xyz=(0, 0, 0), region_stop_xyz=(96, 48, 9))  # 2 × 1 × 2 blocks
    ref = ref_mgr.submit(RestoreSpec(source=src, model=model_url, output=f"file://{tmp_path}/ref", steps=3, **region))
    assert wait_state(ref_mgr, ref.job_id).state == "SUCCEEDED"
    ref_mgr.close()

    m1 = manager()
    out = f"file://{tmp_path}/killed"
    job = m1.submit(RestoreSpec(source=src, model=model_url, output=out, steps=3, **region))
    t0 = time.time()
    killed = False
    while time.time() - t0 < 120 and not killed:  # wait until a block is leased but not done
        done = m1.ledger.done_blocks(job.job_id)
        for i in range(job.blocks_total):
            lease = m1.ledger.get_lease(job.job_id, i)
            if i not in done and lease is not None and len(done) >= 1:
                # the lease names the worker process (host:pid:task): kill it as a crash would
                os.kill(int(lease.owner.split(":")[1]), signal.SIGKILL)
                killed = True
                break
        time.sleep(0.05)
    assert killed, "no block was in progress to kill"
    m1.close()  # the service goes down with its workers; the ledger says RUNNING
    assert m1.ledger.get_job(job.job_id).state == "RUNNING"
    m2 = manager()  # restart on the same ledger
    st = wait_state(m2, job.job_id)
    assert st.state == "SUCCEEDED" and st.blocks_done == st.blocks_total
    restored = read_all(out, fill_missing=True)
    assert restored.any()
    np.testing.assert_array_equal(restored, read_all(f"file://{tmp_path}/ref", fill_missing=True))
    assert any("resum" in e for e in st.events)


def test_cancel_and_errors(manager, phantom_layer, tiny_iso_model, tmp_path):
    src, _ = phantom_layer
    model_url, _ = tiny_iso_model
    mgr = manager()
    st = mgr.submit(RestoreSpec(source=src, model=model_url, output=f"file://{tmp_path}/c", steps=50))
    c = mgr.cancel(st.job_id)
    assert c.state == "CANCELLED"
    with pytest.raises(FailedPrecondition):
        mgr.cancel(st.job_id)
    # a model saved before the error head: its uncertainty needs the spread of samples ≥ 2
    old = RestorationModel.load(model_url)
    old.predictor = UNet(replace(old.predictor.config, error_head=False))
    headless = old.save(f"file://{tmp_path}/models/headless")
    cases = [
        (RestoreSpec(source=src, model=model_url, output=src), "INVALID_ARGUMENT", "output"),
        (RestoreSpec(source=f"file://{tmp_path}/nope", model=model_url, output=f"file://{tmp_path}/x"), "NOT_FOUND", "source"),
        (RestoreSpec(source=src, model=f"file://{tmp_path}/nomodel", output=f"file://{tmp_path}/x"), "NOT_FOUND", "model"),
        (RestoreSpec(source=src, model=model_url, output=f"file://{tmp_path}/x", steps=0), "INVALID_ARGUMENT", "steps"),
        (RestoreSpec(source=src, model=headless, output=f"file://{tmp_path}/x", samples=1,
                     uncertainty_output=f"file://{tmp_path}/u"), "INVALID_ARGUMENT", "uncertainty_output"),
        (RestoreSpec(source=src, model=model_url, output=f"file://{tmp_path}/x", region_start_xyz=(0, 0, 0),
                     region_stop_xyz=(500, 10, 2)), "INVALID_ARGUMENT", "region"),
        (RestoreSpec(source=src, model=model_url, output=f"file://{tmp_path}/x", region_start_xyz=(5, 5, 2),
                     region_stop_xyz=(5, 10, 3)), "INVALID_ARGUMENT", "region"),
        (RestoreSpec(source=src, model=model_url, output=f"file://{tmp_path}/x", sampler="magic"), "INVALID_ARGUMENT", "sampler"),
    ]
    for spec, code, field in cases:
        with pytest.raises(Exception) as e:
            mgr.submit(spec)
        got_code, msg = status_of(e.value)
        assert got_code == code and msg.startswith(field), (spec, got_code, msg)
        assert not os.path.exists(tmp_path / "x")  # nothing written
    with pytest.raises(Exception) as e:
        mgr.get("01aaaaaaaaaaaaaaaaaaaaaaaa")
    assert status_of(e.value)[0] == "NOT_FOUND"
    # a source whose z/xy ratio the model did not learn (40 nm sections; it learned 24 nm) is
    # refused before anything is written, for jobs and cutouts alike
    thick = f"file://{tmp_path}/thick"
    pc.create_source_layer(thick, phantom_layer[1], (8, 8, 40), (0, 0, 0), (32, 32, 3))
    for call in (lambda: mgr.submit(RestoreSpec(source=thick, model=model_url, output=f"file://{tmp_path}/x")),
                 lambda: mgr.cutout(CutoutSpec(source=thick, model=model_url, region_start_xyz=(0, 0, 0),
                                               region_stop_xyz=(32, 32, 3)))):
        with pytest.raises(Exception) as e:
            call()
        got_code, msg = status_of(e.value)
        assert got_code == "FAILED_PRECONDITION" and msg.startswith("model") and "learned" in msg, msg
        assert not os.path.exists(tmp_path / "x")


def test_cutout_and_limits(manager, phantom_layer, tiny_iso_model):
    src, stack = phantom_layer
    model_url, _ = tiny_iso_model
    mgr = manager()
    mgr.max_cutout_voxels = 20_000
    r = mgr.cutout(CutoutSpec(source=src, model=model_url, region_start_xyz=(8, 8, 2), region_stop_xyz=(40, 40, 4),
                              steps=1, samples=2))
    assert r.mean_zyx.shape == (4, 32, 32) and r.std_zyx.shape == (4, 32, 32)
    np.testing.assert_array_equal(r.mean_zyx[0], stack[2, 8:40, 8:40])
    assert r.output_start_xyz == (8, 8, 7) and r.resolution_nm_xyz == (8.0, 8.0, 8.0)
    with pytest.raises(ResourceExhausted, match="20000"):
        mgr.cutout(CutoutSpec(source=src, model=model_url, region_start_xyz=(0, 0, 0), region_stop_xyz=(96, 80, 9)))


def test_train_job_makes_a_usable_model(manager, phantom_layer, tmp_path):
    src, _ = phantom_layer
    mgr = manager()
    out_model = f"file://{tmp_path}/models/trained"
    st = mgr.submit(TrainSpec(source=src, output_model=out_model, steps=8, batch_size=2, patch=32))
    st = wait_state(mgr, st.job_id)
    assert st.state == "SUCCEEDED", st.message
    from service.engine.model import read_metadata
    meta = read_metadata(out_model)
    assert meta["task"] == "isotropic" and meta["factor"] == 3 and meta["training"]["steps"] == 8
    with pytest.raises(EmrestoreError) as e:
        mgr.submit(TrainSpec(source=src, output_model=out_model, steps=0))
    assert e.value.field == "steps"


def test_s3_compatible_store_through_client_script(s3_endpoint, tiny_iso_model, tmp_path, monkeypatch):
    """Source, output, uncertainty and ledger on an S3-compatible store (moto, signatures checked)
    reached through a cloud-files alias; a gRPC client script restores a region; bad credentials
    and an unreachable endpoint give PERMISSION_DENIED / UNAVAILABLE and write nothing."""
    from service.api.client import EmrestoreClient, EmrestoreError
    from service.api.server import build_server
    from service.engine import phantom
    from service.volume import stores

    monkeypatch.setenv("EMRESTORE_LEASE_TTL", "10")
    model_url, _ = tiny_iso_model
    iso = phantom.make_phantom((13, 64, 64), seed=8)
    stack = phantom.to_uint8(phantom.thick_sections(iso, 3, mode="sample"))
    root = s3_endpoint.url(f"jobs-{os.getpid()}")
    src = f"{root}/em"
    pc.create_source_layer(src, stack, (8, 8, 24), (0, 0, 0), (32, 32, 3))
    ledger = f"{root}/ledger"
    mgr = JobManager(ledger, LocalExecutor(ledger, log_dir=str(tmp_path / "logs")), poll_interval_s=0.5,
                     block_size_xyz=(64, 64, 0))
    server, port = build_server(mgr, "127.0.0.1", 0)
    server.start()
    mgr.start()
    try:
        with EmrestoreClient(f"127.0.0.1:{port}") as c:
            job = c.restore_region(src, model_url, f"{root}/em_iso", (0, 0, 0), (64, 64, 5), samples=2, steps=1,
                                   uncertainty=f"{root}/em_unc")
            final = c.wait(job.job_id, timeout=240)
            assert final.state == "SUCCEEDED", final.message
            out = read_all(f"{root}/em_iso")
            np.testing.assert_array_equal(out[0:13:3], stack[:5])
            assert read_all(f"{root}/em_unc").max() > 0
            # a wrong secret key for another alias on the same endpoint
            stores.register_s3_endpoint("labbad", s3_endpoint.endpoint_url, s3_endpoint.access_key_id, "wrong")
            with pytest.raises(EmrestoreError) as e:
                c.restore_region(f"labbad://{s3_endpoint.bucket}/jobs-{os.getpid()}/em", model_url,
                                 f"{root}/never", (0, 0, 0), (64, 64, 5))
            assert e.value.code_name in ("PERMISSION_DENIED", "UNAUTHENTICATED") and "source" in e.value.message
            stores.register_s3_endpoint("labdown", "http://127.0.0.1:9", "k", "s")
            with pytest.raises(EmrestoreError) as e:
                c.restore_region("labdown://bucket/em", model_url, f"{root}/never", (0, 0, 0), (64, 64, 5))
            assert e.value.code_name == "UNAVAILABLE" and "source" in e.value.message
            assert not pc.object_exists(f"{root}/never/info", "output")
    finally:
        server.stop(grace=1)
        mgr.close()


def test_workers_follow_the_persisted_plan_and_old_jobs_are_refused(phantom_layer, tiny_iso_model, tmp_path):
    import json

    from service.jobs.plans import RestorePlan
    from service.jobs.worker import load_plan, run_task
    src, stack = phantom_layer
    model_url, _ = tiny_iso_model
    ledger = f"file://{tmp_path}/ledger"
    mgr = JobManager(ledger, InProcessExecutor(), block_size_xyz=(32, 32, 0))
    out = f"file://{tmp_path}/out"
    st = mgr.submit(RestoreSpec(source=src, model=model_url, output=out, steps=1))
    plan = load_plan(mgr.ledger, st.job_id)
    assert isinstance(plan, RestorePlan) and len(plan.blocks.blocks) == plan.blocks.num_blocks > 2
    assert st.spec["plan"]["num_blocks_planned"] == st.blocks_total == plan.blocks.num_tasks
    assert len(path_text := json.dumps(plan.to_dict())) < 4000, len(path_text)  # grids, not lists
    out_box = pc.open_layer(out)
    for b in plan.blocks:
        assert b.write.start[0] >= out_box.start_zyx[0] and b.read.stop[0] <= stack.shape[0]
    # the worker does what the persisted plan says, nothing else: keep only block 1 in plan.json
    path = tmp_path / "ledger" / "jobs" / st.job_id / "plan.json"
    d = json.loads(path.read_text())
    d["blocks"]["stages"] = []
    d["blocks"]["explicit"] = [dict(plan.blocks.blocks[1].to_dict(), index=0)]
    path.write_text(json.dumps(d))
    assert run_task(ledger, st.job_id, 0, 1, log=lambda m: None) == 1
    b1 = plan.block(1)
    written = pc.read_zyx(out, out_box.start_zyx, out_box.stop_zyx, fill_missing=True)
    assert written[b1.write.slices(out_box.start_zyx)].std() > 0
    assert np.count_nonzero(written) == np.count_nonzero(written[b1.write.slices(out_box.start_zyx)])
    # a job recorded by an older emrestore (no plan.json) is refused with one line
    old = mgr.ledger.create_job({"kind": "restore", "source": src, "plan": {"block_size_xyz": [32, 32, 3]}}, 2)
    with pytest.raises(Exception) as e:
        run_task(ledger, old.job_id, 0, 1)
    code, msg = status_of(e.value)
    assert code == "FAILED_PRECONDITION" and "older emrestore" in msg and "\n" not in msg
    mgr._supervise_job(mgr.ledger.get_job(old.job_id))
    rec = mgr.ledger.get_job(old.job_id)
    assert rec.state == "FAILED" and "resubmit" in rec.message
