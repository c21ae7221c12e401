"""Completion hooks: what runs when a restore job has written all its blocks, before it is
marked SUCCEEDED (e.g. registration in viewers, plugged in by ``emrestore serve`` — the service
never imports the connectors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..volume.geometry import Box


@dataclass(frozen=True)
class CompletedJob:
    """A finished restore job, as a completion hook sees it.

    ``region`` is the restored box in output voxels, zyx (``region.start_xyz`` / ``stop_xyz``
    for xyz); ``voxel_size_nm_xyz`` is the output layer's voxel size, xyz.
    """
    job_id: str
    owner: str
    source: str
    output: str
    uncertainty: str | None
    register_in: list[str] = field(default_factory=list)
    region: Box | None = None
    voxel_size_nm_xyz: tuple[float, float, float] = (1.0, 1.0, 1.0)


#: A hook returns human-readable messages (one event each) and raises on failure.
CompletionHook = Callable[[CompletedJob], list[str]]


def configured_target_names(hooks: list[CompletionHook]) -> set[str] | None:
    """The target names the hooks serve, for refusing an unknown name before the job runs.

    A hook declares them as a ``targets`` mapping attribute (``connector.registry.completion_hook``
    does); ``None`` when some hook declares none (then names are checked only at completion)."""
    names: set[str] = set()
    for hook in hooks:
        declared = getattr(hook, "targets", None)
        if declared is None:
            return None
        names.update(str(n) for n in declared)
    return names


def failure_messages(exc: BaseException) -> list[tuple[str, str]]:
    """Events ``(kind, message)`` for a hook that raised: one per target when the exception carries
    the per-target ``messages`` (``RegistrationError``), else one ``registration_failed``."""
    messages = getattr(exc, "messages", None)
    if isinstance(messages, (list, tuple)) and messages:
        return [("registration_failed" if ": FAILED" in str(m) else "registered", str(m)[:500])
                for m in messages]
    return [("registration_failed", f"{type(exc).__name__}: {exc}"[:500])]
