"""The CATMAID double (real HTTP on 127.0.0.1; nothing is mocked in-process).

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
- :func:`fake_import_command` — the ``import_command`` argv that stands for
  ``manage.py catmaid_import_projects`` on the CATMAID host.
- :data:`CATMAID_PAGE` — an HTML page providing CATMAID's front-end API for the widget
  (documented at the page).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
import urllib.error
import urllib.parse

from tests.doubles_http import DoubleServer, JSONHandler

_TUPLE = re.compile(r"^\(\s*-?[0-9.eE+-]+\s*,\s*-?[0-9.eE+-]+\s*,\s*-?[0-9.eE+-]+\s*\)$")


def _parse_tuple(text: str) -> list[float]:
    return [float(v) for v in text.strip("() ").split(",")]


class _CatmaidHandler(JSONHandler):
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


class CatmaidDouble(DoubleServer):
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
// Double of CATMAID's front-end API (2021.12.21); see tests/catmaid_double.py.
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
