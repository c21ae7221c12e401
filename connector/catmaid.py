"""CATMAID: register a restored Precomputed layer as a stack with a tile-source-14 stack mirror.

Follows **CATMAID 2021.12.21** (also valid for 2020.02.15 and later): the project import format
(the JSON that ``GET /projects/export`` produces and that ``manage.py catmaid_import_projects
--input FILE`` and the admin *Importer* read), tile source type **14** ("Neuroglancer
precomputed image blocks", ``sourceBaseURL`` = ``<layer URL>/%SCALE_DATASET%/0_1_2``) and the
read API (``GET /projects/``, ``GET /{pid}/stacks``, ``GET /{pid}/stack/{sid}/info``) with API
token authentication (``X-Authorization: Token <token>``).

CATMAID's HTTP API has no endpoint that creates stacks, so registration goes through the import
format:

1. :func:`stack_definition` describes the layer (``dimension``, ``resolution`` in nm,
   ``downsample_factors``, ``metadata.voxelOffset`` and one mirror of ``tile_source_type`` 14);
2. the definition is merged into a project import document (``[{"project": {"title", "stacks"}}]``)
   written to ``project_file`` (default ``<output>/catmaid_project.json``, next to the layer, so it
   is served with it and the admin Importer can read it from its URL);
3. with ``manage_py`` set (a CATMAID ``manage.py`` on the service's machine) the document is
   imported right away (``manage.py catmaid_import_projects --input FILE``);
4. with a CATMAID URL and token the API confirms that the stack is listed in the project and that
   its mirror has tile source type 14.

Register target: ``{"platform": "catmaid", "url": "https://catmaid.lab.org/" (or a path /
file:// / gs:// URL of the import document), "options": {"project": "EM restored" (default
``emrestore <source> <job>``; the importer skips projects whose title already exists),
"stack_title": "…", "project_file": "…", "manage_py": "/opt/catmaid/django/projects/manage.py",
"manage_python": "/opt/catmaid/env/bin/python", "permission": "user:AnonymousUser:can_browse",
"token_env": "CATMAID_TOKEN", "public_url_map": "…", "tile_size": "512"}}``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from typing import Any

import httpx

from .util import (ConnectorError, as_list, layer_geometry, option, public_url, read_json_url, resolve_secret,
                   safe_name, write_json_url)

__all__ = ["CATMAID_VERSION", "TILE_SOURCE_PRECOMPUTED", "stack_definition", "merge_into_document",
           "CatmaidClient", "register_layers", "register_job_target", "mirror_url", "validate_document"]

CATMAID_VERSION = "2021.12.21"
TILE_SOURCE_PRECOMPUTED = 14


class CatmaidError(ConnectorError):
    pass


def _tuple(values) -> str:
    return "(" + ",".join(f"{float(v):g}" for v in values) + ")"


def mirror_url(layer_public_url: str) -> str:
    """``sourceBaseURL`` of a tile source 14 mirror: the layer, ``%SCALE_DATASET%``, axes 0_1_2."""
    return layer_public_url.rstrip("/") + "/%SCALE_DATASET%/0_1_2"


def stack_definition(layer_url: str, title: str, *, prefix_map: Any = None, comment: str = "",
                     tile_size: int = 512, geometry: dict | None = None, metadata: dict | None = None) -> dict:
    """A stack entry of the CATMAID project import format for a Precomputed layer."""
    g = geometry or layer_geometry(layer_url)
    pub = public_url(layer_url, prefix_map, field="output")
    off = [int(v) for v in g["voxel_offset_xyz"]]
    size = [int(v) for v in g["size_xyz"]]
    factors = [[1, 1, 1]] + [list(f) for f in g.get("downsample_factors_xyz", [])]
    meta = {"voxelOffset": off, "emrestore": {"layer": layer_url, "precomputed": pub}}
    meta.update(metadata or {})
    return {
        "title": title,
        # stack space starts at voxel 0: with the voxel offset applied the data occupy offset..offset+size
        "dimension": _tuple([o + s for o, s in zip(off, size)]),
        "resolution": _tuple(g["resolution_nm_xyz"]),
        "downsample_factors": [_tuple(f) for f in factors],
        "metadata": meta,
        "comment": comment,
        "translation": "(0,0,0)",
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
        resp = self._http.get(self.base_url + route)
        if resp.status_code in (401, 403):
            raise CatmaidError("token", f"CATMAID refused {route} ({resp.status_code}): {_catmaid_error(resp)}")
        if resp.status_code >= 400:
            raise CatmaidError("url", f"CATMAID answered {resp.status_code} on {route}: {_catmaid_error(resp)}")
        data = resp.json()
        if isinstance(data, dict) and data.get("error"):
            raise CatmaidError("url", f"CATMAID error on {route}: {data['error']}")
        return data

    def projects(self) -> list[dict]:
        return self._get("/projects/")

    def find_project(self, title_or_id: str) -> dict | None:
        for p in self.projects():
            if str(p.get("id")) == str(title_or_id) or p.get("title") == title_or_id:
                return p
        return None

    def stacks(self, project_id: int) -> list[dict]:
        return self._get(f"/{int(project_id)}/stacks")

    def stack_info(self, project_id: int, stack_id: int) -> dict:
        return self._get(f"/{int(project_id)}/stack/{int(stack_id)}/info")


def _catmaid_error(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        if isinstance(body, dict):
            return str(body.get("error") or body.get("detail") or body)[:300]
    except ValueError:
        pass
    return resp.text.strip()[:300]


def run_import(manage_py: str, document: str, *, python: str = "python3", permissions: list[str] | None = None,
               extra: list[str] | None = None, timeout: float = 300.0) -> str:
    """``python manage.py catmaid_import_projects --input DOCUMENT [--permission …] [extra …]``."""
    cmd = [python, manage_py, "catmaid_import_projects", "--input", document]
    if permissions:
        cmd += ["--permission", *permissions]
    cmd += list(extra or [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CatmaidError("manage_py", f"{shlex.join(cmd)} failed: {e}") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise CatmaidError("manage_py", f"catmaid_import_projects exited {proc.returncode}: {' | '.join(tail)}")
    lines = (proc.stdout or proc.stderr or "").strip().splitlines()
    return lines[-1] if lines else "imported"


def verify_stack(client: CatmaidClient, project: str, stack_title: str) -> dict | None:
    """The stack info if ``stack_title`` is listed in ``project`` with a tile-source-14 mirror."""
    p = client.find_project(project)
    if p is None:
        return None
    for s in client.stacks(p["id"]):
        if s.get("title") == stack_title:
            info = client.stack_info(p["id"], s["id"])
            mirrors = info.get("mirrors", [])
            if not any(int(m.get("tile_source_type", 0)) == TILE_SOURCE_PRECOMPUTED for m in mirrors):
                raise CatmaidError("stack", f"stack {stack_title!r} exists but has no tile source 14 mirror")
            info["project_id"] = p["id"]
            info["stack_id"] = s["id"]
            return info
    return None


def register_layers(layers: list[tuple[str, str, str]], *, project: str, project_file: str,
                    catmaid_url: str | None = None, token: str | None = None, manage_py: str | None = None,
                    manage_python: str = "python3", permissions: list[str] | None = None,
                    import_args: list[str] | None = None, prefix_map: Any = None, tile_size: int = 512) -> dict:
    """Describe each ``(layer_url, stack_title, comment)`` as a stack of ``project``, merge them into
    the import document at ``project_file``, import it with ``manage_py`` when given and confirm the
    stacks through the API when ``catmaid_url`` is given."""
    doc = read_document(project_file)
    stacks = []
    for layer_url, title, comment in layers:
        st = stack_definition(layer_url, title, prefix_map=prefix_map, tile_size=tile_size, comment=comment)
        doc = merge_into_document(doc, project, st)
        stacks.append(st)
    where = write_document(project_file, doc or [])
    result: dict = {"document": where, "stacks": stacks, "imported": False, "verified": {}}
    if manage_py:
        if "://" in where:
            raise CatmaidError("project_file", "manage_py needs a local project_file")
        result["import_output"] = run_import(manage_py, where, python=manage_python, permissions=permissions,
                                             extra=import_args)
        result["imported"] = True
    if catmaid_url:
        client = CatmaidClient(catmaid_url, token)
        try:
            for st in stacks:
                info = verify_stack(client, project, st["title"])
                if info is None and manage_py:
                    raise CatmaidError("stack", f"after the import, stack {st['title']!r} is not listed in "
                                                f"project {project!r} at {catmaid_url} (catmaid_import_projects "
                                                "skips projects whose title exists: use a new project title, or "
                                                "import_args '--ignore-same-name-projects false')")
                result["verified"][st["title"]] = info
        finally:
            client.close()
    return result


def register_job_target(job_id: str, spec: dict, target: dict) -> str:
    """The ``catmaid`` register target (see the module docstring)."""
    url = (target.get("url") or "").strip()
    opts = target.get("options") or {}
    output = spec["output"]
    is_http = url.startswith(("http://", "https://"))
    catmaid_url = url if is_http else option(opts, "catmaid_url")
    project_file = option(opts, "project_file") or (
        url if (url and not is_http) else output.rstrip("/") + "/catmaid_project.json")
    source_name = safe_name(str(spec.get("source", "layer")).rstrip("/").rsplit("/", 1)[-1])
    short = job_id[-8:]
    project = option(opts, "project", f"emrestore {source_name} {short}")
    title = option(opts, "stack_title", f"{source_name} restored {short}")
    layers = [(output, title, f"emrestore job {job_id}: restored with {spec.get('model', '?')}")]
    unc = spec.get("uncertainty_output")
    if unc and str(option(opts, "include_uncertainty", "true")).lower() not in ("0", "false", "no"):
        layers.append((unc, f"{title} uncertainty", f"emrestore job {job_id}: standard deviation of the samples"))
    res = register_layers(layers, project=project, project_file=project_file, catmaid_url=catmaid_url,
                          token=resolve_secret(opts, "token"), manage_py=option(opts, "manage_py"),
                          manage_python=option(opts, "manage_python", "python3"),
                          permissions=as_list(option(opts, "permission")),
                          import_args=as_list(option(opts, "import_args")),
                          prefix_map=option(opts, "public_url_map"), tile_size=int(option(opts, "tile_size", 512)))
    return _describe(res, project)


def _describe(res: dict, project: str) -> str:
    parts = []
    for st in res["stacks"]:
        v = res["verified"].get(st["title"])
        if v:
            parts.append(f"stack '{st['title']}' (id {v['stack_id']}) in project '{project}' (id {v['project_id']})")
        else:
            parts.append(f"stack '{st['title']}'")
    mirror = res["stacks"][0]["mirrors"][0]["url"]
    if any(res["verified"].values()):
        return f"catmaid: registered {', '.join(parts)}; tile source {TILE_SOURCE_PRECOMPUTED} mirror {mirror}"
    if res["imported"]:
        return f"catmaid: imported {', '.join(parts)} into project '{project}' from {res['document']}"
    return (f"catmaid: wrote {', '.join(parts)} (tile source {TILE_SOURCE_PRECOMPUTED}, {mirror}) for project "
            f"'{project}' to {res['document']}; import it with 'manage.py catmaid_import_projects --input "
            f"{res['document']}' or the admin Importer")
