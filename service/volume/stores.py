"""Storage URLs, credentials and fsspec access: the one module that knows about stores.

URLs used by emrestore:

- ``file:///abs/path`` (plain local paths are normalised to this form),
- ``memory://path`` (fsspec's in-memory filesystem; not visible to cloud-volume),
- ``s3://bucket/key`` and ``gs://bucket/key`` (default credentials of the process; gs:// goes
  through google-cloud-storage and cloud-files, which both honour ``$STORAGE_EMULATOR_HOST``),
- ``https://host/path`` (read-only, e.g. public Precomputed layers),
- ``ALIAS://bucket/key`` for an S3-compatible endpoint registered with
  :func:`register_s3_endpoint` (cloud-volume cannot parse ``s3://http://host:port/...``).

:data:`BACKENDS` is the one place that maps a URL scheme to its store, for volumes (info.py,
reader.py, layers.py), models (engine/model.py) and the ledger (objects.py).

Registration is per process: every process (service, worker) that touches an aliased URL
must call :func:`register_s3_endpoint` before using it.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import fsspec

from ..errors import EmrestoreError, PermissionDenied

__all__ = [
    "VolumeError",
    "SourceNotFound",
    "StoreUnreachable",
    "PermissionDenied",
    "StoreError",
    "Backend",
    "BACKENDS",
    "backend_for",
    "open_store",
    "supported_schemes",
    "S3Endpoint",
    "register_s3_endpoint",
    "registered_endpoint",
    "normalize_url",
    "open_fs",
    "join_url",
    "object_exists",
    "translate_store_error",
]


# --------------------------------------------------------------------------------------
# Errors (shared by stores, precomputed and blocks)
# --------------------------------------------------------------------------------------


class VolumeError(EmrestoreError):
    """Bad volume input; ``field`` names the offending request field, the message is one line."""

    def __init__(self, field: str, message: str, code: str | None = None):
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(message))  # no colour codes
        super().__init__(field, text, code)


class SourceNotFound(VolumeError):
    """The named layer or object does not exist."""
    code = "NOT_FOUND"


class StoreUnreachable(VolumeError):
    """The store could not be contacted (closed port, DNS failure, timeout)."""
    code = "UNAVAILABLE"




class StoreError(VolumeError):
    """The store answered, but not as its protocol says (a reply we cannot use, a corrupt
    object): the store's failure, never the user's (INTERNAL; the message names the store)."""
    code = "INTERNAL"


# --------------------------------------------------------------------------------------
# S3-compatible endpoints
# --------------------------------------------------------------------------------------

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_BASE_SCHEMES = {"file", "memory", "s3", "gs", "mem", "http", "https"}


@dataclass(frozen=True)
class S3Endpoint:
    """A registered S3-compatible endpoint reachable as ``alias://bucket/key``."""

    alias: str
    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    secret_path: str

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem`` reaching this endpoint."""
        return {
            "key": self.access_key_id,
            "secret": self.secret_access_key,
            "endpoint_url": self.endpoint_url,
        }


_ENDPOINTS: dict[str, S3Endpoint] = {}
_LOCK = threading.Lock()


def register_s3_endpoint(
    alias: str,
    endpoint_url: str,
    access_key_id: str,
    secret_access_key: str,
    cloud_volume_dir: str | os.PathLike | None = None,
) -> S3Endpoint:
    """Make ``alias://bucket/key`` reach ``endpoint_url`` for cloud-volume and fsspec.

    Adds a cloud-files alias and writes ``<cloud_volume_dir>/secrets/<alias>-secret.json``
    (``cloud_volume_dir`` defaults to ``$CLOUD_VOLUME_DIR`` or ``~/.cloudvolume``). cloud-files
    reads its secrets directory once at import, so it is pointed at this directory here;
    use one secrets directory per process. Re-registering an alias with other values resets
    cloud-files' S3 connection pools so the new credentials take effect.
    """
    import cloudfiles.interfaces
    import cloudfiles.paths
    import cloudfiles.secrets

    if not re.fullmatch(r"[a-z][a-z0-9]*", alias or ""):
        raise VolumeError("alias", f"{alias!r} is not allowed; use lower-case letters and digits")
    if alias in _BASE_SCHEMES or alias in cloudfiles.paths.ALLOWED_FORMATS:
        raise VolumeError("alias", f"{alias!r} collides with a built-in protocol or format")
    if not re.match(r"^https?://[^/]+", endpoint_url or ""):
        raise VolumeError(
            "endpoint_url", f"{endpoint_url!r} must be http://host[:port] or https://host[:port]"
        )
    endpoint_url = endpoint_url.rstrip("/")

    base = cloud_volume_dir or os.environ.get("CLOUD_VOLUME_DIR") or cloudfiles.secrets.CLOUD_VOLUME_DIR
    secrets_dir = Path(base).expanduser().resolve() / "secrets"
    secrets_dir.mkdir(parents=True, exist_ok=True)
    secret_path = secrets_dir / f"{alias}-secret.json"
    payload = {"AWS_ACCESS_KEY_ID": access_key_id, "AWS_SECRET_ACCESS_KEY": secret_access_key}
    tmp = secret_path.with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, secret_path)

    endpoint = S3Endpoint(alias, endpoint_url, access_key_id, secret_access_key, str(secret_path))
    with _LOCK:
        previous = _ENDPOINTS.get(alias)
        _ENDPOINTS[alias] = endpoint
        # cloud-files computes its secrets directory at import time; secretpath() reads this
        # module global on each call, so pointing it here makes the file above the one used.
        cloudfiles.secrets.CLOUD_VOLUME_SECRETS_DIR = str(secrets_dir)
        import cloudvolume.secrets

        cloudvolume.secrets.CLOUD_VOLUME_DIR = str(secrets_dir.parent)
        cloudfiles.paths.add_alias(alias, f"s3://{endpoint_url}/")
        if previous is not None and previous != endpoint:
            # Pools are keyed by (alias, bucket) and keep the credentials they were built with.
            cloudfiles.secrets.AWS_CREDENTIALS_CACHE.clear()
            cloudfiles.interfaces.reset_connection_pools()
    return endpoint


ENDPOINTS_ENV = "EMRESTORE_S3_ENDPOINTS"


def register_from_env(environ: dict | None = None) -> list[S3Endpoint]:
    """Register the S3-compatible endpoints named in ``$EMRESTORE_S3_ENDPOINTS``.

    The variable holds a JSON list (inline, or the path of a JSON file) of objects with
    ``alias``, ``endpoint_url``, ``access_key_id`` and ``secret_access_key``. The service and
    every worker call this at start-up, so aliases reach the same store in all processes.
    """
    env = os.environ if environ is None else environ
    raw = env.get(ENDPOINTS_ENV, "").strip()
    if not raw:
        return []
    if not raw.startswith("["):
        try:
            raw = Path(raw).read_text()
        except OSError as exc:
            raise VolumeError(ENDPOINTS_ENV, f"cannot read {raw}: {exc}") from None
    try:
        items = json.loads(raw)
        return [register_s3_endpoint(d["alias"], d["endpoint_url"], d["access_key_id"], d["secret_access_key"])
                for d in items]
    except (ValueError, KeyError, TypeError) as exc:
        raise VolumeError(ENDPOINTS_ENV, f"must be a JSON list of {{alias, endpoint_url, access_key_id, "
                                         f"secret_access_key}} objects ({exc})") from None


def endpoints_json() -> str:
    """The registered endpoints as the JSON that ``register_from_env`` reads (for child processes)."""
    return json.dumps([{"alias": e.alias, "endpoint_url": e.endpoint_url, "access_key_id": e.access_key_id,
                        "secret_access_key": e.secret_access_key} for e in _ENDPOINTS.values()])


def registered_endpoint(alias: str) -> S3Endpoint | None:
    """The endpoint registered under ``alias`` in this process, or None."""
    return _ENDPOINTS.get(alias)


# --------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------


def _scheme(url: str) -> str | None:
    m = _SCHEME_RE.match(url)
    return m.group(1).lower() if m else None


def normalize_url(url: str | os.PathLike) -> str:
    """Canonical form of a store URL: local paths become ``file:///abs/path``.

    A leading ``precomputed://`` is dropped and trailing slashes are removed, so two spellings
    of the same layer compare equal.
    """
    url = os.fspath(url)
    if not isinstance(url, str) or not url.strip():
        raise VolumeError("url", "must be a non-empty path or URL")
    url = url.strip()
    if url.startswith("precomputed://"):
        url = url[len("precomputed://"):]
    scheme = _scheme(url)
    if scheme is None:
        return "file://" + os.path.abspath(os.path.expanduser(url))
    if scheme == "file":
        rest = url[len("file://"):]
        return "file://" + os.path.abspath(os.path.expanduser(rest))
    head, rest = url.split("://", 1)
    rest = rest.rstrip("/")
    if not rest:
        raise VolumeError("url", f"{url!r} names no bucket or path")
    return f"{scheme}://{rest}"


def join_url(url: str, *parts: str) -> str:
    """``url`` with path components appended using '/'."""
    url = normalize_url(url)
    tail = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
    return f"{url}/{tail}" if tail else url


# --------------------------------------------------------------------------------------
# Backends: the one place that maps a URL scheme to its store
# --------------------------------------------------------------------------------------


def _s3fs(storage_options: dict[str, Any], fail_fast: bool):
    import s3fs

    opts = dict(storage_options)
    if fail_fast:
        opts["config_kwargs"] = {
            "retries": {"max_attempts": 1, "mode": "standard"},
            "connect_timeout": 3,
            "read_timeout": 10,
        }
    fs = s3fs.S3FileSystem(**opts)
    if fail_fast:
        fs.retries = 1  # s3fs's own retry loop (class attribute, not a constructor argument)
    return fs


@dataclass(frozen=True)
class Backend:
    """What one kind of store is, for every layer of the service.

    ``fs(url, fail_fast)`` gives ``(fsspec filesystem, path)`` — models, the ledger, probes;
    ``atomic`` names the ledger's atomic store class in objects.py (how create-if-absent and
    compare-and-swap are done there); ``volumes`` says whether cloud-volume/cloud-files reach
    it (Precomputed layers), ``writable`` whether anything may be written there.
    """

    name: str
    fs: Callable[[str, bool], tuple[Any, str]]
    atomic: str
    volumes: bool = True
    writable: bool = True


def _rest(url: str) -> str:
    return url.split("://", 1)[1]


def _memory_fs(url: str, fail_fast: bool):
    fs = fsspec.filesystem("memory")
    return fs, fs._strip_protocol(url)


def _gcs_fs(url: str, fail_fast: bool):
    from .gcs import GCSFileSystem
    return GCSFileSystem(fail_fast=fail_fast), _rest(url)


def _cloudfiles_only(url: str, fail_fast: bool):
    raise VolumeError("url", f"{url[:200]}: cloud-files' mem:// holds Precomputed layers only (no models or ledger); "
                             "use memory:// or file://")


#: scheme → backend. Adding a store is one entry here (and, if its conditional writes differ
#: from the others', one atomic store class in objects.py). Registered S3-compatible aliases
#: are S3 with the alias's endpoint (see :func:`backend_for`).
BACKENDS: dict[str, Backend] = {
    "file": Backend("local files", lambda url, ff: (fsspec.filesystem("file"), _rest(url)), "local"),
    "memory": Backend("fsspec memory", _memory_fs, "memory", volumes=False),
    "mem": Backend("cloud-files memory", _cloudfiles_only, "none"),
    "s3": Backend("S3", lambda url, ff: (_s3fs({}, ff), _rest(url)), "s3"),
    "gs": Backend("Google Cloud Storage", _gcs_fs, "gcs"),
    "http": Backend("HTTP (read-only)", lambda url, ff: (fsspec.filesystem("http"), url), "fs", writable=False),
    "https": Backend("HTTPS (read-only)", lambda url, ff: (fsspec.filesystem("http"), url), "fs", writable=False),
}


def supported_schemes() -> set[str]:
    """Schemes a URL may use in this process: the backends' and the registered aliases'."""
    return set(BACKENDS) | set(_ENDPOINTS)


def backend_for(url: str) -> tuple[Backend, str]:
    """``(backend, canonical url)``; INVALID_ARGUMENT naming the allowed schemes otherwise."""
    url = normalize_url(url)
    scheme = _scheme(url)
    backend = BACKENDS.get(scheme)  # type: ignore[arg-type]
    if backend is None:
        endpoint = _ENDPOINTS.get(scheme)  # type: ignore[arg-type]
        if endpoint is not None:
            opts = endpoint.storage_options()
            backend = Backend(f"S3-compatible store {scheme}:// ({endpoint.endpoint_url})",
                              lambda u, ff: (_s3fs(opts, ff), _rest(u)), "s3")
    if backend is None:
        allowed = ", ".join(sorted(f"{s}://" for s in supported_schemes()))
        raise VolumeError("url", f"scheme {scheme}:// of {url[:200]} is not supported; allowed: {allowed}")
    return backend, url


def open_store(url: str, storage_options: dict | None = None, settle_s: float = 0.25,
               conditional: bool | None = None):
    """The ledger's atomic store for a URL (objects.py, gcs.py): the class its backend names.
    With ``storage_options``, fsspec opens ``url`` with them (plain s3:// with an endpoint, in a
    process that has no alias registered)."""
    from . import objects

    backend, url = backend_for(url)
    if backend.atomic not in ("local", "memory", "s3", "gcs", "fs") or not backend.writable:
        raise ValueError(f"ledger: {backend.name} cannot hold a ledger (read-only or no object store)")
    if storage_options is not None:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
    else:
        fs, path = backend.fs(url, False)
    if backend.atomic == "local":
        return objects._LocalStore(path)
    if backend.atomic == "memory":
        return objects._MemoryStore(fs, path, 0.0)
    if backend.atomic == "s3":
        return objects._S3Store(fs, path, settle_s, conditional)
    if backend.atomic == "gcs":
        from .gcs import GCSStore
        return GCSStore(fs, path, settle_s, conditional)
    return objects._FsStore(fs, path, settle_s)


def open_fs(url: str, *, fail_fast: bool = False):
    """``(filesystem, path)`` for an fsspec filesystem holding ``url`` (see :data:`BACKENDS`).
    ``fail_fast`` turns off retries so that a probe of an unreachable store returns within seconds."""
    backend, url = backend_for(url)
    return backend.fs(url, fail_fast)


# --------------------------------------------------------------------------------------
# Error translation and probes
# --------------------------------------------------------------------------------------

_DENIED_CODES = {
    "403",
    "401",
    "AccessDenied",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AllAccessDisabled",
}
_MISSING_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}


def _client_error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code") or "") or None
    code = getattr(exc, "code", None)  # google.api_core's HTTP errors carry the status as an int
    if isinstance(code, int) and type(exc).__module__.startswith("google."):
        return str(code)
    return None


def translate_store_error(exc: BaseException, url: str, field: str) -> EmrestoreError | None:
    """The error for a store exception (PermissionDenied, StoreUnreachable, SourceNotFound), or
    None; an EmrestoreError is its own."""
    if isinstance(exc, EmrestoreError):
        return exc
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for e in chain:
        code = _client_error_code(e)
        if code in _DENIED_CODES:
            return PermissionDenied(field, f"access to {url} was refused ({code}); check the credentials registered for this store")
        if code in _MISSING_CODES:
            return SourceNotFound(field, f"{url} does not exist ({code})")
    for e in chain:
        if isinstance(e, PermissionError):
            return PermissionDenied(field, f"access to {url} was refused ({e})")
        name = type(e).__name__
        module = type(e).__module__ or ""
        if isinstance(e, (ConnectionError, TimeoutError)) or (
            name
            in {
                "EndpointConnectionError",
                "ConnectTimeoutError",
                "ReadTimeoutError",
                "ConnectionClosedError",
                "NewConnectionError",
                "MaxRetryError",
                "ClientConnectorError",
                "ServerDisconnectedError",
            }
        ) or (module.startswith("requests") and name in {"ConnectionError", "Timeout", "ConnectTimeout"}):
            return StoreUnreachable(field, f"the store holding {url} is unreachable ({name}: {e})")
        if module.startswith("google.auth") and name in {"DefaultCredentialsError", "RefreshError"}:
            return PermissionDenied(field, f"no usable Google credentials for {url} ({name}); set "
                                           "GOOGLE_APPLICATION_CREDENTIALS or a cloud-volume google-secret.json")
    for e in chain:
        if _client_error_code(e) in {"500", "502", "503", "504", "429"}:
            return StoreUnreachable(field, f"the store holding {url} is unavailable ({type(e).__name__}: {e})")
    for e in chain:
        if isinstance(e, FileNotFoundError):
            return SourceNotFound(field, f"{url} does not exist")
    return None


def object_exists(url: str, field: str = "url") -> bool:
    """Whether the object at ``url`` exists, probing without retries.

    Raises StoreUnreachable or PermissionDenied (with ``field``) when the store cannot say.
    A missing bucket counts as a missing object.
    """
    fs, path = open_fs(url, fail_fast=True)
    try:
        fs.info(path)
        return True
    except FileNotFoundError:
        return False
    except Exception as exc:  # noqa: BLE001 - translated below
        err = translate_store_error(exc, url, field)
        if isinstance(err, SourceNotFound):
            return False
        if err is not None:
            raise err from exc
        raise StoreError(field, f"the store holding {url} could not say whether it exists "
                                f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from exc
