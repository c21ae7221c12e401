"""CATMAID: register a restored Precomputed layer as a stack (tile source 14) that overlays the source.

Supported CATMAID versions: **2021.12.21** (the first release with tile source 14, "Neuroglancer
precomputed image blocks") and later releases / the development branch. Checked against
catmaid/CATMAID at tag 2021.12.21: ``django/applications/catmaid/urls.py`` (read API: ``GET
/version``, ``GET /projects/``, ``GET /{pid}/stacks``, ``GET /{pid}/stack/{sid}/info``; no HTTP route
creates stacks or mirrors), ``control/importer.py`` (``PreMirror`` appends ``/`` to every mirror
URL), ``management/commands/catmaid_import_projects.py`` (reads the ``/projects/export`` format from
``--input`` or **stdin**; skips projects and stacks whose title exists), ``admin.py`` (Django admin
``StackMirrorAdmin`` and ``ProjectStackAdmin``: plain model forms) and
``static/js/tile-source.js`` (``NeuroglancerPrecomputedImageBlockSource`` takes the slice axes
after the mirror URL's last ``/``: a trailing ``/`` makes them NaN in 2021.12.21).

How a restored layer gets into CATMAID (all configured by the operator in the target):

1. :func:`stack_definition` describes the layer: ``dimension`` = the layer's size (tile source
   14 starts at the layer's ``voxel_offset``), ``translation`` that places it over the source
   stack (:func:`translation_nm`), ``metadata.voxelOffset``, one tile-source-14 mirror.
2. The import document is written (``project_file``, default next to the layer) and, with an
   ``import_command`` (an argv list such as ``["kubectl", "exec", "-i", "deploy/catmaid", "--",
   "python", "manage.py", "catmaid_import_projects"]``, or ``ssh catmaid-host …``), piped to it on
   stdin — the command runs on the CATMAID host, not on the service's machine. A project whose
   title exists is skipped by the importer, so when the target's ``project`` exists the stack is
   imported into a staging project ``<project> (emrestore)``.
3. With Django-admin credentials (``admin_user`` + ``admin_password``), over plain HTTP(S):
   the stack is linked into the user's existing ``project`` (``/admin/catmaid/projectstack/add/``,
   with the overlay translation), and — on releases whose importer leaves the trailing ``/`` that
   2021.12.21's front end cannot parse — a mirror with the exact URL is added in front
   (``/admin/catmaid/stackmirror/add/``, position −1). Both admin forms exist since 2018 releases.
4. The read API (``X-Authorization: Token …``) confirms the stack, its mirror and the project.

Without ``import_command`` nothing runs: the document is written and the message says how to
import it (admin *Importer*, JSON representation, "merge" strategy adds to an existing project).
"""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any, Sequence

import httpx

from .util import ConnectorError, as_list, layer_geometry, option, public_url, read_json_url, safe_name, write_json_url

__all__ = ["CATMAID_VERSION", "TILE_SOURCE_PRECOMPUTED", "stack_definition", "merge_into_document",
           "CatmaidClient", "CatmaidAdmin", "register_layers", "register_job_target", "mirror_url",
           "validate_document", "translation_nm", "front_end_slice_dims", "parse_version"]

CATMAID_VERSION = "2021.12.21"
TILE_SOURCE_PRECOMPUTED = 14


class CatmaidError(ConnectorError):
    pass


def parse_version(text: str) -> tuple[int, int, int] | None:
    """``"2021.12.21"`` / ``"2021.12.21-42-gabcdef"`` → (2021, 12, 21); None when not a release date."""
    m = re.match(r"^\s*(\d{4})\.(\d{1,2})\.(\d{1,2})", str(text or ""))
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def front_end_slice_dims(image_base: str) -> list[float]:
    """The slice axes CATMAID 2021.12.21's ``NeuroglancerPrecomputedImageBlockSource`` reads from
    a mirror URL (text after the last ``/``, split on ``_``); NaN entries mean it cannot display."""
    tail = image_base[image_base.rfind("/") + 1:]
    out = []
    for part in tail.split("_"):
        m = re.match(r"^\s*[+-]?\d+", part)
        out.append(float(int(m.group(0))) if m else float("nan"))
    return out


def _tuple(values) -> str:
    return "(" + ",".join(f"{float(v):g}" for v in values) + ")"


def mirror_url(layer_public_url: str) -> str:
    """``sourceBaseURL`` of a tile source 14 mirror: the layer, ``%SCALE_DATASET%``, axes 0_1_2."""
    return layer_public_url.rstrip("/") + "/%SCALE_DATASET%/0_1_2"


def stack_definition(layer_url: str, title: str, *, prefix_map: Any = None, comment: str = "",
                     tile_size: int = 512, geometry: dict | None = None, metadata: dict | None = None,
                     translation_nm: Sequence[float] = (0.0, 0.0, 0.0)) -> dict:
    """A stack entry of the CATMAID project import format for a Precomputed layer.

    Tile source 14 reads the layer from its ``voxel_offset``: stack coordinate 0 is voxel
    ``voxel_offset``, so the stack's ``dimension`` is the layer's ``size`` (not offset + size) and
    where the stack lies in project space is its ``translation`` (nm; see :func:`translation_nm`)."""
    g = geometry or layer_geometry(layer_url)
    pub = public_url(layer_url, prefix_map, field="output")
    off = [int(v) for v in g["voxel_offset_xyz"]]
    size = [int(v) for v in g["size_xyz"]]
    factors = [[1, 1, 1]] + [list(f) for f in g.get("downsample_factors_xyz", [])]
    meta = {"voxelOffset": off, "emrestore": {"layer": layer_url, "precomputed": pub}}
    meta.update(metadata or {})
    return {
        "title": title,
        "dimension": _tuple(size),
        "resolution": _tuple(g["resolution_nm_xyz"]),
        "downsample_factors": [_tuple(f) for f in factors],
        "metadata": meta,
        "comment": comment,
        "translation": _tuple(translation_nm),
        "orientation": 0,
        "mirrors": [{
            "title": "emrestore precomputed",
            "url": mirror_url(pub),
            "fileextension": "png",
            "tile_width": int(tile_size),
            "tile_height": int(tile_size),
            "tile_source_type": TILE_SOURCE_PRECOMPUTED,
            "position": 0,
        }],
    }


def translation_nm(restored: dict, source: dict | None, source_translation: Sequence[float] = (0, 0, 0)) -> list[float]:
    """Project-space translation (nm) of a restored stack so that it overlays the source stack:
    the source stack shows voxel ``source.voxel_offset`` at its translation, the restored stack
    voxel ``restored.voxel_offset``; both offsets are converted with their own resolutions."""
    r_off = [o * r for o, r in zip(restored["voxel_offset_xyz"], restored["resolution_nm_xyz"])]
    s_off = ([o * r for o, r in zip(source["voxel_offset_xyz"], source["resolution_nm_xyz"])]
             if source else [0.0, 0.0, 0.0])
    return [float(t) + a - b for t, a, b in zip(source_translation, r_off, s_off)]


def validate_document(doc: Any) -> None:
    """The checks CATMAID's importer applies (PreProject/PreStack/PreMirror), as ValueError."""
    import re
    tuple_re = re.compile(r"^\(\s*-?[0-9.eE+-]+\s*,\s*-?[0-9.eE+-]+\s*,\s*-?[0-9.eE+-]+\s*\)$")
    if not isinstance(doc, list):
        raise ValueError("the import document must be a JSON list of {\"project\": …} objects")
    for p in doc:
        if not isinstance(p, dict) or "project" not in p:
            raise ValueError("Missing required container field 'project'")
        proj = p["project"]
        if not isinstance(proj, dict) or not proj.get("title"):
            raise ValueError("Missing required project field 'title'")
        for s in proj.get("stacks", []):
            for f in ("title", "dimension", "resolution"):
                if f not in s:
                    raise ValueError(f"Missing required stack field '{f}'")
            for f in ("dimension", "resolution", "translation"):
                if f in s and not tuple_re.match(str(s[f])):
                    raise ValueError(f"Couldn't read {f} value {s[f]!r}")
            for m in s.get("mirrors", []):
                if not m.get("title"):
                    raise ValueError("Could not find stack mirror title")
                if not m.get("url") and not m.get("path") and not m.get("folder"):
                    raise ValueError("Could not find valid image base for stack mirror")


def merge_into_document(doc: list | None, project_title: str, stack: dict) -> list:
    """Add ``stack`` to ``project_title`` in an import document (a stack of the same title is replaced)."""
    doc = json.loads(json.dumps(doc)) if doc else []
    for entry in doc:
        proj = entry.get("project", {})
        if proj.get("title") == project_title:
            stacks = [s for s in proj.get("stacks", []) if s.get("title") != stack["title"]]
            stacks.append(stack)
            proj["stacks"] = stacks
            return doc
    doc.append({"project": {"title": project_title, "stacks": [stack]}})
    return doc


def read_document(url: str) -> list | None:
    data = read_json_url(url)
    return data if isinstance(data, list) else None


def write_document(url: str, doc: list) -> str:
    validate_document(doc)
    return write_json_url(url, doc, "project_file", CatmaidError)


class CatmaidClient:
    """CATMAID read API with an API token (``X-Authorization: Token …``)."""

    def __init__(self, base_url: str, token: str | None, timeout: float = 30.0):
        if not base_url.startswith(("http://", "https://")):
            raise CatmaidError("url", f"{base_url!r}: expected the CATMAID URL (https://…/)")
        headers = {"Accept": "application/json"}
        if token:
            headers["X-Authorization"] = f"Token {token}"
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def _get(self, route: str):
        try:
            resp = self._http.get(self.base_url + route)
        except httpx.HTTPError as e:
            raise CatmaidError("url", f"cannot reach {self.base_url}: {e}") from None
        if resp.status_code in (401, 403):
            raise CatmaidError("token", f"CATMAID refused {route} ({resp.status_code}): {_catmaid_error(resp)}")
        if resp.status_code >= 400:
            raise CatmaidError("url", f"CATMAID answered {resp.status_code} on {route}: {_catmaid_error(resp)}")
        data = resp.json()
        if isinstance(data, dict) and data.get("error"):
            raise CatmaidError("url", f"CATMAID error on {route}: {data['error']}")
        return data

    def version(self) -> str:
        return str(self._get("/version").get("SERVER_VERSION", ""))

    def projects(self) -> list[dict]:
        return self._get("/projects/")

    def find_project(self, title_or_id: Any) -> dict | None:
        for p in self.projects():
            if str(p.get("id")) == str(title_or_id) or p.get("title") == title_or_id:
                return p
        return None

    def stacks(self, project_id: int) -> list[dict]:
        return self._get(f"/{int(project_id)}/stacks")

    def stack_info(self, project_id: int, stack_id: int) -> dict:
        return self._get(f"/{int(project_id)}/stack/{int(stack_id)}/info")

    def find_stack(self, title: str) -> tuple[dict, dict] | None:
        """(project, stack entry) of the first stack titled ``title`` in any visible project."""
        for p in self.projects():
            for s in p.get("stacks", []):
                if s.get("title") == title:
                    return p, s
        return None


def _catmaid_error(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        if isinstance(body, dict):
            return str(body.get("error") or body.get("detail") or body)[:300]
    except ValueError:
        pass
    return resp.text.strip()[:300]


class CatmaidAdmin:
    """CATMAID's Django admin over HTTP(S), signed in with a staff account (session + CSRF):
    the two plain model forms used here, ``projectstack/add`` and ``stackmirror/add``."""

    def __init__(self, base_url: str, user: str, password: str, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(timeout=timeout, follow_redirects=False)
        self._login(user, password)

    def close(self) -> None:
        self._http.close()

    def _csrf(self, path: str) -> str:
        r = self._http.get(self.base_url + path)
        if r.status_code in (301, 302) and "/login" in r.headers.get("location", "") and "login" not in path:
            raise CatmaidError("admin_user", "the admin session was refused")
        tok = self._http.cookies.get("csrftoken")
        if not tok:
            raise CatmaidError("url", f"{self.base_url}{path} set no csrftoken cookie: not a CATMAID admin")
        return tok

    def _post(self, path: str, data: dict) -> httpx.Response:
        tok = self._csrf(path)
        return self._http.post(self.base_url + path, data={**data, "csrfmiddlewaretoken": tok},
                               headers={"Referer": self.base_url + path, "X-CSRFToken": tok})

    def _login(self, user: str, password: str) -> None:
        r = self._post("/admin/login/", {"username": user, "password": password, "next": "/admin/"})
        if r.status_code != 302:
            raise CatmaidError("admin_password", f"the CATMAID admin login as {user!r} failed ({r.status_code})")

    def _add(self, model: str, data: dict) -> None:
        r = self._post(f"/admin/catmaid/{model}/add/", data)
        if r.status_code != 302:
            errs = re.findall(r'class="errorlist[^"]*"><li>([^<]+)</li>', r.text)
            raise CatmaidError("admin_user", f"admin {model}/add refused ({r.status_code}): "
                                             f"{'; '.join(errs)[:300] or 'see the CATMAID log'}")

    def add_project_stack(self, project_id: int, stack_id: int, translation: Sequence[float]) -> None:
        t = [float(v) for v in translation]
        self._add("projectstack", {"project": str(project_id), "stack": str(stack_id), "translation_0": f"{t[0]:g}",
                                   "translation_1": f"{t[1]:g}", "translation_2": f"{t[2]:g}", "orientation": "0"})

    def add_stack_mirror(self, stack_id: int, title: str, url: str, tile_size: int, position: int = -1) -> None:
        self._add("stackmirror", {"stack": str(stack_id), "title": title, "image_base": url, "file_extension": "png",
                                  "tile_width": str(tile_size), "tile_height": str(tile_size),
                                  "tile_source_type": str(TILE_SOURCE_PRECOMPUTED), "position": str(position)})


def run_import(command: Sequence[str], document: list, *, permissions: Sequence[str] = (),
               timeout: float = 300.0) -> str:
    """Pipe the import ``document`` (JSON) to the operator's ``command`` (``… catmaid_import_projects``,
    which reads stdin); ``--permission`` values from the target are appended."""
    cmd = list(command)
    if permissions:
        cmd += ["--permission", *permissions]
    try:
        proc = subprocess.run(cmd, input=json.dumps(document), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CatmaidError("import_command", f"{cmd[0]} failed: {e}") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise CatmaidError("import_command", f"catmaid_import_projects exited {proc.returncode}: {' | '.join(tail)[:300]}")
    lines = (proc.stdout or proc.stderr or "").strip().splitlines()
    return lines[-1] if lines else "imported"


def register_layers(layers: list[tuple[str, str, str]], *, project: str, project_file: str,
                    catmaid_url: str | None = None, token: str | None = None,
                    import_command: Sequence[str] | None = None, permissions: Sequence[str] = (),
                    admin: tuple[str, str] | None = None, prefix_map: Any = None, tile_size: int = 512,
                    source_layer: str | None = None, source_translation: Sequence[float] = (0, 0, 0),
                    timeout: float = 300.0) -> dict:
    """Register each ``(layer_url, stack_title, comment)`` in CATMAID (see the module docstring)."""
    src_geom = None
    if source_layer:
        try:
            src_geom = layer_geometry(source_layer)
        except Exception:  # noqa: BLE001 - without it the restored stack is placed by its own offset
            src_geom = None
    stacks = []
    for layer_url, title, comment in layers:
        g = layer_geometry(layer_url)
        stacks.append(stack_definition(layer_url, title, prefix_map=prefix_map, tile_size=tile_size, comment=comment,
                                       geometry=g, translation_nm=translation_nm(g, src_geom, source_translation)))
    client = CatmaidClient(catmaid_url, token) if catmaid_url else None
    result: dict = {"stacks": stacks, "imported": False, "verified": {}, "project": project, "notes": []}
    try:
        existing = client.find_project(project) if client else None
        if client:
            version = client.version()
            result["version"] = version
            v = parse_version(version)
            if v is not None and v < (2021, 12, 21):
                raise CatmaidError("url", f"CATMAID {version} has no tile source 14 (Neuroglancer precomputed); "
                                          f"it needs release {CATMAID_VERSION} or later")
        import_title = f"{project} (emrestore)" if existing else project
        doc = read_document(project_file)
        for st in stacks:
            doc = merge_into_document(doc, import_title, st)
        result["document"] = write_document(project_file, doc or [])
        if not import_command:
            return result
        result["import_output"] = run_import(import_command, [e for e in doc if e["project"]["title"] == import_title],
                                             permissions=permissions, timeout=timeout)
        result["imported"] = True
        if client is None:
            return result
        adm = CatmaidAdmin(catmaid_url, *admin) if admin else None
        try:
            for st in stacks:
                found = client.find_stack(st["title"])
                if found is None:
                    raise CatmaidError("stack", f"after the import, stack {st['title']!r} is not listed at {catmaid_url} "
                                                "(the importer skips stacks whose title exists)")
                proj, entry = found
                info = client.stack_info(proj["id"], entry["id"])
                url = st["mirrors"][0]["url"]
                shown = [m for m in info.get("mirrors", []) if int(m.get("tile_source_type", 0)) == TILE_SOURCE_PRECOMPUTED]
                readable = [m for m in shown if not any(d != d for d in front_end_slice_dims(m.get("image_base", "")))]
                if not readable:
                    if adm is None:
                        result["notes"].append(f"stack {st['title']!r}: the importer stored the mirror as "
                                               f"{(shown[0]['image_base'] if shown else '?')!r}, which CATMAID "
                                               f"{CATMAID_VERSION} cannot display; configure admin_user/admin_password "
                                               "so the exact URL is added")
                    else:
                        adm.add_stack_mirror(entry["id"], "emrestore precomputed (exact URL)", url, tile_size)
                if existing and adm is not None:
                    t = [float(v) for v in re.findall(r"-?[0-9.eE+-]+", st["translation"])]
                    adm.add_project_stack(existing["id"], entry["id"], t)
                    proj = existing
                elif existing:
                    result["notes"].append(f"stack {st['title']!r} is in project {import_title!r}: linking it into "
                                           f"{project!r} needs admin_user/admin_password")
                info = client.stack_info(proj["id"], entry["id"])
                info.update(project_id=proj["id"], stack_id=entry["id"], project_title=proj.get("title"))
                result["verified"][st["title"]] = info
        finally:
            if adm is not None:
                adm.close()
    finally:
        if client is not None:
            client.close()
    return result


def register_job_target(job: dict, target) -> str:
    """The ``catmaid`` target (:class:`connector.targets.Target`) for a finished job."""
    opts = target.options
    output = job["output"]
    source_name = safe_name(str(job.get("source") or "layer").rstrip("/").rsplit("/", 1)[-1])
    short = job["job_id"][-8:]
    project = str(option(opts, "project", f"emrestore {source_name}"))
    title = option(opts, "stack_title", f"{source_name} restored {short}")
    layers = [(output, title, f"emrestore job {job['job_id']}: restored with {job.get('model') or '?'}")]
    unc = job.get("uncertainty_output")
    if unc and str(option(opts, "include_uncertainty", "true")).lower() not in ("0", "false", "no"):
        layers.append((unc, f"{title} uncertainty", f"emrestore job {job['job_id']}: spread of the samples"))
    admin = None
    if option(opts, "admin_user"):
        pw = target.secret("admin_password")
        if not pw:
            raise CatmaidError("admin_password", f"target {target.name}: admin_user needs admin_password {{env|file}}")
        admin = (str(option(opts, "admin_user")), pw)
    res = register_layers(
        layers, project=project,
        project_file=option(opts, "project_file") or output.rstrip("/") + "/catmaid_project.json",
        catmaid_url=target.url, token=target.secret("token"), import_command=option(opts, "import_command"),
        permissions=as_list(option(opts, "permission")), admin=admin, prefix_map=option(opts, "public_url_map"),
        tile_size=int(option(opts, "tile_size", 512)),
        source_layer=job.get("source") or None,
        source_translation=[float(v) for v in option(opts, "source_translation_nm", [0, 0, 0])],
        timeout=float(option(opts, "import_timeout_s", 300)))
    return _describe(res, project)


def _describe(res: dict, project: str) -> str:
    parts = []
    for st in res["stacks"]:
        v = res["verified"].get(st["title"])
        if v:
            parts.append(f"stack '{st['title']}' (id {v['stack_id']}) in project '{v.get('project_title')}' "
                         f"(id {v['project_id']})")
        else:
            parts.append(f"stack '{st['title']}'")
    mirror = res["stacks"][0]["mirrors"][0]["url"]
    notes = ("; " + "; ".join(res["notes"])) if res.get("notes") else ""
    if res["verified"]:
        return (f"catmaid: registered {', '.join(parts)}; tile source {TILE_SOURCE_PRECOMPUTED} mirror {mirror}"
                + (f" (CATMAID {res['version']})" if res.get("version") else "") + notes)
    if res["imported"]:
        return f"catmaid: imported {', '.join(parts)} into project '{project}'" + notes
    return (f"catmaid: wrote {', '.join(parts)} (tile source {TILE_SOURCE_PRECOMPUTED}, {mirror}) for project "
            f"'{project}' to {res['document']}; import it with the admin Importer (JSON representation, "
            "'merge' strategy) or catmaid_import_projects on the CATMAID host" + notes)
