"""Which stores the service may touch: ``emrestore serve --allow-store PREFIX`` (repeatable).

Every URL a request names (source, output, uncertainty, model, target, output model) is checked
here before any I/O: it must lie under one of the allowed prefixes (``file:///data/em/``,
``s3://lab-em/``, ``lab://bucket/``), else PERMISSION_DENIED naming the field. Local paths are
resolved (``..`` and symlinks) before the comparison; other URLs may not contain ``..``
segments. ``http(s)`` sources are allowed only when a prefix allows them. Workers re-check the
URLs of the plan they run with the same policy (``$EMRESTORE_ALLOW_STORES``).
"""

from __future__ import annotations

import json
import os

from ..errors import EmrestoreError, PermissionDenied, quote
from .stores import _scheme, normalize_url, supported_schemes

ALLOW_ENV = "EMRESTORE_ALLOW_STORES"


def _resolved(url: str, field: str) -> str:
    """The canonical URL (local paths resolved); INVALID_ARGUMENT for unsupported schemes."""
    if not isinstance(url, str) or not url.strip():
        raise EmrestoreError(field, "required: a store URL")
    scheme = _scheme(url.strip())
    if scheme is not None and scheme not in supported_schemes() and scheme != "precomputed":
        allowed = ", ".join(sorted(f"{s}://" for s in supported_schemes()))
        raise EmrestoreError(field, f"{quote(url)}: unsupported scheme {scheme!r:.40}; allowed: {allowed}")
    try:
        norm = normalize_url(url)
    except ValueError:
        raise EmrestoreError(field, f"{quote(url)} is not a store URL") from None
    if norm.startswith("file://"):
        return "file://" + os.path.realpath(norm[len("file://"):])
    rest = norm.split("://", 1)[1]
    if any(part in ("..", ".") for part in rest.split("/")):
        raise PermissionDenied(field, f"{quote(url)}: '..' and '.' path segments are not allowed")
    return norm


def inside(url: str, prefix: str) -> bool:
    """True when ``url`` is ``prefix`` or lies below it (both canonical)."""
    p = prefix.rstrip("/")
    return url == p or url.startswith(p + "/")


class StorePolicy:
    """Allowed store prefixes; ``None`` (no policy) allows every supported store (library use)."""

    def __init__(self, prefixes: list[str] | None):
        self.prefixes = None if prefixes is None else [_resolved(p, "--allow-store") for p in prefixes]

    @classmethod
    def from_env(cls, environ=None) -> "StorePolicy":
        raw = (os.environ if environ is None else environ).get(ALLOW_ENV)
        return cls(None if raw is None else json.loads(raw))

    def env(self) -> dict[str, str]:
        """The environment that hands this policy to worker processes."""
        return {} if self.prefixes is None else {ALLOW_ENV: json.dumps(self.prefixes)}

    def check(self, url: str, field: str) -> str:
        """The canonical URL when allowed; PermissionDenied (field named) otherwise. No I/O."""
        norm = _resolved(url, field)
        if self.prefixes is None:
            return norm
        if not any(inside(norm, p) for p in self.prefixes):
            raise PermissionDenied(field, f"{quote(url)} is not under a store this server may use "
                                          "(the operator's --allow-store list)")
        return norm
