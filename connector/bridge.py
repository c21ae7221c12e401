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

Security: every ``/v1`` request needs ``Authorization: Bearer <token>`` with one of the bridge's
own tokens (not the gRPC service's; the bridge holds that one). Requests from browsers carry an
``Origin`` header: it must be in the allow-list (exact ``scheme://host[:port]``), else 403; CORS
preflights (``OPTIONS``) of allowed origins are answered without a token. Requests without an
``Origin`` (scripts, curl) are not subject to the allow-list.

POST /v1/restore-region body::

    {"source": "gs://lab/em/raw",              # precomputed layer URL (required)
     "model": "iso5",                           # model name on the server or model URL (required)
     "region": {"start": [x0, y0, z0], "stop": [x1, y1, z1]},   # source voxels, stop exclusive
     "output": "gs://lab/em/raw_iso",           # optional; default <source>_restored_<id>
     "uncertainty": true,                       # optional: true, false or a layer URL;
                                                #   default true when samples ≥ 2
     "samples": 2, "steps": 10, "sampler": "dpmpp2m", "seed": 0, "mip": 0,   # optional
     "register_in": ["lab-ng"]}                 # names of the operator's targets (--targets FILE)

``start``/``stop`` may also be given at the top level. The default output names use a short
random request id ``<id>`` (the job id is only known once the job exists); the answer returns
the URLs chosen.
"""

from __future__ import annotations

import asyncio
import hmac
import hashlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Iterable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .util import ConnectorError, default_output_url, request_id

log = logging.getLogger(__name__)

__all__ = ["BridgeConfig", "create_app", "http_status_for", "job_json", "run_bridge", "BridgeServer",
           "ASSETS"]

#: gRPC status code name → HTTP status.
GRPC_TO_HTTP = {
    "OK": 200,
    "INVALID_ARGUMENT": 400,
    "OUT_OF_RANGE": 400,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "FAILED_PRECONDITION": 409,
    "ABORTED": 409,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 413,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "CANCELLED": 503,
    "UNIMPLEMENTED": 501,
}

ASSETS = {
    "webknossos_restore.user.js": "application/javascript; charset=utf-8",
    "catmaid_restore_widget.js": "application/javascript; charset=utf-8",
}

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
#: structured job event kinds that end a target's registration
REGISTRATION_KINDS = ("registered", "registration_failed")


def job_event_kinds(job: Any) -> list[str]:
    """The kinds of a job's structured events. THE one place that knows how a job carries them:
    ``job.event_kinds`` (a list parallel to ``job.events``), or events (the client's ``event_log``
    of ``{kind, message, time}``, else ``events``) that are dicts / objects with a ``kind``. Plain-text events carry no kind (older servers) and count as none."""
    kinds = getattr(job, "event_kinds", None)
    if kinds:
        return [str(k) for k in kinds]
    out = []
    for e in (getattr(job, "event_log", None) or getattr(job, "events", []) or []):
        k = e.get("kind") if isinstance(e, dict) else getattr(e, "kind", None)
        if k:
            out.append(str(k))
    return out


def registration_pending(job: Any) -> bool:
    """True while a SUCCEEDED job has not reported one ``registered``/``registration_failed`` event
    per target it names (the manager registers through its completion hooks)."""
    if getattr(job, "state", "") != "SUCCEEDED":
        return False
    spec = getattr(job, "spec", {}) or {}
    n = len(spec.get("register_in") or spec.get("registerIn") or [])
    if not n:
        return False
    return sum(1 for k in job_event_kinds(job) if k in REGISTRATION_KINDS) < n


def register_in_for_grpc(names: list[str]) -> list:
    """How the bridge passes the configured target names to the gRPC client (one place to adapt)."""
    return list(names)


def http_status_for(code_name: str, message: str = "") -> int:
    """HTTP status of a gRPC status code name. RESOURCE_EXHAUSTED is 413 (the request is too
    large, e.g. a cutout over the voxel limit) unless the message is about a rate or quota (429)."""
    if code_name == "RESOURCE_EXHAUSTED":
        low = message.lower()
        if any(w in low for w in ("rate", "quota", "too many", "try again", "concurrent")):
            return 429
        return 413
    return GRPC_TO_HTTP.get(code_name, 500)


def split_field(message: str, default: str = "") -> tuple[str, str]:
    """("field", "text") of a service message ``"field: text"`` (the field is a dotted name)."""
    head, sep, tail = message.partition(": ")
    if sep and head and " " not in head and len(head) <= 64:
        return head, tail
    return default, message


def error_response(status: int, error: str, field: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "field": field, "message": message}, status_code=status,
                        headers=headers)


def job_json(job: Any) -> dict:
    """A JobInfo (client) or JobStatus (manager) as the bridge's JSON."""
    total = int(getattr(job, "blocks_total", 0) or 0)
    done_blocks = int(getattr(job, "blocks_done", 0) or 0)
    state = getattr(job, "state", "")
    spec = getattr(job, "spec", {}) or {}
    region = None
    start = spec.get("region_start_xyz") or spec.get("regionStartXyz")
    stop = spec.get("region_stop_xyz") or spec.get("regionStopXyz")
    if start and stop:
        region = {"start": [int(v) for v in start], "stop": [int(v) for v in stop]}
    return {
        "job_id": job.job_id,
        "kind": getattr(job, "kind", "") or "restore",
        "state": state,
        "done": bool(getattr(job, "done", state in TERMINAL)),
        "message": getattr(job, "message", ""),
        "blocks_done": done_blocks,
        "blocks_total": total,
        "progress": (done_blocks / total) if total else (1.0 if state == "SUCCEEDED" else 0.0),
        "voxels_per_second": float(getattr(job, "voxels_per_second", 0.0) or 0.0),
        "eta_seconds": float(getattr(job, "eta_seconds", 0.0) or 0.0),
        "created": float(getattr(job, "created", 0.0) or 0.0),
        "updated": float(getattr(job, "updated", 0.0) or 0.0),
        "source": spec.get("source", ""),
        "model": spec.get("model", ""),
        "region": region,
        "outputs": dict(getattr(job, "outputs", {}) or {}),
        "events": list(getattr(job, "events", []) or []),
    }


@dataclass
class BridgeConfig:
    """``grpc_target`` HOST:PORT; ``tokens`` the bridge's bearer tokens (at least one);
    ``allow_origins`` exact origins browsers may call from (``"*"`` allows any);
    ``grpc_token`` / ``grpc_tls_ca`` for the upstream service."""
    grpc_target: str
    tokens: list[str]
    allow_origins: list[str] = field(default_factory=list)
    grpc_token: str | None = None
    grpc_tls_ca: str | None = None
    grpc_timeout_s: float = 60.0
    watch_window_s: float = 10.0
    keepalive_s: float = 15.0
    register_wait_s: float = 60.0
    max_body_bytes: int = 1 << 20
    #: the operator's registration targets (connector.targets.load_targets): requests name them
    targets: dict = field(default_factory=dict)

    def validate(self) -> "BridgeConfig":
        toks = [t.strip() for t in (self.tokens or []) if t and t.strip()]
        if not toks:
            raise ConnectorError("token", "the bridge needs at least one bearer token (--token-file)")
        if any(any(c.isspace() for c in t) for t in toks):
            raise ConnectorError("token", "tokens cannot contain whitespace")
        self.tokens = toks
        origins = []
        for o in self.allow_origins or []:
            o = o.strip().rstrip("/")
            if not o:
                continue
            if o != "*" and not (o.startswith("http://") or o.startswith("https://")):
                raise ConnectorError("allow_origin", f"{o!r} must be an origin such as https://webknossos.org")
            if o != "*" and o.count("/") > 2:
                raise ConnectorError("allow_origin", f"{o!r} is a URL with a path; give scheme://host[:port]")
            origins.append(o)
        self.allow_origins = origins
        if not self.grpc_target or ":" not in self.grpc_target:
            raise ConnectorError("grpc", f"{self.grpc_target!r}: expected HOST:PORT of the gRPC service")
        return self


# ----------------------------------------------------------------------------- security middleware
class _SecurityMiddleware:
    """CORS allow-list, preflights and bearer-token checks in front of the routes (pure ASGI, so
    streaming responses pass through untouched)."""

    PUBLIC_PREFIXES = ("/healthz", "/assets/")

    def __init__(self, app, config: BridgeConfig):
        self.app = app
        self.config = config
        self._digests = [hashlib.sha256(t.encode()).digest() for t in config.tokens]

    def _origin_ok(self, origin: str) -> bool:
        allowed = self.config.allow_origins
        return "*" in allowed or origin.rstrip("/") in allowed

    def _token_problem(self, header: str | None) -> str | None:
        if not header:
            return "missing bearer token; send 'Authorization: Bearer <token>'"
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "expected 'Authorization: Bearer <token>'"
        given = hashlib.sha256(token.strip().encode()).digest()
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(given, d)
        return None if ok else "invalid bearer token"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin = headers.get("origin")
        path = scope.get("path", "")
        method = scope.get("method", "GET")
        cors: dict[str, str] = {}
        if origin is not None:
            if not self._origin_ok(origin):
                resp = error_response(403, "ORIGIN_NOT_ALLOWED", "Origin",
                                      f"origin {origin} is not in the bridge's allow-list; start the bridge "
                                      f"with --allow-origin {origin}")
                await resp(scope, receive, send)
                return
            cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                    "Access-Control-Expose-Headers": "Location, Content-Type"}
        if method == "OPTIONS":
            h = dict(cors)
            h.update({"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                      "Access-Control-Allow-Headers": "Authorization, Content-Type, Last-Event-ID",
                      "Access-Control-Max-Age": "600"})
            await Response(status_code=204, headers=h)(scope, receive, send)
            return
        if not path.startswith(self.PUBLIC_PREFIXES):
            problem = self._token_problem(headers.get("authorization"))
            if problem is not None:
                h = dict(cors)
                h["WWW-Authenticate"] = 'Bearer realm="emrestore-bridge"'
                await error_response(401, "UNAUTHENTICATED", "Authorization", problem, h)(scope, receive, send)
                return

        async def send_with_cors(message):
            if message["type"] == "http.response.start" and cors:
                raw = list(message.get("headers", []))
                present = {k.lower() for k, _ in raw}
                for k, v in cors.items():
                    if k.lower().encode() not in present:
                        raw.append((k.lower().encode("latin-1"), v.encode("latin-1")))
                message = dict(message, headers=raw)
            await send(message)

        await self.app(scope, receive, send_with_cors)


# ----------------------------------------------------------------------------- request parsing
def _int3(value: Any, field: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ConnectorError(field, f"{value!r} must be three integers [x, y, z]")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v):
            raise ConnectorError(field, f"{value!r} must be three integers [x, y, z]")
        out.append(int(v))
    return out


def _opt_int(body: dict, name: str, lo: int, hi: int) -> int:
    v = body.get(name, 0)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConnectorError(name, f"{v!r} must be an integer in [{lo}, {hi}]")
    return v


def _opt_str(body: dict, name: str) -> str:
    v = body.get(name)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise ConnectorError(name, f"{v!r} must be a string")
    return v.strip()


def parse_restore_request(body: Any, targets: dict | None = None) -> dict:
    """Validate a restore-region body; returns keyword arguments for the client (plus ``rid``)."""
    if not isinstance(body, dict):
        raise ConnectorError("body", "must be a JSON object")
    source = _opt_str(body, "source")
    if not source:
        raise ConnectorError("source", "required: a precomputed layer URL")
    if source.startswith("precomputed://"):
        source = source[len("precomputed://"):]
    model = _opt_str(body, "model")
    if not model:
        raise ConnectorError("model", "required: a model name on the server (GET /v1/models) or a model URL")
    region = body.get("region")
    if region is None:
        region = {"start": body.get("start"), "stop": body.get("stop")}
    if not isinstance(region, dict):
        raise ConnectorError("region", "must be an object {start: [x, y, z], stop: [x, y, z]}")
    if region.get("start") is None or region.get("stop") is None:
        raise ConnectorError("region", "required: {start: [x, y, z], stop: [x, y, z]} in source voxels")
    start = _int3(region["start"], "region.start")
    stop = _int3(region["stop"], "region.stop")
    if min(start) < 0:
        raise ConnectorError("region.start", f"{start} must be ≥ 0 on every axis")
    if any(b <= a for a, b in zip(start, stop)):
        raise ConnectorError("region", f"start {start} must be < stop {stop} on every axis (stop exclusive)")
    samples = _opt_int(body, "samples", 0, 64)
    steps = _opt_int(body, "steps", 0, 1000)
    seed = _opt_int(body, "seed", 0, 2 ** 62)
    mip = _opt_int(body, "mip", 0, 16)
    sampler = _opt_str(body, "sampler")
    rid = request_id()
    output = _opt_str(body, "output") or default_output_url(source, rid)
    unc = body.get("uncertainty")
    if unc is None:
        unc = samples >= 2
    if isinstance(unc, bool):
        uncertainty = (default_output_url(source, rid, "uncertainty") if not body.get("output")
                       else output.rstrip("/") + "_uncertainty") if unc else None
    elif isinstance(unc, str) and unc.strip():
        uncertainty = unc.strip()
    else:
        raise ConnectorError("uncertainty", f"{unc!r}: give true, false or a layer URL")
    if uncertainty and samples < 2:
        raise ConnectorError("uncertainty", "needs samples ≥ 2 (the spread of the samples)")
    names = body.get("register_in") or []
    if not isinstance(names, list):
        raise ConnectorError("register_in", "must be a list of configured target names")
    from .targets import resolve_names
    clean_targets = [t.name for t in resolve_names(names, targets or {})]
    return dict(source=source, model=model, output=output, start_xyz=start, stop_xyz=stop,
                uncertainty=uncertainty, samples=samples, steps=steps, seed=seed, mip=mip, sampler=sampler,
                register_in=clean_targets, rid=rid)


# ----------------------------------------------------------------------------- the app
def create_app(config: BridgeConfig, client=None) -> Starlette:
    """The ASGI app. ``client``: an EmrestoreClient to use (default: one for ``config``)."""
    config.validate()
    if client is None:
        from service.api.client import EmrestoreClient
        client = EmrestoreClient(config.grpc_target, token=config.grpc_token, tls_ca=config.grpc_tls_ca,
                                 timeout=config.grpc_timeout_s)
    from service.api.client import EmrestoreError

    def grpc_error(e: "EmrestoreError", default_field: str = "") -> JSONResponse:
        fld, text = split_field(e.message or str(e), default_field)
        return error_response(http_status_for(e.code_name, e.message or ""), e.code_name, fld, text)

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
        except ConnectorError as e:
            return error_response(400, "INVALID_ARGUMENT", e.field, e.detail)
        rid = kw.pop("rid")
        job, err = await call(
            client.restore_region, kw["source"], kw["model"], kw["output"], kw["start_xyz"], kw["stop_xyz"],
            uncertainty=kw["uncertainty"], samples=kw["samples"], steps=kw["steps"], seed=kw["seed"],
            mip=kw["mip"], sampler=kw["sampler"], register_in=register_in_for_grpc(kw["register_in"]),
            labels={"emrestore-origin": "bridge", "emrestore-request": rid})
        if err is not None:
            return err
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
            return JSONResponse({"status": "degraded", "grpc": e.code_name, "message": e.message},
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
                    if e.code_name == "DEADLINE_EXCEEDED":
                        continue
                    if e.code_name == "UNAVAILABLE":
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
                        code = getattr(e, "code_name", "INTERNAL")
                        fld, text = split_field(getattr(e, "message", str(e)), "job_id")
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
    app.add_middleware(_SecurityMiddleware, config=config)
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


def read_tokens(path: str | None, env_var: str | None = None) -> list[str]:
    """Tokens from a file (one per line, ``#`` comments) or ``$env_var`` (comma/space separated)."""
    text = ""
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConnectorError("token_file", f"cannot read {path}: {e.strerror or e}") from None
    elif env_var:
        text = os.environ.get(env_var, "")
    out: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        out.extend(t for t in line.replace(",", " ").split() if t)
    return out


def iter_sse(lines: Iterable[str]):
    """Parse server-sent events from text lines: yields (event, data-dict)."""
    event, data = "message", []
    for line in lines:
        line = line.rstrip("\r\n")
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
