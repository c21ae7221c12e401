"""The gRPC server: Restoration service + grpc.health.v1 health + server reflection.

``build_server`` returns a server that is bound but **not started** (call ``server.start()``);
``serve`` runs one until SIGTERM/SIGINT (or ``stop_event``) and shuts it down gracefully:
health goes NOT_SERVING, running calls get ``grace_s`` seconds, then the manager closes.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import auth
from .gen import emrestore_pb2 as pb
from .gen import emrestore_pb2_grpc as pb_grpc
from .servicer import SERVICE_NAME, RestorationServicer

log = logging.getLogger(__name__)

__all__ = ["SERVICE_NAME", "MAX_MESSAGE_BYTES", "build_server", "serve", "health_servicer"]

#: Largest request/response (cutouts with uncertainty are the big ones).
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
SERVER_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
)

def _read(value: str | bytes, field: str) -> bytes:
    if isinstance(value, bytes):
        return value
    try:
        with open(value, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{field}: cannot read {value}: {e.strerror or e}") from None


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{int(port)}"


def build_server(manager, host: str = "127.0.0.1", port: int = 50051,
                 token: str | Iterable[str] | None = None, tls_cert: str | bytes | None = None,
                 tls_key: str | bytes | None = None, max_workers: int = 16,
                 admins: Iterable[str] = (), max_concurrent_cutouts: int = 2,
                 cutout_queue: int = 4) -> tuple[grpc.Server, int]:
    """A bound, unstarted server for ``manager`` and the port it got (port 0: an ephemeral one).

    ``token``: one token or a list; when given every call except health and reflection needs
    ``authorization: Bearer <token>`` (entries ``user:token`` name users; ``admins`` may cancel
    any job). ``tls_cert``/``tls_key``: PEM file paths (or bytes) of the server certificate chain
    and key; both or neither. At most ``max_concurrent_cutouts`` cutouts run at once and
    ``cutout_queue`` more wait; beyond that RESOURCE_EXHAUSTED — so cheap calls and health
    checks always find a free thread (the limits must stay below ``max_workers``).
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("--tls-cert/--tls-key: give both or neither")
    if max_workers < 1:
        raise ValueError(f"max_workers: must be ≥ 1, got {max_workers}")
    tokens = [] if token is None else auth.load_tokens(token, env_var=None)
    interceptor = auth.BearerTokenInterceptor(tokens) if tokens else None
    if max_concurrent_cutouts + cutout_queue >= max_workers:
        raise ValueError(f"--max-concurrent-cutouts: {max_concurrent_cutouts} running + {cutout_queue} queued "
                         f"must stay below the {max_workers} RPC threads (cheap calls need threads too)")
    server = grpc.server(ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="emrestore-rpc"),
                         interceptors=[interceptor] if interceptor else [], options=SERVER_OPTIONS)
    servicer = RestorationServicer(manager, interceptor=interceptor, admins=admins,
                                   max_concurrent_cutouts=max_concurrent_cutouts, cutout_queue=cutout_queue)
    pb_grpc.add_RestorationServicer_to_server(servicer, server)
    hs = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    for name in ("", SERVICE_NAME):
        hs.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (pb.DESCRIPTOR.services_by_name["Restoration"].full_name, health.SERVICE_NAME,
         reflection.SERVICE_NAME), server)
    address = _address(host, port)
    try:
        if tls_cert is not None:
            creds = grpc.ssl_server_credentials([(_read(tls_key, "--tls-key"), _read(tls_cert, "--tls-cert"))])
            bound = server.add_secure_port(address, creds)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as e:
        raise ValueError(f"--port: cannot listen on {address}: {e}") from None
    if not bound:
        raise ValueError(f"--port: cannot listen on {address}")
    server.emrestore_health = hs  # type: ignore[attr-defined]
    return server, bound


def health_servicer(server: grpc.Server) -> health.HealthServicer | None:
    """The health servicer of a server made by ``build_server``."""
    return getattr(server, "emrestore_health", None)


def serve(manager, host: str = "127.0.0.1", port: int = 50051, token=None, tls_cert=None, tls_key=None,
          max_workers: int = 16, *, grace_s: float = 10.0, start_manager: bool = True,
          stop_event: threading.Event | None = None, on_ready=None, admins: Iterable[str] = (),
          max_concurrent_cutouts: int = 2, cutout_queue: int = 4) -> None:
    """Serve until SIGTERM/SIGINT (main thread only) or ``stop_event``; then shut down gracefully.

    Starts ``manager`` (its supervisor thread) first when ``start_manager`` and closes it at the
    end. ``on_ready(bound_port)`` is called once the server listens.
    """
    server, bound = build_server(manager, host, port, token=token, tls_cert=tls_cert, tls_key=tls_key,
                                 max_workers=max_workers, admins=admins,
                                 max_concurrent_cutouts=max_concurrent_cutouts, cutout_queue=cutout_queue)
    stop = stop_event or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        def handler(signum, frame):
            log.info("received %s; shutting down", signal.Signals(signum).name)
            stop.set()
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    try:
        if start_manager:
            manager.start()
        server.start()
        log.info("emrestore serving on %s (%s, auth %s)", _address(host, bound),
                 "TLS" if tls_cert else "plaintext", "on" if token else "off")
        if on_ready is not None:
            on_ready(bound)
        while not stop.wait(0.5):
            pass
    finally:
        hs = health_servicer(server)
        if hs is not None:
            hs.enter_graceful_shutdown()
        server.stop(grace_s).wait()
        if start_manager:
            manager.close()
        for sig, h in previous.items():
            signal.signal(sig, h)
