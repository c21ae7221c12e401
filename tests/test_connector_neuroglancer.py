"""Neuroglancer: the restore-region viewer in real headless Chromium against a real gRPC service
(JobManager + LocalExecutor), the CORS static file server, and Neuroglancer state files/links."""

from __future__ import annotations

import json
import time
import urllib.parse

import httpx
import pytest

from connector.neuroglancer_state import state_for_layers, state_link, write_state
from connector.neuroglancer_view import ANNOTATION_LAYER, RESTORE_ACTION, RESTORE_KEY, RestoreViewer
from connector.static_server import StaticFileServer
from connector.util import ConnectorError, public_url
from tests.browser import chrome_driver
from tests.service_helpers import RunningService, wait_for
from tests.test_connector_bridge import make_source_and_model


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from service.engine import phantom
    from service.volume import precomputed as pc

    root = tmp_path_factory.mktemp("ng")
    src, models_dir, _ = make_source_and_model(root)
    # a wider source (128×128) so that a restored region leaves most of the view untouched, stored
    # as labs store EM (jpeg, sharded): restored regions follow its encoding (jpeg) in unsharded
    # layers (a sharded write would restore whole shards), and Neuroglancer reads the sharded
    # source through the static server's byte ranges
    wide = f"file://{root}/data/wide"
    vol = phantom.to_uint8(phantom.make_phantom((25, 128, 128), seed=3))[::3]
    pc.create_source_layer(wide, vol, (8, 8, 24), chunk_size_xyz=(32, 32, 3),
                           fmt=pc.LayerFormat("jpeg", 95, sharded=True, shard_bytes=2 ** 15))
    svc = RunningService(root, models_dir, shard_bytes=2 ** 15)
    yield {"root": root, "src": src, "wide": wide, "svc": svc}
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


def _url(state: dict, layer) -> str:
    """The data source URL of a layer of a state's JSON, read back as a typed Neuroglancer state."""
    import neuroglancer
    return neuroglancer.ViewerState(state).layers[layer].source[0].url


def test_state_file_and_link(tmp_path, service):
    src = service["src"]
    # remote layers (gs://) pass through as they are; local ones go through the public URL map
    prefix = {f"file://{service['root']}/data": "https://files.example.org/em"}
    state = state_for_layers(src, "gs://lab/em/raw_restored_abc", "gs://lab/em/raw_unc", prefix_map=prefix,
                             resolution_nm_xyz=(8, 8, 8), position_xyz=(10, 20, 30))
    names = [layer["name"] for layer in state["layers"]]
    assert names == ["source", "restored", "uncertainty"]
    assert _url(state, 0) == "precomputed://https://files.example.org/em/src"
    assert _url(state, 1) == "precomputed://gs://lab/em/raw_restored_abc"
    assert "emitRGBA" in state["layers"][2]["shader"] and "emitTransparent" in state["layers"][1]["shader"]
    assert state["dimensions"]["z"] == [8e-9, "m"] and state["position"] == [10, 20, 30]
    # the file: geometry read from the layers themselves (local here: opening gs:// would wait on
    # Google credentials), and a link that carries the whole state
    path, link = write_state(str(tmp_path / "state.json"), src, service["wide"], prefix_map=prefix,
                             resolution_nm_xyz=(8, 8, 8), position_xyz=(10, 20, 30))
    state = json.loads((tmp_path / "state.json").read_text())
    first = [layer["name"] for layer in state["layers"]]
    assert first[:2] == ["source", "restored"]  # (+ the box of the restored region)
    assert _url(state, 1) == "precomputed://https://files.example.org/em/wide"
    assert link.startswith("https://neuroglancer-demo.appspot.com/#!")
    assert json.loads(urllib.parse.unquote(link.split("#!", 1)[1])) == state
    # updating keeps other layers and replaces same-named ones
    write_state(str(tmp_path / "state.json"), None, src, names={"restored": "second"}, prefix_map=prefix,
                resolution_nm_xyz=(8, 8, 8))
    state = json.loads((tmp_path / "state.json").read_text())
    assert [layer["name"] for layer in state["layers"]] == first + ["second"]
    assert _url(state, 1) == "precomputed://https://files.example.org/em/wide"
    assert state_link(state, "http://ng.local/").startswith("http://ng.local/#!")
    with pytest.raises(ConnectorError, match="public_url_map"):
        public_url(f"file://{tmp_path}/layer")


def _panel_pixels(png: bytes, rect: dict):
    """The RGB pixels of a screenshot inside an element's rectangle, as an (H, W, 3) int array."""
    import io

    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    x0, y0 = int(rect["x"]), int(rect["y"])
    return img[y0:y0 + int(rect["height"]), x0:x0 + int(rect["width"])].astype(int)


def _aligned(before, after, max_dy: int = 40, max_dx: int = 6):
    """(before, after, dy, dx): the overlap of two panel crops at the shift that matches them best
    (the panel moves when the layer bar wraps; most of the view is unchanged, so the best shift is
    the true one). ``after[y + dy, x + dx]`` shows what ``before[y, x]`` showed."""
    import numpy as np

    h, w = min(before.shape[0], after.shape[0]), min(before.shape[1], after.shape[1])
    best = None
    for dy in range(-max_dy, max_dy + 1):
        for dx in range(-max_dx, max_dx + 1):
            b = before[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
            a = after[max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
            n = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
            score = np.abs(a[:n[0]:4, :n[1]:4] - b[:n[0]:4, :n[1]:4]).mean()
            if best is None or score < best[0]:
                best = (score, dy, dx)
    _, dy, dx = best
    b = before[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    a = after[max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
    n = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
    return b[:n[0], :n[1]], a[:n[0], :n[1]], dy, dx


@pytest.mark.browser
@pytest.mark.timeout(300)
def test_viewer_key_action_restores_region_in_browser(service, tmp_path):
    """The user draws the region with Neuroglancer's own bounding-box tool (ctrl+click twice),
    presses shift+R (a real key press: no fallback), and the restored layers appear: the XY panel
    changes only inside the restored region, whose box is drawn and stated in the status bar,
    and z steps at the restored layer's resolution."""
    import numpy as np
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    # wide enough that the layer bar does not wrap when layers are added (the panel stays put)
    driver = chrome_driver(str(tmp_path / "profile"), window=(1700, 800))
    viewer = RestoreViewer(service["wide"], service["svc"].target, samples=2, steps=1, block_xyz=(32, 32, 9))
    try:
        assert viewer.bindings()[RESTORE_KEY] == RESTORE_ACTION
        assert viewer.model == "iso3" and viewer.models == ["iso3"]
        assert viewer.viewer.state.layers[ANNOTATION_LAYER].tool.to_json() == {"type": "annotateBoundingBox"}
        css = 0.25  # voxels per screen pixel: the 128×128 source fills most of the panel
        with viewer.viewer.txn() as s:
            s.layout = "xy"
            s.cross_section_scale = css
            s.position = [64, 64, 4.5]
            s.show_scale_bar = False
            s.show_default_annotations = False
        driver.get(viewer.url)
        panel = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".neuroglancer-rendered-data-panel"), 30,
                         what="the Neuroglancer XY panel")[0]
        assert viewer.viewer.state.layers["source"].source[0].url.startswith("precomputed://http://127.0.0.1:")
        time.sleep(5)  # let the client load and draw the source
        rect = panel.rect
        # draw the region with the bounding-box tool: ctrl+click at two corners
        w, h = rect["width"], rect["height"]
        ActionChains(driver).move_to_element_with_offset(panel, int(-50 / css), int(-50 / css)) \
            .key_down(Keys.CONTROL).click().key_up(Keys.CONTROL).perform()
        time.sleep(0.5)
        ActionChains(driver).move_to_element_with_offset(panel, int(-25 / css), int(-30 / css)) \
            .key_down(Keys.CONTROL).click().key_up(Keys.CONTROL).perform()
        drawn = wait_for(lambda: viewer.box_from_annotations(), 15, what="the box drawn with the bounding-box tool")
        time.sleep(1)
        before_png = driver.get_screenshot_as_png()
        (tmp_path / "neuroglancer_before.png").write_bytes(before_png)
        # a real shift+R over the panel; a missing key press fails the test
        ActionChains(driver).move_to_element(panel).key_down(Keys.SHIFT).send_keys("r").key_up(Keys.SHIFT).perform()
        wait_for(lambda: viewer.jobs, 20, what="the shift+R key press to start a job")
        viewer.wait_idle(180)
        job = viewer.jobs[0]
        assert job.state == "SUCCEEDED", (job, viewer.viewer.config_state.state.status_messages)
        assert (job.start_xyz, job.stop_xyz) == drawn  # the tool's box is what was restored
        out_info = json.loads(open(service["svc"].manager.get(job.job_id).outputs["output"][len("file://"):]
                                   + "/info").read())
        # jpeg as the source; a region's new layer unsharded
        assert out_info["scales"][0]["encoding"] == "jpeg" and not out_info["scales"][0].get("sharding")
        short = job.job_id[-8:]
        names = [layer.name for layer in viewer.viewer.state.layers]
        assert f"restored {short}" in names and f"uncertainty {short}" in names
        restored = viewer.viewer.state.layers[f"restored {short}"]
        assert "emitTransparent" in restored.shader and restored.opacity == 1.0
        assert "emitRGBA" in viewer.viewer.state.layers[f"uncertainty {short}"].shader
        # the region actually restored (snapped to output chunks) is boxed and stated
        rb = job.restored_box
        assert rb is not None and all(a <= s_ and e <= b for a, s_, e, b in zip(rb[0], job.start_xyz, job.stop_xyz,
                                                                                 rb[1]))
        boxes = viewer.viewer.state.layers["restored regions"].annotations
        assert [list(boxes[0].point_a), list(boxes[0].point_b)] == [list(map(float, rb[0])), list(map(float, rb[1]))]
        status = viewer.viewer.config_state.state.status_messages["emrestore"]
        assert f"job {short} done" in status and f"restored region {rb[0]}–{rb[1]}" in status, status
        # generated sections are browsable: one z step is the restored layer's 8 nm (source: 24 nm)
        assert viewer.z_step_nm() == 8.0 and "z step 8 nm" in status
        time.sleep(6)
        after_png = driver.get_screenshot_as_png()
        (tmp_path / "neuroglancer_after.png").write_bytes(after_png)
        # the layer bar may wrap and the panel be re-created: it moves, its centre stays the view position
        rect_after = driver.find_elements(By.CSS_SELECTOR, ".neuroglancer-rendered-data-panel")[0].rect
        before, after, dy, dx = _aligned(_panel_pixels(before_png, rect), _panel_pixels(after_png, rect_after))
        changed = np.abs(after - before).sum(axis=2) > 30
        # the restored region on screen: the yellow box of the "restored regions" layer, whose size
        # must be the restored region's (1/css pixels per voxel)
        h, w = before.shape[:2]
        yellow = (after[..., 0] > 200) & (after[..., 1] > 170) & (after[..., 2] < 80)
        assert yellow.sum() > 20, "the restored region's box is not drawn"
        ys, xs = np.nonzero(yellow)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
        assert abs((x1 - x0) - (rb[1][0] - rb[0][0]) / css) <= 4, (x0, x1, rb)
        assert abs((y1 - y0) - (rb[1][1] - rb[0][1]) / css) <= 4, (y0, y1, rb)
        inside = np.zeros_like(changed)
        m = 3
        inside[max(0, y0 - m):y1 + m, max(0, x0 - m):x1 + m] = True
        assert 0 < (x1 - x0) * (y1 - y0) < 0.5 * h * w, (x0, x1, y0, y1, h, w)  # a real test of "outside"
        assert changed[inside].sum() > 0.3 * (x1 - x0) * (y1 - y0), "the restored data do not show"
        outside = changed & ~inside
        outside[-40:] = False  # the status bar overlays the bottom of the panel: its text changes
        from PIL import Image
        Image.fromarray((changed * 255).astype(np.uint8)).save(tmp_path / "neuroglancer_changed.png")
        assert outside.sum() <= 0.001 * outside.size, (
            f"{int(outside.sum())} pixels changed outside the restored region {x0}..{x1} × {y0}..{y1} "
            f"(shift {dy},{dx}; screenshots in {tmp_path})")
        print(f"\nNeuroglancer screenshots: {tmp_path}; changed inside {int(changed[inside].sum())}, "
              f"outside {int(outside.sum())} of {outside.size}")
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
