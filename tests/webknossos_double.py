"""The webKnossos double (real HTTP on 127.0.0.1; nothing is mocked in-process).

- :class:`WebknossosDouble` — an HTTP server standing in for the **WEBKNOSSOS REST API**, following
scalableminds/webknossos ``conf/webknossos.latest.routes`` / ``webknossos.versioned.routes``
(API versions 5–14; only the versions given are routed, others answer 404 like an unknown
route), ``app/controllers/DatasetController.scala`` and ``ComposeService.scala``. Token in
``X-Auth-Token``. Routes: ``GET /api/buildinfo`` (unversioned) and ``/api/vN/buildinfo``,
``GET /user``, ``GET /datasets``, ``GET /datasets/{id}``, ``GET /datasets/{name}/isValidNewName``,
``GET /datastores``, ``POST /datasets/exploreRemote`` (with ``credentialIdentifier`` /
``credentialSecret``: URIs under ``private_prefix`` are explored only with the right
credential, which is then stored and referenced as ``credentialId``),
``POST /datasets/exploreAndAddRemote`` (no credentials; answers the new id, or nothing with
``answers_id=False`` as older releases), ``POST /datasets/addVirtualDataset/{name}``
(``{dataSource, dataStoreName, folderId}``) and, with ``compose=True`` (newer releases),
``POST /datasets/{id}/compose/addLayer`` (``{datasetId, sourceName, newName,
transformations}``). Like the real server it *explores* the ``remoteUri``: it fetches
``<remoteUri>/info`` over HTTP and refuses URIs without a Precomputed image layer; malformed
bodies get 400 with webKnossos' ``{"messages": [{"error": …}]}`` shape.
- :data:`WEBKNOSSOS_PAGE` — an HTML page providing webKnossos' front-end scripting API for the user
  script (documented at the page).
"""

from __future__ import annotations

import json
import re
import secrets
import urllib.error

from tests.doubles_http import DoubleServer, JSONHandler, fetch_json

_WK_NAME = re.compile(r"^[A-Za-z0-9_\-.]{3,}$")


class _WebknossosHandler(JSONHandler):
    double: "WebknossosDouble"

    def wk_error(self, status: int, text: str) -> None:
        self.send_json(status, {"messages": [{"error": text}]})

    def handle_request(self, method: str, path: str, raw: bytes) -> None:
        d = self.double
        if method == "GET" and path == "/api/buildinfo":
            self.send_json(200, {"webknossos": {"name": "webknossos", "version": d.release,
                                                "commitHash": "0" * 40},
                                 "localDataStoreEnabled": True, "localTracingStoreEnabled": True})
            return
        m = re.match(r"^/api/v(\d+)(/.*)$", path)
        if not m or int(m.group(1)) not in d.api_versions:
            self.wk_error(404, f"no route {method} {path}")
            return
        route = m.group(2)
        if method == "GET" and route == "/buildinfo":
            self.send_json(200, {"webknossos": {"name": "webknossos", "version": d.release}})
            return
        token = self.headers.get("X-Auth-Token")
        if token != d.token:
            self.wk_error(401, "Unauthorized: missing or invalid X-Auth-Token")
            return
        if method == "GET" and route == "/user":
            self.send_json(200, {"id": "5ec0000000000000000000a1", "email": "emrestore@example.org",
                                 "organization": d.organization, "isAdmin": True})
            return
        if method == "GET" and route == "/datasets":
            self.send_json(200, list(d.datasets.values()))
            return
        if method == "GET" and route == "/datastores":
            self.send_json(200, [{"name": "localhost", "url": "http://localhost:9000", "isScratch": False}])
            return
        mm = re.match(r"^/datasets/([^/]+)/isValidNewName$", route)
        if method == "GET" and mm:
            name = urllib.parse.unquote(mm.group(1))
            errors = []
            if not _WK_NAME.match(name):
                errors.append("Dataset name must be at least 3 characters of letters, digits, '-', '_' or '.'")
            if any(ds["name"] == name for ds in d.datasets.values()):
                errors.append("A dataset with this name already exists")
            self.send_json(200, {"isValid": not errors, "errors": errors})
            return
        if method == "POST" and route == "/datasets/exploreRemote":
            body = self._json(raw)
            if body is None:
                return
            if not isinstance(body, list) or not all(isinstance(p, dict) and isinstance(p.get("remoteUri"), str)
                                                     for p in body):
                self.wk_error(400, "Invalid Json: expected a list of {remoteUri, …}")
                return
            layers, report = [], []
            for p in body:
                layer, problem = d.explore(p["remoteUri"], p.get("credentialIdentifier"), p.get("credentialSecret"))
                if layer:
                    layers.append(layer)
                else:
                    report.append(problem)
            ds = d.data_source("explored", layers) if layers else None
            self.send_json(200, {"dataSource": ds, "report": "\n".join(report)})
            return
        mm = re.match(r"^/datasets/addVirtualDataset/([^/]+)$", route)
        if method == "POST" and mm:
            body = self._json(raw)
            if body is None:
                return
            name = urllib.parse.unquote(mm.group(1))
            if not isinstance(body, dict) or not isinstance(body.get("dataSource"), dict) \
                    or not isinstance(body.get("dataStoreName"), str):
                self.wk_error(400, "Invalid Json: obj.dataSource / obj.dataStoreName: error.path.missing")
                return
            if body["dataStoreName"] != "localhost":
                self.wk_error(404, "dataStore.notFound")
                return
            if not body["dataSource"].get("dataLayers"):
                self.wk_error(400, "dataset.explore.zeroLayers")
                return
            if not _WK_NAME.match(name) or any(ds["name"] == name for ds in d.datasets.values()):
                self.wk_error(400, f"Invalid or taken dataset name {name!r}")
                return
            self.send_json(200, d.add_dataset(name, body["dataSource"]["dataLayers"],
                                              body["dataSource"].get("scale", {}).get("factor", [1, 1, 1]), None))
            return
        if method == "POST" and route == "/datasets/exploreAndAddRemote":
            body = self._json(raw)
            if body is None:
                return
            problems = []
            if not isinstance(body, dict):
                self.wk_error(400, "Invalid Json: expected an object")
                return
            for f in ("remoteUri", "datasetName"):
                if not isinstance(body.get(f), str) or not body[f].strip():
                    problems.append(f"obj.{f}: error.path.missing or not a string")
            for f in ("folderPath", "dataStoreName", "folderId"):
                if f in body and body[f] is not None and not isinstance(body[f], str):
                    problems.append(f"obj.{f}: error.expected.jsstring")
            if problems:
                self.wk_error(400, "Invalid Json: " + "; ".join(problems))
                return
            name = body["datasetName"]
            if not _WK_NAME.match(name):
                self.wk_error(400, f"Invalid dataset name {name!r}")
                return
            if any(ds["name"] == name for ds in d.datasets.values()):
                self.wk_error(400, "A dataset with this name already exists")
                return
            layer, problem = d.explore(body["remoteUri"])
            if layer is None:
                self.wk_error(400, f"Exploring remote dataset failed: {problem}")
                return
            res = layer.pop("_resolution")
            ds_id = d.add_dataset(name, [layer], res, body.get("folderPath"))
            if d.answers_id:
                self.send_json(200, ds_id)
            else:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
            return
        mm = re.match(r"^/datasets/([0-9a-f]{24})/compose/addLayer$", route)
        if method == "POST" and mm and d.compose:
            body = self._json(raw)
            if body is None:
                return
            target, src = d.datasets.get(mm.group(1)), d.datasets.get(str((body or {}).get("datasetId")))
            if target is None or src is None:
                self.wk_error(404, "Dataset not found")
                return
            if not all(isinstance(body.get(f), str) for f in ("sourceName", "newName")) \
                    or not isinstance(body.get("transformations"), list):
                self.wk_error(400, "Invalid Json: sourceName/newName/transformations")
                return
            layer = next((la for la in src["dataSource"]["dataLayers"] if la["name"] == body["sourceName"]), None)
            if layer is None:
                self.wk_error(400, f"Layer {body['sourceName']} not found in dataset {src['id']}")
                return
            if any(la["name"] == body["newName"] for la in target["dataSource"]["dataLayers"]):
                self.wk_error(400, f"Layer name {body['newName']} is already used")
                return
            target["dataSource"]["dataLayers"].append({**json.loads(json.dumps(layer)), "name": body["newName"],
                                                       "coordinateTransformations": body["transformations"]})
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        mm = re.match(r"^/datasets/([0-9a-f]{24})$", route)
        if method == "GET" and mm:
            ds = d.datasets.get(mm.group(1))
            if ds is None:
                self.wk_error(404, "Dataset not found")
            else:
                self.send_json(200, ds)
            return
        self.wk_error(404, f"no route {method} {path}")

    def _json(self, raw: bytes):
        if "json" not in (self.headers.get("Content-Type") or ""):
            self.wk_error(415, "Expecting text/json or application/json body")
            return None
        try:
            return json.loads(raw or b"null")
        except ValueError as e:
            self.wk_error(400, f"Invalid Json: {e}")
            return None


class WebknossosDouble(DoubleServer):
    """webKnossos API double (see the module docstring). ``datasets``: id → dataset JSON.
    ``api_versions``: the versions routed (default 5–14, a current release); ``compose``: the
    compose/addLayer route exists; ``private_prefix``/``credential``: a "private bucket" whose
    URIs are explored only with that ``{"identifier", "secret"}``."""
    handler_class = _WebknossosHandler

    def __init__(self, token: str = "wk-secret-token", api_versions=tuple(range(5, 15)), organization: str = "sample_org",
                 release: str = "25.06.0", compose: bool = True, answers_id: bool = True,
                 private_prefix: str | None = None, credential: dict | None = None):
        self.token = token
        self.api_versions = set(api_versions)
        self.organization = organization
        self.release = release
        self.compose = compose
        self.answers_id = answers_id
        self.private_prefix = private_prefix
        self.credential = credential or {}
        self.credentials: dict[str, dict] = {}
        self.datasets: dict[str, dict] = {}
        super().__init__()

    def add_dataset(self, name: str, layers: list[dict], resolution, folder_path) -> str:
        ds_id = secrets.token_hex(12)
        for layer in layers:
            layer.pop("_resolution", None)
        self.datasets[ds_id] = {"id": ds_id, "name": name, "folderPath": folder_path, "isActive": True,
                                "isVirtual": True, "owningOrganization": self.organization,
                                "dataSource": {"id": {"name": name, "team": ""}, "dataLayers": layers,
                                               "scale": {"factor": resolution, "unit": "nanometer"}}}
        return ds_id

    def explore(self, uri: str, identifier: str | None = None, secret: str | None = None):
        """(layer JSON, None) for a Precomputed image layer at ``uri``, else (None, problem)."""
        if not uri.startswith(("http://", "https://")):
            return None, f"{uri}: this double can only reach http(s) URIs"
        cred_id = None
        if self.private_prefix and uri.startswith(self.private_prefix):
            if (identifier, secret) != (self.credential.get("identifier"), self.credential.get("secret")):
                return None, f"{uri}: access denied (403) — a private bucket needs credentials"
            cred_id = secrets.token_hex(12)
            self.credentials[cred_id] = {"identifier": identifier, "secret": secret}
        try:
            info = fetch_json(uri.rstrip("/") + "/info")
        except (urllib.error.URLError, ValueError, OSError) as e:
            return None, f"no Neuroglancer Precomputed info at {uri}: {e}"
        if info.get("type") != "image" or not info.get("scales"):
            return None, f"{uri} is not a Precomputed image layer"
        s0 = info["scales"][0]
        off, size = s0.get("voxel_offset", [0, 0, 0]), s0["size"]
        res0 = s0["resolution"]
        mags = [{"mag": [int(round(r / b)) for r, b in zip(s["resolution"], res0)],
                 "path": uri.rstrip("/") + "/" + s["key"], **({"credentialId": cred_id} if cred_id else {})}
                for s in info["scales"]]
        layer = {"name": "color", "category": "color", "elementClass": info["data_type"],
                 "dataFormat": "neuroglancerPrecomputed",
                 "boundingBox": {"topLeft": off, "width": size[0], "height": size[1], "depth": size[2]},
                 "mags": mags, "_resolution": res0}
        return layer, None

    @staticmethod
    def data_source(name: str, layers: list[dict]) -> dict:
        res = layers[0].pop("_resolution", [1, 1, 1]) if layers else [1, 1, 1]
        for layer in layers:
            layer.pop("_resolution", None)
        return {"id": {"name": name, "team": ""}, "dataLayers": layers,
                "scale": {"factor": res, "unit": "nanometer"}}


#: Stands for the webKnossos front-end scripting API, version 3 (``window.webknossos.apiReady(3)``,
#: webKnossos 24.x ``frontend/javascripts/oxalis/api/api_latest.ts``). Only the calls the user
#: script uses exist: ``api.tracing.getCameraPosition()``, ``api.data.getLayerNames()``,
#: ``api.data.getBoundingBox(layer)`` (``[[min], [max]]``, max exclusive),
#: ``api.utils.registerKeyHandler(key, handler)`` (returns ``{unregister}``) and
#: ``api.utils.showToast(type, message, timeout)`` (returns a remover). Toasts are recorded in
#: ``window.__toasts``; key handlers listen to real keydown events ("shift + r" style combos).
WEBKNOSSOS_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>webKnossos API double</title></head>
<body>
<div id="toasts"></div>
<script>
// Double of the webKnossos front-end API v3 (window.webknossos.apiReady(3)); see tests/webknossos_double.py.
(function () {
  const cfg = window.__WK_DOUBLE__ || {};
  window.__toasts = [];
  const handlers = [];
  function matches(combo, e) {
    const parts = combo.toLowerCase().split("+").map(function (s) { return s.trim(); });
    const key = parts[parts.length - 1];
    const shift = parts.indexOf("shift") >= 0, ctrl = parts.indexOf("ctrl") >= 0, alt = parts.indexOf("alt") >= 0;
    return e.key.toLowerCase() === key && e.shiftKey === shift && e.ctrlKey === ctrl && e.altKey === alt;
  }
  document.addEventListener("keydown", function (e) {
    handlers.forEach(function (h) { if (h.active && matches(h.key, e)) h.fn(); });
  });
  const api = {
    tracing: { getCameraPosition: function () { return cfg.position.slice(); } },
    data: {
      getLayerNames: function () { return cfg.layers.slice(); },
      getBoundingBox: function (layer) {
        if (cfg.layers.indexOf(layer) < 0) throw new Error("Layer " + layer + " not found");
        return [cfg.bboxMin.slice(), cfg.bboxMax.slice()];
      }
    },
    utils: {
      registerKeyHandler: function (key, fn) {
        const h = { key: key, fn: fn, active: true }; handlers.push(h);
        return { unregister: function () { h.active = false; } };
      },
      showToast: function (type, message, timeout) {
        const t = { type: type, message: message, timeout: timeout, removed: false };
        window.__toasts.push(t);
        const el = document.createElement("div"); el.className = "toast " + type; el.textContent = message;
        document.getElementById("toasts").appendChild(el);
        return function () { t.removed = true; el.remove(); };
      }
    }
  };
  window.__wkKeyHandlers = handlers;
  window.webknossos = { apiReady: function (version) {
    if (version !== 3) return Promise.reject(new Error("this double provides API version 3 only"));
    return new Promise(function (resolve) { setTimeout(function () { resolve(api); }, 50); });
  } };
})();
</script>
<script src="__SCRIPT__"></script>
</body></html>
"""
