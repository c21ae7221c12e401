"""The one error type of emrestore, shared by the engine, the volume layer, the jobs layer, the
API, the client and the command line.

Every error that reaches a user names the request field (or command-line option) it is about and
carries the gRPC status code name it is answered with: ``EmrestoreError(field, message, code)``.
The client raises the same class for a failed call (the server's code and message). Subclasses
only fix the code (``NotFound``, ``PermissionDenied``, …).

``status_of`` maps any exception to (code, one-line message) without importing the layers that
raise them: an exception class states its code in a ``code`` attribute.
"""

from __future__ import annotations

#: gRPC status code names an error may carry (grpc.StatusCode's names, without OK).
CODES = frozenset({
    "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
})

#: At most this many characters of any input are quoted in an error message.
MAX_QUOTE = 200


def quote(value, limit: int = MAX_QUOTE) -> str:
    """``repr`` of a request value, cut to ``limit`` characters."""
    r = repr(value)
    return r if len(r) <= limit else r[:limit] + f"…({len(r)} chars)"


def split_field(message: str, default: str = "") -> tuple[str, str]:
    """("field", "text") of a message ``"field: text"`` (the field is one word: a dotted name,
    ``register_in[0]`` or ``--option``); (default, message) when it names none."""
    head, sep, tail = str(message).partition(": ")
    if sep and head and " " not in head and len(head) <= 64:
        return head, tail
    return default, str(message)


class EmrestoreError(ValueError):
    """A request that cannot be carried out: the field it is about, why, and the status code.

    ``field`` the request field or option ("" when none), ``reason`` the one-line why, ``code``
    the gRPC status code name, ``message`` "field: reason" (what the server sends and the command
    line prints). ``code_name`` is ``code`` (the client's name for it)."""
    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str, code: str | None = None):
        self.field = field
        if code is not None:
            if code not in CODES:
                raise ValueError(f"code: {code!r} is not a gRPC status code name")
            self.code = code
        self.reason = " ".join(str(message).split())
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.field}: {self.reason}" if self.field else self.reason

    @property
    def code_name(self) -> str:
        return self.code

    @classmethod
    def from_status(cls, code: str, message: str) -> "EmrestoreError":
        """The error of a status (code name, "field: reason") answered by the server."""
        field, reason = split_field(message or "")
        return cls(field, reason, code if code in CODES else "UNKNOWN")

    def renamed(self, names: dict[str, str]) -> "EmrestoreError":
        """The same error with its field renamed (``names``: request field → what this entry point
        calls it, e.g. ``{"steps": "--steps"}`` on the command line); itself when not renamed."""
        for prefix, new in names.items():
            if self.field == prefix or self.field.startswith(prefix + ".") or self.field.startswith(prefix + "["):
                err = EmrestoreError(new + self.field[len(prefix):], self.reason, self.code)
                err.__cause__ = self
                return err
        return self


class NotFound(EmrestoreError):
    code = "NOT_FOUND"


class FailedPrecondition(EmrestoreError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(EmrestoreError):
    code = "RESOURCE_EXHAUSTED"


class PermissionDenied(EmrestoreError):
    """The request may not touch this (store policy, a store that refused access, another user's job)."""
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
