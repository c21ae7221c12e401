"""Job specifications: what a request asks for, validated before anything is written.

A spec is plain data (JSON in the ledger). The request limits live here, once (``LIMITS``): the
servicer, the bridge and the CLI validate through these specs. The manager turns a valid spec
into a typed plan (planning.py) that it records in the ledger for the workers.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..engine.restore import MAX_SAMPLES
from ..engine.sampler_names import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLER_NAMES
from ..errors import RequestError, quote

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


def _vec3(v, name: str, allow_none=True) -> Vec3 | None:
    if v is None:
        if allow_none:
            return None
        raise RequestError(name, "required (x, y, z)")
    try:
        t = tuple(int(a) for a in v)
    except (TypeError, ValueError):
        raise RequestError(name, f"{quote(v)} must be three integers (x, y, z)") from None
    if len(t) != 3 or any(int(a) != a for a in v):
        raise RequestError(name, f"{quote(v)} must be three integers (x, y, z)")
    return t  # type: ignore[return-value]


def _check_int(value, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RequestError(name, f"{quote(value)} must be an integer in [{lo}, {hi}]")
    return value


def _check_url(value, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RequestError(name, "required: a layer URL (file://, gs://, s3://, or an alias://)")
    if len(value) > LIMITS.max_url_chars:
        raise RequestError(name, f"{quote(value)} is longer than {LIMITS.max_url_chars} characters")
    return value.strip()


def _check_sampling(spec) -> None:
    if spec.sampler not in SAMPLER_NAMES:
        raise RequestError("sampler", f"{quote(spec.sampler)}; allowed: {', '.join(SAMPLER_NAMES)}")
    _check_int(spec.steps, "steps", 1, LIMITS.max_steps)
    _check_int(spec.samples, "samples", 1, LIMITS.max_samples)
    _check_int(spec.seed, "seed", 0, 2 ** 63 - 1)
    _check_int(spec.mip, "mip", 0, LIMITS.max_mip)
    if spec.estimate not in ESTIMATES:
        raise RequestError("estimate", f"{quote(spec.estimate)}; allowed: {', '.join(e or '(empty)' for e in ESTIMATES)}")


def _check_region(start, stop) -> tuple[Vec3, Vec3] | None:
    s = _vec3(start, "region.start")
    e = _vec3(stop, "region.stop")
    if s is None and e is None:
        return None
    if s is None or e is None:
        raise RequestError("region", "give both start and stop, or neither for the whole dataset")
    if any(b <= a for a, b in zip(s, e)):
        raise RequestError("region", f"start {list(s)} must be < stop {list(e)} on every axis (xyz, stop exclusive)")
    if min(s) < 0:
        raise RequestError("region", f"start {list(s)} must be ≥ 0")
    return s, e


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

    def validate(self) -> "RestoreSpec":
        self.source = _check_url(self.source, "source")
        self.model = _check_url(self.model, "model")
        self.output = _check_url(self.output, "output")
        if self.uncertainty_output:
            self.uncertainty_output = _check_url(self.uncertainty_output, "uncertainty_output")
            if self.uncertainty_output in (self.output, self.source):
                raise RequestError("uncertainty_output", "must differ from source and output")
        if self.output.rstrip("/") == self.source.rstrip("/"):
            raise RequestError("output", "would overwrite the source layer; choose another URL")
        r = _check_region(self.region_start_xyz, self.region_stop_xyz)
        self.region_start_xyz, self.region_stop_xyz = (r if r else (None, None))
        _check_sampling(self)
        _check_int(self.parallelism, "parallelism", 0, LIMITS.max_parallelism)
        if not isinstance(self.register_in, list) or not all(isinstance(t, str) for t in self.register_in):
            raise RequestError("register_in", "must be a list of configured target names; a request "
                                              "may not name a platform address, command or credential")
        if len(self.register_in) > LIMITS.max_register_targets:
            raise RequestError("register_in", f"at most {LIMITS.max_register_targets} targets")
        for i, t in enumerate(self.register_in):
            if not _NAME_RE.match(t):
                raise RequestError(f"register_in[{i}]", f"{quote(t)} is not a target name "
                                                        "(letters, digits, '_.-', at most 64)")
        if not isinstance(self.overwrite, bool):
            raise RequestError("overwrite", "must be true or false")
        if self.execution not in ("auto", "pool", "batch"):
            raise RequestError("execution", f"{quote(self.execution)}; allowed: auto, pool, batch")
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
            raise RequestError("task", f"{quote(self.task)}; training on a layer supports: isotropic "
                                       "(use the CLI's train command for denoise/superres pairs)")
        if self.factor:
            _check_int(self.factor, "factor", 2, 16)
        if self.preset not in PRESETS:
            raise RequestError("preset", f"{quote(self.preset)}; allowed: {', '.join(PRESETS)}")
        _check_int(self.steps, "steps", 1, MAX_TRAIN_STEPS)
        _check_int(self.seed, "seed", 0, 2 ** 63 - 1)
        _check_int(self.mip, "mip", 0, LIMITS.max_mip)
        _check_int(self.batch_size, "batch_size", 1, 256)
        _check_int(self.patch, "patch", 16, 1024)
        r = _check_region(self.region_start_xyz, self.region_stop_xyz)
        self.region_start_xyz, self.region_stop_xyz = (r if r else (None, None))
        if self.target and not self.base_model:
            raise RequestError("target", "a fine-tuning target needs base_model")
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
            raise RequestError("region", "a cutout needs a region (start and stop, xyz)")
        self.region_start_xyz, self.region_stop_xyz = r
        _check_sampling(self)
        return self


def spec_from_dict(d: dict[str, Any]) -> RestoreSpec | TrainSpec:
    kind = d.get("kind", "restore")
    cls = {"restore": RestoreSpec, "train": TrainSpec}.get(kind)
    if cls is None:
        raise RequestError("kind", f"{quote(kind)}; allowed: restore, train")
    names = {f.name for f in fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    for key in ("region_start_xyz", "region_stop_xyz"):
        if kw.get(key) is not None:
            kw[key] = tuple(kw[key])
    return cls(**kw)
