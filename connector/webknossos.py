"""webKnossos: add a restored Precomputed layer to the dataset the user views, or as a dataset.

Follows the WEBKNOSSOS server's REST API as routed in ``conf/webknossos.latest.routes`` and
``conf/webknossos.versioned.routes`` (scalableminds/webknossos, API versions 5–14;
``app/controllers/DatasetController.scala``, ``app/models/dataset/ComposeService.scala``) and the
client ``webknossos-libs`` (which speaks v13/v14 today). Authentication: the API token of a
webKnossos user in the ``X-Auth-Token`` header.

API version: :meth:`WebknossosClient.negotiate` asks ``GET /api/buildinfo`` (unversioned; it is
webKnossos and its release) and then ``GET /api/v{N}/buildinfo`` from the newest version this
module knows (:data:`WK_API_VERSIONS`, 14 first) down to 5; the first version the server routes
(200, not 404/400) is used. A target may pin ``api_version``.

Registration (:func:`register_layer`):

1. ``GET /api/vN/user`` — check the token;
2. public layers: ``POST /api/vN/datasets/exploreAndAddRemote`` ``{remoteUri, datasetName,
   folderPath, dataStoreName}`` → the new dataset's id (older servers answer nothing; the id is
   then looked up with ``GET /datasets``);
   private buckets (the target's ``bucket_credentials``): ``POST /api/vN/datasets/exploreRemote``
   ``[{remoteUri, credentialIdentifier, credentialSecret, preferredVoxelSize}]`` (webKnossos stores
   the credential and references it from the explored data source) then
   ``POST /api/vN/datasets/addVirtualDataset/{name}`` ``{dataSource, dataStoreName, folderId}``;
3. with the target's ``source_dataset`` (the id of the dataset the user views, or ``"auto"``: the
   dataset whose layer reads the job's source URL):
   ``POST /api/vN/datasets/{source}/compose/addLayer`` ``{datasetId, sourceName, newName,
   transformations: []}`` adds the restored (and uncertainty) layer to that dataset, so it
   shows as a layer over the source. Servers without that route (404) keep the separate dataset,
   and the message links to it.

``remoteUri`` must be reachable from the webKnossos server: ``https://…``/``gs://…``/``s3://…``;
``file://`` outputs need a ``public_url_map`` (see :func:`connector.util.public_url`).
"""

from __future__ import annotations

import re
from typing import Any

import httpx

from .util import ConnectorError, option, public_url, safe_name

__all__ = ["WK_API_VERSIONS", "WK_API_VERSION", "WebknossosClient", "register_layer", "register_job_target"]

#: API versions this module speaks, newest first (v13/v14: webknossos-libs today).
WK_API_VERSIONS = (14, 13, 12, 11, 10, 9, 8, 7, 6, 5)
WK_API_VERSION = WK_API_VERSIONS[0]
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
            return "; ".join(parts)[:300]
    return str(body)[:300]


class WebknossosClient:
    """Minimal webKnossos REST client (``X-Auth-Token``); ``api_version`` None → negotiated."""

    def __init__(self, base_url: str, token: str, api_version: int | None = None, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None):
        if not base_url.startswith(("http://", "https://")):
            raise WebknossosError("url", f"{base_url!r}: expected the webKnossos server URL (https://…)")
        if not token:
            raise WebknossosError("token", "a webKnossos API token is required (the target's token)")
        self.base_url = base_url.rstrip("/")
        self.api_version = int(api_version) if api_version else None
        self.server_version: str | None = None
        self._http = httpx.Client(headers={"X-Auth-Token": token, "Accept": "application/json"},
                                  timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def negotiate(self) -> int:
        """The newest API version both sides speak (see the module docstring)."""
        try:
            r = self._http.get(f"{self.base_url}/api/buildinfo")
        except httpx.HTTPError as e:
            raise WebknossosError("url", f"cannot reach {self.base_url}: {e}") from None
        if r.status_code == 200:
            try:
                info = r.json()
                wk = info.get("webknossos", {}) if isinstance(info, dict) else {}
                self.server_version = str(wk.get("version") or wk.get("commitHash") or "") or None
            except ValueError:
                pass
        elif r.status_code == 404:
            raise WebknossosError("url", f"{self.base_url} has no /api/buildinfo: not a webKnossos server")
        if self.api_version:
            return self.api_version
        for v in WK_API_VERSIONS:
            resp = self._http.get(f"{self.base_url}/api/v{v}/buildinfo")
            if resp.status_code == 200:
                self.api_version = v
                return v
            if resp.status_code not in (400, 404, 410):
                raise WebknossosError("url", f"GET /api/v{v}/buildinfo answered {resp.status_code}: {_wk_message(resp)}")
        raise WebknossosError("api_version", f"{self.base_url} speaks none of the API versions "
                                             f"{WK_API_VERSIONS[-1]}–{WK_API_VERSIONS[0]}")

    def url(self, route: str) -> str:
        if self.api_version is None:
            self.negotiate()
        return f"{self.base_url}/api/v{self.api_version}{route}"

    def _check(self, resp: httpx.Response, what: str) -> httpx.Response:
        if resp.status_code in (401, 403):
            raise WebknossosError("token", f"webKnossos rejected the token ({resp.status_code}) on {what}: "
                                           f"{_wk_message(resp)}")
        if resp.status_code == 404:
            raise WebknossosError("url", f"{what}: not found at {resp.request.url} (API v{self.api_version}): "
                                         f"{_wk_message(resp)}")
        if resp.status_code >= 400:
            raise WebknossosError(what, f"webKnossos answered {resp.status_code}: {_wk_message(resp)}")
        return resp

    def current_user(self) -> dict:
        return self._check(self._http.get(self.url("/user")), "GET /user").json()

    def is_valid_new_name(self, name: str) -> tuple[bool, list[str]]:
        resp = self._check(self._http.get(self.url(f"/datasets/{name}/isValidNewName")), "isValidNewName")
        body = resp.json() if resp.content else {}
        return bool(body.get("isValid", True)), [str(e) for e in body.get("errors", [])]

    def datasets(self) -> list[dict]:
        return self._check(self._http.get(self.url("/datasets")), "GET /datasets").json()

    def dataset(self, dataset_id: str) -> dict:
        return self._check(self._http.get(self.url(f"/datasets/{dataset_id}")), "GET dataset").json()

    def datastores(self) -> list[dict]:
        return self._check(self._http.get(self.url("/datastores")), "GET /datastores").json()

    def explore_remote(self, uri: str, credential: dict | None = None) -> dict:
        cred = credential or {}
        body = [{"remoteUri": uri, "credentialIdentifier": cred.get("identifier"),
                 "credentialSecret": cred.get("secret"), "preferredVoxelSize": None}]
        return self._check(self._http.post(self.url("/datasets/exploreRemote"), json=body), "exploreRemote").json()

    def add_virtual_dataset(self, name: str, data_source: dict, datastore: str, folder_id: str | None = None) -> str | None:
        body = {"dataSource": data_source, "dataStoreName": datastore, "folderId": folder_id}
        resp = self._check(self._http.post(self.url(f"/datasets/addVirtualDataset/{name}"), json=body),
                           "addVirtualDataset")
        return _id_from(resp)

    def explore_and_add_remote(self, remote_uri: str, dataset_name: str, folder_path: str | None = None,
                               datastore: str | None = None) -> str | None:
        body = {"remoteUri": remote_uri, "datasetName": dataset_name, "folderPath": folder_path,
                "dataStoreName": datastore}
        resp = self._check(self._http.post(self.url("/datasets/exploreAndAddRemote"), json=body),
                           "exploreAndAddRemote")
        return _id_from(resp)

    def compose_add_layer(self, dataset_id: str, from_dataset: str, source_name: str, new_name: str) -> bool:
        """Add layer ``source_name`` of dataset ``from_dataset`` to ``dataset_id`` as ``new_name``;
        False when the server has no compose/addLayer route (older releases)."""
        body = {"datasetId": from_dataset, "sourceName": source_name, "newName": new_name, "transformations": []}
        resp = self._http.post(self.url(f"/datasets/{dataset_id}/compose/addLayer"), json=body)
        if resp.status_code == 404:
            msg = _wk_message(resp).lower()
            if "dataset" in msg and "not found" in msg:
                raise WebknossosError("source_dataset", f"dataset {dataset_id} not found on {self.base_url}")
            return False  # no such route on this release
        self._check(resp, "compose/addLayer")
        return True


def _id_from(resp: httpx.Response) -> str | None:
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


def _layer_names(ds: dict) -> list[str]:
    src = ds.get("dataSource") or {}
    return [str(layer.get("name")) for layer in src.get("dataLayers", []) if isinstance(layer, dict)]


def find_dataset_of_layer(client: WebknossosClient, layer_url: str, exclude: set | None = None) -> str | None:
    """The id of a dataset with a layer whose magnifications are read from ``layer_url`` (the
    dataset a user views for that source), or None."""
    base = layer_url.rstrip("/") + "/"
    for d in client.datasets():
        if not d.get("id") or d["id"] in (exclude or set()):
            continue
        ds = d if d.get("dataSource") else client.dataset(d["id"])
        for layer in (ds.get("dataSource") or {}).get("dataLayers", []):
            for mag in layer.get("mags", []) or []:
                if str(mag.get("path", "")).startswith(base):
                    return str(d["id"])
    return None


def register_layer(client: WebknossosClient, layer_url: str, dataset_name: str, *, folder_path: str | None = None,
                   datastore: str | None = None, prefix_map: Any = None, credential: dict | None = None) -> dict:
    """Add ``layer_url`` to webKnossos as a (virtual) dataset; ``{"id", "name", "remote_uri", "url"}``."""
    name = safe_name(dataset_name)
    if not _NAME_RE.match(name):
        raise WebknossosError("dataset_name", f"{dataset_name!r}: at least 3 letters, digits, '-', '_' or '.'")
    remote_uri = public_url(layer_url, prefix_map, field="output")
    ok, errors = client.is_valid_new_name(name)
    if not ok:
        raise WebknossosError("dataset_name", f"{name!r} cannot be used: {'; '.join(errors) or 'name taken'}")
    if credential:
        explored = client.explore_remote(remote_uri, credential)
        ds = explored.get("dataSource") if isinstance(explored, dict) else None
        if not ds:
            raise WebknossosError("bucket_credentials", f"webKnossos could not explore {remote_uri}: "
                                                        f"{(explored or {}).get('report', '')[:300]}")
        store = datastore
        if not store:
            stores = client.datastores()
            if not stores:
                raise WebknossosError("datastore", "the server lists no datastore")
            store = stores[0].get("name")
        ds_id = client.add_virtual_dataset(name, ds, str(store), None)
    else:
        ds_id = client.explore_and_add_remote(remote_uri, name, folder_path, datastore)
    if not ds_id:  # older servers answer nothing: look the dataset up by name
        ds_id = next((d.get("id") for d in client.datasets() if d.get("name") == name), None)
    view = f"{client.base_url}/datasets/{ds_id}/view" if ds_id else f"{client.base_url}/dashboard/datasets"
    return {"id": ds_id, "name": name, "remote_uri": remote_uri, "url": view}


def register_job_target(job: dict, target) -> str:
    """The ``webknossos`` target (:class:`connector.targets.Target`) for a finished job."""
    opts = target.options
    token = target.secret("token")
    if not token:
        raise WebknossosError("token", f"target {target.name} has no token (configure token: {{env|file}})")
    credential = target.secret_json("bucket_credentials")
    short = job["job_id"][-8:]
    source_name = safe_name(str(job.get("source") or "layer").rstrip("/").rsplit("/", 1)[-1])
    name = option(opts, "dataset_name", f"{source_name}_restored_{short}")
    client = WebknossosClient(target.url, token, option(opts, "api_version"))
    try:
        version = client.negotiate()
        client.current_user()
        kw = dict(folder_path=option(opts, "folder_path"), datastore=option(opts, "datastore"),
                  prefix_map=option(opts, "public_url_map"), credential=credential)
        layers = [("restored", job["output"], name)]
        if job.get("uncertainty_output") and str(option(opts, "include_uncertainty", "true")).lower() not in (
                "0", "false", "no"):
            layers.append(("uncertainty", job["uncertainty_output"], f"{name}_uncertainty"))
        added = [(kind, register_layer(client, url, ds_name, **kw)) for kind, url, ds_name in layers]
        source_ds = option(opts, "source_dataset")
        if str(source_ds or "").lower() == "auto":
            source_ds = find_dataset_of_layer(client, public_url(job["source"], option(opts, "public_url_map"),
                                                                  field="source"),
                                              exclude={res["id"] for _, res in added})
        parts = []
        if str(option(opts, "source_dataset") or "").lower() == "auto" and not source_ds:
            parts.append("no dataset on the server reads the source layer, so none was extended")
        if source_ds:
            composed = []
            for kind, res in added:
                if not res["id"]:
                    break
                src_layer = (_layer_names(client.dataset(res["id"])) or ["color"])[0]
                new_name = f"{kind}_{short}"
                if not client.compose_add_layer(str(source_ds), res["id"], src_layer, new_name):
                    break
                composed.append(new_name)
            if len(composed) == len(added):
                link = f"{client.base_url}/datasets/{source_ds}/view"
                return (f"webknossos: added layer{'s' if len(composed) > 1 else ''} "
                        f"{', '.join(repr(c) for c in composed)} to dataset {source_ds} (API v{version}) → {link}")
            parts.append(f"this server cannot add layers to dataset {source_ds} (no compose/addLayer route)")
        for kind, res in added:
            parts.append(f"{kind} dataset '{res['name']}' ({res['remote_uri']}) → {res['url']}")
        return f"webknossos: added remote dataset(s) (API v{version}): " + "; ".join(parts)
    finally:
        client.close()
