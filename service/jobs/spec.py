"""Job specifications and the one validation of every request field.

A spec is plain data (JSON in the ledger): ``RestoreSpec``, ``TrainSpec``, ``CutoutSpec``; its
``validate()`` checks every field against the request limits (``LIMITS``, once). The manager
validates every spec it is given and turns it into a typed plan (planning.py).

**Entry points.** Every way in checks a request with the same functions, on the values as they
arrive (0 and "" mean "the default", as in proto3):

- :func:`restore_request`, :func:`train_request`, :func:`cutout_request`: the fields of a
  CreateRestoreJob / CreateTrainJob / Cutout request → a validated spec, or ``EmrestoreError``
  naming the request field (``region.start``, ``steps``, ``register_in[1]``, …) and the range;
- :func:`check_job_id` (GetJob, CancelJob, WatchJob), :func:`list_request` (ListJobs).

The gRPC servicer (service/api/servicer.py) reads the protobuf message (and only checks its
shape: which oneof, which sub-message is set) and calls them; the HTTP bridge
(connector/bridge_protocol.py) checks the JSON shape and calls them, renaming fields to its JSON
names; the client commands (service/api/commands.py) call them before sending, renaming fields
to their options (``--steps``) with ``EmrestoreError.renamed``. So all three refuse the same values
with the same limits and messages.

**A new request field**: add it to the spec dataclass (with its default), check it in the spec's
``validate()`` (``_check_int``, ``_check_choice``, ``_check_url``, … below; a new limit goes into
``Limits``), take it in the request function (``…_request(..., new_field=...)``, mapping the
wire's empty value to the default), and pass it from the servicer, the bridge and the CLI.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..engine.sampler_names import DEFAULT_SAMPLER, DEFAULT_STEPS, MAX_SAMPLES, SAMPLER_NAMES
from ..errors import EmrestoreError, quote
from ..volume.pyramid import ENCODINGS, SHARDINGS

Vec3 = tuple[int, int, int]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

#: Lateral context (source voxels) read around each block for blending across block borders.
LATERAL_CONTEXT = 32
#: Default write block (output voxels, xyz), rounded up to the write grid.
DEFAULT_BLOCK_XYZ = (256, 256, 0)  # z 0: one output chunk (m·k voxels)


@dataclass(frozen=True)
class Limits:
    """Request limits: one place, used by every entry point (gRPC, bridge, CLI)."""
    max_steps: int = 1000            # sampler steps per sample
    max_samples: int = MAX_SAMPLES   # samples per image (the engine's own bound)
    max_train_steps: int = 200_000
    max_parallelism: int = 10_000
    max_mip: int = 16
    max_register_targets: int = 8
    max_url_chars: int = 2048


LIMITS = Limits()
MAX_TRAIN_STEPS = LIMITS.max_train_steps
ESTIMATES = ("", "mean", "sample", "sample-mean")
EXECUTIONS = ("auto", "pool", "batch")
OUTPUT_ENCODINGS = ENCODINGS
OUTPUT_SHARDINGS = SHARDINGS


def _vec3(v, name: str, allow_none=True) -> Vec3 | None:
    if v is None:
        if allow_none:
            return None
        raise EmrestoreError(name, "required (x, y, z)")
    try:
        t = tuple(int(a) for a in v)
    except (TypeError, ValueError):
        raise EmrestoreError(name, f"{quote(v)} must be three integers (x, y, z)") from None
    if len(t) != 3 or any(int(a) != a for a in v):
        raise EmrestoreError(name, f"{quote(v)} must be three integers (x, y, z)")
    return t  # type: ignore[return-value]


def _check_int(value, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise EmrestoreError(name, f"{quote(value)} must be an integer in [{lo}, {hi}]")
    return value


def _check_url(value, name: str, what: str = "a layer URL (file://, gs://, s3://, or an alias://)") -> str:
    if not isinstance(value, str) or not value.strip():
        raise EmrestoreError(name, f"required: {what}")
    if len(value) > LIMITS.max_url_chars:
        raise EmrestoreError(name, f"{quote(value)} is longer than {LIMITS.max_url_chars} characters")
    return value.strip()


def _check_sampling(spec) -> None:
    _check_choice(spec.sampler, "sampler", SAMPLER_NAMES)
    _check_int(spec.steps, "steps", 1, LIMITS.max_steps)
    _check_int(spec.samples, "samples", 1, LIMITS.max_samples)
    _check_int(spec.seed, "seed", 0, 2 ** 63 - 1)
    _check_int(spec.mip, "mip", 0, LIMITS.max_mip)
    _check_choice(spec.estimate, "estimate", ESTIMATES)


def _check_region(start, stop) -> tuple[Vec3, Vec3] | None:
    s = _vec3(start, "region.start")
    e = _vec3(stop, "region.stop")
    if s is None and e is None:
        return None
    if s is None or e is None:
        raise EmrestoreError("region", "give both start and stop, or neither for the whole dataset")
    if min(s) < 0:
        raise EmrestoreError("region.start", f"{list(s)} must be ≥ 0 on every axis")
    if any(b <= a for a, b in zip(s, e)):
        raise EmrestoreError("region", f"start {list(s)} must be < stop {list(e)} on every axis (xyz, stop exclusive)")
    return s, e


def _check_choice(value, name: str, allowed) -> str:
    if value not in allowed:
        raise EmrestoreError(name, f"{quote(value)}; allowed: {', '.join(a or '(empty)' for a in allowed)}")
    return value


def _wire_int(value, name: str, hi: int, zero: str = "") -> int:
    """A request integer as it arrives: 0 … hi, 0 meaning ``zero`` (the default) when given."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
        raise EmrestoreError(name, f"{quote(value)} must be an integer in [0, {hi}]" + (f" (0: {zero})" if zero else ""))
    return value


def _wire_str(value, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise EmrestoreError(name, f"{quote(value)} must be a string")
    return value.strip()


@dataclass
class RestoreSpec:
    source: str
    model: str
    output: str
    uncertainty_output: str | None = None
    mip: int = 0
    region_start_xyz: Vec3 | None = None
    region_stop_xyz: Vec3 | None = None
    incremental: bool = False
    sampler: str = DEFAULT_SAMPLER
    steps: int = DEFAULT_STEPS
    samples: int = 1
    seed: int = 0
    parallelism: int = 0
    register_in: list = field(default_factory=list)  # names of configured registration targets
    labels: dict = field(default_factory=dict)
    estimate: str = ""  # "" = the engine's default
    overwrite: bool = False
    kind: str = "restore"
    #: where the blocks run: "pool" (warm workers), "batch" (Indexed Job / local tasks), or
    #: "auto": the pool for interactive-sized regions when the server has one (manager.py)
    execution: str = "auto"
    #: how the output layer is stored: "" (as the existing layer, else as the source), raw, png, jpeg
    output_encoding: str = ""
    #: jpeg quality 1–100; 0: the existing layer's, the source's, else the default (90)
    jpeg_quality: int = 0
    #: "auto" (as the existing layer, else as the source), "sharded" or "unsharded"
    output_sharding: str = "auto"
    #: plan, check and price the job; write nothing (the manager returns the estimate)
    dry_run: bool = False

    def validate(self) -> "RestoreSpec":
        self.source = _check_url(self.source, "source")
        self.model = _check_url(self.model, "model")
        self.output = _check_url(self.output, "output")
        if self.uncertainty_output:
            self.uncertainty_output = _check_url(self.uncertainty_output, "uncertainty_output")
            if self.uncertainty_output in (self.output, self.source):
                raise EmrestoreError("uncertainty_output", "must differ from source and output")
        if self.output.rstrip("/") == self.source.rstrip("/"):
            raise EmrestoreError("output", "would overwrite the source layer; choose another URL")
        r = _check_region(self.region_start_xyz, self.region_stop_xyz)
        self.region_start_xyz, self.region_stop_xyz = (r if r else (None, None))
        _check_sampling(self)
        _check_int(self.parallelism, "parallelism", 0, LIMITS.max_parallelism)
        if not isinstance(self.register_in, list) or not all(isinstance(t, str) for t in self.register_in):
            raise EmrestoreError("register_in", "must be a list of configured target names; a request "
                                              "may not name a platform address, command or credential")
        if len(self.register_in) > LIMITS.max_register_targets:
            raise EmrestoreError("register_in", f"at most {LIMITS.max_register_targets} targets")
        for i, t in enumerate(self.register_in):
            if not _NAME_RE.match(t):
                raise EmrestoreError(f"register_in[{i}]", f"{quote(t)} is not a target name "
                                                        "(letters, digits, '_.-', at most 64)")
        if not isinstance(self.overwrite, bool):
            raise EmrestoreError("overwrite", "must be true or false")
        _check_choice(self.execution, "execution", EXECUTIONS)
        _check_choice(self.output_encoding, "output_encoding", ("",) + OUTPUT_ENCODINGS)
        if isinstance(self.jpeg_quality, bool) or not isinstance(self.jpeg_quality, int) or not 0 <= self.jpeg_quality <= 100:
            raise EmrestoreError("jpeg_quality", f"{quote(self.jpeg_quality)}; allowed: 1–100 (0: the default)")
        if self.jpeg_quality and self.output_encoding not in ("", "jpeg"):
            raise EmrestoreError("jpeg_quality", f"applies to jpeg only; output_encoding is {quote(self.output_encoding)}")
        _check_choice(self.output_sharding, "output_sharding", OUTPUT_SHARDINGS)
        if not isinstance(self.dry_run, bool):
            raise EmrestoreError("dry_run", "must be true or false")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainSpec:
    source: str
    output_model: str
    task: str = "isotropic"
    factor: int = 0
    preset: str = "tiny"
    steps: int = 1000
    seed: int = 0
    mip: int = 0
    region_start_xyz: Vec3 | None = None
    region_stop_xyz: Vec3 | None = None
    base_model: str | None = None
    target: str | None = None
    batch_size: int = 8
    patch: int = 64
    labels: dict = field(default_factory=dict)
    kind: str = "train"

    def validate(self) -> "TrainSpec":
        from ..engine.network import PRESETS
        self.source = _check_url(self.source, "source")
        self.output_model = _check_url(self.output_model, "output_model")
        if self.task != "isotropic":
            raise EmrestoreError("task", f"{quote(self.task)}; training on a layer supports: isotropic "
                                       "(use the CLI's train command for denoise/superres pairs)")
        if self.factor:
            _check_int(self.factor, "factor", 2, 16)
        _check_choice(self.preset, "preset", tuple(PRESETS))
        _check_int(self.steps, "steps", 1, MAX_TRAIN_STEPS)
        _check_int(self.seed, "seed", 0, 2 ** 63 - 1)
        _check_int(self.mip, "mip", 0, LIMITS.max_mip)
        _check_int(self.batch_size, "batch_size", 1, 256)
        _check_int(self.patch, "patch", 16, 1024)
        r = _check_region(self.region_start_xyz, self.region_stop_xyz)
        self.region_start_xyz, self.region_stop_xyz = (r if r else (None, None))
        if self.target and not self.base_model:
            raise EmrestoreError("target", "a fine-tuning target needs base_model")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CutoutSpec:
    source: str
    model: str
    region_start_xyz: Vec3 | None = None
    region_stop_xyz: Vec3 | None = None
    mip: int = 0
    sampler: str = DEFAULT_SAMPLER
    steps: int = DEFAULT_STEPS
    samples: int = 1
    seed: int = 0
    estimate: str = ""

    def validate(self) -> "CutoutSpec":
        self.source = _check_url(self.source, "source")
        self.model = _check_url(self.model, "model")
        r = _check_region(self.region_start_xyz, self.region_stop_xyz)
        if r is None:
            raise EmrestoreError("region", "a cutout needs a region (start and stop, xyz)")
        self.region_start_xyz, self.region_stop_xyz = r
        _check_sampling(self)
        return self


def spec_from_dict(d: dict[str, Any]) -> RestoreSpec | TrainSpec:
    kind = d.get("kind", "restore")
    cls = {"restore": RestoreSpec, "train": TrainSpec}.get(kind)
    if cls is None:
        raise EmrestoreError("kind", f"{quote(kind)}; allowed: restore, train")
    names = {f.name for f in fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    for key in ("region_start_xyz", "region_stop_xyz"):
        if kw.get(key) is not None:
            kw[key] = tuple(kw[key])
    return cls(**kw)


# ----------------------------------------------------------------------------- requests as they arrive
def _sampling_request(sampler, steps, samples, seed, mip, estimate) -> dict:
    """The sampling fields of a restore or cutout request (0 / "": the defaults)."""
    return dict(sampler=_wire_str(sampler, "sampler") or DEFAULT_SAMPLER,
                steps=_wire_int(steps, "steps", LIMITS.max_steps, f"the default, {DEFAULT_STEPS}") or DEFAULT_STEPS,
                samples=_wire_int(samples, "samples", LIMITS.max_samples, "1") or 1,
                seed=_wire_int(seed, "seed", 2 ** 63 - 1),
                mip=_wire_int(mip, "mip", LIMITS.max_mip, "full resolution"),
                estimate=_wire_str(estimate, "estimate"))


def _names(register_in) -> list[str]:
    if register_in is None:
        return []
    if not isinstance(register_in, (list, tuple)):
        raise EmrestoreError("register_in", "must be a list of configured target names")
    return [t.strip() if isinstance(t, str) else t for t in register_in]


def restore_request(*, source: str, model: str, output: str, region: tuple | None = None, whole: bool = False,
                    uncertainty_output: str = "", mip: int = 0, incremental: bool = False, sampler: str = "",
                    steps: int = 0, samples: int = 0, seed: int = 0, parallelism: int = 0, register_in=(),
                    labels: dict | None = None, estimate: str = "", overwrite: bool = False,
                    execution: str = "", output_encoding: str = "", jpeg_quality: int = 0,
                    output_sharding: str = "", dry_run: bool = False) -> RestoreSpec:
    """The validated ``RestoreSpec`` of a CreateRestoreJob request's fields (0 / "" / None: the
    defaults). ``region``: (start_xyz, stop_xyz) source voxels, or None with ``whole``."""
    if region is None and not whole:
        raise EmrestoreError("region", "required: a region (box of source voxels) or whole = true")
    if region is not None and whole:
        raise EmrestoreError("whole", "give a region or whole = true, not both")
    start, stop = region if region is not None else (None, None)
    if region is not None and (start is None or stop is None):
        raise EmrestoreError("region", "required: start and stop (x, y, z source voxels, stop exclusive)")
    spec = RestoreSpec(
        source=_check_url(source, "source", "a precomputed layer URL"),
        model=_check_url(model, "model", "a model name or URL"),
        output=_check_url(output, "output", "a layer URL for the restored volume"),
        uncertainty_output=_wire_str(uncertainty_output, "uncertainty_output") or None,
        region_start_xyz=start, region_stop_xyz=stop, incremental=bool(incremental),
        **_sampling_request(sampler, steps, samples, seed, mip, estimate),
        parallelism=_wire_int(parallelism, "parallelism", LIMITS.max_parallelism, "the server's default"),
        register_in=_names(register_in), labels=dict(labels or {}), overwrite=overwrite,
        execution=_wire_str(execution, "execution") or "auto",
        output_encoding=_wire_str(output_encoding, "output_encoding"), jpeg_quality=jpeg_quality,
        output_sharding=_wire_str(output_sharding, "output_sharding") or "auto", dry_run=dry_run)
    return spec.validate()


def cutout_request(*, source: str, model: str, region: tuple | None, mip: int = 0, sampler: str = "",
                   steps: int = 0, samples: int = 0, seed: int = 0, estimate: str = "") -> CutoutSpec:
    """The validated ``CutoutSpec`` of a Cutout request's fields (0 / "": the defaults)."""
    start, stop = region if region is not None else (None, None)
    spec = CutoutSpec(source=_check_url(source, "source", "a precomputed layer URL"),
                      model=_check_url(model, "model", "a model name or URL"),
                      region_start_xyz=start, region_stop_xyz=stop,
                      **_sampling_request(sampler, steps, samples, seed, mip, estimate))
    return spec.validate()


def train_request(*, source: str, output_model: str, task: str = "", preset: str = "", factor: int = 0,
                  steps: int = 0, seed: int = 0, mip: int = 0, batch_size: int = 0, patch: int = 0,
                  region: tuple | None = None, base_model: str = "", target: str = "",
                  labels: dict | None = None) -> TrainSpec:
    """The validated ``TrainSpec`` of a CreateTrainJob request's fields (0 / "": the defaults)."""
    start, stop = region if region is not None else (None, None)
    kw: dict[str, Any] = dict(
        source=_check_url(source, "source", "a precomputed layer URL"),
        output_model=_check_url(output_model, "output_model", "a model URL or name to write"),
        seed=_wire_int(seed, "seed", 2 ** 63 - 1), mip=_wire_int(mip, "mip", LIMITS.max_mip, "full resolution"),
        factor=_wire_int(factor, "factor", 16, "from the layer's voxel size"),
        region_start_xyz=start, region_stop_xyz=stop, labels=dict(labels or {}),
        base_model=_wire_str(base_model, "base_model") or None, target=_wire_str(target, "target") or None)
    kw["task"] = _wire_str(task, "task") or "isotropic"
    kw["preset"] = _wire_str(preset, "preset") or "tiny"
    for name, value, hi, default in (("steps", steps, MAX_TRAIN_STEPS, 1000), ("batch_size", batch_size, 256, 8),
                                     ("patch", patch, 1024, 64)):
        kw[name] = _wire_int(value, name, hi, f"the default, {default}") or default
    return TrainSpec(**kw).validate()


def check_job_id(value: str) -> str:
    """The job id of a GetJob / CancelJob / WatchJob request (``jobs/ID`` or ``ID``)."""
    v = _wire_str(value, "job_id")
    if v.startswith("jobs/"):
        v = v[len("jobs/"):]
    if not v:
        raise EmrestoreError("job_id", "required: the id of a job (as returned by CreateRestoreJob/CreateTrainJob)")
    from .records import validate_job_id
    try:
        return validate_job_id(v)
    except ValueError:
        raise EmrestoreError("job_id", f"{quote(value)} is not a job id (26 lowercase letters and digits)") from None


#: ListJobs: a page holds this many jobs when the request says 0 (at most records.MAX_PAGE_SIZE)
DEFAULT_PAGE_SIZE = 50


def list_request(state: str = "", page_size: int = 0, page_token: str = "") -> tuple[str | None, int, str | None]:
    """(state or None for all, page size, page token or None) of a ListJobs request; a page
    size of 0 is ``DEFAULT_PAGE_SIZE``, one above ``MAX_PAGE_SIZE`` is cut to it."""
    from .records import MAX_PAGE_SIZE, STATES
    state = _wire_str(state, "state").upper()
    if state and state not in STATES:
        raise EmrestoreError("state", f"unknown job state {quote(state)}; allowed: {', '.join(STATES)} (or unset for all)")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 0:
        raise EmrestoreError("page_size", f"must be ≥ 0 (0: {DEFAULT_PAGE_SIZE}), got {quote(page_size)}")
    return state or None, min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE), _wire_str(page_token, "page_token") or None
