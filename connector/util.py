"""Helpers shared by the connectors: layer URLs as browsers see them, names, layer geometry.

Platforms (Neuroglancer in a browser, webKnossos, CATMAID) read Precomputed layers over HTTP(S)
or gs://, never from ``file://``. :func:`public_url` turns a layer URL of the service into the URL
a platform should use:

- ``http(s)://…`` is returned unchanged;
- ``gs://bucket/path`` stays ``gs://…`` (Neuroglancer, webKnossos and CATMAID read it) unless
  ``https=True``, which gives ``https://storage.googleapis.com/bucket/path``;
- ``s3://bucket/path`` → ``https://bucket.s3.amazonaws.com/path`` (public buckets);
- anything else needs a prefix mapping ``"file:///data/=https://files.lab.org/data/"`` (several
  separated by ``;`` or given as a dict), e.g. a web server that serves the layer directories
  with CORS (``emrestore view`` starts one on 127.0.0.1 for ``file://`` layers).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from typing import Any, Iterable, Mapping

from service.errors import EmrestoreError

__all__ = [
    "ConnectorError",
    "parse_prefix_map",
    "public_url",
    "default_output_url",
    "request_id",
    "safe_name",
    "layer_geometry",
    "option",
]

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


class ConnectorError(EmrestoreError):
    """A connector problem for a person (INVALID_ARGUMENT): ``field`` names the option or request
    field, ``detail`` (``reason``) says why."""

    def __init__(self, field: str, message: str):
        super().__init__(field, message)
        self.detail = self.reason


def request_id(n: int = 8) -> str:
    """A short random id (Crockford base32, lowercase) used to name default output layers."""
    return "".join(secrets.choice(_CROCKFORD) for _ in range(n))


def default_output_url(source: str, short: str, kind: str = "restored") -> str:
    """``<source>_<kind>_<short>``: a layer next to the source (same store, same parent)."""
    base = str(source).strip().rstrip("/")
    if not base:
        raise ConnectorError("source", "required: a precomputed layer URL")
    if base.startswith("precomputed://"):
        base = base[len("precomputed://"):]
    return f"{base}_{kind}_{short}"


def safe_name(text: str, max_len: int = 64) -> str:
    """Letters, digits, ``-``, ``_`` and ``.`` only (dataset and stack names on the platforms)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("._-")
    return (name or "layer")[:max_len]


def parse_prefix_map(value: Any) -> list[tuple[str, str]]:
    """Prefix mappings from ``"A=B;C=D"``, a JSON object string, a dict or a list of pairs."""
    if value is None or value == "":
        return []
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                pairs = list(json.loads(text).items())
            except (ValueError, AttributeError):
                raise ConnectorError("public_url_map", f"{value!r} is not a JSON object") from None
        else:
            pairs = []
            for part in text.split(";"):
                part = part.strip()
                if not part:
                    continue
                if "=" not in part:
                    raise ConnectorError("public_url_map", f"{part!r}: expected PREFIX=PUBLIC_PREFIX")
                a, b = part.split("=", 1)
                pairs.append((a.strip(), b.strip()))
    else:
        pairs = [tuple(p) for p in value]
    out = []
    for a, b in pairs:
        if not a or not b:
            raise ConnectorError("public_url_map", f"empty prefix in {a!r}={b!r}")
        out.append((str(a), str(b)))
    # longest prefix first
    return sorted(out, key=lambda p: -len(p[0]))


def _as_file_url(url: str) -> str:
    if "://" not in url:
        return "file://" + os.path.abspath(url)
    return url


def public_url(url: str, prefix_map: Any = None, *, https: bool = False, field: str = "url") -> str:
    """The URL a browser-based platform reads ``url`` from (see the module docstring)."""
    u = str(url).strip()
    if u.startswith("precomputed://"):
        u = u[len("precomputed://"):]
    u = _as_file_url(u).rstrip("/")
    for prefix, repl in parse_prefix_map(prefix_map):
        p = _as_file_url(prefix).rstrip("/")
        if u == p or u.startswith(p + "/"):
            return repl.rstrip("/") + u[len(p):]
    if u.startswith(("http://", "https://")):
        return u
    if u.startswith("gs://"):
        return "https://storage.googleapis.com/" + u[5:] if https else u
    if u.startswith("s3://"):
        bucket, _, key = u[5:].partition("/")
        return f"https://{bucket}.s3.amazonaws.com/{key}"
    raise ConnectorError(field, f"{url} is not reachable from a browser or a remote platform; give a "
                                "public_url_map such as 'file:///data/=https://files.example.org/data/' "
                                "(a web server with CORS that serves the layer directories)")


def layer_geometry(url: str) -> dict:
    """Geometry of a Precomputed layer from its info file (mip 0 plus the number of scales)."""
    from service.volume import precomputed as pc

    info = pc.open_layer(url, 0, "layer")
    raw = _read_info_json(url)
    scales = raw.get("scales", []) if raw else []
    return {
        "url": url,
        "size_xyz": list(info.size_xyz),
        "voxel_offset_xyz": list(info.voxel_offset_xyz),
        "resolution_nm_xyz": [float(r) for r in info.resolution_nm_xyz],
        "chunk_size_xyz": list(info.chunk_size_xyz),
        "dtype": info.dtype,
        "num_scales": max(1, len(scales)),
        "scale_keys": [s.get("key") for s in scales],
        "sharding": scales[0].get("sharding") if scales else None,
        "downsample_factors_xyz": [list(f) for f in info.downsample_factors_xyz],
    }


def _read_info_json(url: str) -> dict | None:
    try:
        from cloudfiles import CloudFiles

        from service.volume.stores import normalize_url

        data = CloudFiles(normalize_url(url)).get("info")
        return json.loads(data) if data else None
    except Exception:  # noqa: BLE001 - geometry from open_layer is enough
        return None


def option(options: Mapping[str, Any] | None, name: str, default: Any = None) -> Any:
    """``options[name]`` with ``-``/``_`` spellings accepted; ``default`` when missing or empty."""
    if not options:
        return default
    for key in (name, name.replace("_", "-"), name.replace("-", "_")):
        if key in options and options[key] not in (None, ""):
            return options[key]
    return default


def as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v for v in re.split(r"[,\s]+", value) if v]
    if isinstance(value, Iterable):
        return [str(v) for v in value]
    return [str(value)]


def local_path(url: str) -> str | None:
    """The filesystem path of a plain path or file:// URL; None for other stores."""
    if url.startswith("file://"):
        return url[7:]
    return url if "://" not in url else None


def read_json_url(url: str):
    """JSON from a local path, file:// or any store cloud-files reads; None when absent or unreadable."""
    local = local_path(url)
    try:
        if local is not None:
            if not os.path.exists(local):
                return None
            with open(local, encoding="utf-8") as f:
                return json.load(f)
        from cloudfiles import CloudFiles
        base, name = url.rstrip("/").rsplit("/", 1)
        raw = CloudFiles(base).get(name)
        return json.loads(raw) if raw else None
    except (OSError, ValueError):
        return None


def write_json_url(url: str, data, field: str = "url", error=None) -> str:
    """Write JSON atomically to a local path, or to a store cloud-files writes; returns where.
    http(s) URLs are refused with ``error(field, message)`` (default ConnectorError)."""
    text = json.dumps(data, indent=2)
    local = local_path(url)
    if local is not None:
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        tmp = local + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, local)
        return local
    if url.startswith(("http://", "https://")):
        raise (error or ConnectorError)(field, f"{url}: cannot write to an http(s) URL; give a path, "
                                               "file://, gs:// or s3:// URL")
    from cloudfiles import CloudFiles
    base, name = url.rstrip("/").rsplit("/", 1)
    CloudFiles(base).put(name, text.encode(), content_type="application/json", compress=None)
    return url
