"""``emrestore`` subcommands of the connectors: ``bridge``, ``view`` and ``ng-state``.

A plug-in of the command tree (service/commandline.py): the entry point ``emrestore.commands``
names :func:`commands`, which returns them. Bad input raises ``connector.util.ConnectorError``
(an ``EmrestoreError``), which the CLI prints as one line and exits 2.
"""

from __future__ import annotations

import os

from service.commandline import Command

from .util import ConnectorError

DEFAULT_SERVER = "127.0.0.1:50051"
BRIDGE_TOKEN_ENV = "EMRESTORE_BRIDGE_TOKEN"


def _ints3(text: str, name: str) -> tuple[int, int, int]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ConnectorError(name, f"expected X,Y,Z integers, got {text!r}") from None
    if len(vals) != 3 or min(vals) < 1:
        raise ConnectorError(name, f"expected three positive integers X,Y,Z, got {text!r}")
    return vals  # type: ignore[return-value]


def _grpc_token(path: str | None) -> str | None:
    from .bridge_security import read_tokens
    toks = read_tokens(path, "EMRESTORE_TOKEN")
    return toks[0] if toks else None


def cmd_bridge(a) -> None:
    from .bridge import run_bridge
    from .bridge_security import BridgeConfig, read_tokens
    tokens = read_tokens(a.token_file, BRIDGE_TOKEN_ENV)
    if not tokens:
        raise ConnectorError("--token-file", f"the bridge needs a bearer token: give --token-file or set ${BRIDGE_TOKEN_ENV}")
    if not 0 <= a.port <= 65535:
        raise ConnectorError("--port", f"{a.port} is not a port number")
    origins = [o for group in (a.allow_origin or []) for o in group]
    from .targets import load_targets
    cfg = BridgeConfig(grpc_target=a.grpc, tokens=tokens, allow_origins=origins,
                       grpc_token=_grpc_token(a.grpc_token_file), grpc_tls_ca=a.grpc_tls_ca,
                       targets=load_targets(a.targets)).validate()
    if not origins:
        print("note: no --allow-origin given: browsers cannot call this bridge (scripts without an Origin can)")
    run_bridge(cfg, a.host, a.port)


def cmd_view(a) -> None:
    from .neuroglancer_view import run_view
    if a.samples < 0 or a.steps < 0:
        raise ConnectorError("--samples/--steps", "must be ≥ 0")
    run_view(a.source, a.server, a.model, _grpc_token(a.token_file), _ints3(a.block, "--block"), a.samples,
             a.steps, a.bind, a.port, a.open, a.output_dir, prefix_map=a.public_url_map)


def cmd_ng_state(a) -> None:
    from .neuroglancer_state import write_state
    where, link = write_state(a.out, a.source, a.restored, a.uncertainty, prefix_map=a.public_url_map,
                              update=not a.replace)
    print(f"wrote {where}")
    print(link)


def _bridge_arguments(p) -> None:
    p.add_argument("--grpc", default=os.environ.get("EMRESTORE_SERVER", DEFAULT_SERVER),
                   help="HOST:PORT of the gRPC service (default $EMRESTORE_SERVER or %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="port (default %(default)s)")
    p.add_argument("--token-file", help=f"the bridge's own bearer tokens, one per line (default ${BRIDGE_TOKEN_ENV})")
    p.add_argument("--allow-origin", nargs="+", action="append", metavar="URL",
                   help="browser origins allowed to call the bridge, e.g. https://webknossos.org (repeatable)")
    p.add_argument("--grpc-token-file", help="token for the gRPC service (default $EMRESTORE_TOKEN)")
    p.add_argument("--grpc-tls-ca", help="CA certificate (PEM) of a TLS gRPC service")
    p.add_argument("--targets", metavar="FILE",
                   help="the operator's registration targets (JSON/YAML, the same file as 'emrestore serve "
                        "--targets'); requests may name only these")


def _view_arguments(p) -> None:

    p.add_argument("source", help="precomputed layer URL (file://, gs://, https://, …)")
    p.add_argument("--model", help="model name on the server or URL (default: the server's first model)")
    p.add_argument("--server", default=os.environ.get("EMRESTORE_SERVER", DEFAULT_SERVER),
                   help="HOST:PORT of the gRPC service (default $EMRESTORE_SERVER or %(default)s)")
    p.add_argument("--token-file", help="token for the gRPC service (default $EMRESTORE_TOKEN)")
    p.add_argument("--block", default="128,128,8", help="X,Y,Z source voxels restored around the mouse (default %(default)s)")
    p.add_argument("--samples", type=int, default=1, help="samples per image; ≥ 2 adds an uncertainty layer")
    p.add_argument("--steps", type=int, default=0, help="sampler steps (0: server default)")
    p.add_argument("--output-dir", help="URL prefix for restored layers (default: next to the source)")
    p.add_argument("--bind", default="127.0.0.1", help="address of the viewer's web server (default %(default)s)")
    p.add_argument("--port", type=int, default=0, help="port of the viewer's web server (0: any)")
    p.add_argument("--public-url-map", help="PREFIX=PUBLIC_PREFIX;… for layers the browser cannot read directly "
                                            "(e.g. an aliased S3 endpoint); file:// layers are served automatically")
    p.add_argument("--open", action="store_true", help="open the viewer in the default browser")


def _ng_state_arguments(p) -> None:
    p.add_argument("--source", help="source layer URL")
    p.add_argument("--restored", required=True, help="restored layer URL")
    p.add_argument("--uncertainty", help="uncertainty layer URL")
    p.add_argument("--out", required=True, help="state JSON to write (path, file://, gs://, s3://)")
    p.add_argument("--public-url-map", help="PREFIX=PUBLIC_PREFIX;… for layers not served over http(s)/gs")
    p.add_argument("--replace", action="store_true", help="replace an existing state instead of adding layers")


def commands() -> tuple[Command, ...]:
    """The connectors' commands (entry point ``emrestore.commands``)."""
    return (
        Command("bridge", "HTTP/JSON + server-sent-events bridge for browsers (webKnossos, CATMAID)", cmd_bridge,
                _bridge_arguments),
        Command("view", "Neuroglancer viewer with a restore-region action (shift+R)", cmd_view, _view_arguments),
        Command("ng-state", "write a Neuroglancer state JSON (and print a link) for restored layers", cmd_ng_state,
                _ng_state_arguments),
    )
