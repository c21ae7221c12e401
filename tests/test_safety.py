"""Issue 9: the service is safe to expose. Each test is a row of the issue's table (or a bad input
of its item 8), sent through the real gRPC server: nothing named by a request outside the allowed
stores is touched, nothing that is not ours is overwritten, incremental jobs are complete, work is
bounded, jobs have owners, one supervisor per job."""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.client import EmrestoreClient, EmrestoreError
from service.jobs.executors import InProcessExecutor
from service.jobs.manager import JobManager, WorkLimits
from service.jobs.spec import RestoreSpec
from service.volume import precomputed as pc
from service.volume.policy import StorePolicy
from tests.test_api import make_model, make_source, start_server

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A server confined to ROOT/allowed (data) and ROOT/allowed/models, with users alice and bob."""
    root = tmp_path_factory.mktemp("safety")
    allowed = root / "allowed"
    allowed.mkdir()
    src, vol = make_source(str(allowed))
    models = str(allowed / "models")
    make_model(models, "iso3", vol)
    other = make_model(str(root / "elsewhere"), "iso3b", vol)  # a model outside the allowed stores
    policy = StorePolicy([f"file://{allowed}"])
    mgr = JobManager(f"file://{root}/ledger", InProcessExecutor(), models_dir=f"file://{models}", poll_interval_s=0.05,
                     max_cutout_voxels=50_000, store_policy=policy,
                     limits=WorkLimits(max_sample_steps=1000, max_jobs_per_user=100))
    server, port = start_server(mgr, token=["alice:ta-secret", "bob:tb-secret"], admins=["root"])
    yield {"root": root, "allowed": allowed, "src": src, "vol": vol, "models": models, "mgr": mgr,
           "target": f"127.0.0.1:{port}", "other_model": other}
    server.stop(0).wait()
    mgr.close()


def client(site, user="alice"):
    return EmrestoreClient(site["target"], token={"alice": "ta-secret", "bob": "tb-secret"}[user], timeout=30)


def refused(fn, *a, **kw) -> EmrestoreError:
    with pytest.raises(EmrestoreError) as e:
        fn(*a, **kw)
    return e.value


def out_url(site, name):
    return f"file://{site['allowed']}/{name}-{time.monotonic_ns()}"


# ---------------------------------------------------------------- stores confined to allowed roots
@pytest.mark.parametrize("source", ["file:///etc", "http://127.0.0.1:9/secret", "file://{root}/ledger"])
def test_sources_outside_the_allowed_stores_are_refused_before_any_io(site, source):
    with client(site) as c:
        e = refused(c.restore_region, source.format(root=site["root"]), "iso3", out_url(site, "o"), (0, 0, 0), (8, 8, 2))
    assert e.code_name == "PERMISSION_DENIED" and e.message.startswith("source:")
    assert "--allow-store" in e.message and "No such" not in e.message  # nothing probed: one answer for all


def test_ftp_and_long_model_names_get_the_field_and_a_short_quote(site):
    with client(site) as c:
        e = refused(c.restore_region, "ftp://host/em", "iso3", out_url(site, "o"), (0, 0, 0), (8, 8, 2))
        assert e.code_name == "INVALID_ARGUMENT" and e.message.startswith("source:") and "ftp" in e.message
        e = refused(c.restore_region, site["src"], "m" * 5000, out_url(site, "o"), (0, 0, 0), (8, 8, 2))
        assert e.code_name == "INVALID_ARGUMENT" and e.message.startswith("model:") and len(e.message) < 400
        e = refused(c.restore_region, site["src"], "../elsewhere/iso3b", out_url(site, "o"), (0, 0, 0), (8, 8, 2))
        assert e.code_name == "INVALID_ARGUMENT" and e.message.startswith("model:")
        e = refused(c.restore_region, site["src"], site["other_model"], out_url(site, "o"), (0, 0, 0), (8, 8, 2))
        assert e.code_name == "PERMISSION_DENIED" and e.message.startswith("model:")


def test_train_output_model_never_escapes_the_model_directory(site):
    with client(site) as c:
        e = refused(c.train, site["src"], "../../../../tmp/x", steps=1)
        assert e.code_name == "INVALID_ARGUMENT" and e.message.startswith("output_model:")
        e = refused(c.train, site["src"], f"file://{site['root']}/outside-model", steps=1)
        assert e.code_name == "PERMISSION_DENIED" and e.message.startswith("output_model:")
    assert not os.path.exists("/tmp/x") or os.path.getmtime("/tmp/x") < time.time() - 60
    assert not os.path.exists(site["root"] / "outside-model")


def test_train_into_an_existing_model_of_another_task_is_refused_up_front(site, tmp_path):
    from service.engine.model import RestorationModel
    from service.engine.tasks import make_task
    m = RestorationModel.create(make_task("denoise", 1), "tiny", seed=0)
    m.name = "denoiser"
    m.save(os.path.join(site["models"], "denoiser"))
    with client(site) as c:
        e = refused(c.train, site["src"], "denoiser", steps=1)
    assert e.code_name == "FAILED_PRECONDITION" and e.message.startswith("output_model:")


# ---------------------------------------------------------------- never overwrite what is not ours
def test_an_unrelated_layer_is_never_overwritten(site):
    url = out_url(site, "foreign")
    geo = pc.output_geometry(pc.open_source(site["src"]), (1, 1, 3))
    # someone else's layer of exactly the output's geometry, without emrestore provenance
    import cloudvolume
    from dataclasses import replace
    probe = site["mgr"].planner.output_geometry(pc.open_source(site["src"]), (1, 1, 3), "uint8")
    pc.create_output_layer(url, probe, probe.chunk_size_xyz, "uint8", {}, len(probe.downsample_factors_xyz))
    prov_path = os.path.join(url[len("file://"):], "provenance")
    with open(prov_path, "w") as f:
        json.dump({"description": "lab annotation", "sources": [], "owners": [], "processing": []}, f)
    before = open(prov_path).read()
    with client(site) as c:
        e = refused(c.restore_region, site["src"], "iso3", url, (0, 0, 0), (64, 64, 8), overwrite=True)
    assert e.code_name == "FAILED_PRECONDITION" and e.message.startswith("output:") and "emrestore" in e.message
    assert open(prov_path).read() == before
    assert geo is not None and cloudvolume and replace


def test_another_jobs_output_needs_overwrite(site):
    url = out_url(site, "prev")
    with client(site) as c:
        first = c.restore_region(site["src"], "iso3", url, (0, 0, 0), (64, 64, 8), steps=2, seed=1)
        again = c.restore_region(site["src"], "iso3", url, (0, 0, 0), (64, 64, 8), steps=2, seed=1)  # a resume
        assert again.blocks_total == first.blocks_total
        e = refused(c.restore_region, site["src"], "iso3", url, (0, 0, 0), (64, 64, 8), steps=3, seed=1)
        assert e.code_name == "FAILED_PRECONDITION" and e.message.startswith("output:") and "overwrite" in e.message
        c.restore_region(site["src"], "iso3", url, (0, 0, 0), (64, 64, 8), steps=3, seed=1, overwrite=True)
    prov = json.load(open(os.path.join(url[len("file://"):], "provenance")))
    assert prov["processing"][-1]["method"]["steps"] == 3


@pytest.mark.parametrize("where", ["source", "model", "uncertainty"])
def test_outputs_never_inside_source_or_model_and_nothing_written_first(site, where):
    src_dir = site["src"]
    with client(site) as c:
        if where == "source":
            e = refused(c.restore_region, src_dir, "iso3", src_dir + "/restored", (0, 0, 0), (64, 64, 8))
            assert e.code_name == "PERMISSION_DENIED" and e.message.startswith("output:")
            assert not os.path.exists(src_dir[len("file://"):] + "/restored")
        elif where == "model":
            out = f"file://{site['models']}/iso3/restored"
            e = refused(c.restore_region, site["src"], "iso3", out, (0, 0, 0), (64, 64, 8))
            assert e.code_name == "PERMISSION_DENIED" and e.message.startswith("output:")
            assert not os.path.exists(out[len("file://"):])
        else:
            out = out_url(site, "u")
            e = refused(c.restore_region, site["src"], "iso3", out, (0, 0, 0), (64, 64, 8), samples=2, steps=2,
                        uncertainty=out + "/")
            assert e.code_name == "INVALID_ARGUMENT" and e.message.startswith("uncertainty_output:")
            assert not os.path.exists(out[len("file://"):])  # neither info nor provenance written first


# ---------------------------------------------------------------- bounded work
def test_samples_times_steps_is_bounded(site):
    with client(site) as c:
        e = refused(c.restore_dataset, site["src"], "iso3", out_url(site, "big"), samples=64, steps=1000)
    assert e.code_name == "RESOURCE_EXHAUSTED" and e.message.startswith("samples:") and "1000" in e.message


def test_jobs_per_user_are_bounded(site, monkeypatch):
    monkeypatch.setattr(site["mgr"], "limits", WorkLimits(max_sample_steps=1000, max_jobs_per_user=3))
    with client(site, "bob") as c:
        live = len([j for j in c.list_jobs() if j.owner == "bob" and not j.done])
        for _ in range(3 - live):
            c.restore_region(site["src"], "iso3", out_url(site, "q"), (0, 0, 0), (32, 32, 8), steps=1)
        e = refused(c.restore_region, site["src"], "iso3", out_url(site, "q"), (0, 0, 0), (32, 32, 8), steps=1)
    assert e.code_name == "RESOURCE_EXHAUSTED" and e.message.startswith("owner:") and "3" in e.message


class SlowCutouts(JobManager):
    """The real manager whose cutout takes a while (the restoration is not what is tested here)."""

    def cutout(self, spec):
        time.sleep(1.5)
        return super().cutout(spec)


def test_concurrent_cutouts_are_capped_and_cheap_calls_stay_responsive(tmp_path):
    src, vol = make_source(str(tmp_path))
    models = str(tmp_path / "models")
    make_model(models, "iso3", vol)
    mgr = SlowCutouts(f"file://{tmp_path}/ledger", InProcessExecutor(), models_dir=models, max_cutout_voxels=50_000)
    server, port = start_server(mgr, max_workers=8, max_concurrent_cutouts=2, cutout_queue=2)
    results: list = []

    def one():
        with EmrestoreClient(f"127.0.0.1:{port}", timeout=60) as c:
            try:
                c.cutout(src, "iso3", (0, 0, 0), (16, 16, 3), steps=1)
                results.append("ok")
            except EmrestoreError as e:
                results.append(e)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        with EmrestoreClient(f"127.0.0.1:{port}", timeout=5) as c:  # a 5 s deadline, as in the issue
            for _ in range(5):
                assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
                c.models()
        channel.close()
    finally:
        for t in threads:
            t.join()
        server.stop(0).wait()
        mgr.close()
    refusals = [r for r in results if r != "ok"]
    assert results.count("ok") >= 2 and refusals
    assert all(r.code_name == "RESOURCE_EXHAUSTED" and "at most 2 cutouts" in r.message for r in refusals)


# ---------------------------------------------------------------- who did it
def test_jobs_record_their_owner_and_only_the_owner_cancels(site, caplog):
    with client(site, "alice") as a, client(site, "bob") as b:
        job = a.restore_region(site["src"], "iso3", out_url(site, "own"), (0, 0, 0), (32, 32, 8), steps=1)
        assert job.owner == "alice" and a.get_job(job.job_id).owner == "alice"
        e = refused(b.cancel, job.job_id)
        assert e.code_name == "PERMISSION_DENIED" and e.message.startswith("job_id:")
        assert a.cancel(job.job_id).state == "CANCELLED"
    with caplog.at_level(logging.WARNING, logger="service.api.auth"):
        with EmrestoreClient(site["target"], token="not-a-token-xyz", timeout=10) as c:
            assert refused(c.models).code_name == "UNAUTHENTICATED"
    assert "authentication failed" in caplog.text and "not-a-token-xyz" not in caplog.text


# ---------------------------------------------------------------- one ledger, one supervisor
class CountingExecutor(InProcessExecutor):
    def __init__(self):
        super().__init__()
        self.launches = 0

    def launch(self, job_id, num_tasks, parallelism):
        self.launches += 1
        super().launch(job_id, num_tasks, parallelism)


def test_two_servers_on_one_ledger_never_double_the_workers(tmp_path):
    src, vol = make_source(str(tmp_path))
    models = str(tmp_path / "models")
    make_model(models, "iso3", vol)
    ledger = f"file://{tmp_path}/ledger"
    e1, e2 = CountingExecutor(), CountingExecutor()
    m1 = JobManager(ledger, e1, models_dir=models, poll_interval_s=0.05)
    m2 = JobManager(ledger, e2, models_dir=models, poll_interval_s=0.05)
    m1.supervisor_ttl_s = m2.supervisor_ttl_s = 2.0
    job = m1.submit(RestoreSpec(source=src, model="iso3", output=f"file://{tmp_path}/out", steps=1))
    for _ in range(3):
        m1.tick()
        m2.tick()
    assert e1.launches == 1 and e2.launches == 0  # the second server does not adopt a supervised job
    assert m1.ledger.supervisor(job.job_id) == m1.supervisor_id
    time.sleep(2.2)  # the first server stops renewing (it died): the second takes over, once
    m2.tick()
    m2.tick()
    assert e2.launches == 1 and m2.ledger.supervisor(job.job_id) == m2.supervisor_id
    assert any(ev.kind == "resumed" for ev in m2.ledger.events(job.job_id)[0])
    m2.close()  # a server shutting down hands its jobs on at once
    assert m2.ledger.supervisor(job.job_id) is None


# ---------------------------------------------------------------- incremental means complete
def test_incremental_keeps_only_what_earlier_jobs_of_the_method_finished(tmp_path):
    """Incremental runs work from the output layer's provenance (the jobs of this method that
    wrote it) and those jobs' done bitmaps: a job stopped after one task leaves exactly the other
    tasks to do (the pyramid's later stages included); another method inherits nothing."""
    from service.engine.model import RestorationModel
    from service.jobs.worker import process_block, run_task
    src, vol = make_source(str(tmp_path))
    models = str(tmp_path / "models")
    make_model(models, "iso3", vol)
    ledger = f"file://{tmp_path}/ledger"
    mgr = JobManager(ledger, InProcessExecutor(), models_dir=models, block_size_xyz=(32, 32, 0),
                     output_chunk_xyz=(16, 16, 15))
    out, unc = f"file://{tmp_path}/out", f"file://{tmp_path}/unc"
    spec = dict(source=src, model="iso3", output=out, uncertainty_output=unc, samples=2, steps=1)
    job = mgr.submit(RestoreSpec(**spec))
    plan = mgr.plan_of(job.job_id)
    assert plan.blocks.stages[0].num_tasks >= 2 and len(plan.blocks.stages) >= 2
    model = RestorationModel.load(plan.model_url)
    assert process_block(mgr.ledger, job.job_id, plan, 0, model, owner="crashed", ttl=10) > 0  # then it stopped
    inc = mgr.submit(RestoreSpec(**spec, incremental=True))
    assert inc.blocks_total == job.blocks_total and inc.blocks_done == 1
    assert run_task(ledger, inc.job_id, 0, 1, log=lambda m: None) == inc.blocks_total - 1
    done = mgr.submit(RestoreSpec(**spec, incremental=True))
    assert done.state == "SUCCEEDED" and done.blocks_done == done.blocks_total
    other = mgr.submit(RestoreSpec(**{**spec, "steps": 2}, incremental=True, overwrite=True))
    assert other.blocks_done == 0  # another method's tasks are not this one's
    assert np.isfinite(vol).all()


# ---------------------------------------------------------------- bad inputs
def _scale(**kw):
    base = {"key": "8_8_24", "size": [64, 64, 8], "resolution": [8, 8, 24], "chunk_sizes": [[32, 32, 8]],
            "voxel_offset": [0, 0, 0], "encoding": "raw"}
    base.update(kw)
    return {"type": "image", "data_type": "uint8", "num_channels": 1, "scales": [base]}


@pytest.mark.parametrize("info", [{}, {"scales": []}, "truncated", _scale(resolution=[0, 8, 24]),
                                  _scale(size=[-64, 64, 8]), _scale(chunk_sizes=[[32, 32]])],
                         ids=["empty", "no scales", "truncated", "zero resolution", "negative size", "bad chunk"])
def test_broken_source_info_names_the_source(site, info):
    d = site["allowed"] / f"broken-{time.monotonic_ns()}"
    d.mkdir()
    (d / "info").write_text('{"type": "image", "scales": [' if info == "truncated" else json.dumps(info))
    with client(site) as c:
        e = refused(c.restore_region, f"file://{d}", "iso3", out_url(site, "o"), (0, 0, 0), (8, 8, 2))
    assert e.code_name == "INVALID_ARGUMENT" and e.message.startswith("source:"), e.message


def test_cutout_with_an_even_factor_is_refused_like_jobs(site):
    from service.engine.model import RestorationModel
    from service.engine.normalize import IntensityNorm
    from service.engine.tasks import make_task
    m = RestorationModel.create(make_task("isotropic", 2), "tiny", seed=0)
    m.name = "iso2"
    m.input_norm = m.target_norm = IntensityNorm.from_volume(site["vol"])
    m.save(os.path.join(site["models"], "iso2"))
    with client(site) as c:
        e = refused(c.cutout, site["src"], "iso2", (0, 0, 0), (16, 16, 3), steps=1)
        assert e.code_name == "INVALID_ARGUMENT" and e.message.startswith("model:") and "even" in e.message
        e = refused(c.restore_region, site["src"], "iso2", out_url(site, "even"), (0, 0, 0), (16, 16, 3))
        assert e.code_name == "INVALID_ARGUMENT"


def test_workers_recheck_the_plan_against_the_policy(site, monkeypatch):
    from service.jobs.worker import run_task
    with client(site) as c:
        job = c.restore_region(site["src"], "iso3", out_url(site, "w"), (0, 0, 0), (32, 32, 8), steps=1)
    monkeypatch.setenv("EMRESTORE_ALLOW_STORES", json.dumps(["file:///nowhere"]))
    with pytest.raises(Exception) as e:
        run_task(site["mgr"].ledger_url, job.job_id, 0, 1)
    assert getattr(e.value, "code", "") == "PERMISSION_DENIED" and str(e.value).startswith("source:")


def test_a_worker_crash_is_an_event_of_the_job(tmp_path):
    from service.jobs.executors import ExecutorStatus

    class CrashingExecutor(CountingExecutor):
        def status(self, job_id):
            return ExecutorStatus(active=1, messages=["task 0 exited with code -9; retrying"])

    src, vol = make_source(str(tmp_path))
    make_model(str(tmp_path / "models"), "iso3", vol)
    mgr = JobManager(f"file://{tmp_path}/ledger", CrashingExecutor(), models_dir=str(tmp_path / "models"))
    job = mgr.submit(RestoreSpec(source=src, model="iso3", output=f"file://{tmp_path}/out", steps=1))
    mgr.tick()
    mgr.tick()
    crashes = [e for e in mgr.ledger.events(job.job_id)[0] if e.kind == "worker_failed"]
    assert [e.message for e in crashes] == ["task 0 exited with code -9; retrying"]
    assert any(e["kind"] == "worker_failed" for e in mgr.get(job.job_id).event_log)


def test_local_executor_keeps_the_logs_of_earlier_attempts(tmp_path):
    """Real worker processes (forked from the warm template) that fail with a retryable exit code
    (3: CUDA required, none here): every attempt keeps its log (appended on a relaunch) with the
    worker's one error line, and the task ends failed."""
    from service.jobs import executors
    job = "01aaaaaaaaaaaaaaaaaaaaaaaa"
    ex = executors.LocalExecutor("file:///unused", max_retries=1, log_dir=str(tmp_path / "logs"),
                                 env={"EMRESTORE_DEVICE": "cuda"})
    for _ in range(2):  # a relaunch after the first ended: two attempts each
        ex.launch(job, 1, 1)
        ex._jobs[job].thread.join(timeout=120)
        assert ex.status(job).failed == 1
        assert "exit code 3 after 2 attempt(s)" in " ".join(ex.status(job).messages)
    logs = sorted(os.listdir(tmp_path / "logs"))  # one file per attempt, appended by later launches
    assert len(logs) == 2
    lines = [ln for name in logs for ln in (tmp_path / "logs" / name).read_text().splitlines()]
    assert len(lines) == 4, lines
    assert all(ln.startswith("emrestore: error:") and "CUDA" in ln for ln in lines), lines


@pytest.mark.parametrize("start", ["fork", "exec"])
def test_worker_processes_get_their_own_environment_log_and_exit_code(tmp_path, monkeypatch, start):
    """Both ways of starting a local worker (forked from the template; a fresh interpreter) give
    it exactly the environment it was handed (not the template's), append its output to its log
    and report the CLI's exit code (2: bad input, before any model or torch work)."""
    from service.jobs import processes
    monkeypatch.setenv(processes.START_ENV, start)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "7")  # the service's (and maybe the template's) own
    log = tmp_path / "logs" / "w.log"
    env = dict(os.environ, JOB_COMPLETION_INDEX="not-a-number")
    first = processes.start_worker(["worker", "--ledger", "file:///unused", "--job", "j"], env, str(log))
    assert log.exists()  # at once, as a subprocess's redirected output (callers wait on its lines)
    assert first.wait(120) == 2 and first.poll() == 2
    env.pop("JOB_COMPLETION_INDEX")
    second = processes.start_worker(["worker", "--ledger", "file:///unused", "--job", "j"], env, str(log))
    assert second.wait(120) == 2
    lines = log.read_text().splitlines()
    assert lines == ["emrestore: error: INVALID_ARGUMENT: --task-index: $JOB_COMPLETION_INDEX='not-a-number' "
                     "is not an integer",
                     "emrestore: error: INVALID_ARGUMENT: --task-index: not given and $JOB_COMPLETION_INDEX is unset"]
    assert processes.start_method() == start


def test_unreachable_or_unauthorised_model_stores_are_not_internal(s3_endpoint, tmp_path):
    from service.volume import stores
    src, vol = make_source(str(tmp_path))
    stores.register_s3_endpoint("labdown9", "http://127.0.0.1:9", "k", "s")
    stores.register_s3_endpoint("labbad9", s3_endpoint.endpoint_url, s3_endpoint.access_key_id, "wrong")
    mgr = JobManager(f"file://{tmp_path}/ledger", InProcessExecutor())
    server, port = start_server(mgr)
    try:
        with EmrestoreClient(f"127.0.0.1:{port}", timeout=60) as c:
            for model, codes in ((f"labdown9://{s3_endpoint.bucket}/m", {"UNAVAILABLE"}),
                                 (f"labbad9://{s3_endpoint.bucket}/m", {"PERMISSION_DENIED", "UNAUTHENTICATED"})):
                e = refused(c.restore_region, src, model, f"file://{tmp_path}/o", (0, 0, 0), (8, 8, 2))
                assert e.code_name in codes and e.message.startswith("model:"), (model, e)
    finally:
        server.stop(0).wait()
        mgr.close()


def test_voxels_per_job_are_bounded(site, monkeypatch):
    monkeypatch.setattr(site["mgr"], "limits", WorkLimits(max_job_voxels=1000))
    with client(site) as c:
        e = refused(c.restore_dataset, site["src"], "iso3", out_url(site, "huge"), steps=1)
    assert e.code_name == "RESOURCE_EXHAUSTED" and e.message.startswith("region:") and "1000" in e.message
