"""Test doubles of the platforms the connectors talk to, and a running emrestore service.

Everything here is real networking on 127.0.0.1 (ephemeral ports); nothing is mocked in-process.

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
- :class:`CatmaidDouble` — an HTTP server standing in for **CATMAID 2021.12.21**, following
  catmaid/CATMAID at that tag: ``django/applications/catmaid/urls.py`` (read API: ``GET /version``,
  ``GET /projects/``, ``GET /projects/export``, ``GET /{pid}/stacks``, ``GET /{pid}/stack/{sid}/info``;
  API token in ``X-Authorization: Token …``), ``control/importer.py`` and
  ``management/commands/catmaid_import_projects.py`` (the management command has no HTTP form;
  here it is ``POST /__double__/catmaid_import_projects``, reached through :func:`fake_import_command`):
  the importer's checks (required ``title``, ``dimension``, ``resolution``, mirror ``title`` and
  ``url``, ``(x,y,z)`` tuples), its defaults (projects and stacks whose title exists are skipped)
  and its ``PreMirror`` appending ``/`` to every mirror URL; ``admin.py`` (Django admin login with
  session + CSRF, the plain ``stackmirror`` and ``projectstack`` add forms, 302 on success,
  200 with an ``errorlist`` otherwise); and ``static/js/tile-source.js`` —
  :meth:`CatmaidDouble.displays` applies the 2021.12.21 ``NeuroglancerPrecomputedImageBlockSource``
  parsing (slice axes after the mirror URL's last ``/``) to tell whether a stack would display.
- :data:`WEBKNOSSOS_PAGE` / :data:`CATMAID_PAGE` — HTML pages providing the platforms' front-end
  JavaScript API surface for the user script and the widget (documented in the pages).
- :class:`RunningService` — the real gRPC server with the real JobManager + LocalExecutor.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# ============================================================================ running service


class RunningService:
    """A real emrestore gRPC server (127.0.0.1, ephemeral port) over a real JobManager whose
    LocalExecutor runs ``emrestore worker`` subprocesses. ``models_dir``: model directory URL."""

    def __init__(self, tmp_path, models_dir: str | None, token: str | None = None,
                 block_xyz=(64, 64, 0), max_cutout_voxels: int = 4_194_304, shard_bytes: int | None = None):
        from service.api.server import build_server
        from service.jobs.executors import LocalExecutor
        from service.jobs.manager import JobManager

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        ledger = f"file://{tmp_path}/ledger"
        self.manager = JobManager(ledger, LocalExecutor(ledger, default_parallelism=1,
                                                        log_dir=str(tmp_path / "worker-logs"),
                                                        env={"OMP_NUM_THREADS": "1"}),
                                  models_dir=models_dir, poll_interval_s=0.2, block_size_xyz=block_xyz,
                                  max_cutout_voxels=max_cutout_voxels, shard_bytes=shard_bytes)
        self.manager.start()
        self.server, self.port = build_server(self.manager, "127.0.0.1", 0, token=token)
        self.server.start()
        self.target = f"127.0.0.1:{self.port}"
        self.token = token

    def close(self) -> None:
        self.server.stop(1).wait()
        self.manager.close()


# ============================================================================ HTTP double base


class _DoubleServer:
    handler_class: type

    def __init__(self):
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(self.handler_class):  # type: ignore[misc, name-defined]
            double = owner

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def record(self, method: str, path: str, headers: dict, body) -> None:
        with self._lock:
            self.requests.append({"method": method, "path": path, "headers": headers, "body": body})

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _JSONHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    double: _DoubleServer

    def log_message(self, fmt, *args):
        pass

    def send_json(self, status: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        return raw

    def _dispatch(self, method: str) -> None:
        raw = self.read_body() if method in ("POST", "PUT", "PATCH") else b""
        path = urllib.parse.urlsplit(self.path).path
        self.double.record(method, self.path, dict(self.headers), raw.decode("utf-8", "replace"))
        try:
            self.handle_request(method, path, raw)
        except Exception as e:  # noqa: BLE001 - a double must answer, never hang
            self.send_json(500, {"error": f"double crashed: {type(e).__name__}: {e}"})

    def do_GET(self):  # noqa: N802
        self._dispatch("GET")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def handle_request(self, method: str, path: str, raw: bytes) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


def _fetch_json(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - test double, loopback only
        return json.loads(r.read().decode())


# ============================================================================ webKnossos double

_WK_NAME = re.compile(r"^[A-Za-z0-9_\-.]{3,}$")


class _WebknossosHandler(_JSONHandler):
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


class WebknossosDouble(_DoubleServer):
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
            info = _fetch_json(uri.rstrip("/") + "/info")
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


# ============================================================================ CATMAID double

_TUPLE = re.compile(r"^\(\s*-?[0-9.eE+-]+\s*,\s*-?[0-9.eE+-]+\s*,\s*-?[0-9.eE+-]+\s*\)$")


def _parse_tuple(text: str) -> list[float]:
    return [float(v) for v in text.strip("() ").split(",")]


class _CatmaidHandler(_JSONHandler):
    double: "CatmaidDouble"

    def handle_request(self, method: str, path: str, raw: bytes) -> None:
        d = self.double
        if method == "POST" and path == "/__double__/catmaid_import_projects":
            try:
                doc = json.loads(raw or b"null")
                imported = d.import_document(doc)
            except (ValueError, RuntimeError) as e:
                self.send_json(400, {"error": str(e), "type": type(e).__name__})
                return
            self.send_json(200, {"imported": imported})
            return
        if path == "/version" and method == "GET":
            self.send_json(200, {"SERVER_VERSION": d.version})
            return
        if path.startswith("/admin/"):
            self.handle_admin(method, path, raw)
            return
        auth = self.headers.get("X-Authorization")
        if auth is None:
            self.send_json(403, {"error": "You do not have permission to access this resource (no API token)",
                                 "type": "PermissionError"})
            return
        scheme, _, tok = auth.partition(" ")
        if scheme != "Token" or tok != d.token:
            self.send_json(401, {"detail": "Invalid token."})
            return
        if method == "GET" and path == "/projects/":
            self.send_json(200, [{"id": p["id"], "title": p["title"],
                                  "stacks": [{"id": s["id"], "title": s["title"], "comment": s.get("comment", "")}
                                             for s in p["stacks"]], "stackgroups": []}
                                 for p in d.projects.values()])
            return
        if method == "GET" and path == "/projects/export":
            self.send_json(200, [{"project": {"id": p["id"], "title": p["title"],
                                              "stacks": [d.export_stack(s) for s in p["stacks"]]}}
                                 for p in d.projects.values()])
            return
        m = re.match(r"^/(\d+)/stacks$", path)
        if method == "GET" and m:
            p = d.projects.get(int(m.group(1)))
            if p is None:
                self.send_json(404, {"error": f"Project {m.group(1)} does not exist", "type": "DoesNotExist"})
                return
            self.send_json(200, [{"id": s["id"], "pid": p["id"], "title": s["title"], "comment": s.get("comment", "")}
                                 for s in p["stacks"]])
            return
        m = re.match(r"^/(\d+)/stack/(\d+)/info$", path)
        if method == "GET" and m:
            p = d.projects.get(int(m.group(1)))
            s = next((s for s in (p or {}).get("stacks", []) if s["id"] == int(m.group(2))), None)
            if s is None:
                self.send_json(404, {"error": "Stack not found", "type": "DoesNotExist"})
                return
            self.send_json(200, d.stack_info(p, s))
            return
        self.send_json(404, {"error": f"no route {method} {path}"})


    # ---------------------------------------------------------------- Django admin
    def send_html(self, status: int, text: str, cookies: dict | None = None, location: str | None = None) -> None:
        data = text.encode()
        self.send_response(status)
        for k, v in (cookies or {}).items():
            self.send_header("Set-Cookie", f"{k}={v}; Path=/")
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _cookies(self) -> dict:
        out = {}
        for part in (self.headers.get("Cookie") or "").split(";"):
            if "=" in part:
                k, v = part.strip().split("=", 1)
                out[k] = v
        return out

    def handle_admin(self, method: str, path: str, raw: bytes) -> None:
        d = self.double
        cookies = self._cookies()
        csrf = cookies.get("csrftoken") or secrets.token_hex(16)
        if method == "GET":
            self.send_html(200, "<form>admin</form>", {"csrftoken": csrf})
            return
        form = {k: v[0] for k, v in urllib.parse.parse_qs(raw.decode(), keep_blank_values=True).items()}
        if not cookies.get("csrftoken") or form.get("csrfmiddlewaretoken") != cookies["csrftoken"] \
                or not (self.headers.get("Referer") or "").startswith(d.url):
            self.send_html(403, "<h1>Forbidden (403)</h1><p>CSRF verification failed.</p>")
            return
        if path == "/admin/login/":
            if (form.get("username"), form.get("password")) != (d.admin_user, d.admin_password):
                self.send_html(200, '<ul class="errorlist nonfield"><li>Please enter the correct username and '
                                    'password for a staff account.</li></ul>')
                return
            sid = secrets.token_hex(16)
            d.sessions.add(sid)
            self.send_html(302, "", {"sessionid": sid}, "/admin/")
            return
        if cookies.get("sessionid") not in d.sessions:
            self.send_html(302, "", None, "/admin/login/?next=" + path)
            return
        errors = []
        if path == "/admin/catmaid/stackmirror/add/":
            stack = d.find_stack(form.get("stack"))
            if stack is None:
                errors.append("Select a valid choice. That choice is not one of the available choices.")
            for f in ("title", "image_base"):
                if not form.get(f):
                    errors.append(f"{f}: This field is required.")
            try:
                ints = {f: int(form.get(f, "")) for f in ("tile_width", "tile_height", "tile_source_type", "position")}
            except ValueError:
                errors.append("Enter a whole number.")
            if not errors:
                # a model form: image_base is stored exactly as given (no trailing slash added)
                stack["mirrors"].append({"id": d._id("mirror"), "title": form["title"], "image_base": form["image_base"],
                                         "file_extension": form.get("file_extension", "jpg"),
                                         "tile_width": ints["tile_width"], "tile_height": ints["tile_height"],
                                         "tile_source_type": ints["tile_source_type"], "position": ints["position"]})
                stack["mirrors"].sort(key=lambda m: m["position"])
                self.send_html(302, "", None, "/admin/catmaid/stackmirror/")
                return
        elif path == "/admin/catmaid/projectstack/add/":
            stack = d.find_stack(form.get("stack"))
            proj = d.projects.get(int(form["project"])) if str(form.get("project", "")).isdigit() else None
            if stack is None or proj is None:
                errors.append("Select a valid choice. That choice is not one of the available choices.")
            try:
                t = [float(form[f"translation_{i}"]) for i in range(3)]
            except (KeyError, ValueError):
                errors.append("translation: Enter a number.")
            if not errors:
                proj["stacks"].append(dict(stack, translation=t))
                self.send_html(302, "", None, "/admin/catmaid/projectstack/")
                return
        else:
            self.send_html(404, "<h1>Not Found</h1>")
            return
        self.send_html(200, "".join(f'<ul class="errorlist"><li>{e}</li></ul>' for e in errors))


class CatmaidDouble(_DoubleServer):
    """CATMAID 2021.12.21 double (see the module docstring). ``projects``: id → project."""
    handler_class = _CatmaidHandler

    def __init__(self, token: str = "catmaid-secret-token", version: str = "2021.12.21",
                 admin_user: str = "emrestore-admin", admin_password: str = "admin-secret"):
        self.token = token
        self.version = version
        self.admin_user, self.admin_password = admin_user, admin_password
        self.sessions: set[str] = set()
        self.projects: dict[int, dict] = {}
        self._next = {"project": 1, "stack": 1, "mirror": 1}
        super().__init__()

    def _id(self, kind: str) -> int:
        i = self._next[kind]
        self._next[kind] += 1
        return i

    def find_stack(self, stack_id) -> dict | None:
        for p in self.projects.values():
            for st in p["stacks"]:
                if str(st["id"]) == str(stack_id):
                    return st
        return None

    @staticmethod
    def displays(stack: dict) -> bool:
        """Whether CATMAID 2021.12.21's front end can show the stack: it uses the first mirror
        (lowest position) of tile source 14 and reads the slice axes after its URL's last '/'
        (``NeuroglancerPrecomputedImageBlockSource``); a NaN axis breaks it."""
        mirrors = sorted(stack["mirrors"], key=lambda m: m["position"])
        if not mirrors or mirrors[0]["tile_source_type"] != 14:
            return False
        base = mirrors[0]["image_base"]
        dims = []
        for part in base[base.rfind("/") + 1:].split("_"):
            m = re.match(r"^\s*[+-]?\d+", part)
            dims.append(int(m.group(0)) if m else None)
        return len(dims) == 3 and None not in dims and sorted(dims) == [0, 1, 2]

    def add_project(self, title: str) -> int:
        pid = self._id("project")
        self.projects[pid] = {"id": pid, "title": title, "stacks": []}
        return pid

    def import_document(self, doc) -> list[str]:
        """catmaid_import_projects with its default options; returns the imported stack titles."""
        if not isinstance(doc, list):
            raise ValueError("expected a JSON list of project objects (the /projects/export format)")
        pre = []
        for entry in doc:
            if not isinstance(entry, dict) or "project" not in entry:
                raise RuntimeError("Missing required container field 'project'")
            p = entry["project"]
            if "title" not in p:
                raise RuntimeError("Missing required project field 'title'")
            stacks = []
            for s in p.get("stacks", []):
                for f in ("title", "dimension", "resolution"):
                    if f not in s:
                        raise RuntimeError(f"Missing required stack field '{f}'")
                for f in ("dimension", "resolution"):
                    if not _TUPLE.match(str(s[f])):
                        raise ValueError(f"Couldn't read {f} value")
                if not _TUPLE.match(str(s.get("translation", "(0,0,0)"))):
                    raise ValueError("Couldn't read translation value")
                for mirror in s.get("mirrors", []):
                    if not mirror.get("title"):
                        raise ValueError("Could not find stack mirror title")
                    if not mirror.get("url"):
                        raise ValueError("Could not find valid image base for stack mirror")
                    if not isinstance(mirror.get("tile_source_type", 1), int):
                        raise ValueError("tile_source_type must be an integer")
                stacks.append(s)
            pre.append((p["title"], stacks))
        imported = []
        existing_projects = {p["title"] for p in self.projects.values()}
        existing_stacks = {s["title"] for p in self.projects.values() for s in p["stacks"]}
        for title, stacks in pre:
            if title in existing_projects:  # --ignore-same-name-projects (default true)
                continue
            stacks = [s for s in stacks if s["title"] not in existing_stacks]  # --ignore-same-name-stacks
            if not stacks:  # --ignore-empty-projects
                continue
            pid = self.add_project(title)
            for s in stacks:
                mirrors = []
                for mirror in s.get("mirrors", []):
                    base = mirror["url"] if mirror["url"].endswith("/") else mirror["url"] + "/"
                    mirrors.append({"id": self._id("mirror"), "title": mirror["title"], "image_base": base,
                                    "file_extension": mirror.get("fileextension", "jpg"),
                                    "tile_width": mirror.get("tile_width", 512),
                                    "tile_height": mirror.get("tile_height", 512),
                                    "tile_source_type": mirror.get("tile_source_type", 1),
                                    "position": mirror.get("position", 0)})
                self.projects[pid]["stacks"].append({
                    "id": self._id("stack"), "title": s["title"], "comment": s.get("comment", ""),
                    "dimension": _parse_tuple(s["dimension"]), "resolution": _parse_tuple(s["resolution"]),
                    "translation": _parse_tuple(s.get("translation", "(0,0,0)")),
                    "downsample_factors": s.get("downsample_factors"), "metadata": s.get("metadata", ""),
                    "orientation": s.get("orientation", 0), "mirrors": mirrors})
                imported.append(s["title"])
        return imported

    @staticmethod
    def stack_info(p: dict, s: dict) -> dict:
        xyz = lambda v: dict(zip("xyz", v))  # noqa: E731
        return {"sid": s["id"], "pid": p["id"], "ptitle": p["title"], "stitle": s["title"],
                "dimension": xyz([int(v) for v in s["dimension"]]), "resolution": xyz(s["resolution"]),
                "translation": xyz(s["translation"]), "orientation": s["orientation"],
                "downsample_factors": s["downsample_factors"], "metadata": s["metadata"],
                "comment": s["comment"], "mirrors": s["mirrors"], "broken_slices": {}}

    @staticmethod
    def export_stack(s: dict) -> dict:
        t = lambda v: "(" + ",".join(f"{x:g}" for x in v) + ")"  # noqa: E731
        return {"id": s["id"], "title": s["title"], "dimension": t(s["dimension"]), "resolution": t(s["resolution"]),
                "translation": t(s["translation"]), "orientation": s["orientation"], "metadata": s["metadata"],
                "comment": s["comment"], "downsample_factors": s["downsample_factors"],
                "mirrors": [{"title": m["title"], "url": m["image_base"], "fileextension": m["file_extension"],
                             "tile_width": m["tile_width"], "tile_height": m["tile_height"],
                             "tile_source_type": m["tile_source_type"], "position": m["position"]}
                            for m in s["mirrors"]]}


def fake_import_command(path: str, catmaid: CatmaidDouble) -> list[str]:
    """An ``import_command`` argv standing in for ``… manage.py catmaid_import_projects`` on the
    CATMAID host: reads the document on stdin (as the real command does without ``--input``) and
    posts it to the double; ``--permission`` arguments are accepted."""
    script = f'''#!{sys.executable}
"""Stand-in for 'manage.py catmaid_import_projects' (document on stdin)."""
import json, sys, urllib.request, urllib.error
data = sys.stdin.buffer.read()
if not data.strip():
    print("CommandError: Please provide either the --input argument with a file path or provide data on stdin.",
          file=sys.stderr); sys.exit(1)
req = urllib.request.Request("{catmaid.url}/__double__/catmaid_import_projects", data=data,
                             headers={{"Content-Type": "application/json"}}, method="POST")
try:
    with urllib.request.urlopen(req, timeout=30) as r:
        print("Imported", len(json.loads(r.read())["imported"]), "stacks")
except urllib.error.HTTPError as e:
    print("CommandError:", json.loads(e.read()).get("error"), file=sys.stderr); sys.exit(1)
'''
    with open(path, "w") as f:
        f.write(script)
    os.chmod(path, 0o755)
    return [sys.executable, path]


# ============================================================================ front-end API doubles

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
// Double of the webKnossos front-end API v3 (window.webknossos.apiReady(3)); see tests/platform_doubles.py.
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

#: Stands for CATMAID's front end (2021.12.21): the global ``CATMAID`` namespace with
#: ``CATMAID.registerWidget({name, description, key, creator})``, ``CATMAID.msg(title, text)``,
#: ``CATMAID.warn(text)``, ``CATMAID.error(text)``, the ``InstanceRegistry`` mix-in
#: (``registerInstance``/``unregisterInstance``) and the global ``project`` with
#: ``getStackViewers()`` / ``focusedStackViewer`` whose stack viewer has ``primaryStack``
#: (``id``, ``title``, ``dimension``, ``resolution``, ``translation``, ``mirrors`` with
#: ``image_base``/``tile_source_type``, ``projectToStackX/Y/Z(z, y, x)``), ``projectCoordinates()``,
#: ``viewWidth``, ``viewHeight`` and ``scale``. ``CATMAID.createWidget(key)`` instantiates a
#: registered widget into ``#widget-host`` the way CATMAID's window manager does (controls then
#: content, then ``init``). Messages are recorded in ``window.__messages``.
CATMAID_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>CATMAID front-end double</title></head>
<body>
<div id="widget-host"></div>
<script>
// Double of CATMAID's front-end API (2021.12.21); see tests/platform_doubles.py.
(function () {
  const cfg = window.__CATMAID_DOUBLE__ || {};
  window.__messages = [];
  function InstanceRegistry() {}
  InstanceRegistry.prototype.registerInstance = function () {
    const c = this.constructor; c.__n = (c.__n || 0) + 1; return c.__n;
  };
  InstanceRegistry.prototype.unregisterInstance = function () {};
  window.InstanceRegistry = InstanceRegistry;
  const widgets = {};
  const stack = {
    id: cfg.stackId, title: cfg.stackTitle,
    dimension: { x: cfg.dimension[0], y: cfg.dimension[1], z: cfg.dimension[2] },
    resolution: { x: cfg.resolution[0], y: cfg.resolution[1], z: cfg.resolution[2] },
    translation: { x: 0, y: 0, z: 0 },
    mirrors: cfg.mirrors,
    projectToStackX: function (z, y, x) { return (x - this.translation.x) / this.resolution.x; },
    projectToStackY: function (z, y, x) { return (y - this.translation.y) / this.resolution.y; },
    projectToStackZ: function (z, y, x) { return (z - this.translation.z) / this.resolution.z; }
  };
  const stackViewer = {
    primaryStack: stack, viewWidth: cfg.viewSize[0], viewHeight: cfg.viewSize[1], scale: cfg.scale,
    projectCoordinates: function () {
      return { x: cfg.position[0] * stack.resolution.x, y: cfg.position[1] * stack.resolution.y,
               z: cfg.position[2] * stack.resolution.z };
    }
  };
  window.project = { id: cfg.projectId, focusedStackViewer: stackViewer,
                     getStackViewers: function () { return [stackViewer]; } };
  window.CATMAID = {
    registerWidget: function (spec) { widgets[spec.key] = spec; },
    msg: function (title, text) { window.__messages.push({ level: "msg", title: title, text: text }); },
    warn: function (text) { window.__messages.push({ level: "warn", text: text }); },
    error: function (text) { window.__messages.push({ level: "error", text: text }); },
    createWidget: function (key) {
      const spec = widgets[key]; if (!spec) throw new Error("no widget " + key);
      const w = new spec.creator({}); const conf = w.getWidgetConfiguration();
      const host = document.getElementById("widget-host");
      const controls = document.createElement("div"); controls.id = conf.controlsID || "controls";
      const content = document.createElement("div"); content.id = conf.contentID || "content";
      host.appendChild(controls); host.appendChild(content);
      if (conf.createControls) conf.createControls.call(w, controls);
      if (conf.createContent) conf.createContent.call(w, content);
      if (conf.init) conf.init.call(w);
      window.__widget = w; return w;
    },
    __widgets: widgets,
    // settings an administrator gives extensions; here taken from the page's double config
    emrestoreConfig: cfg.emrestoreConfig
  };
})();
</script>
<script src="__SCRIPT__"></script>
</body></html>
"""


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.2, what: str = "condition"):
    t_end = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() > t_end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# ============================================================================ headless Chromium

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage",
                  # software WebGL (SwiftShader) for Neuroglancer without a GPU
                  "--use-angle=swiftshader", "--enable-unsafe-swiftshader")


def chrome_driver(user_data_dir: str, window=(1200, 900)):
    """Selenium Chrome driver on Debian's ``chromium`` + ``chromium-driver`` with a fresh profile;
    ``pytest.skip`` (with the reason) when either, or selenium, is missing."""
    import shutil

    import pytest

    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    driver_bin = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)
    if chromium is None or driver_bin is None:
        pytest.skip("browser test needs Debian's chromium and chromium-driver "
                    "(apt-get install -y --no-install-recommends chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("browser test needs the selenium package")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={user_data_dir}")
    opts.add_argument(f"--window-size={window[0]},{window[1]}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        return webdriver.Chrome(service=Service(driver_bin), options=opts)
    except Exception as e:  # noqa: BLE001 - a broken browser install is a skip, with the reason
        pytest.skip(f"chromium could not be started through chromedriver: {str(e).splitlines()[0]}")


def page_with_config(template: str, script_url: str, config_var: str, config: dict) -> str:
    """An HTML page from WEBKNOSSOS_PAGE/CATMAID_PAGE with ``window.<config_var> = config`` set first."""
    head = f"<script>window.{config_var} = {json.dumps(config)};</script>"
    return template.replace("<head>", "<head>" + head, 1).replace("__SCRIPT__", script_url)
