"""Registration targets: operator configuration, never request data.

The operator lists named targets in one file (JSON, or YAML when PyYAML is installed) that
``emrestore serve --targets FILE`` and ``emrestore bridge --targets FILE`` read::

    {"targets": {
       "lab-ng":  {"platform": "neuroglancer", "url": "gs://lab-viewer/states/em.json",
                   "public_url_map": "file:///data/=https://files.lab.org/data/"},
       "lab-wk":  {"platform": "webknossos", "url": "https://webknossos.lab.org",
                   "token": {"env": "WK_TOKEN"}, "source_dataset": "6656e1…",
                   "bucket_credentials": {"file": "/etc/emrestore/s3-readonly.json"}},
       "lab-cm":  {"platform": "catmaid", "url": "https://catmaid.lab.org/",
                   "token": {"file": "/etc/emrestore/catmaid.token"},
                   "import_command": ["kubectl", "exec", "-i", "deploy/catmaid", "--",
                                      "python", "/home/django/projects/manage.py",
                                      "catmaid_import_projects"],
                   "admin_user": "emrestore", "admin_password": {"file": "/etc/emrestore/catmaid.pw"},
                   "project": "EM volume 2024"}}}

A request names targets only (``register_in: ["lab-ng"]``); everything a connector uses — URLs,
paths, programs, secrets — comes from this file. Secrets are given as ``{"env": NAME}`` (an
environment variable of the service) or ``{"file": PATH}`` (first non-comment line; a JSON object
for bucket credentials) and are read only when a target is used, so a file that holds no secret
can be shared and checked into the deployment. :func:`load_targets` checks the whole file up
front and names the offending key in its errors.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .util import ConnectorError

__all__ = ["Target", "Secret", "load_targets", "parse_targets", "resolve_names", "PLATFORMS", "NAME_RE"]

PLATFORMS = ("neuroglancer", "webknossos", "catmaid")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

#: keys each platform's target accepts (besides ``platform`` and ``url``)
_OPTIONS = {
    "neuroglancer": {"public_url_map", "include_source", "layer_name", "link_prefix"},
    "webknossos": {"token", "public_url_map", "dataset_name", "folder_path", "datastore", "api_version",
                   "include_uncertainty", "source_dataset", "bucket_credentials"},
    "catmaid": {"token", "public_url_map", "project", "stack_title", "project_file", "import_command",
                "import_timeout_s", "permission", "tile_size", "include_uncertainty", "source_translation_nm",
                "admin_user", "admin_password"},
}
_SECRET_KEYS = {"token", "bucket_credentials", "admin_password"}


@dataclass(frozen=True)
class Secret:
    """Where a secret lives: an environment variable or a file, both named by the operator."""
    env: str | None = None
    file: str | None = None
    field: str = "token"

    def read(self) -> str:
        if self.env:
            val = os.environ.get(self.env, "").strip()
            if not val:
                raise ConnectorError(self.field, f"environment variable {self.env} is unset or empty")
            return val
        try:
            with open(str(self.file), encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConnectorError(self.field, f"cannot read {self.file}: {e.strerror or e}") from None
        if text.lstrip().startswith("{"):
            return text.strip()
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                return line
        raise ConnectorError(self.field, f"{self.file} holds no secret")

    def read_json(self) -> dict:
        text = self.read()
        try:
            data = json.loads(text)
        except ValueError:
            raise ConnectorError(self.field, "expected a JSON object") from None
        if not isinstance(data, dict):
            raise ConnectorError(self.field, "expected a JSON object")
        return data

    def describe(self) -> str:
        return f"${self.env}" if self.env else f"file {self.file}"


@dataclass(frozen=True)
class Target:
    """One configured registration target."""
    name: str
    platform: str
    url: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def secret(self, key: str = "token") -> str | None:
        s = self.options.get(key)
        return s.read() if isinstance(s, Secret) else None

    def secret_json(self, key: str) -> dict | None:
        s = self.options.get(key)
        return s.read_json() if isinstance(s, Secret) else None


def _secret(value: Any, where: str) -> Secret:
    if not isinstance(value, Mapping) or set(value) - {"env", "file"} or len(value) != 1:
        raise ConnectorError(where, 'give {"env": "VARIABLE"} or {"file": "/path/to/secret"} '
                                    "(secrets are never written into the target file itself)")
    (kind, ref), = value.items()
    if not isinstance(ref, str) or not ref.strip():
        raise ConnectorError(where, f"{kind} must be a non-empty string")
    if kind == "env" and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", ref):
        raise ConnectorError(where, f"{ref!r} is not an environment variable name")
    return Secret(env=ref if kind == "env" else None, file=ref if kind == "file" else None,
                  field=where.rsplit(".", 1)[-1])


def parse_targets(data: Any, origin: str = "targets") -> dict[str, Target]:
    """Targets from the parsed file content (``{"targets": {name: {...}}}`` or ``{name: {...}}``)."""
    if isinstance(data, Mapping) and "targets" in data:
        data = data["targets"]
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConnectorError(origin, "expected an object of named targets")
    out: dict[str, Target] = {}
    for name, spec in data.items():
        where = f"{origin}.{name}"
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ConnectorError(where, "target names are 1-64 letters, digits, '_', '.', '-'")
        if not isinstance(spec, Mapping):
            raise ConnectorError(where, "expected an object with platform and url")
        platform = str(spec.get("platform", "")).strip().lower()
        if platform not in PLATFORMS:
            raise ConnectorError(f"{where}.platform", f"{spec.get('platform')!r}; allowed: {', '.join(PLATFORMS)}")
        url = spec.get("url")
        if not isinstance(url, str) or not url.strip():
            raise ConnectorError(f"{where}.url", "required")
        url = url.strip()
        if platform in ("webknossos", "catmaid") and not url.startswith(("https://", "http://")):
            raise ConnectorError(f"{where}.url", f"{url!r}: expected the {platform} server URL (https://…)")
        opts: dict[str, Any] = {}
        for key, value in spec.items():
            if key in ("platform", "url"):
                continue
            if key not in _OPTIONS[platform]:
                raise ConnectorError(f"{where}.{key}", f"unknown option for {platform}; allowed: "
                                                       f"{', '.join(sorted(_OPTIONS[platform]))}")
            if key in _SECRET_KEYS:
                opts[key] = _secret(value, f"{where}.{key}")
            elif key == "import_command":
                if (not isinstance(value, list) or not value
                        or not all(isinstance(v, str) and v for v in value)):
                    raise ConnectorError(f"{where}.{key}", "a non-empty list of program arguments (no shell)")
                opts[key] = tuple(value)
            else:
                opts[key] = value
        out[name] = Target(name=name, platform=platform, url=url, options=opts)
    return out


def load_targets(path: str | None) -> dict[str, Target]:
    """Read and check the operator's target file (JSON; YAML when PyYAML is installed)."""
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConnectorError("--targets", f"cannot read {path}: {e.strerror or e}") from None
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml  # type: ignore[import-untyped]
        except ImportError:
            raise ConnectorError("--targets", f"{path}: YAML needs PyYAML; give the targets as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConnectorError("--targets", f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConnectorError("--targets", f"{path}: not valid JSON ({e})") from None
    return parse_targets(data)


def resolve_names(names: Iterable[Any], targets: Mapping[str, Target], field_name: str = "register_in") -> list[Target]:
    """The configured targets a request names; unknown or malformed names are refused with the
    field (``register_in[i]``) and the configured names."""
    out: list[Target] = []
    for i, n in enumerate(names or []):
        if not isinstance(n, str) or not n.strip():
            raise ConnectorError(f"{field_name}[{i}]", "must be the name of a configured target (a string)")
        n = n.strip()
        t = targets.get(n)
        if t is None:
            allowed = ", ".join(sorted(targets)) or "none are configured (emrestore serve --targets FILE)"
            shown = n if len(n) <= 64 else n[:64] + "…"
            raise ConnectorError(f"{field_name}[{i}]", f"{shown!r} is not a configured target; allowed: {allowed}")
        out.append(t)
    return out
