"""Register a finished job's output layers in viewing platforms.

The job manager calls :func:`register_job_outputs` when a restore job succeeds with the job's
``register_in`` targets (``{"platform", "url", "options"}``, see docs/CONTRACTS.md). One
human-readable message comes back per target; a failing target becomes a message starting with
``"<platform>: FAILED"`` — this function never raises.

Platforms:

- ``neuroglancer``: write or update a Neuroglancer state JSON at ``url`` (path, ``file://``,
  ``gs://``, ``s3://``) with the source, restored and uncertainty layers
  (:func:`connector.neuroglancer_view.register_state_target`);
- ``webknossos``: add the restored layer as a remote dataset (:mod:`connector.webknossos`);
- ``catmaid``: add a stack with a tile-source-14 mirror (:mod:`connector.catmaid`).
"""

from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger(__name__)

__all__ = ["register_job_outputs", "HANDLERS", "PLATFORMS"]


def _neuroglancer(job_id: str, spec: dict, target: dict) -> str:
    from .neuroglancer_view import register_state_target
    return register_state_target(job_id, spec, target)


def _webknossos(job_id: str, spec: dict, target: dict) -> str:
    from .webknossos import register_job_target
    return register_job_target(job_id, spec, target)


def _catmaid(job_id: str, spec: dict, target: dict) -> str:
    from .catmaid import register_job_target
    return register_job_target(job_id, spec, target)


HANDLERS: dict[str, Callable[[str, dict, dict], str]] = {
    "neuroglancer": _neuroglancer,
    "webknossos": _webknossos,
    "catmaid": _catmaid,
}
PLATFORMS = tuple(HANDLERS)


def register_job_outputs(job_id: str, spec: dict, targets: list[dict]) -> list[str]:
    """Register the outputs of job ``job_id`` (its ``spec`` dict) in every target; one message each."""
    messages: list[str] = []
    for i, target in enumerate(targets or []):
        platform = str((target or {}).get("platform", "")).strip().lower() if isinstance(target, dict) else ""
        where = (target or {}).get("url", "") if isinstance(target, dict) else ""
        handler = HANDLERS.get(platform)
        if handler is None:
            messages.append(f"{platform or f'target {i}'}: FAILED: unknown platform; allowed: {', '.join(PLATFORMS)}")
            continue
        if not spec.get("output"):
            messages.append(f"{platform}: FAILED: the job has no output layer to register")
            continue
        try:
            messages.append(handler(job_id, spec, target))
        except Exception as e:  # noqa: BLE001 - every failure is a message, never an exception
            log.info("register %s %s failed: %s", platform, where, e)
            text = " ".join(str(e).split()) or type(e).__name__
            messages.append(f"{platform}: FAILED ({where or 'no url'}): {text}")
    return messages
