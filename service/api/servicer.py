"""gRPC servicer of ``emrestore.v1.Restoration``: requests → spec dataclasses → JobManager.

Each handler reads its request into a spec through the one validation of request fields
(service/jobs/spec.py: required fields, ranges, start < stop, known names), which raises
``EmrestoreError`` naming the field; the manager then validates everything that needs the data
(layer bounds, model/task).
Every exception is turned into a gRPC status with ``service.errors.status_of`` and
``context.abort`` — the message names the request field (``region.start: …``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
from typing import Any

import grpc
import numpy as np
from google.protobuf import struct_pb2

from ..errors import EmrestoreError, PermissionDenied, ResourceExhausted, quote, status_of
from ..jobs import spec
from ..jobs.records import TERMINAL_STATES
from . import auth
from .gen import emrestore_pb2 as pb
from .gen import emrestore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "emrestore.v1.Restoration"
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


# ----------------------------------------------------------------------------- requests → specs
# The fields are checked by service/jobs/spec.py (the one validation, shared with the bridge and
# the command line); here only the message's shape: which oneof is set, which sub-messages.
def _region(req, field: str = "region", required: bool = False):
    """(start_xyz, stop_xyz) of a Box field, or None when unset and not required."""
    if not req.HasField(field):
        if required:
            raise EmrestoreError(field, "required: a box of source voxels (start inclusive, stop exclusive, xyz)")
        return None
    box = getattr(req, field)
    for part in ("start", "stop"):
        if not box.HasField(part):
            raise EmrestoreError(f"{field}.{part}", "required (x, y, z source voxels)")
    return _vec3(box.start), _vec3(box.stop)


def _job_call(fn, job_id: str, *args, **kwargs):
    """``fn(job_id, …)`` with JobNotFound reported as NOT_FOUND on the field job_id."""
    from ..errors import NotFound
    from ..jobs.ledger import JobNotFound
    try:
        return fn(job_id, *args, **kwargs)
    except JobNotFound:
        raise NotFound("job_id", f"no job {job_id!r}") from None


def _target_names(req) -> list[str]:
    """The registration target names of a request: a request names a target configured on the
    server; platform, address and options are server configuration."""
    names = []
    for i, t in enumerate(req.register_in):
        for name in ("platform", "url"):
            if getattr(t, name).strip():
                raise PermissionDenied(f"register_in[{i}].{name}", "a request names a configured target "
                                       "(register_in[].name); platform, address and options are server configuration")
        if len(t.options):
            raise PermissionDenied(f"register_in[{i}].options", "a request names a configured target "
                                   "(register_in[].name); platform, address and options are server configuration")
        if not t.name.strip():
            raise EmrestoreError(f"register_in[{i}].name", "required: the name of a registration target configured on the server")
        names.append(t.name)
    return names


def restore_spec_from_request(req: pb.CreateRestoreJobRequest):
    """The validated ``RestoreSpec`` of a request (the manager validates what needs the data)."""
    which = req.WhichOneof("extent")
    if which == "whole" and not req.whole:
        raise EmrestoreError("whole", "must be true when set (or give a region)")
    return spec.restore_request(
        source=req.source, model=req.model, output=req.output, uncertainty_output=req.uncertainty_output,
        region=_region(req, "region", required=True) if which == "region" else None, whole=which == "whole",
        mip=req.mip, incremental=req.incremental, sampler=req.sampler, steps=req.steps, samples=req.samples,
        seed=req.seed, parallelism=req.parallelism, register_in=_target_names(req), labels=dict(req.labels),
        estimate=req.estimate, overwrite=req.overwrite, execution=req.execution,
        output_encoding=req.output_encoding, jpeg_quality=req.jpeg_quality, output_sharding=req.output_sharding,
        dry_run=req.dry_run)


def train_spec_from_request(req: pb.CreateTrainJobRequest):
    """The validated ``TrainSpec`` of a request (the manager validates what needs the data)."""
    return spec.train_request(
        source=req.source, output_model=req.output_model, task=req.task, preset=req.preset, factor=req.factor,
        steps=req.steps, seed=req.seed, mip=req.mip, batch_size=req.batch_size, patch=req.patch,
        region=_region(req, "region"), base_model=req.base_model, target=req.target, labels=dict(req.labels))


def cutout_spec_from_request(req: pb.CutoutRequest, max_voxels: int | None = None):
    """The validated ``CutoutSpec`` of a request; RESOURCE_EXHAUSTED when the region exceeds
    ``max_voxels`` (the server's limit)."""
    cut = spec.cutout_request(source=req.source, model=req.model, region=_region(req, "region", required=True),
                              mip=req.mip, sampler=req.sampler, steps=req.steps, samples=req.samples,
                              seed=req.seed, estimate=req.estimate)
    if max_voxels:
        n = int(np.prod([b - a for a, b in zip(cut.region_start_xyz, cut.region_stop_xyz)], dtype=np.int64))
        if n > max_voxels:
            raise ResourceExhausted("region", f"{n} source voxels exceed the cutout limit of {max_voxels} "
                                              "output voxels; use CreateRestoreJob for larger regions")
    return cut


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
        got = self.manager.submit(restore_spec_from_request(request), owner=self._user(context))
        if isinstance(got, dict):  # a dry run: its estimate, and no job
            job = pb.Job(message="dry run: nothing written")
            job.dry_run.CopyFrom(_struct(got))
            return job
        return job_to_proto(got)

    @_unary
    def CreateTrainJob(self, request, context):
        return job_to_proto(self.manager.submit(train_spec_from_request(request), owner=self._user(context)))

    @_unary
    def GetJob(self, request, context):
        return job_to_proto(_job_call(self.manager.get, spec.check_job_id(request.job_id)))

    @_unary
    def ListJobs(self, request, context):
        if request.state and request.state not in pb.Job.State.values():
            raise EmrestoreError("state", f"unknown job state {request.state}; allowed: "
                                          f"{', '.join(_STATE_NAMES)} (or unset for all)")
        state, size, token = spec.list_request(pb.Job.State.Name(request.state) if request.state else "",
                                               request.page_size, request.page_token)
        try:
            jobs, next_token = self.manager.list(state=state, page_size=size, page_token=token)
        except (ValueError, KeyError) as exc:
            code, msg = status_of(exc)
            if token is not None and code in ("INVALID_ARGUMENT", "NOT_FOUND") and "page_token" not in msg:
                raise EmrestoreError("page_token", f"{quote(token)} is not a token returned by ListJobs "
                                                 f"({msg})") from None
            raise
        return pb.ListJobsResponse(jobs=[job_to_proto(j) for j in jobs], next_page_token=next_token or "")

    @_unary
    def CancelJob(self, request, context):
        job_id = spec.check_job_id(request.job_id)
        if self.interceptor is not None:
            user = self._user(context)
            owner = _job_call(self.manager.get, job_id).owner
            if user not in self.admins and user != owner:
                raise PermissionDenied("job_id", f"job {job_id} belongs to another user; only its owner or an "
                                                 "admin may cancel it")
        return job_to_proto(_job_call(self.manager.cancel, job_id))

    @_streaming
    def WatchJob(self, request, context):
        job_id = spec.check_job_id(request.job_id)
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
        cut = cutout_spec_from_request(request, self.manager.max_cutout_voxels)
        # bounded: a place in the queue at once or RESOURCE_EXHAUSTED, then a running slot
        if not self._cutout_waiting.acquire(blocking=False):
            raise ResourceExhausted("region", f"the server runs at most {self.max_concurrent_cutouts} cutouts at "
                                              "once and its queue is full; retry later")
        try:
            with self._cutout_slots:
                return cutout_to_proto(self.manager.cutout(cut))
        finally:
            self._cutout_waiting.release()

    @_unary
    def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[model_to_proto(m) for m in self.manager.list_models()])

    @_unary
    def GetModel(self, request, context):
        name = request.model.strip()
        if not name:
            raise EmrestoreError("model", "required: a model name or URL")
        return model_to_proto(self.manager.describe_model(name))
