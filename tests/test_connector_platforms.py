"""Registering restored layers in the operator's configured targets: webKnossos and CATMAID
against HTTP doubles on 127.0.0.1 that follow the released servers' contracts, the Neuroglancer
state target, the target configuration, and a real job registered by the completion hook."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import httpx
import pytest

from connector import catmaid, webknossos
from connector.registry import RegistrationError, completion_hook
from connector.static_server import StaticFileServer
from connector.targets import load_targets, parse_targets, resolve_names
from connector.util import ConnectorError
from tests.catmaid_double import CatmaidDouble, fake_import_command
from tests.service_helpers import RunningService, wait_for
from tests.webknossos_double import WebknossosDouble
from tests.test_connector_bridge import make_source_and_model

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import numpy as np

    from service.volume import precomputed as pc

    root = tmp_path_factory.mktemp("platforms")
    src, models_dir, vol = make_source_and_model(root)
    # a "restored" layer with a voxel offset (isotropic 8 nm, z offset 6 sections) and its uncertainty
    restored = f"file://{root}/data/src_restored_t1"
    pc.create_source_layer(restored, np.repeat(vol, 3, axis=0)[:12, :32, :32], (8, 8, 8),
                           voxel_offset_xyz=(16, 8, 6), chunk_size_xyz=(32, 32, 4))
    unc = f"file://{root}/data/src_uncertainty_t1"
    pc.create_source_layer(unc, np.full((12, 32, 32), 7, np.uint8), (8, 8, 8), voxel_offset_xyz=(16, 8, 6),
                           chunk_size_xyz=(32, 32, 4))
    static = StaticFileServer()
    data_url = static.add("data", str(root / "data"))
    yield {"root": root, "src": src, "restored": restored, "unc": unc, "models_dir": models_dir,
           "data_url": data_url, "map": f"file://{root}/data={data_url}"}
    static.close()


def _job(env, **kw):
    base = dict(job_id="01hzzzzzzzzzzzzzzzzzzzjob1", owner="alice", source=env["src"], output=env["restored"],
                uncertainty=env["unc"], model="iso3", region=([16, 8, 6], [48, 40, 18]),
                output_voxel_size_nm=[8.0, 8.0, 8.0], register_in=[])
    base.update(kw)
    return SimpleNamespace(**base)


def _targets(tmp_path, spec: dict):
    p = tmp_path / "targets.json"
    p.write_text(json.dumps({"targets": spec}))
    return load_targets(str(p))


# ----------------------------------------------------------------------------- target configuration
def test_targets_are_checked_and_secrets_stay_out_of_the_file(tmp_path):
    ok = parse_targets({"ng": {"platform": "neuroglancer", "url": "file:///srv/state.json"},
                        "wk": {"platform": "webknossos", "url": "https://wk.lab.org", "token": {"env": "WK_TOKEN"}}})
    assert sorted(ok) == ["ng", "wk"] and ok["wk"].options["token"].env == "WK_TOKEN"
    bad = [
        ({"x": {"platform": "imaris", "url": "u"}}, "targets.x.platform"),
        ({"x": {"platform": "webknossos", "url": "file:///etc"}}, "targets.x.url"),
        ({"x": {"platform": "webknossos", "url": "https://wk", "token": "inline-secret"}}, "targets.x.token"),
        ({"x": {"platform": "webknossos", "url": "https://wk", "token": {"env": "A B"}}}, "targets.x.token"),
        ({"x": {"platform": "catmaid", "url": "https://cm", "import_command": "manage.py import"}},
         "targets.x.import_command"),
        ({"x": {"platform": "catmaid", "url": "https://cm", "manage_py": "/opt/manage.py"}}, "targets.x.manage_py"),
        ({"bad name!": {"platform": "neuroglancer", "url": "u"}}, "targets.bad name!"),
    ]
    for spec, field in bad:
        with pytest.raises(ConnectorError) as e:
            parse_targets({"targets": spec})
        assert e.value.field == field, (spec, e.value)
    with pytest.raises(ConnectorError) as e:
        resolve_names(["ng", "elsewhere"], ok)
    assert e.value.field == "register_in[1]" and "allowed: ng, wk" in str(e.value)
    with pytest.raises(ConnectorError) as e:
        resolve_names([{"platform": "neuroglancer", "url": "file:///etc/important.conf"}], ok)
    assert e.value.field == "register_in[0]"
    with pytest.raises(ConnectorError) as e:
        load_targets(str(tmp_path / "missing.json"))
    assert e.value.field == "--targets"


def test_requests_cannot_name_paths_commands_or_secrets(env, tmp_path):
    """The request-shaped targets of issue 9 (manage_py, token_file/token_env, a file:// state URL)
    register nothing: the hook only knows configured names."""
    victim = tmp_path / "important.conf"
    victim.write_text("keep me")
    hook = completion_hook(_targets(tmp_path, {"ng": {"platform": "neuroglancer",
                                                      "url": str(tmp_path / "state.json")}}))
    with pytest.raises(ConnectorError) as e:
        hook(_job(env, register_in=[f"file://{victim}"]))
    assert e.value.field == "register_in[0]" and victim.read_text() == "keep me"


# ----------------------------------------------------------------------------- Neuroglancer target
def _url(state: dict, name: str) -> str:
    """The data source URL of a layer of a state's JSON, read back as a typed Neuroglancer state."""
    import neuroglancer
    return neuroglancer.ViewerState(state).layers[name].source[0].url


def test_neuroglancer_target_state_has_region_box_and_transparent_layers(env, tmp_path):
    targets = _targets(tmp_path, {"lab-ng": {"platform": "neuroglancer", "url": str(tmp_path / "ng" / "state.json"),
                                             "public_url_map": env["map"]},
                                  "web": {"platform": "neuroglancer", "url": "http://ng.example/state.json"}})
    msgs = completion_hook(targets)(_job(env, register_in=["lab-ng"]))
    assert len(msgs) == 1 and msgs[0].startswith("lab-ng: neuroglancer: wrote state"), msgs
    state = json.loads((tmp_path / "ng" / "state.json").read_text())
    layers = {layer["name"]: layer for layer in state["layers"]}
    assert _url(state, "source") == f"precomputed://{env['data_url']}/src"
    restored = layers["restored zzzzjob1"]
    assert "emitTransparent" in restored["shader"] and restored["opacity"] == 1.0
    lo, hi = (float(v) for v in restored["shader"].split("range=[")[1].split("]")[0].split(","))
    assert 0 <= lo < hi <= 255  # the source's contrast, not the identity
    assert "emitRGBA" in layers["uncertainty zzzzjob1"]["shader"]
    # the restored region as a box, in the state's units (output voxels: 8 nm), and z steps at 8 nm
    box = layers["restored regions"]["annotations"][0]
    assert (box["pointA"], box["pointB"]) == ([16, 8, 6], [48, 40, 18])
    assert state["dimensions"]["z"] == [8e-9, "m"] and state["position"] == [32, 24, 12]
    with pytest.raises(RegistrationError) as e:
        completion_hook(targets)(_job(env, register_in=["lab-ng", "web"]))
    assert e.value.messages[0].startswith("lab-ng: neuroglancer") and "web (neuroglancer): FAILED" in str(e.value)


# ----------------------------------------------------------------------------- webKnossos
def test_webknossos_negotiates_the_api_version():
    wk_new, wk_old = WebknossosDouble(), WebknossosDouble(api_versions=range(5, 10), release="22.09.0")
    try:
        c = webknossos.WebknossosClient(wk_new.url, wk_new.token)
        assert c.negotiate() == 14 and c.server_version == "25.06.0"
        c = webknossos.WebknossosClient(wk_old.url, wk_old.token)
        assert c.negotiate() == 9 and c.url("/user").endswith("/api/v9/user")
        assert webknossos.WebknossosClient(wk_old.url, wk_old.token, api_version=7).negotiate() == 7
        only_future = WebknossosDouble(api_versions=[15])
        with pytest.raises(ConnectorError) as e:
            webknossos.WebknossosClient(only_future.url, only_future.token).negotiate()
        assert e.value.field == "api_version"
        only_future.close()
        h = {"X-Auth-Token": wk_new.token}
        assert httpx.get(f"{wk_new.url}/api/v3/user", headers=h).status_code == 404
        r = httpx.post(f"{wk_new.url}/api/v14/datasets/exploreAndAddRemote", json={"datasetName": "abc"}, headers=h)
        assert r.status_code == 400 and "remoteUri" in r.json()["messages"][0]["error"]
    finally:
        wk_new.close()
        wk_old.close()


def test_webknossos_adds_layers_to_the_source_dataset(env, tmp_path, monkeypatch):
    wk = WebknossosDouble()
    try:
        c = webknossos.WebknossosClient(wk.url, wk.token)
        source = webknossos.register_layer(c, env["src"], "em_source", prefix_map=env["map"])
        monkeypatch.setenv("WK_TOKEN", wk.token)
        targets = _targets(tmp_path, {"lab-wk": {"platform": "webknossos", "url": wk.url, "token": {"env": "WK_TOKEN"},
                                                 "source_dataset": source["id"], "public_url_map": env["map"]}})
        msgs = completion_hook(targets)(_job(env, register_in=["lab-wk"]))
        assert "added layers 'restored_zzzzjob1', 'uncertainty_zzzzjob1' to dataset" in msgs[0], msgs
        assert "(API v14)" in msgs[0] and msgs[0].endswith(f"/datasets/{source['id']}/view")
        layers = wk.datasets[source["id"]]["dataSource"]["dataLayers"]
        assert [la["name"] for la in layers] == ["color", "restored_zzzzjob1", "uncertainty_zzzzjob1"]
        assert layers[1]["boundingBox"]["topLeft"] == [16, 8, 6]
        assert layers[1]["mags"][0]["path"] == f"{env['data_url']}/src_restored_t1/8_8_8"
        assert all(r["headers"].get("X-Auth-Token") in (None, wk.token) for r in wk.requests)
        # "auto": the dataset whose layer reads the job's source
        targets = _targets(tmp_path, {"auto": {"platform": "webknossos", "url": wk.url, "token": {"env": "WK_TOKEN"},
                                               "source_dataset": "auto", "public_url_map": env["map"],
                                               "dataset_name": "second_restore", "include_uncertainty": "false"}})
        msgs = completion_hook(targets)(_job(env, job_id="01hzzzzzzzzzzzzzzzzzzzjob3", register_in=["auto"]))
        assert f"to dataset {source['id']}" in msgs[0], msgs
        assert wk.datasets[source["id"]]["dataSource"]["dataLayers"][-1]["name"] == "restored_zzzzjob3"
    finally:
        wk.close()


def test_webknossos_fallbacks_old_servers_and_private_buckets(env, tmp_path, monkeypatch):
    old = WebknossosDouble(api_versions=range(5, 10), compose=False, answers_id=False)
    private = WebknossosDouble(private_prefix=f"{env['data_url']}/src_", credential={"identifier": "AKIA1",
                                                                                       "secret": "sk-1"})
    try:
        monkeypatch.setenv("WK_TOKEN_OLD", old.token)
        monkeypatch.setenv("WK_TOKEN_PRIV", private.token)
        cred = tmp_path / "bucket.json"
        cred.write_text(json.dumps({"identifier": "AKIA1", "secret": "sk-1"}))
        targets = _targets(tmp_path, {
            "old": {"platform": "webknossos", "url": old.url, "token": {"env": "WK_TOKEN_OLD"},
                    "source_dataset": "0123456789abcdef01234567", "public_url_map": env["map"],
                    "include_uncertainty": "false"},
            "priv": {"platform": "webknossos", "url": private.url, "token": {"env": "WK_TOKEN_PRIV"},
                     "bucket_credentials": {"file": str(cred)}, "public_url_map": env["map"],
                     "include_uncertainty": "false"},
            "priv-nocred": {"platform": "webknossos", "url": private.url, "token": {"env": "WK_TOKEN_PRIV"},
                            "public_url_map": env["map"], "dataset_name": "nocred"}})
        hook = completion_hook(targets)
        msg = hook(_job(env, register_in=["old"]))[0]
        assert "(API v9)" in msg and "cannot add layers" in msg, msg
        ds = next(d for d in old.datasets.values() if d["name"] == "src_restored_zzzzjob1")
        assert msg.endswith(f"/datasets/{ds['id']}/view")  # found by name: old servers answer no id
        msg = hook(_job(env, register_in=["priv"]))[0]
        ds = next(d for d in private.datasets.values() if d["name"] == "src_restored_zzzzjob1")
        cid = ds["dataSource"]["dataLayers"][0]["mags"][0]["credentialId"]
        assert private.credentials[cid] == {"identifier": "AKIA1", "secret": "sk-1"}
        add = [r for r in private.requests if "addVirtualDataset" in r["path"]]
        assert add and add[0]["path"] == "/api/v14/datasets/addVirtualDataset/src_restored_zzzzjob1"
        with pytest.raises(RegistrationError, match="access denied|private bucket"):
            hook(_job(env, register_in=["priv-nocred"]))
    finally:
        old.close()
        private.close()


# ----------------------------------------------------------------------------- CATMAID
def test_catmaid_stack_geometry_uses_the_voxel_offset(env):
    g = {"voxel_offset_xyz": [16, 8, 6], "size_xyz": [32, 32, 12], "resolution_nm_xyz": [8.0, 8.0, 8.0],
         "downsample_factors_xyz": []}
    src = {"voxel_offset_xyz": [4, 4, 1], "resolution_nm_xyz": [8.0, 8.0, 24.0]}
    t = catmaid.translation_nm(g, src, (100, 0, 0))
    assert t == [100 + 16 * 8 - 4 * 8, 8 * 8 - 4 * 8, 6 * 8 - 24]
    st = catmaid.stack_definition(env["restored"], "r", prefix_map=env["map"], geometry=g, translation_nm=t)
    assert st["dimension"] == "(32,32,12)"  # the size, not offset + size
    assert st["translation"] == "(196,32,24)" and st["metadata"]["voxelOffset"] == [16, 8, 6]
    assert st["mirrors"][0]["url"] == f"{env['data_url']}/src_restored_t1/%SCALE_DATASET%/0_1_2"
    assert catmaid.front_end_slice_dims(st["mirrors"][0]["url"]) == [0, 1, 2]
    assert any(math.isnan(v) for v in catmaid.front_end_slice_dims(st["mirrors"][0]["url"] + "/"))
    assert catmaid.parse_version("2021.12.21-12-gdeadbee") == (2021, 12, 21)


def test_catmaid_import_alone_does_not_display_in_2021_12_21(env, tmp_path, monkeypatch):
    """The released importer appends '/' to the mirror URL: the imported stack exists but the
    2021.12.21 front end cannot show it, and the message says so."""
    cm = CatmaidDouble()
    try:
        monkeypatch.setenv("CM_TOKEN", cm.token)
        targets = _targets(tmp_path, {"cm": {"platform": "catmaid", "url": cm.url, "token": {"env": "CM_TOKEN"},
                                             "import_command": fake_import_command(str(tmp_path / "imp"), cm),
                                             "project": "EM new", "public_url_map": env["map"],
                                             "include_uncertainty": "false"}})
        msg = completion_hook(targets)(_job(env, register_in=["cm"]))[0]
        proj = next(p for p in cm.projects.values() if p["title"] == "EM new")
        stack = proj["stacks"][0]
        assert stack["dimension"] == [32, 32, 12] and stack["translation"] == [128.0, 64.0, 48.0]
        assert stack["mirrors"][0]["image_base"].endswith("/0_1_2/") and not cm.displays(stack)
        assert "cannot display" in msg and "admin_user" in msg, msg
    finally:
        cm.close()


def test_catmaid_registration_displays_in_the_users_existing_project(env, tmp_path, monkeypatch):
    cm = CatmaidDouble()
    try:
        pid = cm.add_project("EM volume")  # the project the user is looking at
        monkeypatch.setenv("CM_TOKEN", cm.token)
        (tmp_path / "pw").write_text("admin-secret\n")
        targets = _targets(tmp_path, {"cm": {
            "platform": "catmaid", "url": cm.url, "token": {"env": "CM_TOKEN"},
            "import_command": fake_import_command(str(tmp_path / "imp"), cm), "project": "EM volume",
            "admin_user": "emrestore-admin", "admin_password": {"file": str(tmp_path / "pw")},
            "public_url_map": env["map"], "permission": ["user:AnonymousUser:can_browse"]}})
        msg = completion_hook(targets)(_job(env, register_in=["cm"]))[0]
        assert "in project 'EM volume'" in msg and "(CATMAID 2021.12.21)" in msg, msg
        stacks = cm.projects[pid]["stacks"]
        assert [s["title"] for s in stacks] == ["src restored zzzzjob1", "src restored zzzzjob1 uncertainty"]
        assert all(cm.displays(s) for s in stacks)  # the exact URL comes first
        assert stacks[0]["translation"] == [128.0, 64.0, 48.0] and stacks[0]["dimension"] == [32, 32, 12]
        # a wrong admin password is a clear error naming the option
        (tmp_path / "pw").write_text("nope\n")
        with pytest.raises(RegistrationError, match="admin login"):
            completion_hook(targets)(_job(env, job_id="01hzzzzzzzzzzzzzzzzzzzjob2", register_in=["cm"]))
        old = CatmaidDouble(version="2020.02.15")
        monkeypatch.setenv("CM_TOKEN", old.token)
        t_old = _targets(tmp_path, {"cm": {"platform": "catmaid", "url": old.url, "token": {"env": "CM_TOKEN"},
                                           "public_url_map": env["map"]}})
        with pytest.raises(RegistrationError, match="no tile source 14"):
            completion_hook(t_old)(_job(env, register_in=["cm"]))
        old.close()
    finally:
        cm.close()


# ----------------------------------------------------------------------------- a real job
def test_real_job_registered_by_the_completion_hook(env, tmp_path):
    """A real job (gRPC → JobManager → LocalExecutor); its completed form goes through the hook."""
    from service.api.client import EmrestoreClient

    svc = RunningService(tmp_path, env["models_dir"])
    try:
        with EmrestoreClient(svc.target) as c:
            out = f"file://{env['root']}/data/src_registered"
            job = c.restore_region(env["src"], "iso3", out, (0, 0, 0), (32, 32, 9), steps=2)
            final = c.wait(job.job_id, timeout=150)
            assert final.state == "SUCCEEDED", final.message
        state_file = tmp_path / "state.json"
        hook = completion_hook(_targets(tmp_path, {"ng": {"platform": "neuroglancer", "url": str(state_file),
                                                          "public_url_map": env["map"]}}))
        msgs = hook(SimpleNamespace(job_id=job.job_id, owner="", source=env["src"], output=out, uncertainty=None,
                                    register_in=["ng"], region=None, output_voxel_size_nm=[8, 8, 8]))
        assert "FAILED" not in msgs[0]
        state = json.loads(state_file.read_text())
        layers = {layer["name"]: layer for layer in state["layers"]}
        assert _url(state, f"restored {job.job_id[-8:]}") == f"precomputed://{env['data_url']}/src_registered"
        assert state["dimensions"]["z"] == [8e-9, "m"]  # the restored layer's isotropic resolution
        box = layers["restored regions"]["annotations"][0]  # the chunks actually written
        assert box["pointA"][:2] == [0, 0] and box["pointB"][0] >= 32 and box["pointB"][2] >= 25
        wait_for(lambda: True, 1)
    finally:
        svc.close()
