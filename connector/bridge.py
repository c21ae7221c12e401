"""HTTP bridge for browsers: JSON + server-sent events in front of the gRPC service.

Browsers cannot speak gRPC, so the webKnossos user script, the CATMAID widget and other web
front ends call this bridge, which forwards every request to the emrestore gRPC service through
:class:`service.api.client.EmrestoreClient`.

Endpoints (JSON bodies and answers; errors are ``{"error", "field", "message"}``):

==========================================  ===============================================
``POST /v1/restore-region``                 start restoring a box → 202 ``{job, output, …}``
``GET  /v1/jobs/{job_id}``                  a job's status
``GET  /v1/jobs/{job_id}/events``           ``text/event-stream``: ``progress`` events until
                                            a terminal state, then one ``done`` event
``POST /v1/jobs/{job_id}/cancel``           request cancellation
``GET  /v1/models``                         the server's models
``GET  /healthz``                           bridge and gRPC health (no token needed)
``GET  /assets/{name}``                     the user script and the CATMAID widget (no token)
==========================================  ===============================================

The messages — the ``POST /v1/restore-region`` body, job JSON, the mapping of gRPC status codes
to HTTP — are in :mod:`connector.bridge_protocol`; the configuration
(:class:`~connector.bridge_security.BridgeConfig`) and the security in front of the routes (the
bridge's own bearer tokens, the ``Origin`` allow-list, CORS preflights) in
:mod:`connector.bridge_security`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from service.errors import EmrestoreError

from .bridge_protocol import (error_response, http_status_for, job_json, parse_restore_request, register_in_for_grpc,
                              registration_pending)
from .bridge_security import BridgeConfig, SecurityMiddleware
from .util import ConnectorError

log = logging.getLogger(__name__)

__all__ = ["create_app", "run_bridge", "BridgeServer", "ASSETS"]

ASSETS = {
    "webknossos_restore.user.js": "application/javascript; charset=utf-8",
    "catmaid_restore_widget.js": "application/javascript; charset=utf-8",
}

# ----------------------------------------------------------------------------- the app
def create_app(config: BridgeConfig, client=None) -> Starlette:
    """The ASGI app. ``client``: an EmrestoreClient to use (default: one for ``config``)."""
    config.validate()
    if client is None:
        from service.api.client import EmrestoreClient
        client = EmrestoreClient(config.grpc_target, token=config.grpc_token, tls_ca=config.grpc_tls_ca,
                                 timeout=config.grpc_timeout_s)

    def grpc_error(e: EmrestoreError, default_field: str = "") -> JSONResponse:
        return error_response(http_status_for(e.code, e.message), e.code, e.field or default_field, e.reason)

    async def call(fn, *args, default_field: str = "", **kwargs):
        try:
            return await run_in_threadpool(fn, *args, **kwargs), None
        except EmrestoreError as e:
            return None, grpc_error(e, default_field)

    async def read_json(request: Request):
        raw = await request.body()
        if len(raw) > config.max_body_bytes:
            raise ConnectorError("body", f"larger than {config.max_body_bytes} bytes")
        ctype = request.headers.get("content-type", "")
        if raw and "json" not in ctype:
            raise ConnectorError("Content-Type", f"{ctype or 'none'}; send application/json")
        try:
            return json.loads(raw or b"null")
        except ValueError as e:
            raise ConnectorError("body", f"not valid JSON ({e})") from None

    async def restore_region(request: Request):
        try:
            kw = parse_restore_request(await read_json(request), config.targets)
        except EmrestoreError as e:  # the body's shape (ConnectorError) or a field's value (service/jobs/spec.py)
            return error_response(http_status_for(e.code, e.message), e.code, e.field, e.reason)
        rid = kw.pop("rid")
        job, err = await call(
            client.restore_region, kw["source"], kw["model"], kw["output"], kw["start_xyz"], kw["stop_xyz"],
            uncertainty=kw["uncertainty"], samples=kw["samples"], steps=kw["steps"], seed=kw["seed"],
            mip=kw["mip"], sampler=kw["sampler"], register_in=register_in_for_grpc(kw["register_in"]),
            labels={"emrestore-origin": "bridge", "emrestore-request": rid}, output_encoding=kw["output_encoding"],
            jpeg_quality=kw["jpeg_quality"], output_sharding=kw["output_sharding"], dry_run=kw["dry_run"])
        if err is not None:
            return err
        if job.dry_run is not None:  # nothing written: what the job would do
            return JSONResponse({"dry_run": job.dry_run, "request_id": rid}, status_code=200)
        body = {"job": job_json(job), "output": kw["output"], "uncertainty_output": kw["uncertainty"],
                "request_id": rid,
                "links": {"self": f"/v1/jobs/{job.job_id}", "events": f"/v1/jobs/{job.job_id}/events"}}
        return JSONResponse(body, status_code=202, headers={"Location": f"/v1/jobs/{job.job_id}"})

    async def get_job(request: Request):
        job, err = await call(client.get_job, request.path_params["job_id"], default_field="job_id")
        return err if err is not None else JSONResponse(job_json(job))

    async def cancel_job(request: Request):
        job, err = await call(client.cancel, request.path_params["job_id"], default_field="job_id")
        return err if err is not None else JSONResponse(job_json(job))

    async def models(request: Request):
        ms, err = await call(client.models)
        if err is not None:
            return err
        keep = ("name", "url", "kind", "task", "factor", "preset", "num_parameters", "voxel_size_nm")
        return JSONResponse({"models": [{k: m.get(k) for k in keep} for m in ms]})

    async def healthz(request: Request):
        try:
            status = await run_in_threadpool(client.health, "", 3.0)
        except EmrestoreError as e:
            return JSONResponse({"status": "degraded", "grpc": e.code, "message": e.message},
                                status_code=503)
        ok = status == "SERVING"
        return JSONResponse({"status": "ok" if ok else "degraded", "grpc": status}, status_code=200 if ok else 503)

    async def asset(request: Request):
        name = request.path_params["name"]
        if name not in ASSETS:
            return error_response(404, "NOT_FOUND", "name", f"no asset {name!r}; known: {', '.join(ASSETS)}")
        data = resources.files("connector").joinpath("assets", name).read_bytes()
        return Response(data, media_type=ASSETS[name])

    async def job_events(request: Request):
        job_id = request.path_params["job_id"]
        first, err = await call(client.get_job, job_id, default_field="job_id")
        if err is not None:
            return err
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def put(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # loop closed: the client went away
                stop.set()

        def pump():
            while not stop.is_set():
                try:
                    for u in client.watch(job_id, timeout=config.watch_window_s):
                        if stop.is_set():
                            return
                        put(("job", u.job))
                        if u.done:
                            put(("end", u.job))
                            return
                except EmrestoreError as e:
                    if e.code == "DEADLINE_EXCEEDED":
                        continue
                    if e.code == "UNAVAILABLE":
                        time.sleep(1.0)
                        continue
                    put(("error", e))
                    return
                except Exception as e:  # noqa: BLE001 - reported to the browser
                    put(("error", e))
                    return
                # the stream ended without a final update (server restart): ask once
                try:
                    info = client.get_job(job_id)
                    if info.done:
                        put(("job", info))
                        put(("end", info))
                        return
                except Exception:  # noqa: BLE001
                    time.sleep(1.0)

        def wait_registered(jid: str, job: Any):
            t_end = time.monotonic() + config.register_wait_s
            while job is not None and registration_pending(job) and time.monotonic() < t_end:
                time.sleep(0.25)
                try:
                    job = client.get_job(jid)
                except EmrestoreError:
                    break
            return job

        if first.done and registration_pending(first):
            first = await run_in_threadpool(wait_registered, job_id, first)
        if not first.done:
            threading.Thread(target=pump, daemon=True, name=f"sse-{job_id[:8]}").start()

        def frame(event: str, data: dict, n: int) -> str:
            return f"id: {n}\nevent: {event}\ndata: {json.dumps(data)}\n\n"

        async def stream():
            n = 0
            last_key = None
            try:
                yield "retry: 2000\n\n"
                js = job_json(first)
                last_key = (js["state"], js["blocks_done"], js["message"], len(js["events"]))
                n += 1
                yield frame("progress", js, n)
                if first.done:
                    n += 1
                    yield frame("done", js, n)
                    return
                while True:
                    try:
                        kind, payload = await asyncio.wait_for(queue.get(), timeout=config.keepalive_s)
                    except asyncio.TimeoutError:
                        yield ": keepalive\n\n"
                        continue
                    if kind == "job":
                        js = job_json(payload)
                        key = (js["state"], js["blocks_done"], js["message"], len(js["events"]))
                        if key != last_key:
                            last_key = key
                            n += 1
                            yield frame("progress", js, n)
                    elif kind == "end":
                        final = await run_in_threadpool(wait_registered, job_id, payload)
                        js = job_json(final) if final is not None else js
                        n += 1
                        yield frame("progress", js, n)
                        n += 1
                        yield frame("done", js, n)
                        return
                    else:
                        e = payload
                        if not isinstance(e, EmrestoreError):
                            e = EmrestoreError("job_id", str(e), "INTERNAL")
                        code, fld, text = e.code, e.field or "job_id", e.reason
                        n += 1
                        yield frame("error", {"error": code, "field": fld, "message": text}, n)
                        return
            finally:
                stop.set()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def not_found(request: Request, exc):
        return error_response(404, "NOT_FOUND", "path", f"no endpoint {request.method} {request.url.path}")

    async def bad_method(request: Request, exc):
        return error_response(405, "METHOD_NOT_ALLOWED", "method",
                              f"{request.method} is not allowed on {request.url.path}")

    routes = [
        Route("/v1/restore-region", restore_region, methods=["POST"]),
        Route("/v1/jobs/{job_id}", get_job, methods=["GET"]),
        Route("/v1/jobs/{job_id}/events", job_events, methods=["GET"]),
        Route("/v1/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/assets/{name}", asset, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: bad_method})
    app.add_middleware(SecurityMiddleware, config=config)
    app.state.client = client
    app.state.config = config
    return app


# ----------------------------------------------------------------------------- serving
class BridgeServer:
    """uvicorn serving ``app`` in a background thread (tests, ``emrestore view``)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host = host
        self.port = self._sock.getsockname()[1]
        cfg = uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                       daemon=True, name="emrestore-bridge")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> "BridgeServer":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if time.monotonic() - t0 > timeout or not self.thread.is_alive():
                raise RuntimeError("bridge did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> "BridgeServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_bridge(config: BridgeConfig, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve the bridge in the foreground until interrupted."""
    import uvicorn

    app = create_app(config)
    log.info("emrestore bridge on http://%s:%d → gRPC %s (origins: %s)", host, port, config.grpc_target,
             ", ".join(config.allow_origins) or "none")
    uvicorn.run(app, host=host, port=port, log_level="info", lifespan="off")
