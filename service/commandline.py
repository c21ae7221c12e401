"""The ``emrestore`` command tree: commands as data, and the one error → exit-code mapping.

**A command** is a :class:`Command`: its name, one-line help, ``arguments(parser)`` that adds its
options to an argparse parser, and ``run(args)`` that carries it out (or ``subcommands``, e.g.
``jobs ls|get|watch|cancel``). The tree is listed once, in ``service/cli.py`` (``commands()``):
the engine commands there, ``serve`` (service/api/serving.py), the client commands
(service/api/commands.py: ``COMMANDS``), ``worker`` (service/jobs/worker_main.py: ``WORKER``) and
the plug-ins: every entry point of the group ``emrestore.commands`` names a function that returns
Commands (the connectors' ``bridge``, ``view``, ``ng-state``: ``connector.commands:commands``).

To add a subcommand: write ``run(args)`` and ``arguments(parser)`` next to the code it drives,
make a ``Command(name, help, run, arguments)`` there and add it to ``commands()`` in
service/cli.py (or to a plug-in's list). To add an option: one ``parser.add_argument`` in the
command's ``arguments``; check its value where the request fields are checked
(service/jobs/spec.py) when it becomes a request field, else in ``run``.

**Errors.** A command raises :class:`service.errors.EmrestoreError` (field = the option or request
field, the reason, a gRPC status code name; ``ValueError``, ``FileNotFoundError``,
``PermissionError`` and ``KeyError`` count as bad input too). :func:`run` prints one line
``emrestore: error: CODE: field: reason`` and returns the exit status:

- 0 done (or what ``run`` returned),
- 2 (``EXIT_BAD_INPUT``) for the codes in the command's ``bad_input`` (default
  ``BAD_INPUT_CODES``: the request itself is wrong; the worker narrows it to what a retry cannot
  fix, ``WORKER_BAD_INPUT_CODES``),
- 1 (``EXIT_FAILURE``) for every other code; an unexpected exception also prints its traceback,
- an exception's own ``exit_status`` (the device check's 3: ``emrestore: error: message``),
- 130 on Ctrl-C.

This module imports nothing of emrestore but ``service.errors``: the worker entry point uses it
without loading the client commands.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from .errors import EmrestoreError, status_of

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
#: status codes that mean the request itself was wrong (exit 2); anything else exits 1.
BAD_INPUT_CODES = frozenset({"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "OUT_OF_RANGE",
                             "ALREADY_EXISTS", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED",
                             "PERMISSION_DENIED"})
#: a worker's bad input: what another attempt cannot fix (Kubernetes fails the index on exit 2);
#: exhausted quotas and refused credentials exit 1 and are retried.
WORKER_BAD_INPUT_CODES = frozenset({"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION",
                                    "PERMISSION_DENIED"})
#: exceptions that are bad input when they carry no status code of their own
_INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError, PermissionError)


@dataclass(frozen=True)
class Command:
    """One ``emrestore`` subcommand (see the module docstring)."""
    name: str
    help: str
    run: Callable[[argparse.Namespace], int | None] | None = None
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    subcommands: tuple["Command", ...] = ()
    bad_input: frozenset = BAD_INPUT_CODES


def error_line(message: str, code: str | None = None) -> None:
    """Print the one error line: ``emrestore: error: [CODE: ]message``."""
    text = " ".join(str(message).split())
    print(f"emrestore: error: {code + ': ' if code else ''}{text}", file=sys.stderr, flush=True)


def exit_status(exc: BaseException, bad_input: frozenset = BAD_INPUT_CODES) -> int:
    """Report ``exc`` (one line; a traceback first when it is unexpected) and return the exit
    status: the one error → exit-code mapping of the command line."""
    if isinstance(exc, KeyboardInterrupt):
        print("emrestore: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    own = getattr(exc, "exit_status", None)
    if isinstance(own, int):
        error_line(str(exc) or type(exc).__name__)
        return own
    code, message = status_of(exc)
    if isinstance(exc, EmrestoreError):
        message = exc.message
    elif code == "INTERNAL" and isinstance(exc, _INPUT_ERRORS):
        code = "INVALID_ARGUMENT"  # e.g. a KeyError of a missing option value
    elif code == "INTERNAL":
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    error_line(message, code)
    return EXIT_BAD_INPUT if code in bad_input else EXIT_FAILURE


def run(command: Command, args: argparse.Namespace) -> int:
    """Run a command: its return value (None: 0), or the exit status of what it raised."""
    try:
        rc = command.run(args)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - every failure is one line and a status
        return exit_status(e, command.bad_input)
    return int(rc or 0)


def add_commands(subparsers, commands: Iterable[Command]) -> None:
    """Add ``commands`` (and their subcommands) to an argparse subparsers object."""
    for c in commands:
        p = subparsers.add_parser(c.name, help=c.help, description=c.help)
        if c.arguments is not None:
            c.arguments(p)
        if c.subcommands:
            sub = p.add_subparsers(dest=f"{c.name.replace('-', '_')}_command", required=True, metavar="SUBCOMMAND")
            add_commands(sub, c.subcommands)
        else:
            p.set_defaults(_command=c, func=c.run)


def build_parser(commands: Sequence[Command], description: str = "", version: str | None = None,
                 prog: str = "emrestore") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=description)
    if version:
        ap.add_argument("--version", action="version", version=f"{prog} {version}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_commands(sub, commands)
    return ap


def main(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` with a parser from :func:`build_parser` and run the chosen command."""
    a = parser.parse_args(argv)
    return run(a._command, a)
