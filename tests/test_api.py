"""The gRPC API against a real server on 127.0.0.1 (ephemeral port) with the real client.

Most tests serve a real ``JobManager`` whose executor launches nothing (``InProcessExecutor``), so
jobs stay RUNNING until a test marks blocks done in the ledger; the end-to-end tests at the
bottom run the real ``LocalExecutor`` (``emrestore worker`` subprocesses) with a tiny model
trained here for 30 steps.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.client import EmrestoreClient, EmrestoreError
from service.api.gen import emrestore_pb2 as pb
from service.api.gen import emrestore_pb2_grpc as pb_grpc
from service.api.server import build_server, health_servicer
from service.jobs.executors import InProcessExecutor
from service.jobs.manager import JobManager

pytestmark = pytest.mark.timeout(120)

VOXEL_NM = (8, 8, 24)
SHAPE_ZYX = (8, 64, 64)   # (Z-1) not a multiple of the output chunk's gaps: no 1-section block


# ----------------------------------------------------------------------------- shared helpers
def make_source(root: str, name: str = "src") -> tuple[str, np.ndarray]:
    """A small anisotropic (×3) precomputed layer: 8 sections of 64×64 at 8×8×24 nm."""
    from service.engine import phantom
    from service.volume.precomputed import create_source_layer
    vol = phantom.to_uint8(phantom.make_phantom((22, 64, 64), seed=0))[::3]
    assert vol.shape == SHAPE_ZYX
    url = f"file://{root}/{name}"
    create_source_layer(url, vol, VOXEL_NM, chunk_size_xyz=(32, 32, 8))
    return url, vol


def make_model(models_dir: str, name: str = "iso3", vol: np.ndarray | None = None, train_steps: int = 0) -> str:
    """An isotropic ×3 tiny model saved under models_dir/name; trained for train_steps (0: untrained)."""
    from service.engine.model import RestorationModel
    from service.engine.normalize import IntensityNorm
    from service.engine.pairs import IsotropicPairs
    from service.engine.tasks import make_task
    from service.engine.training import TrainConfig, train
    task = make_task("isotropic", 3)
    m = RestorationModel.create(task, "tiny", voxel_size_nm=VOXEL_NM, seed=0)
    m.name = name
    url = os.path.join(models_dir, name)
    if train_steps:
        pairs = IsotropicPairs(task, vol, self_supervised=True)
        m.input_norm = m.target_norm = pairs.norm
        train(m, pairs, TrainConfig(steps=train_steps, batch_size=4, patch=32, warmup=5, device="cpu"),
              out_url=url, progress=False, mode="self-supervised")
    else:
        m.input_norm = m.target_norm = IntensityNorm.from_volume(vol if vol is not None else np.arange(256))
        m.save(url)
    return url


class SpyManager(JobManager):
    """The real manager, recording when watch generators end (to test prompt stream stops)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.watch_ended = threading.Event()

    def watch(self, job_id, timeout_s=None, stop=None):
        try:
            yield from super().watch(job_id, timeout_s=timeout_s, stop=stop)
        finally:
            self.watch_ended.set()


def start_server(manager, **kw):
    server, port = build_server(manager, "127.0.0.1", 0, **kw)
    server.start()
    return server, port


def make_self_signed(tmp_path) -> tuple[str, str]:
    """A self-signed certificate (CA:true) for localhost and 127.0.0.1, and its key; PEM paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "server.crt", tmp_path / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def rpc_error(fn, *args, **kw) -> EmrestoreError:
    with pytest.raises(EmrestoreError) as ei:
        r = fn(*args, **kw)
        if hasattr(r, "__next__"):
            list(r)
    return ei.value


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    src, vol = make_source(str(root))
    models = str(root / "models")
    make_model(models, "iso3", vol)
    return {"root": root, "src": src, "vol": vol, "models": models}


@pytest.fixture(scope="module")
def served(world):
    """A real JobManager (InProcessExecutor) behind a real server, no auth; yields (manager, client)."""
    def register(job):  # a completion hook serving one configured target (as connector.registry's)
        return [f"{name}: registered {job.output}" for name in job.register_in]
    register.targets = {"lab-neuroglancer": None}
    mgr = SpyManager(f"file://{world['root']}/ledger", InProcessExecutor(), models_dir=world["models"],
                     poll_interval_s=0.05, max_cutout_voxels=50_000, completion_hooks=[register])
    mgr.start()
    server, port = start_server(mgr)
    client = EmrestoreClient(f"127.0.0.1:{port}", timeout=30)
    yield mgr, client, port
    client.close()
    server.stop(0).wait()
    mgr.close()


def restore_req(world, **kw) -> pb.CreateRestoreJobRequest:
    base = dict(source=world["src"], model="iso3", output=f"file://{world['root']}/out-{time.monotonic_ns()}",
                region=pb.Box(start=pb.Vec3(x=0, y=0, z=0), stop=pb.Vec3(x=64, y=64, z=8)), steps=2)
    base.update(kw)
    return pb.CreateRestoreJobRequest(**base)


# ----------------------------------------------------------------------------- generated code
def test_generated_code_is_current():
    pytest.importorskip("grpc_tools")
    from service.api import codegen
    assert codegen.stale() == [], "run: python -m service.api.codegen"


def test_generated_imports_are_package_relative():
    gen = os.path.join(os.path.dirname(__file__), "..", "service", "api", "gen")
    for name in ("emrestore_pb2.py", "emrestore_pb2_grpc.py"):
        text = open(os.path.join(gen, name), encoding="utf-8").read()
        assert not re.search(r"^\s*(from|import) emrestore", text, re.MULTILINE)
    assert "from . import emrestore_pb2" in open(os.path.join(gen, "emrestore_pb2_grpc.py")).read()


# ----------------------------------------------------------------------------- health, reflection
def test_health_and_reflection(served):
    _, client, port = served
    assert client.health() == "SERVING"
    assert client.health("emrestore.v1.Restoration") == "SERVING"
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"emrestore.v1.Restoration", "grpc.health.v1.Health"} <= services
        from google.protobuf.descriptor_pool import DescriptorPool
        pool = DescriptorPool(db)
        svc = pool.FindServiceByName("emrestore.v1.Restoration")
        assert {m.name for m in svc.methods} == {
            "CreateRestoreJob", "CreateTrainJob", "GetJob", "ListJobs", "CancelJob", "WatchJob", "Cutout",
            "ListModels", "GetModel"}
        assert pool.FindMessageTypeByName("emrestore.v1.Vec3").fields_by_name["z"].number == 3


# ----------------------------------------------------------------------------- auth and TLS
def test_auth_required_when_configured(world, served):
    mgr = served[0]
    server, port = start_server(mgr, token=["first-token", "s3cret-token"])
    target = f"127.0.0.1:{port}"
    try:
        # health and reflection need no token
        assert EmrestoreClient(target).health() == "SERVING"
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
        with grpc.insecure_channel(target) as ch:
            assert "emrestore.v1.Restoration" in ProtoReflectionDescriptorDatabase(ch).get_services()
        for token, text in ((None, "missing bearer token"), ("wrong", "invalid bearer token")):
            with EmrestoreClient(target, token=token) as c:
                e = rpc_error(c.models)
                assert e.code == "UNAUTHENTICATED" and text in e.message
                assert "authorization" in e.message
                e = rpc_error(c.watch, "0" * 26)  # server streaming is guarded too
                assert e.code == "UNAUTHENTICATED"
        with grpc.insecure_channel(target) as ch:  # wrong scheme
            with pytest.raises(grpc.RpcError) as ei:
                pb_grpc.RestorationStub(ch).ListModels(pb.ListModelsRequest(),
                                                       metadata=[("authorization", "Basic s3cret-token")])
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with EmrestoreClient(target, token="s3cret-token") as c:
            assert [m["name"] for m in c.models()] == ["iso3"]
            assert list(c.list_jobs(page_size=5)) is not None
    finally:
        server.stop(0).wait()


def test_auth_off_needs_no_token(served):
    _, client, _ = served
    assert [m["name"] for m in client.models()] == ["iso3"]


def test_tls_with_self_signed_certificate(world, served, tmp_path):
    mgr = served[0]
    cert, key = make_self_signed(tmp_path)
    server, port = start_server(mgr, token="tls-token", tls_cert=cert, tls_key=key)
    target = f"127.0.0.1:{port}"
    try:
        with EmrestoreClient(target, token="tls-token", tls_ca=cert) as c:
            assert c.health() == "SERVING"
            assert c.model("iso3")["task"] == "isotropic"
        with EmrestoreClient(target, token="tls-token", tls_ca=cert, tls_server_name="localhost") as c:
            assert c.models()[0]["name"] == "iso3"
        with EmrestoreClient(target, token="tls-token", timeout=3) as c:  # plaintext to a TLS port
            assert rpc_error(c.models).code == "UNAVAILABLE"
        with EmrestoreClient(target, token="tls-token", tls_ca=True, timeout=3) as c:  # untrusted cert
            assert rpc_error(c.models).code == "UNAVAILABLE"
    finally:
        server.stop(0).wait()
    with pytest.raises(ValueError, match="tls-key"):
        build_server(mgr, "127.0.0.1", 0, tls_cert=cert)


# ----------------------------------------------------------------------------- happy paths
def test_restore_job_get_list_cancel(world, served):
    mgr, c, _ = served
    job = c.restore_region(world["src"], "iso3", f"file://{world['root']}/out-a", (0, 0, 0), (64, 64, 8),
                           steps=2, seed=7, labels={"who": "test"},
                           register_in=["lab-neuroglancer"])
    assert len(job.job_id) == 26 and job.kind == "restore" and job.state == "RUNNING" and not job.done
    assert job.blocks_total >= 1 and job.blocks_done == 0 and job.created > 0
    assert job.spec["source"] == world["src"] and job.spec["steps"] == 2 and job.spec["seed"] == 7
    assert isinstance(job.spec["steps"], int) and isinstance(job.spec["mip"], int)
    assert job.spec["region_stop_xyz"] == [64, 64, 8] and job.spec["labels"] == {"who": "test"}
    assert job.spec["register_in"] == ["lab-neuroglancer"] and job.owner == ""
    assert job.spec["plan"]["scale_xyz"] == [1, 1, 3] and "blocks" not in job.spec["plan"]
    assert [e["kind"] for e in job.event_log][:1] == ["created"]
    assert job.outputs["output"].endswith("out-a")
    got = c.get_job(job.job_id)
    assert got.job_id == job.job_id and got.state == "RUNNING"
    assert c.get_job("jobs/" + job.job_id).job_id == job.job_id  # resource name accepted
    whole = c.restore_dataset(world["src"], "iso3", f"file://{world['root']}/out-b", incremental=True)
    assert whole.spec["region_start_xyz"] is None and whole.spec["incremental"] is True
    # ListJobs: newest first, pages of one, state filter
    ids = [j.job_id for j in c.list_jobs(page_size=1)]
    assert ids.index(whole.job_id) < ids.index(job.job_id)
    resp = c.stub.ListJobs(pb.ListJobsRequest(page_size=1))
    assert len(resp.jobs) == 1 and resp.next_page_token
    cancelled = c.cancel(job.job_id)
    assert cancelled.state == "CANCELLED" and cancelled.done
    assert job.job_id in mgr.executor.cancelled
    assert job.job_id in [j.job_id for j in c.list_jobs(state="CANCELLED")]
    assert job.job_id not in [j.job_id for j in c.list_jobs(state="running")]
    e = rpc_error(c.cancel, job.job_id)
    assert e.code == "FAILED_PRECONDITION" and "job_id" in e.message
    c.cancel(whole.job_id)


def test_train_job(world, served):
    _, c, _ = served
    job = c.train(world["src"], f"{world['models']}/trained", steps=5, preset="tiny",
                  start_xyz=(0, 0, 0), stop_xyz=(64, 64, 8))
    assert job.kind == "train" and job.state == "RUNNING" and job.spec["steps"] == 5
    assert job.outputs["output_model"].endswith("trained")
    c.cancel(job.job_id)
    ft = c.train(world["src"], f"{world['models']}/ft", base_model="iso3", steps=3)
    assert ft.spec["base_model"].endswith("iso3")
    c.cancel(ft.job_id)
    named = c.train(world["src"], "named", steps=2)  # a bare name: in the server's model directory
    assert named.outputs["output_model"] == world["models"] + "/named"
    c.cancel(named.job_id)


def test_models(world, served):
    _, c, _ = served
    (m,) = c.models()
    assert m["name"] == "iso3" and m["task"] == "isotropic" and m["factor"] == 3 and m["preset"] == "tiny"
    assert m["voxel_size_nm"] == [8, 8, 24] and m["num_parameters"] > 0 and m["url"].endswith("iso3")
    assert c.model("iso3")["url"] == m["url"]
    assert c.model(m["url"])["name"] == "iso3"


def test_cutout(world, served):
    _, c, _ = served
    mean, std, meta = c.cutout(world["src"], "iso3", (8, 8, 2), (40, 24, 5), steps=1, samples=2, seed=3)
    assert mean.shape == (7, 16, 32) and mean.dtype == np.uint8   # (5-2-1)·3+1 sections
    assert std is not None and std.shape == mean.shape and std.dtype == np.float32
    assert meta["output_start_xyz"] == (8, 8, 2 * 3 + 1) and meta["resolution_nm_xyz"] == (8.0, 8.0, 8.0)
    mean1, std1, _ = c.cutout(world["src"], "iso3", (8, 8, 2), (40, 24, 5), steps=1, seed=3)
    assert std1 is None and mean1.shape == mean.shape


def test_cutout_over_the_size_limit(world, served):
    _, c, _ = served
    # source voxels alone over the limit (50000): checked before anything is read
    e = rpc_error(c.cutout, world["src"], "iso3", (0, 0, 0), (64, 64, 60))
    assert e.code == "RESOURCE_EXHAUSTED" and "50000" in e.message and "region" in e.message
    # source under, restored output (×3 in z) over the limit: the manager's check
    e = rpc_error(c.cutout, world["src"], "iso3", (0, 0, 0), (64, 64, 8))
    assert e.code == "RESOURCE_EXHAUSTED" and "50000" in e.message


def test_watch_streams_progress_to_terminal(world, served):
    mgr, c, _ = served
    job = c.restore_dataset(world["src"], "iso3", f"file://{world['root']}/out-w", steps=1)
    n = job.blocks_total
    updates = []

    def drive():
        for i in range(n):
            time.sleep(0.3)
            mgr.ledger.mark_block_done(job.job_id, i, {"voxels": 1})

    t = threading.Thread(target=drive)
    t.start()
    final = c.wait(job.job_id, progress=updates.append, timeout=30)
    t.join()
    assert final.state == "SUCCEEDED" and final.done and final.blocks_done == n
    assert updates[0].new_events and updates[-1].done and updates[-1].state == "SUCCEEDED"
    done_counts = [u.blocks_done for u in updates]
    assert done_counts == sorted(done_counts) and done_counts[-1] == n
    seen = [e for u in updates for e in u.new_events]
    assert len(seen) == len(set(seen))  # each event once
    # watching a finished job: one update, done
    (u,) = list(c.watch(job.job_id))
    assert u.done and u.state == "SUCCEEDED"


def test_watch_stops_promptly_when_client_cancels(world, served):
    mgr, c, _ = served
    job = c.restore_dataset(world["src"], "iso3", f"file://{world['root']}/out-x", steps=1)
    mgr.watch_ended.clear()
    it = c.watch(job.job_id)
    first = next(it)
    assert first.state == "RUNNING" and not first.done
    it.close()  # cancels the call
    assert mgr.watch_ended.wait(5), "server-side watch did not stop after the client cancelled"
    c.cancel(job.job_id)


def test_graceful_stop_sets_not_serving(served):
    mgr = served[0]
    server, port = start_server(mgr)
    hs = health_servicer(server)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        assert stub.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
        hs.enter_graceful_shutdown()
        assert stub.Check(health_pb2.HealthCheckRequest(service="emrestore.v1.Restoration")).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
    server.stop(0).wait()


# ----------------------------------------------------------------------------- malformed requests
def _box(start, stop):
    return pb.Box(start=pb.Vec3(x=start[0], y=start[1], z=start[2]), stop=pb.Vec3(x=stop[0], y=stop[1], z=stop[2]))


MALFORMED_RESTORE = [
    ("missing source", dict(source=""), "INVALID_ARGUMENT", "source"),
    ("missing model", dict(model=""), "INVALID_ARGUMENT", "model"),
    ("missing output", dict(output=""), "INVALID_ARGUMENT", "output"),
    ("no region", dict(region=None), "INVALID_ARGUMENT", "region"),
    ("whole=false", dict(region=None, whole=False), "INVALID_ARGUMENT", "whole"),
    ("start >= stop", dict(region=_box((10, 0, 0), (10, 64, 8))), "INVALID_ARGUMENT", "region"),
    ("missing stop", dict(region=pb.Box(start=pb.Vec3())), "INVALID_ARGUMENT", "region.stop"),
    ("negative start", dict(region=_box((-1, 0, 0), (10, 64, 8))), "INVALID_ARGUMENT", "region.start"),
    ("outside the layer", dict(region=_box((0, 0, 0), (640, 64, 8))), "INVALID_ARGUMENT", "region"),
    ("negative steps", dict(steps=-3), "INVALID_ARGUMENT", "steps"),
    ("too many steps", dict(steps=5000), "INVALID_ARGUMENT", "steps"),
    ("negative samples", dict(samples=-1), "INVALID_ARGUMENT", "samples"),
    ("negative seed", dict(seed=-1), "INVALID_ARGUMENT", "seed"),
    ("negative parallelism", dict(parallelism=-2), "INVALID_ARGUMENT", "parallelism"),
    ("negative mip", dict(mip=-1), "INVALID_ARGUMENT", "mip"),
    ("unknown sampler", dict(sampler="euler"), "INVALID_ARGUMENT", "sampler"),
    ("output is source", dict(output="SRC"), "INVALID_ARGUMENT", "output"),
    ("target platform from the request", dict(register_in=[pb.RegisterTarget(platform="catmaid", name="x")]),
     "PERMISSION_DENIED", "register_in[0].platform"),
    ("target url from the request", dict(register_in=[pb.RegisterTarget(url="file:///etc/x.conf", name="x")]),
     "PERMISSION_DENIED", "register_in[0].url"),
    ("target options from the request", dict(register_in=[pb.RegisterTarget(options={"manage_py": "-c1"}, name="x")]),
     "PERMISSION_DENIED", "register_in[0].options"),
    ("target without a name", dict(register_in=[pb.RegisterTarget()]), "INVALID_ARGUMENT", "register_in[0].name"),
    ("target name not a name", dict(register_in=[pb.RegisterTarget(name="../x")]), "INVALID_ARGUMENT",
     "register_in[0]"),
    ("unknown estimate", dict(estimate="median"), "INVALID_ARGUMENT", "estimate"),
    ("unknown model", dict(model="nope"), "NOT_FOUND", "model"),
    ("missing source layer", dict(source="file:///nonexistent/layer"), "NOT_FOUND", "source"),
]


@pytest.mark.parametrize("what,change,code,field", MALFORMED_RESTORE, ids=[m[0] for m in MALFORMED_RESTORE])
def test_malformed_restore_requests(world, served, what, change, code, field):
    _, c, _ = served
    kw = dict(change)
    if kw.get("output") == "SRC":
        kw["output"] = world["src"]
    req = restore_req(world)
    for k, v in kw.items():
        if v is None:
            req.ClearField(k)
        elif k == "register_in":
            req.register_in.extend(v)
        elif isinstance(v, pb.Box):
            req.region.CopyFrom(v)
        else:
            setattr(req, k, v)
    with pytest.raises(grpc.RpcError) as ei:
        c.stub.CreateRestoreJob(req, timeout=30)
    assert ei.value.code().name == code, ei.value.details()
    assert ei.value.details().startswith(field + ":") or f"{field}:" in ei.value.details(), ei.value.details()


MALFORMED_OTHER = [
    ("GetJob", pb.GetJobRequest(), "INVALID_ARGUMENT", "job_id"),
    ("GetJob", pb.GetJobRequest(job_id="not-a-job"), "INVALID_ARGUMENT", "job_id"),
    ("GetJob", pb.GetJobRequest(job_id="01" + "0" * 24), "NOT_FOUND", "job_id"),
    ("CancelJob", pb.CancelJobRequest(job_id="01" + "0" * 24), "NOT_FOUND", "job_id"),
    ("ListJobs", pb.ListJobsRequest(page_size=-1), "INVALID_ARGUMENT", "page_size"),
    ("ListJobs", pb.ListJobsRequest(state=99), "INVALID_ARGUMENT", "state"),
    ("ListJobs", pb.ListJobsRequest(page_token="bogus!"), "INVALID_ARGUMENT", "page_token"),
    ("GetModel", pb.GetModelRequest(), "INVALID_ARGUMENT", "model"),
    ("GetModel", pb.GetModelRequest(model="missing"), "NOT_FOUND", "model"),
    ("CreateTrainJob", pb.CreateTrainJobRequest(output_model="m"), "INVALID_ARGUMENT", "source"),
    ("CreateTrainJob", pb.CreateTrainJobRequest(source="file:///x"), "INVALID_ARGUMENT", "output_model"),
    ("CreateTrainJob", pb.CreateTrainJobRequest(source="SRC", output_model="m", steps=-5),
     "INVALID_ARGUMENT", "steps"),
    ("CreateTrainJob", pb.CreateTrainJobRequest(source="SRC", output_model="m", preset="huge"),
     "INVALID_ARGUMENT", "preset"),
    ("CreateTrainJob", pb.CreateTrainJobRequest(source="SRC", output_model="m", target="file:///t"),
     "INVALID_ARGUMENT", "target"),
    ("Cutout", pb.CutoutRequest(source="SRC", model="iso3"), "INVALID_ARGUMENT", "region"),
    ("Cutout", pb.CutoutRequest(source="SRC", model="iso3", region=_box((0, 0, 0), (8, 8, 2)), samples=-2),
     "INVALID_ARGUMENT", "samples"),
    ("Cutout", pb.CutoutRequest(source="SRC", model="iso3", region=_box((0, 0, 0), (8, 8, 2)), sampler="x"),
     "INVALID_ARGUMENT", "sampler"),
    ("Cutout", pb.CutoutRequest(source="SRC", model="iso3", region=_box((0, 0, 0), (8, 8, 1))),
     "INVALID_ARGUMENT", "region"),
]


@pytest.mark.parametrize("method,req,code,field", MALFORMED_OTHER,
                         ids=[f"{m[0]}-{m[3]}-{i}" for i, m in enumerate(MALFORMED_OTHER)])
def test_malformed_other_requests(world, served, method, req, code, field):
    _, c, _ = served
    req = type(req).FromString(req.SerializeToString())
    if getattr(req, "source", None) == "SRC":
        req.source = world["src"]
    with pytest.raises(grpc.RpcError) as ei:
        getattr(c.stub, method)(req, timeout=30)
    assert ei.value.code().name == code, ei.value.details()
    assert f"{field}:" in ei.value.details(), ei.value.details()


def test_watch_unknown_job_is_not_found(served):
    _, c, _ = served
    e = rpc_error(c.watch, "01" + "0" * 24)
    assert e.code == "NOT_FOUND" and "job_id" in e.message
    e = rpc_error(lambda: list(c.list_jobs(state="DONE")))
    assert e.code == "INVALID_ARGUMENT" and "state" in e.message


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def real(tmp_path_factory, tiny_iso_model):
    """The real JobManager + LocalExecutor (worker subprocesses) and the session's trained tiny model."""
    import shutil

    from service.jobs.executors import LocalExecutor
    root = tmp_path_factory.mktemp("e2e")
    src, vol = make_source(str(root))
    models = str(root / "models")
    shutil.copytree(tiny_iso_model[0][len("file://"):], os.path.join(models, "iso3"))
    ledger = f"file://{root}/ledger"
    ex = LocalExecutor(ledger, default_parallelism=2, log_dir=str(root / "logs"))
    # 16-px chunks: 32-px blocks then write mip 1 too, so a 64-px region is several tasks
    mgr = JobManager(ledger, ex, models_dir=models, poll_interval_s=0.2, block_size_xyz=(32, 32, 0),
                     output_chunk_xyz=(16, 16, 15))
    mgr.start()
    server, port = start_server(mgr)
    client = EmrestoreClient(f"127.0.0.1:{port}", timeout=60)
    yield {"root": root, "src": src, "vol": vol, "mgr": mgr, "client": client}
    client.close()
    server.stop(0).wait()
    mgr.close()


def _logs(root) -> str:
    d = root / "logs"
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(d.glob("*.log"))) if d.exists() else ""


def test_e2e_region_job_succeeds_and_watch_sees_progress(real):
    from service.volume.precomputed import open_layer, read_zyx
    c, root = real["client"], real["root"]
    out = f"file://{root}/region-out"
    job = c.restore_region(real["src"], "iso3", out, (0, 0, 0), (64, 64, 8), steps=2, parallelism=1)
    assert job.blocks_total >= 2
    updates = []
    final = c.wait(job.job_id, progress=updates.append, timeout=90)
    assert final.state == "SUCCEEDED", final.message + _logs(root)
    assert final.blocks_done == final.blocks_total == job.blocks_total
    assert updates[-1].done and all(not u.done for u in updates[:-1])
    assert len({u.blocks_done for u in updates}) >= 2  # progress was seen, not just the end
    info = open_layer(out)
    data = read_zyx(out, info.start_zyx, info.stop_zyx)
    assert data.shape == ((SHAPE_ZYX[0] - 1) * 3 + 1, 64, 64) and data.std() > 0
    # the source sections come back (roughly) at output z = 3·i
    src = real["vol"].astype(float)
    assert np.corrcoef(data[::3].astype(float).ravel(), src.ravel())[0, 1] > 0.5


def test_e2e_whole_dataset_train_and_cancel(real):
    from service.volume.precomputed import open_layer
    c, root = real["client"], real["root"]
    whole = c.restore_dataset(real["src"], "iso3", f"file://{root}/whole-out", steps=1, parallelism=1)
    trained = c.train(real["src"], "from-layer", steps=3, batch_size=2, patch=32)
    victim = c.restore_dataset(real["src"], "iso3", f"file://{root}/cancel-out", steps=50, parallelism=1)
    stream = c.watch(victim.job_id)
    assert next(stream).state in ("PENDING", "RUNNING")
    cancelled = c.cancel(victim.job_id)
    assert cancelled.state == "CANCELLED"
    rest = list(stream)  # the stream ends at the terminal state
    assert rest and rest[-1].state == "CANCELLED" and rest[-1].done
    final = c.wait(whole.job_id, timeout=90)
    assert final.state == "SUCCEEDED", final.message + _logs(root)
    assert final.spec["region_start_xyz"] is None
    assert open_layer(f"file://{root}/whole-out").size_xyz == (64, 64, (SHAPE_ZYX[0] - 1) * 3 + 1)
    assert c.get_job(victim.job_id).state == "CANCELLED"
    final = c.wait(trained.job_id, timeout=90)
    assert final.state == "SUCCEEDED", final.message + _logs(root)
    model = c.model("from-layer")
    assert model["task"] == "isotropic" and model["factor"] == 3 and model["training"]["steps"] == 3
    assert "from-layer" in [m["url"].rsplit("/", 1)[-1] for m in c.models()]
    states = {j.job_id: j.state for j in c.list_jobs()}
    assert states[whole.job_id] == "SUCCEEDED" and states[victim.job_id] == "CANCELLED"


def test_new_events_follow_the_managers_sliding_window():
    from service.api.servicer import _new_events
    assert _new_events(["a", "b"], None) == ["a", "b"]
    assert _new_events(["a", "b", "c"], ["a", "b"]) == ["c"]
    assert _new_events(["b", "c", "d"], ["a", "b", "c"]) == ["d"]       # oldest dropped, one new
    assert _new_events(["x", "y", "x"], ["x"]) == ["y", "x"]             # repeated messages
    assert _new_events(["x", "y"], ["x", "y"]) == []
