"""Job specifications: what a request asks for, validated before anything is written.

A spec is plain data (JSON in the ledger). Turning a restore spec into blocks is deterministic
(``plan_for``), so every worker — local process or Kubernetes pod — derives the same plan.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..engine.restore import MAX_SAMPLES
from ..engine.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS
from ..errors import RequestError

Vec3 = tuple[int, int, int]

#: Lateral context (source voxels) read around each block for blending across block borders.
LATERAL_CONTEXT = 32
#: Default write block (output voxels, xyz), rounded up to the write grid.
DEFAULT_BLOCK_XYZ = (256, 256, 0)  # z 0: one output chunk (m·k voxels)
MAX_TRAIN_STEPS = 200_000


def _vec3(v, name: str, allow_none=True) -> Vec3 | None:
    if v is None:
        if allow_none:
            return None
        raise RequestError(name, "required (x, y, z)")
    try:
        t = tuple(int(a) for a in v)
    except (TypeError, ValueError):
        raise RequestError(name, f"{v!r} must be three integers (x, y, z)") from None
    if len(t) != 3 or any(int(a) != a for a in v):
        raise RequestError(name, f"{v!r} must be three integers (x, y, z)")
    return t  # type: ignore[return-value]


def _check_int(value, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RequestError(name, f"{value!r} must be an integer in [{lo}, {hi}]")
    return value


def _check_url(value, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RequestError(name, "required: a layer URL (file://, gs://, s3://, or an alias://)")
    return value.strip()


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
    register_in: list = field(default_factory=list)
    labels: dict = field(default_factory=dict)
    kind: str = "restore"

    def validate(self) -> "RestoreSpec":
        self.source = _check_url(self.source, "source")
        self.model = _check_url(self.model, "model")
        self.output = _check_url(self.output, "output")
        if self.uncertainty_output:
            self.uncertainty_output = _check_url(self.uncertainty_output, "uncertainty_output")
            if self.samples < 2:
                raise RequestError("uncertainty_output", "needs samples ≥ 2 (the spread of the samples)")
            if self.uncertainty_output in (self.output, self.source):
                raise RequestError("uncertainty_output", "must differ from source and output")
        if self.output.rstrip("/") == self.source.rstrip("/"):
            raise RequestError("output", "would overwrite the source layer; choose another URL")
        _check_int(self.mip, "mip", 0, 16)
        r = _check_region(self.region_start_xyz, self.region_stop_xyz)
        self.region_start_xyz, self.region_stop_xyz = (r if r else (None, None))
        if self.sampler not in SAMPLERS:
            raise RequestError("sampler", f"{self.sampler!r}; allowed: {', '.join(sorted(SAMPLERS))}")
        _check_int(self.steps, "steps", 1, 1000)
        _check_int(self.samples, "samples", 1, MAX_SAMPLES)
        _check_int(self.seed, "seed", 0, 2 ** 63 - 1)
        _check_int(self.parallelism, "parallelism", 0, 10_000)
        if not isinstance(self.register_in, list) or not all(isinstance(t, dict) for t in self.register_in):
            raise RequestError("register_in", "must be a list of {platform, url, options} targets")
        for t in self.register_in:
            if t.get("platform") not in ("neuroglancer", "webknossos", "catmaid"):
                raise RequestError("register_in.platform",
                                   f"{t.get('platform')!r}; allowed: neuroglancer, webknossos, catmaid")
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
            raise RequestError("task", f"{self.task!r}; training on a layer supports: isotropic "
                                       "(use the CLI's train command for denoise/superres pairs)")
        if self.factor:
            _check_int(self.factor, "factor", 2, 16)
        if self.preset not in PRESETS:
            raise RequestError("preset", f"{self.preset!r}; allowed: {', '.join(PRESETS)}")
        _check_int(self.steps, "steps", 1, MAX_TRAIN_STEPS)
        _check_int(self.seed, "seed", 0, 2 ** 63 - 1)
        _check_int(self.mip, "mip", 0, 16)
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

    def validate(self) -> "CutoutSpec":
        self.source = _check_url(self.source, "source")
        self.model = _check_url(self.model, "model")
        r = _check_region(self.region_start_xyz, self.region_stop_xyz)
        if r is None:
            raise RequestError("region", "a cutout needs a region (start and stop, xyz)")
        self.region_start_xyz, self.region_stop_xyz = r
        _check_int(self.mip, "mip", 0, 16)
        if self.sampler not in SAMPLERS:
            raise RequestError("sampler", f"{self.sampler!r}; allowed: {', '.join(sorted(SAMPLERS))}")
        _check_int(self.steps, "steps", 1, 1000)
        _check_int(self.samples, "samples", 1, MAX_SAMPLES)
        _check_int(self.seed, "seed", 0, 2 ** 63 - 1)
        return self


def spec_from_dict(d: dict[str, Any]) -> RestoreSpec | TrainSpec:
    kind = d.get("kind", "restore")
    cls = {"restore": RestoreSpec, "train": TrainSpec}.get(kind)
    if cls is None:
        raise RequestError("kind", f"{kind!r}; allowed: restore, train")
    names = {f.name for f in fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    for key in ("region_start_xyz", "region_stop_xyz"):
        if kw.get(key) is not None:
            kw[key] = tuple(kw[key])
    return cls(**kw)
