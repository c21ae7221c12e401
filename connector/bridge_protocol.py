"""The bridge's messages: what browsers send and receive, and how gRPC answers map onto HTTP.

- **Requests**: :func:`parse_restore_request` checks the HTTP shape of a ``POST /v1/restore-region``
  body (a JSON object, integers, strings, three-vectors) and the operator's target names, checks
  its fields with the server's own request checks (service/jobs/spec.py: the same limits and
  messages, fields renamed to the body's names) and turns it into keyword arguments for
  :class:`service.api.client.EmrestoreClient`.
- **Answers**: :func:`job_json` is a job as JSON; :func:`job_event_kinds` and
  :func:`registration_pending` read a job's structured events.
- **Errors**: :func:`http_status_for` maps gRPC status codes to HTTP statuses,
  :func:`split_field` and :func:`error_response` build ``{"error", "field", "message"}`` answers.
- **Server-sent events**: :func:`iter_sse` parses a ``text/event-stream`` (clients, tests).

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

import json
from typing import Any, Iterable

from starlette.responses import JSONResponse

from service.errors import EmrestoreError, split_field  # noqa: F401 - split_field: part of this module's API

from .util import ConnectorError, default_output_url, request_id

__all__ = ["GRPC_TO_HTTP", "TERMINAL", "REGISTRATION_KINDS", "job_event_kinds", "registration_pending",
           "register_in_for_grpc", "http_status_for", "split_field", "error_response", "job_json",
           "parse_restore_request", "iter_sse"]

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

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
#: request field → the restore body's name for it (how errors of the request checks name them)
BODY_NAMES = {"uncertainty_output": "uncertainty"}
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


# ----------------------------------------------------------------------------- requests
def _int3(value: Any, field: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ConnectorError(field, f"{value!r} must be three integers [x, y, z]")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v):
            raise ConnectorError(field, f"{value!r} must be three integers [x, y, z]")
        out.append(int(v))
    return out


def _opt_int(body: dict, name: str) -> int:
    v = body.get(name, 0)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConnectorError(name, f"{v!r} must be an integer")
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
    samples, steps, seed, mip = (_opt_int(body, n) for n in ("samples", "steps", "seed", "mip"))
    sampler = _opt_str(body, "sampler")
    fmt = dict(output_encoding=_opt_str(body, "output_encoding"), jpeg_quality=_opt_int(body, "jpeg_quality"),
               output_sharding=_opt_str(body, "output_sharding"))
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise ConnectorError("dry_run", f"{dry_run!r:.80}: give true or false")
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
    names = body.get("register_in") or []
    if not isinstance(names, list):
        raise ConnectorError("register_in", "must be a list of configured target names")
    from .targets import resolve_names
    clean_targets = [t.name for t in resolve_names(names, targets or {})]
    from service.jobs.spec import restore_request
    try:  # the server's own checks: the same limits and messages
        restore_request(source=source, model=model, output=output, region=(start, stop),
                        uncertainty_output=uncertainty or "", samples=samples, steps=steps, seed=seed, mip=mip,
                        sampler=sampler, register_in=clean_targets, dry_run=dry_run, **fmt)
    except EmrestoreError as e:
        raise e.renamed(BODY_NAMES) from None
    return dict(source=source, model=model, output=output, start_xyz=start, stop_xyz=stop,
                uncertainty=uncertainty, samples=samples, steps=steps, seed=seed, mip=mip, sampler=sampler,
                register_in=clean_targets, rid=rid, dry_run=dry_run, **fmt)


# ----------------------------------------------------------------------------- server-sent events
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
