"""The bridge's configuration and its guard in front of the routes.

Every ``/v1`` request needs ``Authorization: Bearer <token>`` with one of the bridge's own
tokens (not the gRPC service's; the bridge holds that one). Requests from browsers carry an
``Origin`` header: it must be in the allow-list (exact ``scheme://host[:port]``), else 403; CORS
preflights (``OPTIONS``) of allowed origins are answered without a token. Requests without an
``Origin`` (scripts, curl) are not subject to the allow-list. ``/healthz`` and ``/assets/``
need no token.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field

from starlette.responses import Response

from .bridge_protocol import error_response
from .util import ConnectorError

__all__ = ["BridgeConfig", "SecurityMiddleware", "read_tokens"]


@dataclass
class BridgeConfig:
    """``grpc_target`` HOST:PORT; ``tokens`` the bridge's bearer tokens (at least one);
    ``allow_origins`` exact origins browsers may call from (``"*"`` allows any);
    ``grpc_token`` / ``grpc_tls_ca`` for the upstream service."""
    grpc_target: str
    tokens: list[str]
    allow_origins: list[str] = field(default_factory=list)
    grpc_token: str | None = None
    grpc_tls_ca: str | None = None
    grpc_timeout_s: float = 60.0
    watch_window_s: float = 10.0
    keepalive_s: float = 15.0
    register_wait_s: float = 60.0
    max_body_bytes: int = 1 << 20
    #: the operator's registration targets (connector.targets.load_targets): requests name them
    targets: dict = field(default_factory=dict)

    def validate(self) -> "BridgeConfig":
        toks = [t.strip() for t in (self.tokens or []) if t and t.strip()]
        if not toks:
            raise ConnectorError("token", "the bridge needs at least one bearer token (--token-file)")
        if any(any(c.isspace() for c in t) for t in toks):
            raise ConnectorError("token", "tokens cannot contain whitespace")
        self.tokens = toks
        origins = []
        for o in self.allow_origins or []:
            o = o.strip().rstrip("/")
            if not o:
                continue
            if o != "*" and not (o.startswith("http://") or o.startswith("https://")):
                raise ConnectorError("allow_origin", f"{o!r} must be an origin such as https://webknossos.org")
            if o != "*" and o.count("/") > 2:
                raise ConnectorError("allow_origin", f"{o!r} is a URL with a path; give scheme://host[:port]")
            origins.append(o)
        self.allow_origins = origins
        if not self.grpc_target or ":" not in self.grpc_target:
            raise ConnectorError("grpc", f"{self.grpc_target!r}: expected HOST:PORT of the gRPC service")
        return self


# ----------------------------------------------------------------------------- security middleware
class SecurityMiddleware:
    """CORS allow-list, preflights and bearer-token checks in front of the routes (pure ASGI, so
    streaming responses pass through untouched)."""

    PUBLIC_PREFIXES = ("/healthz", "/assets/")

    def __init__(self, app, config: BridgeConfig):
        self.app = app
        self.config = config
        self._digests = [hashlib.sha256(t.encode()).digest() for t in config.tokens]

    def _origin_ok(self, origin: str) -> bool:
        allowed = self.config.allow_origins
        return "*" in allowed or origin.rstrip("/") in allowed

    def _token_problem(self, header: str | None) -> str | None:
        if not header:
            return "missing bearer token; send 'Authorization: Bearer <token>'"
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "expected 'Authorization: Bearer <token>'"
        given = hashlib.sha256(token.strip().encode()).digest()
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(given, d)
        return None if ok else "invalid bearer token"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin = headers.get("origin")
        path = scope.get("path", "")
        method = scope.get("method", "GET")
        cors: dict[str, str] = {}
        if origin is not None:
            if not self._origin_ok(origin):
                resp = error_response(403, "ORIGIN_NOT_ALLOWED", "Origin",
                                      f"origin {origin} is not in the bridge's allow-list; start the bridge "
                                      f"with --allow-origin {origin}")
                await resp(scope, receive, send)
                return
            cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                    "Access-Control-Expose-Headers": "Location, Content-Type"}
        if method == "OPTIONS":
            h = dict(cors)
            h.update({"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                      "Access-Control-Allow-Headers": "Authorization, Content-Type, Last-Event-ID",
                      "Access-Control-Max-Age": "600"})
            await Response(status_code=204, headers=h)(scope, receive, send)
            return
        if not path.startswith(self.PUBLIC_PREFIXES):
            problem = self._token_problem(headers.get("authorization"))
            if problem is not None:
                h = dict(cors)
                h["WWW-Authenticate"] = 'Bearer realm="emrestore-bridge"'
                await error_response(401, "UNAUTHENTICATED", "Authorization", problem, h)(scope, receive, send)
                return

        async def send_with_cors(message):
            if message["type"] == "http.response.start" and cors:
                raw = list(message.get("headers", []))
                present = {k.lower() for k, _ in raw}
                for k, v in cors.items():
                    if k.lower().encode() not in present:
                        raw.append((k.lower().encode("latin-1"), v.encode("latin-1")))
                message = dict(message, headers=raw)
            await send(message)

        await self.app(scope, receive, send_with_cors)


def read_tokens(path: str | None, env_var: str | None = None) -> list[str]:
    """Tokens from a file (one per line, ``#`` comments) or ``$env_var`` (comma/space separated)."""
    text = ""
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConnectorError("token_file", f"cannot read {path}: {e.strerror or e}") from None
    elif env_var:
        text = os.environ.get(env_var, "")
    out: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        out.extend(t for t in line.replace(",", " ").split() if t)
    return out
