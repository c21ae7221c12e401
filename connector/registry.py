"""Register a finished job's layers in the operator's configured targets.

The job manager runs completion hooks when a restore job succeeds
(``JobManager(completion_hooks=[...])``). :func:`completion_hook` builds one from the targets the
operator configured (:func:`connector.targets.load_targets`)::

    hook = completion_hook(load_targets("/etc/emrestore/targets.json"))
    messages = hook(completed_job)      # one message per target; raises RegistrationError on failure

``completed_job`` is any object with the attributes of :class:`CompletedJobLike` (the service's
``CompletedJob`` dataclass). Its ``register_in`` holds target NAMES only; names not in the
configuration are refused. Everything a connector uses (URLs, secrets, programs) comes from the
configuration, never from the job's request.

Platforms:

- ``neuroglancer``: write or update a Neuroglancer state JSON at the target's ``url``
  (:func:`connector.neuroglancer_state.register_state_target`);
- ``webknossos``: add the restored layer to the source dataset, or as a remote dataset
  (:mod:`connector.webknossos`);
- ``catmaid``: a stack with a tile-source-14 mirror (:mod:`connector.catmaid`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Protocol, Sequence

from .targets import Target, resolve_names

log = logging.getLogger(__name__)

__all__ = ["completion_hook", "register_job", "job_view", "CompletedJobLike", "RegistrationError", "HANDLERS",
           "PLATFORMS", "check_names"]


class CompletedJobLike(Protocol):
    """What a completion hook reads from a finished job (the service's ``CompletedJob``)."""
    job_id: str
    owner: str
    source: str
    output: str
    uncertainty: str | None
    register_in: Sequence[str]
    region: Any              # (start_xyz, stop_xyz) of the restored region in output-layer voxels
    output_voxel_size_nm: Sequence[float]


class RegistrationError(RuntimeError):
    """Registration in at least one target failed; ``messages`` holds every target's outcome."""

    def __init__(self, messages: list[str]):
        self.messages = messages
        failed = [m for m in messages if ": FAILED" in m]
        super().__init__("; ".join(failed) or "registration failed")


def _box(region: Any) -> tuple[list[int], list[int]] | None:
    if region is None:
        return None
    if isinstance(region, Mapping):
        start, stop = region.get("start") or region.get("start_xyz"), region.get("stop") or region.get("stop_xyz")
    elif hasattr(region, "start_xyz") and hasattr(region, "stop_xyz"):
        start, stop = region.start_xyz, region.stop_xyz  # service.volume.geometry.Box (stored zyx)
    elif hasattr(region, "start") and hasattr(region, "stop"):
        start, stop = region.start, region.stop
    else:
        try:
            start, stop = region
        except (TypeError, ValueError):
            return None
    def xyz(v):
        if hasattr(v, "x"):
            return [int(v.x), int(v.y), int(v.z)]
        return [int(a) for a in v]
    try:
        return xyz(start), xyz(stop)
    except (TypeError, ValueError):
        return None


def job_view(job: Any) -> dict:
    """The fields the connectors use, from a CompletedJob-like object (or a dict)."""
    get = (lambda k, d=None: job.get(k, d)) if isinstance(job, Mapping) else (lambda k, d=None: getattr(job, k, d))
    vs = (get("voxel_size_nm_xyz") or get("output_voxel_size_nm") or get("output_voxel_size")
          or get("voxel_size_nm"))
    return {
        "job_id": str(get("job_id", "")),
        "owner": str(get("owner", "") or ""),
        "source": str(get("source", "") or ""),
        "output": str(get("output", "") or ""),
        "uncertainty_output": get("uncertainty") or get("uncertainty_output") or None,
        "model": str(get("model", "") or ""),
        "region_out": _box(get("region")),
        "output_voxel_size_nm": [float(v) for v in vs] if vs else None,
    }


def _neuroglancer(job: dict, target: Target) -> str:
    from .neuroglancer_state import register_state_target
    return register_state_target(job, target)


def _webknossos(job: dict, target: Target) -> str:
    from .webknossos import register_job_target
    return register_job_target(job, target)


def _catmaid(job: dict, target: Target) -> str:
    from .catmaid import register_job_target
    return register_job_target(job, target)


HANDLERS: dict[str, Callable[[dict, Target], str]] = {
    "neuroglancer": _neuroglancer,
    "webknossos": _webknossos,
    "catmaid": _catmaid,
}
PLATFORMS = tuple(HANDLERS)


def register_job(job: Any, targets: Mapping[str, Target]) -> list[str]:
    """Register ``job`` in each target it names; one message per target. Failures become
    ``"<target> (<platform>): FAILED: …"`` messages; the caller decides whether to raise."""
    view = job_view(job)
    names = list((job.get("register_in") if isinstance(job, Mapping) else getattr(job, "register_in", None)) or [])
    chosen = resolve_names(names, targets)
    messages: list[str] = []
    for t in chosen:
        if not view["output"]:
            messages.append(f"{t.name} ({t.platform}): FAILED: the job has no output layer to register")
            continue
        try:
            messages.append(f"{t.name}: " + HANDLERS[t.platform](view, t))
        except Exception as e:  # noqa: BLE001 - every failure is reported with its target
            log.info("register %s (%s) failed: %s", t.name, t.platform, e)
            text = " ".join(str(e).split()) or type(e).__name__
            messages.append(f"{t.name} ({t.platform}): FAILED: {text[:300]}")
    return messages


def completion_hook(targets: Mapping[str, Target]) -> Callable[[Any], list[str]]:
    """A job-manager completion hook registering a finished job in the configured ``targets``
    it names. Returns the messages; raises :class:`RegistrationError` (messages attached) when
    any target failed, and ConnectorError (field ``register_in[i]``) for an unknown name."""
    configured = dict(targets)

    def hook(job: Any) -> list[str]:
        messages = register_job(job, configured)
        if any(": FAILED" in m for m in messages):
            raise RegistrationError(messages)
        return messages

    hook.targets = configured  # type: ignore[attr-defined]
    return hook


def completion_hook_from_file(path: str) -> Callable[[Any], list[str]]:
    """The ``emrestore.completion_hooks`` entry point: ``emrestore serve --targets FILE`` hands the
    operator's target file here (see :func:`connector.targets.load_targets`)."""
    from .targets import load_targets
    return completion_hook(load_targets(path))


def check_names(names: Sequence[Any], targets: Mapping[str, Target]) -> list[str]:
    """Names validated against ``targets`` (``ConnectorError`` naming ``register_in[i]`` otherwise):
    for checking a request up front (the bridge does; the service validates names itself)."""
    return [t.name for t in resolve_names(names, targets)]

