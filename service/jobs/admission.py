"""Admission: the checks a request passes before anything is planned or written — the operator's
work limits, the store policy (every URL of the request, outputs never inside a source or a model)
and the registration targets it names. Each refusal names the request field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import EmrestoreError, FailedPrecondition, PermissionDenied, ResourceExhausted, quote
from ..volume.policy import StorePolicy, inside
from .completion import CompletionHook, configured_target_names
from .spec import RestoreSpec


@dataclass(frozen=True)
class WorkLimits:
    """Bounds on the work one request may ask for (the operator's, with defaults)."""
    max_job_voxels: int = 2 ** 36          # output voxels written by one restore job
    max_sample_steps: int = 4_000          # samples × steps per request
    max_jobs_per_user: int = 16            # live (PENDING/RUNNING) jobs of one user


def check_owner_quota(ledger, limits: WorkLimits, owner: str) -> None:
    if not owner:
        return
    live = [r for r in ledger.pending_jobs() if r.owner == owner]
    if len(live) >= limits.max_jobs_per_user:
        raise ResourceExhausted("owner", f"user {owner} has {len(live)} live jobs; the limit is "
                                         f"{limits.max_jobs_per_user} per user")


def check_sampling_work(limits: WorkLimits, samples: int, steps: int) -> None:
    if samples * steps > limits.max_sample_steps:
        raise ResourceExhausted("samples", f"samples × steps = {samples} × {steps} = {samples * steps}; "
                                           f"the limit is {limits.max_sample_steps}")


def check_restore_stores(policy: StorePolicy, spec: RestoreSpec, resolve_model: Callable[[str], str],
                         models_dir: str | None) -> str:
    """Every URL of a restore request against the policy, before any I/O; the model's URL."""
    src = policy.check(spec.source, "source")
    out = policy.check(spec.output, "output")
    model_url = resolve_model(spec.model)
    model = policy.check(model_url, "model")
    roots = [("source", src), ("model", model)]
    if models_dir:
        roots.append(("model directory", policy.check(models_dir, "model")))
    outs = [("output", out)]
    if spec.uncertainty_output:
        unc = policy.check(spec.uncertainty_output, "uncertainty_output")
        if inside(unc, out) or inside(out, unc):
            raise EmrestoreError("uncertainty_output", "must not be the output layer or lie inside it (or it inside)")
        outs.append(("uncertainty_output", unc))
    for name, url in outs:
        for what, root in roots:
            if inside(url, root) or inside(root, url):
                raise PermissionDenied(name, f"lies inside the {what} (or contains it); outputs go elsewhere")
    return model_url


def check_targets(hooks: list[CompletionHook], names: list[str]) -> None:
    """Registration targets a request names must be configured on this server."""
    if not names:
        return
    if not hooks:
        raise FailedPrecondition("register_in", "this server has no registration targets configured "
                                                "(emrestore serve --targets FILE)")
    known = configured_target_names(hooks)
    if known is None:
        return
    for i, n in enumerate(names):
        if n not in known:
            raise EmrestoreError(f"register_in[{i}]", f"{quote(n)} is not a configured target; "
                                                    f"configured: {', '.join(sorted(known)) or 'none'}")
