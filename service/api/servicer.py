"""gRPC servicer of ``emrestore.v1.Restoration``: requests → spec dataclasses → JobManager.

Each handler first checks the shape of the request itself (required fields, negative numbers,
start < stop, known enum values and sampler names) and raises ``RequestError`` naming the
field; the manager then validates everything that needs the data (layer bounds, model/task).
Every exception is turned into a gRPC status with ``service.errors.status_of`` and
``context.abort`` — the message names the request field (``region.start: …``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
from dataclasses import fields as dc_fields
from typing import Any

import grpc
import numpy as np
from google.protobuf import struct_pb2

from ..errors import PermissionDenied, RequestError, ResourceExhausted, quote, status_of
from ..jobs.records import TERMINAL_STATES
from . import auth
from .gen import emrestore_pb2 as pb
from .gen import emrestore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "emrestore.v1.Restoration"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_JOB_PREFIX = "jobs/"
_KIND_TO_PB = {"restore": pb.Job.RESTORE, "train": pb.Job.TRAIN}
_STATE_NAMES = tuple(n for n in pb.Job.State.keys() if n != "STATE_UNSPECIFIED")


# ----------------------------------------------------------------------------- conversion helpers
def _struct(obj: Any) -> struct_pb2.Struct:
    """A JSON-able dict as a Struct (tuples → lists, other objects → str)."""
    s = struct_pb2.Struct()
    if obj:
        s.update(json.loads(json.dumps(obj, default=str)))
    return s


def _finite(v: Any, unknown: float = -1.0) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return unknown
    return f if math.isfinite(f) else unknown


def _vec3(msg: pb.Vec3) -> tuple[int, int, int]:
    return (int(msg.x), int(msg.y), int(msg.z))


def _pb_vec3(v) -> pb.Vec3:
    x, y, z = (int(a) for a in v)
    return pb.Vec3(x=x, y=y, z=z)


def _pb_vec3d(v) -> pb.Vec3d:
    x, y, z = (float(a) for a in v)
    return pb.Vec3d(x=x, y=y, z=z)


def job_to_proto(st: Any) -> pb.Job:
    """A jobs-layer ``JobStatus`` as a ``Job`` message."""
    state = str(getattr(st, "state", "") or "")
    job = pb.Job(
        name=_JOB_PREFIX + st.job_id,
        job_id=st.job_id,
        kind=_KIND_TO_PB.get(getattr(st, "kind", ""), pb.Job.KIND_UNSPECIFIED),
        state=pb.Job.State.Value(state) if state in _STATE_NAMES else pb.Job.STATE_UNSPECIFIED,
        message=str(getattr(st, "message", "") or ""),
        blocks_done=int(getattr(st, "blocks_done", 0) or 0),
        blocks_total=int(getattr(st, "blocks_total", 0) or 0),
        voxels_per_second=max(0.0, _finite(getattr(st, "voxels_per_second", 0.0), 0.0)),
        eta_seconds=max(0.0, _finite(getattr(st, "eta_seconds", 0.0), 0.0)),
    )
    job.done = state in TERMINAL_STATES
    if job.done:
        job.eta_seconds = 0.0
    for attr, ts in (("created", job.create_time), ("updated", job.update_time)):
        t = getattr(st, attr, None)
        if t:
            ts.FromNanoseconds(int(float(t) * 1e9))
    spec = dict(getattr(st, "spec", None) or {})
    job.spec.CopyFrom(_struct(spec))
    job.owner = str(getattr(st, "owner", "") or "")
    for e in getattr(st, "event_log", None) or []:
        ev = job.event_log.add(kind=str(e.get("kind", "")), message=str(e.get("message", "")))
        if e.get("time"):
            ev.time.FromNanoseconds(int(float(e["time"]) * 1e9))
    for k, v in (getattr(st, "outputs", None) or {}).items():
        if v is not None:
            job.outputs[str(k)] = str(v)
    job.events.extend(str(e) for e in (getattr(st, "events", None) or []))
    return job


def model_to_proto(meta: dict) -> pb.Model:
    """A model.json dict (plus ``url``) as a ``Model`` message."""
    m = pb.Model(
        name=str(meta.get("name") or ""),
        url=str(meta.get("url") or ""),
        kind=str(meta.get("kind") or ""),
        task=str(meta.get("task") or ""),
        factor=int(meta.get("factor") or 0),
        preset=str(meta.get("preset") or ""),
        num_parameters=int(meta.get("num_parameters") or 0),
        saved=str(meta.get("saved") or ""),
    )
    vs = meta.get("voxel_size_nm")
    if vs:
        m.voxel_size_nm.CopyFrom(_pb_vec3d(vs))
    m.metadata.CopyFrom(_struct(meta))
    return m


def _new_events(events: list[str], prev: list[str] | None) -> list[str]:
    """Events not in ``prev`` (the list sent last time). The manager returns a sliding window of
    recent events, so ``events`` is ``prev`` minus some oldest entries plus new ones: find the
    smallest shift d with events[:len(prev)-d] == prev[d:]; all events are new when none fits."""
    if not prev:
        return list(events)
    for d in range(len(prev) + 1):
        k = len(prev) - d
        if k <= len(events) and events[:k] == prev[d:]:
            return list(events[k:])
    return list(events)


# ----------------------------------------------------------------------------- request checks
def _required(value: str, field: str, what: str) -> str:
    v = value.strip()
    if not v:
        raise RequestError(field, f"required: {what}")
    return v


def _nonneg(value: int, field: str) -> int:
    if value < 0:
        raise RequestError(field, f"must be ≥ 0, got {value}")
    return int(value)


def _region(req, field: str = "region", required: bool = False):
    """(start_xyz, stop_xyz) of a Box field, or (None, None) when unset and not required."""
    if not req.HasField(field):
        if required:
            raise RequestError(field, "required: a box of source voxels (start inclusive, stop exclusive, xyz)")
        return None, None
    box = getattr(req, field)
    for part in ("start", "stop"):
        if not box.HasField(part):
            raise RequestError(f"{field}.{part}", "required (x, y, z source voxels)")
    start, stop = _vec3(box.start), _vec3(box.stop)
    if min(start) < 0:
        raise RequestError(f"{field}.start", f"{list(start)} must be ≥ 0 on every axis")
    if any(b <= a for a, b in zip(start, stop)):
        raise RequestError(field, f"start {list(start)} must be < stop {list(stop)} on every axis "
                                  "(xyz, start inclusive, stop exclusive)")
    return start, stop


def _sampler(name: str) -> str | None:
    if not name:
        return None
    from ..engine.sampler_names import SAMPLER_NAMES
    if name not in SAMPLER_NAMES:
        raise RequestError("sampler", f"unknown sampler {quote(name)}; allowed: {', '.join(SAMPLER_NAMES)}")
    return name


def _sampling(req, kw: dict) -> None:
    """sampler/steps/samples/seed of a restore or cutout request into spec kwargs (0/"" = default)."""
    s = _sampler(req.sampler)
    if s:
        kw["sampler"] = s
    for name in ("steps", "samples"):
        v = _nonneg(getattr(req, name), name)
        if v:
            kw[name] = v
    kw["seed"] = _nonneg(req.seed, "seed")
    kw["mip"] = _nonneg(req.mip, "mip")


def _job_id(value: str) -> str:
    v = value.strip()
    if v.startswith(_JOB_PREFIX):
        v = v[len(_JOB_PREFIX):]
    if not v:
        raise RequestError("job_id", "required: the id of a job (as returned by CreateRestoreJob/CreateTrainJob)")
    from ..jobs.ledger import validate_job_id
    try:
        validate_job_id(v)
    except ValueError:
        raise RequestError("job_id", f"{quote(value)} is not a job id (26 lowercase letters and digits)") from None
    return v


def _job_call(fn, job_id: str, *args, **kwargs):
    """``fn(job_id, …)`` with JobNotFound reported as NOT_FOUND on the field job_id."""
    from ..errors import NotFound
    from ..jobs.ledger import JobNotFound
    try:
        return fn(job_id, *args, **kwargs)
    except JobNotFound:
        raise NotFound("job_id", f"no job {job_id!r}") from None


def restore_spec_from_request(req: pb.CreateRestoreJobRequest):
    """The ``RestoreSpec`` of a request (shape checked; the manager validates the rest)."""
    from ..jobs.spec import RestoreSpec
    kw: dict[str, Any] = dict(
        source=_required(req.source, "source", "a precomputed layer URL"),
        model=_required(req.model, "model", "a model name or URL"),
        output=_required(req.output, "output", "a layer URL for the restored volume"),
        incremental=bool(req.incremental),
        parallelism=_nonneg(req.parallelism, "parallelism"),
    )
    if req.uncertainty_output.strip():
        kw["uncertainty_output"] = req.uncertainty_output.strip()
    which = req.WhichOneof("extent")
    if which is None:
        raise RequestError("region", "required: a region (box of source voxels) or whole = true")
    if which == "whole":
        if not req.whole:
            raise RequestError("whole", "must be true when set (or give a region)")
    else:
        kw["region_start_xyz"], kw["region_stop_xyz"] = _region(req, "region", required=True)
    _sampling(req, kw)
    targets = []
    for i, t in enumerate(req.register_in):
        for name in ("platform", "url"):
            if getattr(t, name).strip():
                raise PermissionDenied(f"register_in[{i}].{name}", "a request names a configured target "
                                       "(register_in[].name); platform, address and options are server configuration")
        if len(t.options):
            raise PermissionDenied(f"register_in[{i}].options", "a request names a configured target "
                                   "(register_in[].name); platform, address and options are server configuration")
        if not t.name.strip():
            raise RequestError(f"register_in[{i}].name", "required: the name of a registration target configured on the server")
        targets.append(t.name.strip())
    kw["register_in"] = targets
    kw["labels"] = dict(req.labels)
    kw["estimate"] = req.estimate.strip()
    kw["overwrite"] = bool(req.overwrite)
    kw["execution"] = req.execution.strip() or "auto"
    return RestoreSpec(**kw)


def train_spec_from_request(req: pb.CreateTrainJobRequest):
    """The ``TrainSpec`` of a request (shape checked; the manager validates the rest)."""
    from ..jobs.spec import TrainSpec
    kw: dict[str, Any] = dict(
        source=_required(req.source, "source", "a precomputed layer URL"),
        output_model=_required(req.output_model, "output_model", "a model URL or name to write"),
        seed=_nonneg(req.seed, "seed"),
        mip=_nonneg(req.mip, "mip"),
    )
    for name in ("task", "preset"):
        v = getattr(req, name).strip()
        if v:
            kw[name] = v
    for name in ("factor", "steps", "batch_size", "patch"):
        v = _nonneg(getattr(req, name), name)
        if v:
            kw[name] = v
    start, stop = _region(req, "region")
    if start is not None:
        kw["region_start_xyz"], kw["region_stop_xyz"] = start, stop
    if req.base_model.strip():
        kw["base_model"] = req.base_model.strip()
    if req.target.strip():
        if not req.base_model.strip():
            raise RequestError("target", "a fine-tuning target needs base_model")
        kw["target"] = req.target.strip()
    names = {f.name for f in dc_fields(TrainSpec)}
    if "labels" in names:
        kw["labels"] = dict(req.labels)
    return TrainSpec(**kw)


def cutout_spec_from_request(req: pb.CutoutRequest, max_voxels: int | None = None):
    """The ``CutoutSpec`` of a request; RESOURCE_EXHAUSTED when the region exceeds ``max_voxels``."""
    from ..jobs.spec import CutoutSpec
    kw: dict[str, Any] = dict(
        source=_required(req.source, "source", "a precomputed layer URL"),
        model=_required(req.model, "model", "a model name or URL"),
    )
    start, stop = _region(req, "region", required=True)
    kw["region_start_xyz"], kw["region_stop_xyz"] = start, stop
    _sampling(req, kw)
    kw["estimate"] = req.estimate.strip()
    if max_voxels:
        n = int(np.prod([b - a for a, b in zip(start, stop)], dtype=np.int64))
        if n > max_voxels:
            raise ResourceExhausted("region", f"{n} source voxels exceed the cutout limit of {max_voxels} "
                                              "output voxels; use CreateRestoreJob for larger regions")
    return CutoutSpec(**kw)


def _array_bytes(arr: np.ndarray) -> bytes:
    a = np.ascontiguousarray(arr)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a.tobytes(order="C")


def cutout_to_proto(res: Any) -> pb.CutoutResponse:
    mean = np.asarray(res.mean_zyx)
    dtype = str(getattr(res, "dtype", "") or mean.dtype.name)
    if mean.dtype.name != dtype:
        mean = mean.astype(dtype)
    z, y, x = mean.shape
    out = pb.CutoutResponse(data=_array_bytes(mean), shape=pb.Vec3(x=x, y=y, z=z), dtype=dtype,
                            output_start=_pb_vec3(res.output_start_xyz),
                            resolution_nm=_pb_vec3d(res.resolution_nm_xyz),
                            message=str(getattr(res, "message", "") or ""))
    std = getattr(res, "std_zyx", None)
    if std is not None:
        std = np.asarray(std, dtype=np.float32)
        if std.shape != mean.shape:
            raise RuntimeError(f"cutout: uncertainty shape {std.shape} differs from data shape {mean.shape}")
        out.uncertainty = _array_bytes(std)
        out.uncertainty_dtype = "float32"
    return out


# ----------------------------------------------------------------------------- error handling
def _abort(context: grpc.ServicerContext, exc: BaseException, method: str):
    code_name, msg = status_of(exc)
    code = getattr(grpc.StatusCode, code_name, grpc.StatusCode.UNKNOWN)
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        log.exception("%s failed", method)
        msg = f"{type(exc).__name__}: {msg}" if msg != type(exc).__name__ else msg
    else:
        log.info("%s: %s: %s", method, code_name, msg)
    context.abort(code, msg)


def _unary(fn):
    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            _abort(context, exc, fn.__name__)
    return wrapper


def _streaming(fn):
    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            yield from fn(self, request, context)
        except Exception as exc:  # noqa: BLE001
            if context.is_active():
                _abort(context, exc, fn.__name__)
    return wrapper


# ----------------------------------------------------------------------------- servicer
class RestorationServicer(pb_grpc.RestorationServicer):
    """Serves ``emrestore.v1.Restoration`` from a ``service.jobs.manager.JobManager``.

    ``interceptor``: the bearer-token interceptor (it names the calling user; None: no
    authentication, every caller may cancel every job). ``admins``: users who may cancel any job.
    Cutouts: at most ``max_concurrent_cutouts`` run, ``cutout_queue`` wait, more are refused.
    """

    def __init__(self, manager, interceptor=None, admins=(), max_concurrent_cutouts: int = 2,
                 cutout_queue: int = 4):
        self.manager = manager
        self.interceptor = interceptor
        self.admins = frozenset(admins) | {auth.DEFAULT_USER}
        self.max_concurrent_cutouts = max_concurrent_cutouts
        self._cutout_slots = threading.BoundedSemaphore(max(1, max_concurrent_cutouts))
        self._cutout_waiting = threading.BoundedSemaphore(max(1, max_concurrent_cutouts) + max(0, cutout_queue))

    def _user(self, context) -> str:
        return auth.caller(context, self.interceptor) or ""

    @_unary
    def CreateRestoreJob(self, request, context):
        return job_to_proto(self.manager.submit(restore_spec_from_request(request), owner=self._user(context)))

    @_unary
    def CreateTrainJob(self, request, context):
        return job_to_proto(self.manager.submit(train_spec_from_request(request), owner=self._user(context)))

    @_unary
    def GetJob(self, request, context):
        return job_to_proto(_job_call(self.manager.get, _job_id(request.job_id)))

    @_unary
    def ListJobs(self, request, context):
        size = request.page_size
        if size < 0:
            raise RequestError("page_size", f"must be ≥ 0 (0: {DEFAULT_PAGE_SIZE}), got {size}")
        size = min(size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        state = None
        if request.state:
            if request.state not in pb.Job.State.values():
                raise RequestError("state", f"unknown job state {request.state}; allowed: "
                                            f"{', '.join(_STATE_NAMES)} (or unset for all)")
            state = pb.Job.State.Name(request.state)
        token = request.page_token.strip() or None
        try:
            jobs, next_token = self.manager.list(state=state, page_size=size, page_token=token)
        except (ValueError, KeyError) as exc:
            code, msg = status_of(exc)
            if token is not None and code in ("INVALID_ARGUMENT", "NOT_FOUND") and "page_token" not in msg:
                raise RequestError("page_token", f"{quote(token)} is not a token returned by ListJobs "
                                                 f"({msg})") from None
            raise
        return pb.ListJobsResponse(jobs=[job_to_proto(j) for j in jobs], next_page_token=next_token or "")

    @_unary
    def CancelJob(self, request, context):
        job_id = _job_id(request.job_id)
        if self.interceptor is not None:
            user = self._user(context)
            owner = _job_call(self.manager.get, job_id).owner
            if user not in self.admins and user != owner:
                raise PermissionDenied("job_id", f"job {job_id} belongs to another user; only its owner or an "
                                                 "admin may cancel it")
        return job_to_proto(_job_call(self.manager.cancel, job_id))

    @_streaming
    def WatchJob(self, request, context):
        job_id = _job_id(request.job_id)
        stop = threading.Event()
        context.add_callback(stop.set)  # client cancelled, deadline passed or server stopping
        sent: list[str] | None = None
        _job_call(self.manager.get, job_id)  # NOT_FOUND before the stream starts
        for st in self.manager.watch(job_id, stop=stop):
            if stop.is_set() or not context.is_active():
                return
            job = job_to_proto(st)
            events = list(job.events)
            new = _new_events(events, sent)
            sent = events
            yield pb.JobUpdate(job_id=job.job_id, state=job.state, blocks_done=job.blocks_done,
                               blocks_total=job.blocks_total, voxels_per_second=job.voxels_per_second,
                               eta_seconds=job.eta_seconds, message=job.message, new_events=new,
                               done=job.done, job=job)
            if job.done:
                return

    @_unary
    def Cutout(self, request, context):
        spec = cutout_spec_from_request(request, self.manager.max_cutout_voxels)
        # bounded: a place in the queue at once or RESOURCE_EXHAUSTED, then a running slot
        if not self._cutout_waiting.acquire(blocking=False):
            raise ResourceExhausted("region", f"the server runs at most {self.max_concurrent_cutouts} cutouts at "
                                              "once and its queue is full; retry later")
        try:
            with self._cutout_slots:
                return cutout_to_proto(self.manager.cutout(spec))
        finally:
            self._cutout_waiting.release()

    @_unary
    def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[model_to_proto(m) for m in self.manager.list_models()])

    @_unary
    def GetModel(self, request, context):
        name = _required(request.model, "model", "a model name or URL")
        return model_to_proto(self.manager.describe_model(name))
