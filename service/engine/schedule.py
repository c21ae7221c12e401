"""Noise schedules: the training schedule and the shorter inference schedules drawn from it.

Training follows the reference recipe: linear beta from 1e-6 to 0.01 over 2000 steps; the network
is conditioned on the continuous noise level gamma = sqrt(alpha_bar), drawn uniformly between two
neighbouring steps' values. Because of that, inference can use any subsequence of levels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class NoiseSchedule:
    beta_start: float = 1e-6
    beta_end: float = 0.01
    num_steps: int = 2000

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NoiseSchedule":
        return cls(**d)

    def alpha_bars(self) -> np.ndarray:
        """alpha_bar for t = 0 … T (index 0 is the clean signal, alpha_bar = 1)."""
        betas = np.linspace(self.beta_start, self.beta_end, self.num_steps, dtype=np.float64)
        return np.concatenate([[1.0], np.cumprod(1.0 - betas)])

    def sample_gammas(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continuous noise levels for training: gamma ~ U(sqrt(ab[t]), sqrt(ab[t-1])), t ~ U{1..T}."""
        g = np.sqrt(self.alpha_bars())
        t = torch.randint(1, self.num_steps + 1, (batch,), generator=generator)
        u = torch.rand(batch, generator=generator, dtype=torch.float64)
        lo = torch.from_numpy(g[t.numpy()])
        hi = torch.from_numpy(g[t.numpy() - 1])
        return (lo + u * (hi - lo)).float()

    def inference_alpha_bars(self, steps: int, spacing: str = "trailing") -> np.ndarray:
        """Decreasing-noise sequence of ``steps`` alpha_bar values, ending with 1.0 (clean).

        ``trailing`` takes training steps T, T-T/n, …; ``uniform`` rounds n evenly spaced steps;
        ``logsnr`` spaces steps uniformly in log signal-to-noise ratio (good for few steps).
        Returns ``steps + 1`` values: the starting level and each level after a step.
        """
        if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= self.num_steps:
            raise ValueError(f"steps: must be an integer in [1, {self.num_steps}], got {steps!r}")
        ab = self.alpha_bars()
        T = self.num_steps
        if spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / steps)).astype(int)
        elif spacing == "uniform":
            ts = np.round(np.linspace(T, 1, steps)).astype(int)
        elif spacing == "logsnr":
            # continuous levels (the network is conditioned on continuous gamma), evenly spaced in
            # log-SNR between the noisiest and the least noisy training level
            lam = np.linspace(np.log(ab[T] / (1 - ab[T])), np.log(ab[1] / (1 - ab[1])), steps)
            return np.concatenate([1.0 / (1.0 + np.exp(-lam)), [1.0]])
        else:
            raise ValueError(f"spacing: unknown spacing {spacing!r}; choose trailing, uniform or logsnr")
        ts = np.maximum.accumulate(ts[::-1])[::-1]  # keep decreasing
        return np.concatenate([ab[ts], [1.0]])
