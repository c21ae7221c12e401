"""Optional bearer-token authentication for the gRPC server.

When tokens are configured every call must carry the metadata ``authorization: Bearer <token>``
with one of them; health checking (``grpc.health.v1.Health``) and server reflection are exempt
so that load balancers and tools such as grpcurl work without a token. Tokens are compared in
constant time (SHA-256 digests through ``hmac.compare_digest``, every configured token checked).

Tokens come from the ``token`` argument (one string or a list), a token file (one token per
line; blank lines and ``#`` comments ignored) or an environment variable (default
``EMRESTORE_TOKEN``; several tokens separated by commas or whitespace).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Iterable

import grpc

__all__ = ["TOKEN_ENV", "EXEMPT_PREFIXES", "load_tokens", "BearerTokenInterceptor", "bearer_metadata"]

TOKEN_ENV = "EMRESTORE_TOKEN"
METADATA_KEY = "authorization"
EXEMPT_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def _split(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        out.extend(t for t in line.replace(",", " ").split() if t)
    return out


def read_token_file(path: str) -> list[str]:
    """Tokens in a file (one per line, ``#`` comments); ValueError naming the file when empty."""
    try:
        with open(path, encoding="utf-8") as f:
            tokens = _split(f.read())
    except FileNotFoundError:
        raise ValueError(f"--token-file: {path} does not exist") from None
    except OSError as e:
        raise ValueError(f"--token-file: cannot read {path}: {e.strerror or e}") from None
    if not tokens:
        raise ValueError(f"--token-file: {path} holds no token")
    return tokens


def load_tokens(token: str | Iterable[str] | None = None, token_file: str | None = None,
                env_var: str | None = TOKEN_ENV) -> list[str]:
    """The configured tokens: ``token`` and ``token_file`` if given, else ``$env_var``; [] = auth off."""
    tokens: list[str] = []
    if token is not None:
        tokens.extend([token] if isinstance(token, str) else list(token))
    if token_file:
        tokens.extend(read_token_file(token_file))
    if not tokens and token is None and token_file is None and env_var:
        tokens.extend(_split(os.environ.get(env_var, "")))
    tokens = [t.strip() for t in tokens]
    if any(not t for t in tokens):
        raise ValueError("token: an empty token is not allowed")
    if any(any(c.isspace() for c in t) for t in tokens):
        raise ValueError("token: tokens cannot contain whitespace")
    return tokens


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token`` (empty when None)."""
    return ((METADATA_KEY, f"Bearer {token}"),) if token else ()


def _digest(s: str) -> bytes:
    return hashlib.sha256(s.encode("utf-8")).digest()


def _denying_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED."""
    def deny(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kw = dict(request_deserializer=handler.request_deserializer,
              response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kw)
    return grpc.unary_unary_rpc_method_handler(deny, **kw)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls without a valid ``authorization: Bearer <token>`` (UNAUTHENTICATED)."""

    def __init__(self, tokens: Iterable[str], exempt_prefixes: tuple[str, ...] = EXEMPT_PREFIXES):
        self._digests = [_digest(t) for t in tokens]
        if not self._digests:
            raise ValueError("token: BearerTokenInterceptor needs at least one token")
        self._exempt = tuple(exempt_prefixes)

    def check(self, header: str | None) -> str | None:
        """None when ``header`` (the authorization value) is valid, else the error message."""
        if header is None:
            return (f"{METADATA_KEY}: missing bearer token; send metadata "
                    f"'{METADATA_KEY}: Bearer <token>'")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return f"{METADATA_KEY}: expected 'Bearer <token>'"
        given = _digest(token.strip())
        ok = False
        for d in self._digests:  # no early exit: the time does not depend on which token matched
            ok |= hmac.compare_digest(given, d)
        return None if ok else f"{METADATA_KEY}: invalid bearer token"

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(self._exempt):
            return continuation(handler_call_details)
        values = [v for k, v in (handler_call_details.invocation_metadata or ())
                  if k.lower() == METADATA_KEY]
        if len(values) > 1:
            problem = f"{METADATA_KEY}: send exactly one bearer token"
        else:
            value = values[0] if values else None
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            problem = self.check(value)
        handler = continuation(handler_call_details)
        if problem is None or handler is None:
            return handler
        return _denying_handler(handler, problem)
