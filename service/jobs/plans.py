"""Typed job plans: what a worker needs to run a job, written once by the manager into the
ledger (``jobs/{id}/plan.json``) and loaded by every worker — workers never re-plan.

A restore plan describes its work as grids (volume/grid.py: stages of tasks over the output
layer's scales, restoration blocks computed on demand) — a few hundred bytes whatever the
dataset's size — and everything that decides the bytes written: model, scale, sampling, seed,
normalisation, output dtype and format, tiling. A train plan is one block: the training region
and the training settings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..volume.blocks import Block, Plan
from ..volume.geometry import Box

#: Version of the plan format; a ledger job without a plan (or with another version) is refused.
#: Version 1 listed every block; those plans are still read (their blocks become explicit tasks).
PLAN_VERSION = 2
READABLE_VERSIONS = (1, 2)


class PlanMissing(ValueError):
    """A job recorded by an older emrestore (no persisted plan): it cannot be resumed."""
    code = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class RestorePlan:
    source: str
    mip: int
    output: str
    uncertainty_output: str | None
    model_url: str
    task: str
    factor: int
    scale_xyz: tuple[int, int, int]
    output_resolution_nm_xyz: tuple[float, float, float]
    output_dtype: str
    norm: dict
    sampler: str
    steps: int
    samples: int
    seed: int
    estimate: str
    tile: int
    overlap: int
    blocks: Plan
    num_blocks_planned: int = 0
    num_tasks: int = 1
    kind: str = "restore"  # "cutout": a one-block job whose arrays go to the ledger (result.npz)
    #: "interactive" (restore-regions, cutouts: leased first by pool workers) or "batch"
    priority: str = "batch"
    #: where the job's blocks run: "pool" (warm pool workers) or "batch" (Indexed Job / local tasks)
    execution: str = "batch"
    #: how the output layer is stored (pyramid.LayerFormat as a dict; {} = raw unsharded)
    output_format: dict = field(default_factory=dict)
    #: the std a uint8 uncertainty value of 255 stands for (None: a float32 layer of older plans)
    uncertainty_full_scale: float | None = None

    def block(self, index: int) -> Block:
        """Restoration block ``index`` of a one-block task (cutouts, plans of format 1)."""
        return self.blocks.blocks_in(index)[0]

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "blocks"}
        d["blocks"] = self.blocks.to_dict()
        d["version"] = PLAN_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RestorePlan":
        kw = {k: v for k, v in d.items() if k not in ("blocks", "version")}
        kw["scale_xyz"] = tuple(int(v) for v in d["scale_xyz"])
        kw["output_resolution_nm_xyz"] = tuple(float(v) for v in d["output_resolution_nm_xyz"])
        return cls(blocks=Plan.from_dict(d["blocks"]), **kw)


@dataclass(frozen=True)
class TrainPlan:
    source: str
    mip: int
    output_model: str
    factor: int
    read: Box
    voxel_size_nm: tuple[float, float, float]
    preset: str
    steps: int
    seed: int
    batch_size: int
    patch: int
    base_model: str | None = None
    target: str | None = None
    target_box: Box | None = None
    num_tasks: int = 1
    kind: str = "train"
    message: str = ""
    priority: str = "batch"
    execution: str = "batch"  # training always runs as a batch task

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["read"] = self.read.to_list()
        d["target_box"] = self.target_box.to_list() if self.target_box else None
        d["version"] = PLAN_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainPlan":
        kw = {k: v for k, v in d.items() if k != "version"}
        kw["read"] = Box.from_list(d["read"])
        kw["target_box"] = Box.from_list(d["target_box"]) if d.get("target_box") else None
        kw["voxel_size_nm"] = tuple(float(v) for v in d["voxel_size_nm"])
        return cls(**kw)


JobPlan = RestorePlan | TrainPlan

#: job priorities, the order pool workers lease blocks in
PRIORITIES = ("interactive", "batch")
#: where a job runs: "auto" picks by size (manager.py)
EXECUTIONS = ("auto", "pool", "batch")


def plan_from_dict(d: dict[str, Any] | None, job_id: str = "") -> JobPlan:
    """The typed plan of a ledger job; PlanMissing (one line) for jobs of an older format."""
    if not d:
        raise PlanMissing(f"job {job_id}: recorded by an older emrestore without a persisted plan; "
                          "resubmit it (its finished output chunks are kept with incremental=true)")
    if d.get("version") not in READABLE_VERSIONS:
        raise PlanMissing(f"job {job_id}: plan format version {d.get('version')!r} is not "
                          f"{PLAN_VERSION}; resubmit the job with this emrestore")
    kind = d.get("kind")
    if kind in ("restore", "cutout"):
        return RestorePlan.from_dict(d)
    if kind == "train":
        return TrainPlan.from_dict(d)
    raise PlanMissing(f"job {job_id}: unknown plan kind {kind!r}")
