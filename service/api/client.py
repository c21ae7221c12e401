"""A small Python client for the emrestore gRPC service.

Example::

    from service.api.client import EmrestoreClient, EmrestoreError

    with EmrestoreClient("127.0.0.1:50051", token="s3cret") as c:
        job = c.restore_region("gs://lab/em/raw", "iso5", "gs://lab/em/iso",
                               start_xyz=(0, 0, 0), stop_xyz=(1024, 1024, 64),
                               uncertainty="gs://lab/em/iso-std", samples=4)
        final = c.wait(job.job_id, progress=lambda u: print(u.blocks_done, "/", u.blocks_total))
        print(final.state, final.outputs)
        mean, std, meta = c.cutout("gs://lab/em/raw", "iso5", (100, 100, 10), (228, 228, 14))
        for m in c.models():
            print(m["name"], m["task"], m["factor"])

Every method raises :class:`service.errors.EmrestoreError` on failure: ``.code`` the status code
name (e.g. "INVALID_ARGUMENT"), ``.message`` the server's message, which names the request field
(``.field``, ``.reason``).
Coordinates are absolute source voxels ``(x, y, z)``, start inclusive and stop exclusive;
arrays come back as numpy ``(z, y, x)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import grpc
import numpy as np
from google.protobuf import json_format

from ..errors import EmrestoreError
from .auth import bearer_metadata
from .gen import emrestore_pb2 as pb
from .gen import emrestore_pb2_grpc as pb_grpc

__all__ = ["EmrestoreClient", "EmrestoreError", "JobInfo", "JobProgress", "DEFAULT_TARGET",
           "TERMINAL_STATES", "STATES"]

DEFAULT_TARGET = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CUTOUT_TIMEOUT_S = 600.0
#: Job states, from the protobuf enum (the ledger's names are tested to be the same).
STATES = tuple(n for n in pb.Job.State.keys() if n != "STATE_UNSPECIFIED")
TERMINAL_STATES = frozenset(STATES[2:])  # SUCCEEDED, FAILED, CANCELLED: the enum's order


def _rpc_error(err: grpc.RpcError) -> EmrestoreError:
    """The EmrestoreError of a failed call (the server's status code and message)."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    return EmrestoreError.from_status(code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN", details or "")


@dataclass
class JobInfo:
    """A job as plain Python values (see the ``Job`` message)."""
    job_id: str
    kind: str                   # "restore" | "train" | ""
    state: str                  # PENDING | RUNNING | SUCCEEDED | FAILED | CANCELLED
    done: bool
    message: str
    blocks_done: int
    blocks_total: int
    voxels_per_second: float
    eta_seconds: float
    created: float              # Unix seconds
    updated: float
    spec: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    events: list = field(default_factory=list)
    event_log: list = field(default_factory=list)   # [{kind, message, time}]
    owner: str = ""
    dry_run: dict | None = None  # a dry run's estimate (CreateRestoreJob with dry_run): no job then

    @classmethod
    def from_proto(cls, j: pb.Job) -> "JobInfo":
        kind = pb.Job.Kind.Name(j.kind).lower() if j.kind in pb.Job.Kind.values() and j.kind else ""
        return cls(job_id=j.job_id, kind=kind, state=_state_name(j.state), done=j.done,
                   message=j.message, blocks_done=j.blocks_done, blocks_total=j.blocks_total,
                   voxels_per_second=j.voxels_per_second, eta_seconds=j.eta_seconds,
                   created=j.create_time.ToNanoseconds() / 1e9 if j.HasField("create_time") else 0.0,
                   updated=j.update_time.ToNanoseconds() / 1e9 if j.HasField("update_time") else 0.0,
                   spec=_ints(json_format.MessageToDict(j.spec)) if j.HasField("spec") else {},
                   outputs=dict(j.outputs), events=list(j.events),
                   dry_run=_ints(json_format.MessageToDict(j.dry_run)) if j.HasField("dry_run") else None,
                   event_log=[{"kind": e.kind, "message": e.message,
                               "time": e.time.ToNanoseconds() / 1e9 if e.HasField("time") else 0.0}
                              for e in j.event_log],
                   owner=j.owner)


@dataclass
class JobProgress:
    """One update of a watched job (see the ``JobUpdate`` message)."""
    job_id: str
    state: str
    done: bool
    blocks_done: int
    blocks_total: int
    voxels_per_second: float
    eta_seconds: float
    message: str
    new_events: list
    job: JobInfo

    @classmethod
    def from_proto(cls, u: pb.JobUpdate) -> "JobProgress":
        return cls(job_id=u.job_id, state=_state_name(u.state), done=u.done, blocks_done=u.blocks_done,
                   blocks_total=u.blocks_total, voxels_per_second=u.voxels_per_second,
                   eta_seconds=u.eta_seconds, message=u.message, new_events=list(u.new_events),
                   job=JobInfo.from_proto(u.job))


def _ints(obj):
    """Struct numbers are doubles: whole numbers back to int (recursively)."""
    if isinstance(obj, float) and obj.is_integer() and abs(obj) < 2 ** 53:
        return int(obj)
    if isinstance(obj, dict):
        return {k: _ints(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_ints(v) for v in obj]
    return obj


def _state_name(v: int) -> str:
    return pb.Job.State.Name(v) if v in pb.Job.State.values() else str(v)


def _vec3(v: Sequence[int], name: str) -> pb.Vec3:
    try:
        x, y, z = (int(a) for a in v)
    except (TypeError, ValueError):
        raise EmrestoreError(name, f"{v!r} must be three integers (x, y, z)") from None
    return pb.Vec3(x=x, y=y, z=z)


def _box(start, stop, name: str = "region") -> pb.Box:
    return pb.Box(start=_vec3(start, f"{name}.start"), stop=_vec3(stop, f"{name}.stop"))


def _targets(register_in) -> list[pb.RegisterTarget]:
    """Target names (configured on the server). A dict is sent as it is (the server refuses
    platform/url/options: they are server configuration)."""
    out = []
    for t in register_in or []:
        if isinstance(t, str):
            out.append(pb.RegisterTarget(name=t))
        else:
            out.append(pb.RegisterTarget(name=t.get("name", ""), platform=t.get("platform", ""), url=t.get("url", ""),
                                         options={str(k): str(v) for k, v in (t.get("options") or {}).items()}))
    return out


class EmrestoreClient:
    """A connection to an emrestore server.

    ``target``: "host:port". ``token``: bearer token sent with every call (None: none).
    ``tls_ca``: path (or PEM bytes) of the CA certificate that signed the server's certificate;
    ``True`` for the system roots; None for a plaintext channel. ``timeout``: default deadline
    in seconds of unary calls (None: none).
    """

    def __init__(self, target: str = DEFAULT_TARGET, token: str | None = None,
                 tls_ca: str | bytes | bool | None = None, timeout: float | None = 60.0,
                 tls_server_name: str | None = None):
        self.target = target
        self.timeout = timeout
        self._metadata = bearer_metadata(token)
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if tls_ca is None or tls_ca is False:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            root = None
            if isinstance(tls_ca, bytes):
                root = tls_ca
            elif isinstance(tls_ca, str):
                try:
                    with open(tls_ca, "rb") as f:
                        root = f.read()
                except OSError as e:
                    raise EmrestoreError("tls_ca", f"cannot read {tls_ca}: {e.strerror or e}") from None
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root),
                                               options=options)
        self.stub = pb_grpc.RestorationStub(self.channel)

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "EmrestoreClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, request, timeout: float | None = None):
        try:
            return getattr(self.stub, method)(request, metadata=self._metadata,
                                              timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as e:
            raise _rpc_error(e) from None

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """Health status name ("SERVING", "NOT_SERVING", …) of ``service`` ("" = the server)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        try:
            resp = health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            raise _rpc_error(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    # ------------------------------------------------------------------ jobs
    def _restore(self, source, model, output, *, region=None, whole=False, uncertainty=None, mip=0,
                 incremental=False, sampler="", steps=0, samples=0, seed=0, parallelism=0,
                 register_in=None, labels=None, estimate="", overwrite=False, execution="",
                 output_encoding="", jpeg_quality=0, output_sharding="", dry_run=False) -> JobInfo:
        req = pb.CreateRestoreJobRequest(
            source=source, model=model, output=output, uncertainty_output=uncertainty or "", mip=mip,
            incremental=incremental, sampler=sampler or "", steps=steps, samples=samples, seed=seed,
            parallelism=parallelism, register_in=_targets(register_in), labels=labels or {},
            estimate=estimate or "", overwrite=bool(overwrite), execution=execution or "",
            output_encoding=output_encoding or "", jpeg_quality=jpeg_quality, output_sharding=output_sharding or "",
            dry_run=bool(dry_run))
        if region is not None:
            req.region.CopyFrom(region)
        elif whole:
            req.whole = True
        return JobInfo.from_proto(self._call("CreateRestoreJob", req))

    def restore_region(self, source: str, model: str, output: str, start_xyz: Sequence[int],
                       stop_xyz: Sequence[int], *, uncertainty: str | None = None, mip: int = 0,
                       incremental: bool = False, sampler: str = "", steps: int = 0, samples: int = 0,
                       seed: int = 0, parallelism: int = 0, register_in: list[str] | None = None,
                       labels: dict | None = None, estimate: str = "", overwrite: bool = False,
                       execution: str = "", **fmt) -> JobInfo:
        """Start restoring the box start_xyz..stop_xyz (absolute source voxels) of ``source``.

        ``model``: a name in the server's model directory or a URL. ``uncertainty``: layer URL
        for the per-voxel standard deviation (needs samples ≥ 2). 0/"" mean server defaults.
        ``register_in``: names of registration targets configured on the server. ``overwrite``:
        replace an existing emrestore output of another job. ``execution``: "pool", "batch" or
        "" (auto: the warm pool for small regions when the server has one). ``fmt``:
        ``output_encoding`` (raw, png, jpeg), ``jpeg_quality``, ``output_sharding`` (auto, sharded,
        unsharded), ``dry_run`` (the job's price in ``JobInfo.dry_run``; nothing written).
        """
        return self._restore(source, model, output, region=_box(start_xyz, stop_xyz), uncertainty=uncertainty,
                             mip=mip, incremental=incremental, sampler=sampler, steps=steps, samples=samples,
                             seed=seed, parallelism=parallelism, register_in=register_in, labels=labels,
                             estimate=estimate, overwrite=overwrite, execution=execution, **fmt)

    def restore_dataset(self, source: str, model: str, output: str, *, incremental: bool = False,
                        uncertainty: str | None = None, mip: int = 0, sampler: str = "", steps: int = 0,
                        samples: int = 0, seed: int = 0, parallelism: int = 0,
                        register_in: list[str] | None = None, labels: dict | None = None,
                        estimate: str = "", overwrite: bool = False, execution: str = "", **fmt) -> JobInfo:
        """Start restoring the whole of ``source``; ``incremental``: keep the tasks earlier jobs
        of this method finished. ``fmt``: as :meth:`restore_region`."""
        return self._restore(source, model, output, whole=True, uncertainty=uncertainty, mip=mip,
                             incremental=incremental, sampler=sampler, steps=steps, samples=samples,
                             seed=seed, parallelism=parallelism, register_in=register_in, labels=labels,
                             estimate=estimate, overwrite=overwrite, execution=execution, **fmt)

    def train(self, source: str, output_model: str, *, factor: int = 0, preset: str = "", steps: int = 0,
              seed: int = 0, mip: int = 0, start_xyz: Sequence[int] | None = None,
              stop_xyz: Sequence[int] | None = None, base_model: str | None = None,
              target: str | None = None, batch_size: int = 0, patch: int = 0,
              labels: dict | None = None) -> JobInfo:
        """Start training a model on ``source`` (self-supervised isotropic), or fine-tuning
        ``base_model`` (towards ``target``, a registered high-quality layer, if given)."""
        req = pb.CreateTrainJobRequest(source=source, output_model=output_model, factor=factor,
                                       preset=preset or "", steps=steps, seed=seed, mip=mip,
                                       base_model=base_model or "", target=target or "",
                                       batch_size=batch_size, patch=patch, labels=labels or {})
        if start_xyz is not None or stop_xyz is not None:
            req.region.CopyFrom(_box(start_xyz, stop_xyz))
        return JobInfo.from_proto(self._call("CreateTrainJob", req))

    def get_job(self, job_id: str) -> JobInfo:
        """The job's current status."""
        return JobInfo.from_proto(self._call("GetJob", pb.GetJobRequest(job_id=job_id)))

    def list_jobs(self, state: str | None = None, page_size: int = 50) -> Iterator[JobInfo]:
        """All jobs, newest first (optionally only those in ``state``), fetching page by page."""
        st = 0
        if state:
            if state.upper() not in STATES:
                raise EmrestoreError("state", f"unknown job state {state!r}; allowed: {', '.join(STATES)}")
            st = pb.Job.State.Value(state.upper())
        token = ""
        while True:
            resp = self._call("ListJobs", pb.ListJobsRequest(page_size=page_size, page_token=token, state=st))
            for j in resp.jobs:
                yield JobInfo.from_proto(j)
            token = resp.next_page_token
            if not token:
                return

    def cancel(self, job_id: str) -> JobInfo:
        """Request cancellation (FAILED_PRECONDITION when the job already finished)."""
        return JobInfo.from_proto(self._call("CancelJob", pb.CancelJobRequest(job_id=job_id)))

    def watch(self, job_id: str, timeout: float | None = None) -> Iterator[JobProgress]:
        """Progress updates until the job reaches a terminal state (the last update has
        ``done``). Closing the iterator early cancels the stream."""
        call = self.stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=self._metadata, timeout=timeout)
        try:
            for u in call:
                yield JobProgress.from_proto(u)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise _rpc_error(e) from None
        finally:
            call.cancel()

    def wait(self, job_id: str, progress: Callable[[JobProgress], None] | None = None,
             timeout: float | None = None, reconnect_s: float = 1.0) -> JobInfo:
        """Block until the job finishes and return its final status; ``progress(update)`` is
        called on every update. Reconnects when the stream breaks (server restart).
        EmrestoreError DEADLINE_EXCEEDED after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise EmrestoreError("timeout", f"job {job_id} still running after {timeout:g} s", "DEADLINE_EXCEEDED")
            try:
                last = None
                for u in self.watch(job_id, timeout=left):
                    last = u
                    if progress is not None:
                        progress(u)
                if last is not None and last.done:
                    return last.job
            except EmrestoreError as e:
                if e.code == "DEADLINE_EXCEEDED":
                    raise EmrestoreError("timeout", f"job {job_id} still running after {timeout:g} s",
                                         "DEADLINE_EXCEEDED") from None
                if e.code != "UNAVAILABLE":
                    raise
            info = None
            try:
                info = self.get_job(job_id)
            except EmrestoreError as e:
                if e.code != "UNAVAILABLE":
                    raise
            if info is not None and info.done:
                return info
            time.sleep(reconnect_s)

    # ------------------------------------------------------------------ cutout and models
    def cutout(self, source: str, model: str, start_xyz: Sequence[int], stop_xyz: Sequence[int], *,
               mip: int = 0, sampler: str = "", steps: int = 0, samples: int = 0, seed: int = 0,
               estimate: str = "", timeout: float | None = None) -> tuple[np.ndarray, np.ndarray | None, dict]:
        """Restore a small box now. Returns (mean, std or None, meta): arrays (z, y, x); std when
        samples ≥ 2; meta has output_start_xyz, resolution_nm_xyz, dtype, shape_zyx, message.
        ``timeout``: seconds (default: the client's timeout, at least 600)."""
        req = pb.CutoutRequest(source=source, model=model, region=_box(start_xyz, stop_xyz), mip=mip,
                               sampler=sampler or "", steps=steps, samples=samples, seed=seed,
                               estimate=estimate or "")
        if timeout is None and self.timeout is not None:
            timeout = max(self.timeout, CUTOUT_TIMEOUT_S)  # restoring takes a while on a CPU server
        r = self._call("Cutout", req, timeout=timeout)
        shape = (r.shape.z, r.shape.y, r.shape.x)
        mean = np.frombuffer(r.data, dtype=np.dtype(r.dtype).newbyteorder("<")).reshape(shape)
        std = None
        if r.uncertainty:
            std = np.frombuffer(r.uncertainty, dtype=np.dtype(r.uncertainty_dtype or "float32")
                                .newbyteorder("<")).reshape(shape)
        meta = {"output_start_xyz": (r.output_start.x, r.output_start.y, r.output_start.z),
                "resolution_nm_xyz": (r.resolution_nm.x, r.resolution_nm.y, r.resolution_nm.z),
                "dtype": r.dtype, "shape_zyx": shape, "message": r.message}
        return mean, std, meta

    @staticmethod
    def _model_dict(m: pb.Model) -> dict:
        d = _ints(json_format.MessageToDict(m.metadata)) if m.HasField("metadata") else {}
        d.update(name=m.name, url=m.url, kind=m.kind, task=m.task, factor=m.factor, preset=m.preset,
                 num_parameters=m.num_parameters, saved=m.saved)
        d["voxel_size_nm"] = ([m.voxel_size_nm.x, m.voxel_size_nm.y, m.voxel_size_nm.z]
                              if m.HasField("voxel_size_nm") else None)
        return d

    def models(self) -> list[dict]:
        """The server's models: model.json fields plus ``url``."""
        return [self._model_dict(m) for m in self._call("ListModels", pb.ListModelsRequest()).models]

    def model(self, name_or_url: str) -> dict:
        """One model's model.json fields plus ``url``."""
        return self._model_dict(self._call("GetModel", pb.GetModelRequest(model=name_or_url)))
