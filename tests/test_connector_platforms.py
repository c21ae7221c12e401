"""Registering restored layers: webKnossos and CATMAID against HTTP doubles on 127.0.0.1, the
Neuroglancer state target, the registry's error handling, and a real job whose ``register_in``
targets are registered when it succeeds."""

from __future__ import annotations

import json
import os
import sys

import httpx
import pytest

from connector import catmaid, webknossos
from connector.registry import register_job_outputs
from connector.static_server import StaticFileServer
from connector.util import ConnectorError
from tests.platform_doubles import CatmaidDouble, RunningService, WebknossosDouble, fake_manage_py, wait_for
from tests.test_connector_bridge import make_source_and_model

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("platforms")
    src, models_dir, _ = make_source_and_model(root)
    static = StaticFileServer()
    data_url = static.add("data", str(root / "data"))
    wk, cm = WebknossosDouble(), CatmaidDouble()
    yield {"root": root, "src": src, "models_dir": models_dir, "data_url": data_url, "wk": wk, "cm": cm,
           "map": f"file://{root}/data={data_url}"}
    for x in (static.close, wk.close, cm.close):
        x()


# ----------------------------------------------------------------------------- webKnossos
def test_webknossos_double_rejects_malformed_requests(env):
    wk = env["wk"]
    h = {"X-Auth-Token": wk.token}
    url = f"{wk.url}/api/v9/datasets/exploreAndAddRemote"
    assert httpx.post(url, json={"remoteUri": "x", "datasetName": "abc"}).status_code == 401
    r = httpx.post(url, json={"datasetName": "abc"}, headers=h)
    assert r.status_code == 400 and "remoteUri" in r.json()["messages"][0]["error"]
    r = httpx.post(url, json={"remoteUri": 5, "datasetName": "abc", "folderPath": 3}, headers=h)
    assert r.status_code == 400 and "folderPath" in r.json()["messages"][0]["error"]
    r = httpx.post(url, content=b"{", headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 400
    r = httpx.post(url, json={"remoteUri": f"{env['data_url']}/src", "datasetName": "a b"}, headers=h)
    assert r.status_code == 400 and "name" in r.json()["messages"][0]["error"]
    r = httpx.post(url, json={"remoteUri": f"{env['data_url']}/nothing", "datasetName": "abc"}, headers=h)
    assert r.status_code == 400 and "Exploring remote dataset failed" in r.json()["messages"][0]["error"]
    assert httpx.get(f"{wk.url}/api/v3/user", headers=h).status_code == 404  # only the documented version


def test_webknossos_register_layer(env):
    wk = env["wk"]
    res = webknossos.register_layer(wk.url, env["src"], wk.token, "raw_em_source", prefix_map=env["map"],
                                    folder_path="/emrestore")
    assert res["remote_uri"] == f"{env['data_url']}/src" and res["url"].endswith(f"/datasets/{res['id']}/view")
    ds = wk.datasets[res["id"]]
    assert ds["folderPath"] == "/emrestore" and ds["dataSource"]["scale"]["factor"] == [8, 8, 24]
    layer = ds["dataSource"]["dataLayers"][0]
    assert layer["boundingBox"] == {"topLeft": [0, 0, 0], "width": 64, "height": 64, "depth": 9}
    posts = [r for r in wk.requests if r["method"] == "POST" and "exploreAndAddRemote" in r["path"]]
    assert posts[-1]["path"] == "/api/v9/datasets/exploreAndAddRemote"
    assert json.loads(posts[-1]["body"]) == {"remoteUri": f"{env['data_url']}/src", "datasetName": "raw_em_source",
                                             "folderPath": "/emrestore", "dataStoreName": None}
    with pytest.raises(ConnectorError, match="name taken|already exists") as e:
        webknossos.register_layer(wk.url, env["src"], wk.token, "raw_em_source", prefix_map=env["map"])
    assert e.value.field == "dataset_name"
    with pytest.raises(ConnectorError) as e:
        webknossos.register_layer(wk.url, env["src"], "wrong", "another_name", prefix_map=env["map"])
    assert e.value.field == "token" and "401" in str(e.value)
    with pytest.raises(ConnectorError) as e:
        webknossos.register_layer(wk.url, env["src"], wk.token, "another_name")  # file:// without a map
    assert e.value.field == "output" and "public_url_map" in str(e.value)
    with pytest.raises(ConnectorError) as e:
        webknossos.register_layer(wk.url, env["src"], wk.token, "another_name", prefix_map=env["map"], api_version=3)
    assert e.value.field == "url" and "API v3" in str(e.value)


# ----------------------------------------------------------------------------- CATMAID
def test_catmaid_stack_definition_and_import(env, tmp_path):
    cm = env["cm"]
    st = catmaid.stack_definition(env["src"], "raw", prefix_map=env["map"])
    assert st["dimension"] == "(64,64,9)" and st["resolution"] == "(8,8,24)"
    assert st["mirrors"][0]["tile_source_type"] == 14
    assert st["mirrors"][0]["url"] == f"{env['data_url']}/src/%SCALE_DATASET%/0_1_2"
    assert st["metadata"]["voxelOffset"] == [0, 0, 0]
    manage = fake_manage_py(str(tmp_path / "manage.py"), cm)
    doc = str(tmp_path / "project.json")
    res = catmaid.register_layers([(env["src"], "raw in catmaid", "c")], project="Import test", project_file=doc,
                                  catmaid_url=cm.url, token=cm.token, manage_py=manage, manage_python=sys.executable,
                                  prefix_map=env["map"])
    assert res["imported"] and res["verified"]["raw in catmaid"]["mirrors"][0]["tile_source_type"] == 14
    exported = httpx.get(f"{cm.url}/projects/export", headers={"X-Authorization": f"Token {cm.token}"}).json()
    assert any(p["project"]["title"] == "Import test" for p in exported)
    # the importer's checks: a stack without dimension is refused (manage.py exits 1)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"project": {"title": "Bad", "stacks": [{"title": "x", "resolution": "(1,1,1)"}]}}]))
    with pytest.raises(ConnectorError, match="Missing required stack field 'dimension'"):
        catmaid.run_import(manage, str(bad), python=sys.executable)
    with pytest.raises(ValueError, match="Missing required stack field"):
        catmaid.validate_document(json.loads(bad.read_text()))
    # API token checks
    r = httpx.get(f"{cm.url}/projects/")
    assert r.status_code == 403
    with pytest.raises(ConnectorError) as e:
        catmaid.CatmaidClient(cm.url, "wrong").projects()
    assert e.value.field == "token" and "401" in str(e.value)


# ----------------------------------------------------------------------------- registry
def _spec(env, output, unc=None):
    return {"source": env["src"], "output": output, "uncertainty_output": unc, "model": "iso3",
            "region_start_xyz": [0, 0, 0], "region_stop_xyz": [32, 32, 9], "plan": {"scale_xyz": [1, 1, 3]}}


def test_registry_messages_never_raise(env, tmp_path):
    spec = _spec(env, env["src"])  # an existing layer stands in for an output
    msgs = register_job_outputs("01hzzzzzzzzzzzzzzzzzzzzzzz", spec, [
        {"platform": "neuroglancer", "url": str(tmp_path / "ng" / "state.json"), "options": {"public_url_map": env["map"]}},
        {"platform": "neuroglancer", "url": "http://ng.example/state.json", "options": {"public_url_map": env["map"]}},
        {"platform": "webknossos", "url": env["wk"].url, "options": {}},
        {"platform": "imaris", "url": "x"},
        {"platform": "catmaid", "url": str(tmp_path / "catmaid.json"), "options": {"public_url_map": env["map"]}},
    ])
    assert len(msgs) == 5
    assert msgs[0].startswith("neuroglancer: wrote state") and "restored zzzzzzzz" in msgs[0]
    state = json.loads((tmp_path / "ng" / "state.json").read_text())
    assert state["layers"][1]["source"] == f"precomputed://{env['data_url']}/src"
    assert msgs[1].startswith("neuroglancer: FAILED") and "http(s) URL" in msgs[1]
    assert msgs[2].startswith("webknossos: FAILED") and "token" in msgs[2]
    assert msgs[3].startswith("imaris: FAILED: unknown platform")
    assert msgs[4].startswith("catmaid: wrote stack") and "catmaid_import_projects" in msgs[4]
    catmaid.validate_document(json.loads((tmp_path / "catmaid.json").read_text()))
    assert register_job_outputs("x", {}, [{"platform": "neuroglancer", "url": "y"}])[0].startswith(
        "neuroglancer: FAILED")


def test_job_with_register_in_targets_registers_on_success(env, tmp_path):
    """A real job (gRPC → JobManager → LocalExecutor) whose register_in targets are registered by
    the manager when it succeeds: a Neuroglancer state file, a webKnossos dataset and a CATMAID stack."""
    from service.api.client import EmrestoreClient
    wk, cm = env["wk"], env["cm"]
    os.environ["EMRESTORE_TEST_WK_TOKEN"] = wk.token  # the service reads the token from its environment
    manage = fake_manage_py(str(tmp_path / "manage.py"), cm)
    svc = RunningService(tmp_path, env["models_dir"])
    try:
        with EmrestoreClient(svc.target) as c:
            out = f"file://{env['root']}/data/src_registered"
            state_file = tmp_path / "viewer" / "state.json"
            job = c.restore_region(env["src"], "iso3", out, (0, 0, 0), (32, 32, 9), steps=2, register_in=[
                {"platform": "neuroglancer", "url": f"file://{state_file}", "options": {"public_url_map": env["map"]}},
                {"platform": "webknossos", "url": wk.url, "options": {
                    "token_env": "EMRESTORE_TEST_WK_TOKEN", "dataset_name": "registered_by_job",
                    "public_url_map": env["map"]}},
                {"platform": "catmaid", "url": cm.url, "options": {
                    "token": cm.token, "manage_py": manage, "manage_python": sys.executable,
                    "project": "job registrations", "public_url_map": env["map"]}},
            ])
            final = c.wait(job.job_id, timeout=150)
            assert final.state == "SUCCEEDED", final.message
            info = wait_for(lambda: (lambda j: j if len([e for e in j.events if e.startswith(
                ("neuroglancer:", "webknossos:", "catmaid:"))]) >= 3 else None)(c.get_job(job.job_id)), 60,
                what="the registration events")
        events = [e for e in info.events if e.startswith(("neuroglancer:", "webknossos:", "catmaid:"))]
        assert not [e for e in events if "FAILED" in e], events
        state = json.loads(state_file.read_text())
        assert state["layers"][1]["source"] == f"precomputed://{env['data_url']}/src_registered"
        assert state["dimensions"]["z"] == [8e-9, "m"]  # the restored layer's isotropic resolution
        ds = [d for d in wk.datasets.values() if d["name"] == "registered_by_job"]
        assert len(ds) == 1 and ds[0]["dataSource"]["scale"]["factor"] == [8, 8, 8]
        proj = next(p for p in cm.projects.values() if p["title"] == "job registrations")
        assert proj["stacks"][0]["mirrors"][0]["tile_source_type"] == 14
        assert proj["stacks"][0]["resolution"] == [8.0, 8.0, 8.0]
        assert os.path.exists(f"{env['root']}/data/src_registered/catmaid_project.json")
    finally:
        svc.close()
        os.environ.pop("EMRESTORE_TEST_WK_TOKEN", None)
