"""Cutouts: synchronous restoration of a small region for viewers (a mixin of ``JobManager``).

A cutout is planned as one block with a job's geometry (``Planner.cutout``) and restored with the
workers' own ``restore_block``: in the server's process, or — with a warm pool — as a one-block
interactive job whose arrays come back through the ledger. Nothing is written to any layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from ..errors import EmrestoreError
from . import admission
from .plans import RestorePlan
from .spec import CutoutSpec
from .worker import check_info, load_cutout_result, restore_cutout


@dataclass
class CutoutResult:
    mean_zyx: np.ndarray
    std_zyx: np.ndarray | None
    output_start_xyz: tuple
    resolution_nm_xyz: tuple
    dtype: str
    message: str


class Cutouts:
    """Needs the manager's ``planner``, ``policy``, ``limits``, ``models``, ``ledger``,
    ``readers`` (a ReaderCache), ``has_pool``, ``resolve_model``, ``_launch`` and ``cutout_timeout_s``."""

    # ------------------------------------------------------------------ cutout
    def cutout(self, spec: CutoutSpec) -> CutoutResult:
        """Plan one block over the region and restore it with the workers' code; nothing written."""
        spec.validate()
        self.policy.check(spec.source, "source")
        self.policy.check(self.resolve_model(spec.model), "model")
        admission.check_sampling_work(self.limits, spec.samples, spec.steps)
        plan, block, src = self.planner.cutout(spec)
        if self.has_pool:
            return self._cutout_on_pool(spec, plan, block)
        data = self.readers.get(spec.source).read(block.read, spec.mip)  # a Cutout: missing chunks known
        model = self.models.load(plan.model_url)
        mean, std, res = restore_cutout(plan, block, model, data)
        info = {}
        if res is not None:
            info = {"restore_seconds": res.seconds, **check_info(res)}
        return self._cutout_result(plan, block, mean, std, info)

    def _cutout_result(self, plan, block, mean, std, info: dict) -> CutoutResult:
        mean = np.ascontiguousarray(mean)
        std = np.ascontiguousarray(std) if std is not None else None
        msg = f"restored {mean.shape[0]} sections of {mean.shape[1]}×{mean.shape[2]}"
        if "restore_seconds" in info:
            msg += f" in {info['restore_seconds']:.1f} s"
            if info.get("score") is not None:
                msg += f"; needs-fine-tuning score {info['score']:.2f}" + (" (needs fine-tuning)" if info.get("needs_finetuning") else "")
        return CutoutResult(mean, std, block.write.start_xyz, plan.output_resolution_nm_xyz, str(mean.dtype), msg)

    def _cutout_on_pool(self, spec: CutoutSpec, plan: RestorePlan, block) -> CutoutResult:
        """A cutout as a one-block interactive job that a pool worker runs (its arrays come back
        through the ledger); waits at most ``cutout_timeout_s``, then cancels it (UNAVAILABLE)."""
        from dataclasses import asdict
        plan = replace(plan, kind="cutout", priority="interactive", execution="pool")
        spec_d = dict(asdict(spec), kind="cutout")
        rec = self.ledger.create_job(spec_d, 1, plan=plan.to_dict())
        self._launch(rec.job_id, 1)
        deadline = time.monotonic() + self.cutout_timeout_s
        delay = 0.02
        while True:
            marker = self.ledger.block_info(rec.job_id, 0)
            if marker is not None:
                break
            if self.ledger.cancel_requested(rec.job_id):
                raise EmrestoreError("region", f"cutout job {rec.job_id} was cancelled or failed", code="UNAVAILABLE")
            if time.monotonic() > deadline:
                self.ledger.request_cancel(rec.job_id)
                raise EmrestoreError("region", f"no pool worker restored the cutout within "
                                               f"{self.cutout_timeout_s:g} s (job {rec.job_id}); "
                                               "is the worker pool running?", code="UNAVAILABLE")
            time.sleep(delay)
            delay = min(0.2, delay * 1.5)
        mean, std = load_cutout_result(self.ledger, rec.job_id)
        return self._cutout_result(plan, block, mean, std, marker.get("info", {}))

