"""Restoration tasks: what the network is conditioned on and what it generates."""

from __future__ import annotations

from dataclasses import dataclass

import torch

TASKS = ("denoise", "superres", "isotropic")
SUPERRES_FACTORS = (2, 4)
ISOTROPIC_FACTORS = range(2, 17)


@dataclass(frozen=True)
class TaskSpec:
    """``denoise`` (factor 1), ``superres`` (lateral ×2/×4) or ``isotropic`` (z by factor k).

    Isotropic conditions on the two sections on both sides of a gap and generates all k−1
    missing sections jointly as channels of one sample (one chain per gap).
    """
    name: str
    factor: int = 1

    def __post_init__(self):
        if self.name not in TASKS:
            raise ValueError(f"task: unknown task {self.name!r}; choose one of {', '.join(TASKS)}")
        if self.name == "denoise" and self.factor != 1:
            raise ValueError(f"factor: denoise takes factor 1, got {self.factor}")
        if self.name == "superres" and self.factor not in SUPERRES_FACTORS:
            raise ValueError(f"factor: superres takes factor 2 or 4, got {self.factor}")
        if self.name == "isotropic" and self.factor not in ISOTROPIC_FACTORS:
            raise ValueError(f"factor: isotropic takes an integer factor in [2, 16], got {self.factor}")

    @property
    def cond_channels(self) -> int:
        return 2 if self.name == "isotropic" else 1

    @property
    def out_channels(self) -> int:
        return self.factor - 1 if self.name == "isotropic" else 1

    def output_sections(self, num_sections: int) -> int:
        """Sections in a restored TIFF stack: (Z − 1)·k + 1 for isotropic, else Z."""
        if self.name == "isotropic":
            return (num_sections - 1) * self.factor + 1
        return num_sections


def base_prediction(task: TaskSpec, cond: torch.Tensor) -> torch.Tensor:
    """The classical estimate the diffusion model refines (residual diffusion).

    Isotropic: linear interpolation between the two sections (channel j−1 at weight j/k);
    denoise and super-resolution: the (upsampled) input itself. (B, Cc, H, W) → (B, Co, H, W).
    """
    if task.name == "isotropic":
        k = task.factor
        w = torch.arange(1, k, dtype=cond.dtype, device=cond.device)[None, :, None, None] / k
        return (1 - w) * cond[:, :1] + w * cond[:, 1:2]
    return cond[:, :1]
