"""Optional bearer-token authentication for the gRPC server.

When tokens are configured every call must carry the metadata ``authorization: Bearer <token>``
with one of them; health checking (``grpc.health.v1.Health``) and server reflection are exempt
so that load balancers and tools such as grpcurl work without a token. Tokens are compared in
constant time (SHA-256 digests through ``hmac.compare_digest``, every configured token checked).

Tokens come from the ``token`` argument (one string or a list), a token file (one token per
line; blank lines and ``#`` comments ignored) or an environment variable (default
``EMRESTORE_TOKEN``; several tokens separated by commas or whitespace).

Each token names a user: a line ``alice:s3cret`` is user ``alice`` with token ``s3cret``; a bare
token is user ``default``. Jobs record the user who created them; only that user or an admin
(``emrestore serve --admin USER``; the ``default`` user is one) may cancel them. Failed
authentications are logged with the method and the reason, never the token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from typing import Iterable

import grpc

__all__ = ["TOKEN_ENV", "EXEMPT_PREFIXES", "load_tokens", "BearerTokenInterceptor", "bearer_metadata"]

log = logging.getLogger(__name__)

TOKEN_ENV = "EMRESTORE_TOKEN"
DEFAULT_USER = "default"
_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
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


def split_user(entry: str) -> tuple[str, str]:
    """(user, token) of a configured entry ``user:token`` (or a bare token: user ``default``)."""
    user, sep, token = entry.partition(":")
    if not sep:
        return DEFAULT_USER, entry
    if not _USER_RE.match(user) or not token:
        raise ValueError("token: entries are 'user:token' with a user name of letters, digits and '_.@-'")
    return user, token


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
        pairs = [split_user(t) for t in tokens]
        self._users = [(_digest(tok), user) for user, tok in pairs]
        self._digests = [d for d, _ in self._users]
        if not self._digests:
            raise ValueError("token: BearerTokenInterceptor needs at least one token")
        self._exempt = tuple(exempt_prefixes)

    def user_of(self, header: str | None) -> str | None:
        """The user whose token ``header`` carries, or None (constant time over all tokens)."""
        if header is None:
            return None
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        given = _digest(token.strip())
        found = None
        for d, user in self._users:  # no early exit: the time does not depend on which token matched
            if hmac.compare_digest(given, d):
                found = user
        return found

    def check(self, header: str | None) -> str | None:
        """None when ``header`` (the authorization value) is valid, else the error message."""
        if header is None:
            return (f"{METADATA_KEY}: missing bearer token; send metadata "
                    f"'{METADATA_KEY}: Bearer <token>'")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return f"{METADATA_KEY}: expected 'Bearer <token>'"
        return None if self.user_of(header) is not None else f"{METADATA_KEY}: invalid bearer token"

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
        log.warning("authentication failed: %s: %s", method[:200], problem)  # never the token
        return _denying_handler(handler, problem)


def caller(context, interceptor: BearerTokenInterceptor | None) -> str | None:
    """The authenticated user of a call (None when authentication is off)."""
    if interceptor is None:
        return None
    for k, v in context.invocation_metadata() or ():
        if k.lower() == METADATA_KEY:
            return interceptor.user_of(v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
    return None
