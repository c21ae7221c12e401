"""webKnossos: register a restored Precomputed layer as a remote dataset.

Follows the WEBKNOSSOS REST API **version 9** (paths ``/api/v9/…``, the version the
``webknossos`` Python client 0.15–2.x uses by default; the routes below are unchanged in the later
``/api/v10``+ versions, so ``api_version`` can be raised). Authentication: the user's API token
in the ``X-Auth-Token`` header (webKnossos → user menu → Auth Token).

Calls made by :func:`register_layer`:

1. ``GET  /api/v9/user`` — check the token (401/403 → a clear error);
2. ``GET  /api/v9/datasets/{name}/isValidNewName`` — ``{"isValid": bool, "errors": [...]}``;
3. ``POST /api/v9/datasets/exploreAndAddRemote`` with
   ``{"remoteUri", "datasetName", "folderPath", "dataStoreName"}`` — webKnossos explores the
   Precomputed layer at ``remoteUri`` (its ``info`` file) and adds a virtual (remote) dataset; the
   answer is the new dataset's id (newer servers) or empty (older ones).

``remoteUri`` must be reachable from the webKnossos server: ``https://…``/``gs://…``/``s3://…``;
``file://`` outputs need a ``public_url_map`` (see :func:`connector.util.public_url`).
The uncertainty layer, when present, becomes a second dataset ``<name>_uncertainty``.

Register target (``register_in``): ``{"platform": "webknossos", "url": "https://webknossos.org",
"options": {"token_env": "WK_TOKEN", "dataset_name": "…", "folder_path": "/emrestore",
"datastore": "…", "public_url_map": "…", "api_version": "9", "include_uncertainty": "true"}}``
(``token``/``token_env``/``token_file``; the dataset name defaults to
``<source name>_restored_<job>``).
"""

from __future__ import annotations

import re
from typing import Any

import httpx

from .util import ConnectorError, option, public_url, resolve_secret, safe_name

__all__ = ["WK_API_VERSION", "WebknossosClient", "register_layer", "register_job_target"]

WK_API_VERSION = 9
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-.]{3,}$")


class WebknossosError(ConnectorError):
    pass


def _wk_message(resp: httpx.Response) -> str:
    """webKnossos error bodies look like ``{"messages": [{"error": "…"}]}``."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:300] or resp.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("messages"), list):
        parts = []
        for m in body["messages"]:
            if isinstance(m, dict):
                parts.extend(str(v) for v in m.values())
        if parts:
            return "; ".join(parts)
    return str(body)[:300]


class WebknossosClient:
    """Minimal webKnossos REST client (``X-Auth-Token``)."""

    def __init__(self, base_url: str, token: str, api_version: int = WK_API_VERSION, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None):
        if not base_url.startswith(("http://", "https://")):
            raise WebknossosError("url", f"{base_url!r}: expected the webKnossos server URL (https://…)")
        if not token:
            raise WebknossosError("token", "a webKnossos API token is required (options token / token_env / token_file)")
        self.base_url = base_url.rstrip("/")
        self.api_version = int(api_version)
        self._http = httpx.Client(headers={"X-Auth-Token": token, "Accept": "application/json"},
                                  timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def url(self, route: str) -> str:
        return f"{self.base_url}/api/v{self.api_version}{route}"

    def _check(self, resp: httpx.Response, what: str) -> httpx.Response:
        if resp.status_code in (401, 403):
            raise WebknossosError("token", f"webKnossos rejected the token ({resp.status_code}) on {what}: "
                                           f"{_wk_message(resp)}")
        if resp.status_code == 404:
            raise WebknossosError("url", f"{what}: not found at {resp.request.url} — is this a webKnossos server "
                                         f"with API v{self.api_version}?")
        if resp.status_code >= 400:
            raise WebknossosError(what, f"webKnossos answered {resp.status_code}: {_wk_message(resp)}")
        return resp

    def current_user(self) -> dict:
        return self._check(self._http.get(self.url("/user")), "GET /user").json()

    def is_valid_new_name(self, name: str) -> tuple[bool, list[str]]:
        resp = self._check(self._http.get(self.url(f"/datasets/{name}/isValidNewName")), "isValidNewName")
        body = resp.json() if resp.content else {}
        return bool(body.get("isValid", True)), [str(e) for e in body.get("errors", [])]

    def explore_remote(self, uris: list[str]) -> dict:
        body = [{"remoteUri": u, "credentialIdentifier": None, "credentialSecret": None,
                 "preferredVoxelSize": None, "dataStoreName": None} for u in uris]
        return self._check(self._http.post(self.url("/datasets/exploreRemote"), json=body), "exploreRemote").json()

    def explore_and_add_remote(self, remote_uri: str, dataset_name: str, folder_path: str | None = None,
                               datastore: str | None = None) -> str | None:
        body = {"remoteUri": remote_uri, "datasetName": dataset_name, "folderPath": folder_path,
                "dataStoreName": datastore}
        resp = self._check(self._http.post(self.url("/datasets/exploreAndAddRemote"), json=body),
                           "exploreAndAddRemote")
        if not resp.content:
            return None
        try:
            data = resp.json()
        except ValueError:
            return None
        if isinstance(data, str):
            return data
        if isinstance(data, dict):
            return data.get("id") or data.get("newDatasetId")
        return None

    def dataset(self, dataset_id: str) -> dict:
        return self._check(self._http.get(self.url(f"/datasets/{dataset_id}")), "GET dataset").json()


def register_layer(wk_url: str, layer_url: str, token: str, dataset_name: str, *, folder_path: str | None = None,
                   datastore: str | None = None, prefix_map: Any = None, api_version: int = WK_API_VERSION,
                   client: WebknossosClient | None = None) -> dict:
    """Add ``layer_url`` to webKnossos as a remote dataset; returns ``{"id", "name", "remote_uri", "url"}``."""
    name = safe_name(dataset_name)
    if not _NAME_RE.match(name):
        raise WebknossosError("dataset_name", f"{dataset_name!r}: at least 3 letters, digits, '-', '_' or '.'")
    remote_uri = public_url(layer_url, prefix_map, field="output")
    own = client is None
    c = client or WebknossosClient(wk_url, token, api_version)
    try:
        c.current_user()
        ok, errors = c.is_valid_new_name(name)
        if not ok:
            raise WebknossosError("dataset_name", f"{name!r} cannot be used: {'; '.join(errors) or 'name taken'}")
        ds_id = c.explore_and_add_remote(remote_uri, name, folder_path, datastore)
    finally:
        if own:
            c.close()
    view = f"{c.base_url}/datasets/{ds_id}/view" if ds_id else f"{c.base_url}/dashboard/datasets"
    return {"id": ds_id, "name": name, "remote_uri": remote_uri, "url": view}


def register_job_target(job_id: str, spec: dict, target: dict) -> str:
    """The ``webknossos`` register target (see the module docstring)."""
    wk_url = (target.get("url") or "").strip()
    opts = target.get("options") or {}
    token = resolve_secret(opts, "token")
    if not token:
        raise WebknossosError("token", "no webKnossos token: set options token_env (an environment variable of "
                                       "the service) or token_file")
    source_name = safe_name(str(spec.get("source", "layer")).rstrip("/").rsplit("/", 1)[-1])
    name = option(opts, "dataset_name", f"{source_name}_restored_{job_id[-8:]}")
    api_version = int(option(opts, "api_version", WK_API_VERSION))
    kw = dict(folder_path=option(opts, "folder_path"), datastore=option(opts, "datastore"),
              prefix_map=option(opts, "public_url_map"), api_version=api_version)
    res = register_layer(wk_url, spec["output"], token, name, **kw)
    msg = f"webknossos: added remote dataset '{res['name']}' ({res['remote_uri']}) → {res['url']}"
    unc = spec.get("uncertainty_output")
    if unc and str(option(opts, "include_uncertainty", "true")).lower() not in ("0", "false", "no"):
        res2 = register_layer(wk_url, unc, token, f"{res['name']}_uncertainty", **kw)
        msg += f"; uncertainty dataset '{res2['name']}' → {res2['url']}"
    return msg
