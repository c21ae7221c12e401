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
