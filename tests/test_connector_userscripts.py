"""The webKnossos user script and the CATMAID widget in real headless Chromium, against the real
bridge → real gRPC service (JobManager + LocalExecutor). The pages provide the platforms'
front-end JavaScript API as documented doubles (tests/webknossos_double.py, tests/catmaid_double.py). Registration in the
platforms is the service's completion hook with the operator's targets (tests/test_connector_platforms.py)."""

from __future__ import annotations

from importlib import resources

import pytest

from connector.bridge import BridgeServer, create_app
from connector.bridge_security import BridgeConfig
from connector.static_server import StaticFileServer
from tests.browser import chrome_driver, page_with_config
from tests.catmaid_double import CATMAID_PAGE, CatmaidDouble
from tests.service_helpers import RunningService, wait_for
from tests.webknossos_double import WEBKNOSSOS_PAGE, WebknossosDouble
from tests.test_connector_bridge import make_source_and_model

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

TOKEN = "bridge-browser-token"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("userscripts")
    driver = chrome_driver(str(root / "chrome-profile"))  # first: skips before anything is started
    src, models_dir, _ = make_source_and_model(root)
    static = StaticFileServer("127.0.0.1", 0)
    data_url = static.add("data", str(root / "data"))
    static.add("assets", str(resources.files("connector").joinpath("assets")))
    (root / "pages").mkdir()
    static.add("pages", str(root / "pages"))
    svc = RunningService(root, models_dir)
    bridge = BridgeServer(create_app(BridgeConfig(grpc_target=svc.target, tokens=[TOKEN],
                                                  allow_origins=[static.base_url]))).start()
    wk, cm = WebknossosDouble(), CatmaidDouble()
    yield {"root": root, "src": src, "static": static, "data_url": data_url, "svc": svc, "bridge": bridge,
           "wk": wk, "cm": cm, "driver": driver}
    driver.quit()
    for x in (bridge.stop, svc.close, static.close, wk.close, cm.close):
        x()


def _write_page(env, name: str, html: str) -> str:
    (env["root"] / "pages" / name).write_text(html)
    return f"{env['static'].base_url}/pages/{name}"


def _wk_page(env, **overrides) -> str:
    cfg = {"bridgeUrl": env["bridge"].url, "token": TOKEN, "sources": {"color": env["src"]},
           "block": [32, 32, 9], "samples": 1, "steps": 2, "button": True}
    cfg.update(overrides)
    double = {"position": [20, 24, 4], "layers": ["color"], "bboxMin": [0, 0, 0], "bboxMax": [64, 64, 9]}
    html = page_with_config(WEBKNOSSOS_PAGE, f"{env['static'].base_url}/assets/webknossos_restore.user.js",
                            "EMRESTORE_CONFIG", cfg)
    html = html.replace("<head>", f"<head><script>window.__WK_DOUBLE__ = {__import__('json').dumps(double)};</script>", 1)
    return _write_page(env, "wk.html", html)


def _toasts(driver):
    return driver.execute_script("return window.__toasts || []")


def test_webknossos_userscript_key_restores_and_registers(env):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from service.volume import precomputed as pc

    d = env["driver"]
    d.get(_wk_page(env))
    wait_for(lambda: d.execute_script("return !!(window.emrestore && window.emrestore.ready)"), 20,
             what="the user script to install itself after apiReady(3)")
    keys = d.execute_script("return window.__wkKeyHandlers.filter(h => h.active).map(h => h.key)")
    assert keys == ["shift + r"]
    assert d.find_element(By.ID, "emrestore-restore-button").is_displayed()
    # the real key press (shift+R) on the page
    ActionChains(d).move_to_element(d.find_element(By.TAG_NAME, "body")).key_down(Keys.SHIFT).send_keys("r") \
        .key_up(Keys.SHIFT).perform()
    toasts = wait_for(lambda: [t for t in _toasts(d) if t["type"] in ("success", "error")], 120,
                      what="a final toast")
    final = toasts[-1]
    assert final["type"] == "success", (final, d.get_log("browser")[-5:])
    msgs = [t["message"] for t in _toasts(d)]
    assert any("starting restoration of [4,8,0]–[36,40,9]" in m for m in msgs), msgs
    assert any("RUNNING" in m for m in msgs), msgs
    assert "SUCCEEDED" in final["message"]
    result = d.execute_script("return window.emrestore.state.lastResult")
    out = result["output"]
    assert out.startswith(env["src"] + "_restored_")
    assert pc.open_layer(out).resolution_nm_xyz == (8.0, 8.0, 8.0)


def test_webknossos_userscript_errors(env):
    d = env["driver"]
    d.get(_wk_page(env, token="wrong-token", registerIn=[]))
    wait_for(lambda: d.execute_script("return !!(window.emrestore && window.emrestore.ready)"), 20, what="install")
    d.execute_async_script("window.emrestore.restoreRegion().then(arguments[arguments.length - 1])")
    last = _toasts(d)[-1]
    assert last["type"] == "error" and "401 UNAUTHENTICATED" in last["message"] and "invalid bearer token" in last["message"]
    # unknown source layer → the service's NOT_FOUND reaches the user as a toast naming the field
    d.get(_wk_page(env, sources={"color": f"file://{env['root']}/data/nope"}, registerIn=[]))
    wait_for(lambda: d.execute_script("return !!(window.emrestore && window.emrestore.ready)"), 20, what="install")
    d.execute_async_script("window.emrestore.restoreRegion().then(arguments[arguments.length - 1])")
    last = _toasts(d)[-1]
    assert last["type"] == "error" and "404 NOT_FOUND (source)" in last["message"]
    # a page from an origin that is not in the allow-list (localhost ≠ 127.0.0.1)
    url = _wk_page(env, registerIn=[]).replace("127.0.0.1", "localhost")
    d.get(url)
    wait_for(lambda: d.execute_script("return !!(window.emrestore && window.emrestore.ready)"), 20, what="install")
    d.execute_async_script("window.emrestore.restoreRegion().then(arguments[arguments.length - 1])")
    last = _toasts(d)[-1]
    assert last["type"] == "error" and "cannot reach the emrestore bridge" in last["message"]
    assert "allow-origin" in last["message"]


def test_catmaid_widget_restores_current_view_in_layer_voxels(env, tmp_path):
    """The widget converts CATMAID stack coordinates (0 = the layer's voxel_offset) to the layer's
    absolute voxels: a source with voxel_offset (16, 8, 3) is restored where the view is."""
    from selenium.webdriver.common.by import By
    from service.volume import precomputed as pc

    d = env["driver"]
    vol = pc.read_zyx(env["src"], (0, 0, 0), (9, 64, 64))
    off_src = f"file://{env['root']}/data/src_off"
    pc.create_source_layer(off_src, vol, (8, 8, 24), voxel_offset_xyz=(16, 8, 3), chunk_size_xyz=(32, 32, 3))
    cfg = {"bridgeUrl": env["bridge"].url, "token": TOKEN, "block": [32, 32, 9], "samples": 2, "steps": 1,
           "sourceMap": {env["data_url"]: f"file://{env['root']}/data"}}
    # the stack as CATMAID shows it: dimension = the layer's size; no voxelOffset in its metadata,
    # so the widget reads the offset from the layer's info file next to the mirror URL
    double = {"projectId": 1, "stackId": 7, "stackTitle": "raw EM", "dimension": [64, 64, 9],
              "resolution": [8, 8, 24], "position": [40, 30, 5], "viewSize": [400, 300], "scale": 1.0,
              "mirrors": [{"id": 1, "title": "precomputed", "tile_source_type": 14,
                           "image_base": f"{env['data_url']}/src_off/%SCALE_DATASET%/0_1_2"}],
              "emrestoreConfig": cfg}
    html = page_with_config(CATMAID_PAGE, f"{env['static'].base_url}/assets/catmaid_restore_widget.js",
                            "__CATMAID_DOUBLE__", double)
    d.get(_write_page(env, "catmaid.html", html))
    assert d.execute_script("return Object.keys(CATMAID.__widgets)") == ["emrestore-restore"]
    d.execute_script("CATMAID.createWidget('emrestore-restore')")
    wait_for(lambda: d.execute_script(
        "var s = document.querySelector('select[id$=\"-model\"]'); return s && s.options.length"), 20,
        what="the model list")
    d.find_element(By.CSS_SELECTOR, "button.emrestore-restore").click()
    done = wait_for(lambda: [m for m in d.execute_script("return window.__messages")
                             if "SUCCEEDED" in (m.get("text") or "") or m["level"] == "error"], 150,
                    what="the widget to finish")
    assert done[-1]["level"] == "msg", (done, d.get_log("browser")[-5:])
    msgs = d.execute_script("return window.__messages")
    # stack region [24,14,0]–[56,46,9] + offset (16, 8, 3)
    assert any("started: [40,22,3]–[72,54,12]" in (m.get("text") or "") for m in msgs), msgs
    assert d.execute_script("return document.querySelector('progress').value") == 1
    result = d.execute_script("return window.__widget.lastResult")
    assert result["output"].startswith(off_src + "_restored_") and result["uncertainty"]
    assert result["job"]["region"] == {"start": [40, 22, 3], "stop": [72, 54, 12]}
