"""Registration end to end: ``emrestore serve --targets FILE`` wiring (the entry point the service
loads without importing ``connector``), a real gRPC server, local worker processes, and a
Neuroglancer target that writes a state file. Requests name configured targets only."""

from __future__ import annotations

import json
import os
import shutil
from importlib.metadata import entry_points

import grpc
import pytest

from service.api.client import EmrestoreClient, EmrestoreError
from service.api.server import build_server
from service.jobs.executors import LocalExecutor
from service.jobs.manager import JobManager

from .test_api import make_source


def _hook_from_entry_point(targets_file: str):
    plugins = [ep for ep in entry_points(group="emrestore.completion_hooks") if ep.name == "registration"]
    assert plugins, "the connector package must provide the emrestore.completion_hooks entry point"
    return plugins[0].load()(targets_file)


@pytest.fixture(scope="module")
def registry_world(tmp_path_factory, tiny_iso_model):
    root = tmp_path_factory.mktemp("registration")
    src, _ = make_source(str(root))
    models = root / "models"
    shutil.copytree(tiny_iso_model[0][len("file://"):], models / "iso3")
    state = root / "viewer" / "state.json"
    targets = root / "targets.json"
    targets.write_text(json.dumps({"targets": {"lab-ng": {"platform": "neuroglancer", "url": f"file://{state}",
                                                             "public_url_map": f"file://{root}/=https://files.lab.example/em/"}}}))
    ledger = f"file://{root}/ledger"
    hook = _hook_from_entry_point(str(targets))
    mgr = JobManager(ledger, LocalExecutor(ledger, default_parallelism=1, log_dir=str(root / "logs")),
                     models_dir=str(models), poll_interval_s=0.2, completion_hooks=[hook])
    mgr.start()
    server, port = build_server(mgr, "127.0.0.1", 0)
    server.start()
    client = EmrestoreClient(f"127.0.0.1:{port}", timeout=60)
    yield {"root": root, "src": src, "state": state, "client": client}
    client.close()
    server.stop(0).wait()
    mgr.close()


def test_a_configured_target_is_registered_when_the_job_succeeds(registry_world):
    w = registry_world
    out = f"file://{w['root']}/restored"
    job = w["client"].restore_region(w["src"], "iso3", out, (0, 0, 0), (32, 32, 8), steps=2,
                                     register_in=["lab-ng"])
    final = w["client"].wait(job.job_id, timeout=120)
    assert final.state == "SUCCEEDED", final.message
    kinds = [e["kind"] for e in final.event_log]
    assert "registered" in kinds and "registration_failed" not in kinds, final.event_log
    state = json.loads(w["state"].read_text())
    sources = json.dumps(state["layers"])
    assert "https://files.lab.example/em/restored" in sources  # the layer, as a browser reaches it


def test_an_unknown_target_is_refused_before_anything_is_written(registry_world):
    w = registry_world
    out = w["root"] / "never-written"
    with pytest.raises(EmrestoreError) as ei:
        w["client"].restore_region(w["src"], "iso3", f"file://{out}", (0, 0, 0), (32, 32, 8), steps=2,
                                   register_in=["lab-ng", "attacker"])
    assert ei.value.code == "INVALID_ARGUMENT"
    assert "register_in[1]" in ei.value.message and "lab-ng" in ei.value.message
    assert not os.path.exists(out)


def test_a_request_cannot_describe_its_own_target(registry_world):
    w = registry_world
    out = w["root"] / "never-written-2"
    with pytest.raises(EmrestoreError) as ei:
        w["client"].restore_region(w["src"], "iso3", f"file://{out}", (0, 0, 0), (32, 32, 8), steps=2,
                                   register_in=[{"name": "lab-ng", "platform": "neuroglancer",
                                                 "url": f"file://{w['root']}/evil.json"}])
    assert ei.value.code == "PERMISSION_DENIED" and "register_in[0]" in ei.value.message
    assert not os.path.exists(out) and not os.path.exists(w["root"] / "evil.json")
