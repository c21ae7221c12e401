"""The HTTP bridge over real HTTP on loopback (uvicorn in a thread) in front of the real gRPC
service (real server on 127.0.0.1, real JobManager + LocalExecutor, a tiny untrained model)."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from connector.bridge import BridgeServer, create_app
from connector.bridge_protocol import http_status_for, iter_sse, parse_restore_request
from connector.bridge_security import BridgeConfig
from connector.util import ConnectorError
from tests.service_helpers import RunningService

pytestmark = pytest.mark.timeout(180)

BRIDGE_TOKEN = "bridge-token-123"
GRPC_TOKEN = "grpc-token-456"
ORIGIN = "http://viewer.allowed.test"
VOXEL_NM = (8, 8, 24)


def make_source_and_model(root) -> tuple[str, str, np.ndarray]:
    """A 9-section 64×64 anisotropic (×3) layer and an untrained tiny isotropic ×3 model "iso3"."""
    from service.engine import phantom
    from service.engine.model import RestorationModel
    from service.engine.normalize import IntensityNorm
    from service.engine.tasks import make_task
    from service.volume import precomputed as pc

    vol = phantom.to_uint8(phantom.make_phantom((25, 64, 64), seed=1))[::3]
    src = f"file://{root}/data/src"
    pc.create_source_layer(src, vol, VOXEL_NM, chunk_size_xyz=(32, 32, 3))
    m = RestorationModel.create(make_task("isotropic", 3), "tiny", voxel_size_nm=VOXEL_NM, seed=0)
    m.name = "iso3"
    m.input_norm = m.target_norm = IntensityNorm.from_volume(vol)
    m.save(f"file://{root}/models/iso3")
    return src, f"file://{root}/models", vol


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("bridge")
    src, models_dir, _ = make_source_and_model(root)
    svc = RunningService(root, models_dir, token=GRPC_TOKEN)
    from connector.targets import parse_targets
    targets = parse_targets({"lab-ng": {"platform": "neuroglancer", "url": f"file://{root}/state.json"}})
    cfg = BridgeConfig(grpc_target=svc.target, tokens=[BRIDGE_TOKEN], allow_origins=[ORIGIN], grpc_token=GRPC_TOKEN,
                       targets=targets)
    srv = BridgeServer(create_app(cfg)).start()
    yield {"svc": svc, "bridge": srv, "src": src, "root": root}
    srv.stop()
    svc.close()


def auth(token=BRIDGE_TOKEN, **extra):
    return {"Authorization": f"Bearer {token}", **extra}


def test_health_models_and_auth(stack):
    url = stack["bridge"].url
    r = httpx.get(f"{url}/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "grpc": "SERVING"}
    r = httpx.get(f"{url}/v1/models")
    assert r.status_code == 401
    assert r.json()["error"] == "UNAUTHENTICATED" and r.json()["field"] == "Authorization"
    assert "missing bearer token" in r.json()["message"]
    r = httpx.get(f"{url}/v1/models", headers=auth("wrong"))
    assert r.status_code == 401 and r.json()["message"] == "invalid bearer token"
    r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Basic {BRIDGE_TOKEN}"})
    assert r.status_code == 401
    r = httpx.get(f"{url}/v1/models", headers=auth())
    assert r.status_code == 200
    models = r.json()["models"]
    assert [m["name"] for m in models] == ["iso3"] and models[0]["task"] == "isotropic"
    r = httpx.get(f"{url}/v1/nope", headers=auth())
    assert r.status_code == 404 and r.json()["error"] == "NOT_FOUND"
    r = httpx.get(f"{url}/assets/webknossos_restore.user.js")
    assert r.status_code == 200 and "apiReady(3)" in r.text


def test_cors_allow_list_and_preflight(stack):
    url = stack["bridge"].url
    pre = httpx.options(f"{url}/v1/restore-region", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    r = httpx.get(f"{url}/v1/models", headers=auth(Origin=ORIGIN))
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    for method in ("OPTIONS", "GET"):
        r = httpx.request(method, f"{url}/v1/models", headers=auth(Origin="https://evil.example"))
        assert r.status_code == 403
        body = r.json()
        assert body["error"] == "ORIGIN_NOT_ALLOWED" and body["field"] == "Origin"
        assert "https://evil.example" in body["message"] and "--allow-origin" in body["message"]
        assert "access-control-allow-origin" not in r.headers
    # 401s for an allowed origin still carry CORS headers (the page can read the error)
    r = httpx.get(f"{url}/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN


@pytest.mark.parametrize("body, field, status", [
    ("not json", "body", 400),
    ({"model": "iso3", "region": {"start": [0, 0, 0], "stop": [8, 8, 3]}}, "source", 400),
    ({"source": "file:///x", "region": {"start": [0, 0, 0], "stop": [8, 8, 3]}}, "model", 400),
    ({"source": "file:///x", "model": "iso3"}, "region", 400),
    ({"source": "file:///x", "model": "iso3", "region": {"start": [0, 0], "stop": [8, 8, 3]}}, "region.start", 400),
    ({"source": "file:///x", "model": "iso3", "region": {"start": [5, 0, 0], "stop": [5, 8, 3]}}, "region", 400),
    ({"source": "file:///x", "model": "iso3", "region": {"start": [0, 0, 0], "stop": [8, 8, 3]},
      "samples": 1, "uncertainty": 3}, "uncertainty", 400),
    ({"source": "file:///x", "model": "iso3", "region": {"start": [0, 0, 0], "stop": [8, 8, 3]},
      "register_in": [{"platform": "neuroglancer", "url": "file:///etc/important.conf"}]}, "register_in[0]", 400),
    ({"source": "file:///x", "model": "iso3", "region": {"start": [0, 0, 0], "stop": [8, 8, 3]},
      "register_in": ["lab-ng", "not-configured"]}, "register_in[1]", 400),
    ({"source": "file:///x", "model": "iso3", "region": {"start": [0, 0, 0], "stop": [8, 8, 3]},
      "register_in": "lab-ng"}, "register_in", 400),
])
def test_bad_requests_name_the_field(stack, body, field, status):
    url = stack["bridge"].url
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{url}/v1/restore-region", content=content,
                   headers=auth(**{"Content-Type": "application/json"}))
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and r.json()["error"] == "INVALID_ARGUMENT" and r.json()["message"]


def test_service_errors_map_to_http(stack):
    url, src, root = stack["bridge"].url, stack["src"], stack["root"]
    post = lambda body: httpx.post(f"{url}/v1/restore-region", json=body, headers=auth())  # noqa: E731
    r = post({"source": f"file://{root}/data/missing", "model": "iso3",
              "region": {"start": [0, 0, 0], "stop": [32, 32, 9]}})
    assert r.status_code == 404 and r.json()["error"] == "NOT_FOUND" and r.json()["field"] == "source"
    assert "no Precomputed info file" in r.json()["message"]
    r = post({"source": src, "model": "iso3", "region": {"start": [0, 0, 0], "stop": [64, 64, 40]}})
    assert r.status_code == 400 and r.json()["field"] == "region"
    assert "outside the source bounds" in r.json()["message"]
    r = post({"source": src, "model": "no-such-model", "region": {"start": [0, 0, 0], "stop": [32, 32, 9]}})
    assert r.status_code == 404 and r.json()["field"] == "model"
    r = httpx.get(f"{url}/v1/jobs/not-a-job", headers=auth())
    assert r.status_code == 400 and r.json()["field"] == "job_id"
    r = httpx.get(f"{url}/v1/jobs/{'0' * 26}", headers=auth())
    assert r.status_code == 404 and r.json()["field"] == "job_id"
    r = httpx.get(f"{url}/v1/jobs/{'0' * 26}/events", headers=auth())
    assert r.status_code == 404


def test_status_mapping():
    assert http_status_for("INVALID_ARGUMENT") == 400
    assert http_status_for("NOT_FOUND") == 404
    assert http_status_for("UNAUTHENTICATED") == 401
    assert http_status_for("FAILED_PRECONDITION") == 409
    assert http_status_for("RESOURCE_EXHAUSTED", "region: cutout would produce 9000000 voxels; the limit is 4194304") == 413
    assert http_status_for("RESOURCE_EXHAUSTED", "too many concurrent jobs; try again later") == 429
    assert http_status_for("UNAVAILABLE") == 503
    assert http_status_for("INTERNAL") == 500


def test_default_outputs_next_to_source():
    kw = parse_restore_request({"source": "gs://lab/em/raw", "model": "m",
                                "region": {"start": [0, 0, 0], "stop": [1, 1, 1]}, "samples": 2})
    assert kw["output"] == f"gs://lab/em/raw_restored_{kw['rid']}"
    assert kw["uncertainty"] == f"gs://lab/em/raw_uncertainty_{kw['rid']}"
    kw = parse_restore_request({"source": "precomputed://gs://lab/em/raw/", "model": "m", "start": [0, 0, 0],
                                "stop": [1, 1, 1], "output": "gs://lab/out"})
    assert kw["output"] == "gs://lab/out" and kw["uncertainty"] is None and kw["source"] == "gs://lab/em/raw/"
    # one sample: the uncertainty layer when asked for (the model's error head; the server checks the model)
    kw = parse_restore_request({"source": "gs://lab/em/raw", "model": "m", "start": [0, 0, 0], "stop": [1, 1, 1],
                                "uncertainty": True})
    assert kw["samples"] == 0 and kw["uncertainty"] == f"gs://lab/em/raw_uncertainty_{kw['rid']}"
    with pytest.raises(ConnectorError):
        BridgeConfig(grpc_target="h:1", tokens=[]).validate()
    with pytest.raises(ConnectorError, match="allow_origin"):
        BridgeConfig(grpc_target="h:1", tokens=["t"], allow_origins=["https://a.org/path"]).validate()


def test_restore_region_job_and_events(stack):
    from service.volume import precomputed as pc
    url, src = stack["bridge"].url, stack["src"]
    r = httpx.post(f"{url}/v1/restore-region", headers=auth(Origin=ORIGIN), json={
        "source": src, "model": "iso3", "region": {"start": [0, 0, 0], "stop": [32, 32, 9]},
        "samples": 2, "steps": 1})
    assert r.status_code == 202, r.text
    body = r.json()
    job = body["job"]
    assert r.headers["location"] == f"/v1/jobs/{job['job_id']}"
    assert body["output"].startswith(src + "_restored_") and body["uncertainty_output"].startswith(src + "_uncertainty_")
    assert job["state"] in ("PENDING", "RUNNING") and job["region"] == {"start": [0, 0, 0], "stop": [32, 32, 9]}
    # server-sent events until the terminal state
    events = []
    with httpx.stream("GET", f"{url}{body['links']['events']}", headers=auth(Origin=ORIGIN), timeout=120) as s:
        assert s.status_code == 200
        assert s.headers["content-type"].startswith("text/event-stream")
        assert s.headers["access-control-allow-origin"] == ORIGIN
        for event, data in iter_sse(s.iter_lines()):
            events.append((event, data))
            if event in ("done", "error"):
                break
    kinds = [e for e, _ in events]
    assert kinds[0] == "progress" and kinds[-1] == "done", kinds
    final = events[-1][1]
    assert final["state"] == "SUCCEEDED" and final["progress"] == 1.0 and final["blocks_done"] == final["blocks_total"]
    assert len({d["blocks_done"] for e, d in events if e == "progress"}) >= 2  # progress was streamed
    r = httpx.get(f"{url}/v1/jobs/{job['job_id']}", headers=auth())
    assert r.status_code == 200 and r.json()["state"] == "SUCCEEDED"
    assert r.json()["outputs"] == {"output": body["output"], "uncertainty_output": body["uncertainty_output"]}
    info = pc.open_layer(body["output"])
    assert info.resolution_nm_xyz == (8.0, 8.0, 8.0)
    restored = pc.read_zyx(body["output"], info.start_zyx, (info.stop_zyx[0], 32, 32), fill_missing=True)
    assert restored.std() > 0
    # a finished job: events give one progress + done at once; cancelling it is a conflict (409)
    with httpx.stream("GET", f"{url}/v1/jobs/{job['job_id']}/events", headers=auth(), timeout=30) as s:
        again = [e for e, _ in iter_sse(s.iter_lines())]
    assert again == ["progress", "done"]
    r = httpx.post(f"{url}/v1/jobs/{job['job_id']}/cancel", headers=auth())
    assert r.status_code == 409 and r.json()["error"] == "FAILED_PRECONDITION" and r.json()["field"] == "job_id"


def test_wrong_grpc_token_is_reported(stack):
    cfg = BridgeConfig(grpc_target=stack["svc"].target, tokens=[BRIDGE_TOKEN], allow_origins=[], grpc_token="bad")
    with BridgeServer(create_app(cfg)) as srv:
        r = httpx.get(f"{srv.url}/v1/models", headers=auth())
    assert r.status_code == 401 and r.json()["error"] == "UNAUTHENTICATED"
    assert "invalid bearer token" in r.json()["message"]


OUT_OF_RANGE = [  # (what the request changes, the field refused, a piece of the limit's text)
    ({"samples": 65}, "samples", "[0, 64]"),
    ({"samples": -1}, "samples", "[0, 64]"),
    ({"steps": 1001}, "steps", "[0, 1000]"),
    ({"seed": -1}, "seed", f"[0, {2 ** 63 - 1}]"),
    ({"mip": 17}, "mip", "[0, 16]"),
    ({"sampler": "euler"}, "sampler", "allowed: ddim, ddpm, dpmpp2m"),
    ({"start": [-1, 0, 0]}, "region.start", "≥ 0"),
    ({"start": [8, 0, 0]}, "region", "must be < stop"),
    ({"register_in": ["../x"]}, "register_in[0]", "not a target name"),
]


@pytest.mark.parametrize("change, field, limit", OUT_OF_RANGE, ids=[c[1] + str(i) for i, c in enumerate(OUT_OF_RANGE)])
def test_bridge_and_grpc_refuse_the_same_values_with_the_same_limits(stack, change, field, limit):
    """Issue 22: one validation of the request fields (service/jobs/spec.py): the bridge and the
    gRPC server refuse the same out-of-range values with the same field, limit and message."""
    from service.api.client import EmrestoreClient
    from service.errors import EmrestoreError
    req = {"source": stack["src"], "model": "iso3", "start": [0, 0, 0], "stop": [8, 8, 3],
           "output": f"file://{stack['root']}/data/same_limits", **change}
    r = httpx.post(f"{stack['bridge'].url}/v1/restore-region", json=req, headers=auth())
    body = r.json()
    kw = {k: req[k] for k in ("samples", "steps", "seed", "mip", "sampler", "register_in") if k in req}
    with EmrestoreClient(stack["svc"].target, token=GRPC_TOKEN) as c, pytest.raises(EmrestoreError) as e:
        c.restore_region(req["source"], req["model"], req["output"], req["start"], req["stop"], **kw)
    assert e.value.code == "INVALID_ARGUMENT" and e.value.field == field and limit in e.value.reason, e.value
    if field == "register_in[0]":  # the bridge refuses names it has not configured first
        assert r.status_code == 400 and body["field"] == field
        return
    assert (r.status_code, body["error"], body["field"]) == (400, "INVALID_ARGUMENT", field), body
    assert body["message"] == e.value.reason


def _parser():
    from connector.commands import commands
    from service.commandline import build_parser
    return build_parser(commands())  # the plug-in's commands alone, as the tree adds them


def test_cli_commands_parse_and_validate(stack, tmp_path, monkeypatch):
    ap = _parser()
    a = ap.parse_args(["bridge", "--grpc", "127.0.0.1:1", "--port", "0", "--allow-origin", "https://a.org",
                       "https://b.org", "--allow-origin", "http://c.org:8000"])
    assert [o for g in a.allow_origin for o in g] == ["https://a.org", "https://b.org", "http://c.org:8000"]
    monkeypatch.delenv("EMRESTORE_BRIDGE_TOKEN", raising=False)
    with pytest.raises(ConnectorError, match="--token-file"):
        a.func(a)
    empty = tmp_path / "empty"
    empty.write_text("# no token here\n")
    a = ap.parse_args(["bridge", "--token-file", str(empty)])
    with pytest.raises(ConnectorError, match="bearer token"):
        a.func(a)
    tok = tmp_path / "tok"
    tok.write_text("t0k\n")
    bad = tmp_path / "targets.json"
    bad.write_text(json.dumps({"targets": {"x": {"platform": "catmaid", "url": "https://cm", "manage_py": "/m"}}}))
    for path, field in ((str(tmp_path / "missing.json"), "--targets"), (str(bad), "targets.x.manage_py")):
        a = ap.parse_args(["bridge", "--token-file", str(tok), "--targets", path])
        with pytest.raises(ConnectorError) as e:
            a.func(a)
        assert e.value.field == field
    a = ap.parse_args(["view", "file:///nowhere", "--block", "1,2"])
    with pytest.raises(ConnectorError, match="--block"):
        a.func(a)
    src = stack["src"]
    a = ap.parse_args(["ng-state", "--restored", src, "--source", src, "--out", str(tmp_path / "s.json"),
                       "--public-url-map", f"file://{stack['root']}/data=https://files.example.org/em"])
    a.func(a)
    state = json.loads((tmp_path / "s.json").read_text())
    import neuroglancer  # the state file is a typed Neuroglancer state
    assert neuroglancer.ViewerState(state).layers[1].source[0].url == "precomputed://https://files.example.org/em/src"
    assert state["dimensions"]["z"] == [pytest.approx(24e-9), "m"]


def test_cli_bridge_serves(stack, tmp_path):
    """``emrestore bridge`` (through connector.commands) in a subprocess, on a free port."""
    import socket
    import subprocess
    import sys
    import time

    tok = tmp_path / "tokens"
    tok.write_text("cli-token\n")
    gtok = tmp_path / "grpc"
    gtok.write_text(GRPC_TOKEN + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import sys; from connector.commands import commands; from service.commandline import build_parser, main; "
            "sys.exit(main(build_parser(commands()), sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "bridge", "--grpc", stack["svc"].target, "--port", str(port),
                             "--token-file", str(tok), "--grpc-token-file", str(gtok), "--allow-origin", ORIGIN],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t_end = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=auth("cli-token", Origin=ORIGIN))
                break
            except httpx.TransportError:
                if time.monotonic() > t_end or proc.poll() is not None:
                    raise AssertionError(proc.communicate(timeout=5)[0] if proc.poll() is not None else "no bridge")
                time.sleep(0.2)
        assert r.status_code == 200 and r.json()["models"][0]["name"] == "iso3"
        assert r.headers["access-control-allow-origin"] == ORIGIN
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_registration_is_decided_from_structured_event_kinds():
    """The bridge waits for one ``registered``/``registration_failed`` event per named target; event
    text (a message starting with "catmaid:") decides nothing."""
    from types import SimpleNamespace

    from connector.bridge_protocol import job_event_kinds, registration_pending

    spec = {"register_in": ["lab-ng", "lab-wk"]}
    job = SimpleNamespace(state="SUCCEEDED", spec=spec, events=["catmaid: registered", "neuroglancer: wrote"])
    assert job_event_kinds(job) == [] and registration_pending(job)
    job.events = [{"kind": "registered", "message": "lab-ng: …"}, {"kind": "progress", "message": "x"}]
    assert registration_pending(job)
    job.events.append({"kind": "registration_failed", "message": "lab-wk: …"})
    assert not registration_pending(job)
    assert not registration_pending(SimpleNamespace(state="SUCCEEDED", spec=spec, events=[],
                                                    event_kinds=["registered", "registered"]))
    assert not registration_pending(SimpleNamespace(state="FAILED", spec=spec, events=[]))
