"""What every ``emrestore`` service command shares: one-line errors with a gRPC-style code and
the exit codes (2 bad input, 1 failure)."""

from __future__ import annotations

import functools
import sys

DEFAULT_SERVER = "127.0.0.1:50051"
#: status codes that mean the request itself was wrong (exit 2); anything else exits 1.
BAD_INPUT_CODES = frozenset({"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "OUT_OF_RANGE",
                             "ALREADY_EXISTS", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED",
                             "PERMISSION_DENIED"})
EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1


class CommandError(Exception):
    """A one-line error with a gRPC-style code name."""

    def __init__(self, code: str, message: str):
        self.code, self.message = code, message
        super().__init__(f"{code}: {message}")


def _bad(message: str) -> CommandError:
    return CommandError("INVALID_ARGUMENT", message)


def _exit_code(code: str) -> int:
    return EXIT_BAD_INPUT if code in BAD_INPUT_CODES else EXIT_FAILURE


def _fail(code: str, message: str) -> None:
    print(f"emrestore: error: {code}: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    raise SystemExit(_exit_code(code))


def _handled(fn):
    """Run a command; EmrestoreError/CommandError/ValueError → one error line and SystemExit."""
    @functools.wraps(fn)
    def wrapper(a):
        from .client import EmrestoreError
        try:
            rc = fn(a)
        except EmrestoreError as e:
            _fail(e.code_name, e.message)
        except CommandError as e:
            _fail(e.code, e.message)
        except KeyboardInterrupt:
            raise
        except (ValueError, KeyError, FileNotFoundError, PermissionError) as e:
            from ..errors import status_of
            code, msg = status_of(e)
            _fail(code if code != "INTERNAL" else "INVALID_ARGUMENT", msg)
        if rc:
            raise SystemExit(rc)
    return wrapper


