"""The diffusion process of predict-and-refine restoration (DvSR, Whang et al. 2022; CorrDiff,
Mardani et al. 2023), in one object used by training and by restore.

An L2-trained predictor gives the posterior mean ``mu`` in one network evaluation. The diffusion
model generates the residual ``r = (target − mu)·scale`` conditioned on the inputs and ``mu``:

- ``encode`` / ``decode``: target ↔ scaled residual around the prediction;
- ``q_sample``: the forward process x_γ = γ·r + sqrt(1−γ²)·ε at continuous level γ = sqrt(ᾱ);
- ``target``: what the network learns — v = γ·ε − sqrt(1−γ²)·r (or ε, the reference's choice);
- ``x0_from_output``: the inverse of ``target``, the clean residual from the network output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .schedule import NoiseSchedule

PREDICTIONS = ("v", "eps")


@dataclass
class ResidualDiffusion:
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)
    prediction: str = "v"
    #: residuals are multiplied by this to unit variance (set from the data at training start)
    scale: float = 1.0

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction: must be one of {PREDICTIONS}, got {self.prediction!r}")

    # ------------------------------------------------------------- residual encoding
    def encode(self, target: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        return (target - mean) * self.scale

    def decode(self, residual: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        return mean + residual / self.scale

    @property
    def clip(self) -> float:
        """Largest residual the sampler keeps: the full data range (2) in residual units."""
        return 2.0 * self.scale

    # ------------------------------------------------------------- forward process
    @staticmethod
    def _g(gamma: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = gamma.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)
        return g, torch.sqrt((1 - g * g).clamp_min(0))

    def q_sample(self, x0: torch.Tensor, noise: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        g, s = self._g(gamma, x0)
        return g * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        g, s = self._g(gamma, x0)
        return g * noise - s * x0 if self.prediction == "v" else noise

    def x0_from_output(self, out: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        g, s = self._g(gamma, out)
        if self.prediction == "v":
            return g * x - s * out
        return (x - s * out) / g.clamp_min(1e-4)

    # ------------------------------------------------------------- storage
    def to_dict(self) -> dict:
        return {"schedule": self.schedule.to_dict(), "prediction": self.prediction, "scale": self.scale}

    @classmethod
    def from_dict(cls, d: dict) -> "ResidualDiffusion":
        return cls(NoiseSchedule.from_dict(d["schedule"]), d.get("prediction", "v"), float(d.get("scale", 1.0)))
