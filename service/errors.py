"""Error classes shared by the engine, the volume layer, the jobs layer and the API.

Every error that reaches a user names the request field it is about. ``status_of`` maps an
exception to the gRPC status code name the API answers with (the CLI prints the message alone).
"""

from __future__ import annotations


class RequestError(ValueError):
    """A request that cannot be carried out; ``code`` is the gRPC status code name."""
    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {' '.join(str(message).split())}")


class NotFound(RequestError):
    code = "NOT_FOUND"


class FailedPrecondition(RequestError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(RequestError):
    code = "RESOURCE_EXHAUSTED"


def status_of(exc: BaseException) -> tuple[str, str]:
    """(gRPC status code name, one-line message) for an exception raised while serving a request."""
    from .engine.model import ModelError, ModelNotFound
    from .jobs.ledger import IllegalTransition, JobNotFound
    from .volume.stores import PermissionDenied, SourceNotFound, StoreUnreachable, VolumeError
    msg = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, RequestError):
        return exc.code, msg
    if isinstance(exc, (JobNotFound, SourceNotFound, ModelNotFound, FileNotFoundError)):
        return "NOT_FOUND", msg
    if isinstance(exc, StoreUnreachable):
        return "UNAVAILABLE", msg
    if isinstance(exc, PermissionDenied):
        return "PERMISSION_DENIED", msg
    if isinstance(exc, IllegalTransition):
        return "FAILED_PRECONDITION", msg
    if isinstance(exc, ModelError):
        return "FAILED_PRECONDITION", msg
    if isinstance(exc, (VolumeError, ValueError)):
        return "INVALID_ARGUMENT", msg
    return "INTERNAL", msg
