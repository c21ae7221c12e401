"""Error classes shared by the engine, the volume layer, the jobs layer and the API.

Every error that reaches a user names the request field it is about and carries the gRPC status
code name it is answered with: ``EmrestoreError(field, message, code)``. ``status_of`` maps any
exception to (code, one-line message) without importing the layers that raise them: an
exception class states its code in a ``code`` attribute.
"""

from __future__ import annotations

#: gRPC status code names an error may carry.
CODES = frozenset({
    "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED",
    "PERMISSION_DENIED", "UNAVAILABLE", "UNAUTHENTICATED", "ALREADY_EXISTS", "INTERNAL",
})

#: At most this many characters of any input are quoted in an error message.
MAX_QUOTE = 200


def quote(value, limit: int = MAX_QUOTE) -> str:
    """``repr`` of a request value, cut to ``limit`` characters."""
    r = repr(value)
    return r if len(r) <= limit else r[:limit] + f"…({len(r)} chars)"


class EmrestoreError(ValueError):
    """A request that cannot be carried out: the field it is about, why, and the status code."""
    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str, code: str | None = None):
        self.field = field
        if code is not None:
            if code not in CODES:
                raise ValueError(f"code: {code!r} is not a gRPC status code name")
            self.code = code
        self.reason = " ".join(str(message).split())
        super().__init__(f"{field}: {self.reason}")


#: The historic name.
RequestError = EmrestoreError


class NotFound(EmrestoreError):
    code = "NOT_FOUND"


class FailedPrecondition(EmrestoreError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(EmrestoreError):
    code = "RESOURCE_EXHAUSTED"


class PermissionDenied(EmrestoreError):
    code = "PERMISSION_DENIED"


def status_of(exc: BaseException) -> tuple[str, str]:
    """(gRPC status code name, one-line message) for an exception raised while serving a request."""
    msg = " ".join(str(exc).split()) or type(exc).__name__
    if len(msg) > 4 * MAX_QUOTE:
        msg = msg[:4 * MAX_QUOTE] + "…"
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code in CODES:
        return code, msg
    if isinstance(exc, FileNotFoundError):
        return "NOT_FOUND", msg
    if isinstance(exc, PermissionError):
        return "PERMISSION_DENIED", msg
    if isinstance(exc, ValueError):
        return "INVALID_ARGUMENT", msg
    return "INTERNAL", msg
