"""Samplers: swappable reverse processes over a sequence of noise levels.

A sampler gets a *denoiser* ``x0 = denoiser(x, gamma)`` — the prediction of the clean sample
from the noisy one at noise level gamma = sqrt(alpha_bar), conditioning already bound — the shape
of the sample batch, the decreasing-noise sequence of alpha_bar values (from
``NoiseSchedule.inference_alpha_bars``) and a CPU ``torch.Generator`` for all randomness, so the
same seed gives the same result on any device. Predicted clean samples are clipped to ±``clip``
(the data range).

- ``ddpm``: ancestral sampling (the reference method; 200–1000 steps there).
- ``ddim``: deterministic DDIM (eta = 0).
- ``dpmpp2m``: DPM-Solver++(2M), a second-order multistep solver in data prediction; the default.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .sampler_names import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLER_NAMES  # noqa: F401 (re-exported)

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _randn(shape, generator, device) -> torch.Tensor:
    """Noise on the CPU (same numbers on every device). A list of generators splits the batch
    into equal parts, one per generator, so each image's noise is independent of batching."""
    if isinstance(generator, (list, tuple)):
        n = len(generator)
        part = (shape[0] // n,) + tuple(shape[1:])
        return torch.cat([torch.randn(part, generator=g, dtype=torch.float32) for g in generator]).to(device)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


def _x0(x0: torch.Tensor, clip: float) -> torch.Tensor:
    return x0.clamp(-clip, clip)


def _gamma(batch: int, a: float, device) -> torch.Tensor:
    return torch.full((batch,), math.sqrt(a), dtype=torch.float32, device=device)


class Sampler:
    """One loop for every sampler: evaluate the denoiser at each level, then ``update``.

    Subclasses differ only in ``update(x, x0, a, a_next, state, generator, device)``, which
    returns the sample at the next (less noisy) level.
    """
    name = "base"
    stochastic = False

    def sample(self, denoiser: Denoiser, shape: tuple[int, ...], alpha_bars: np.ndarray,
               generator, device: torch.device | str = "cpu",
               callback: Callable[[int, int], None] | None = None, clip: float = 1.0) -> torch.Tensor:
        x = _randn(shape, generator, device)
        n = len(alpha_bars) - 1
        state: dict = {}
        for i in range(n):
            a, a_next = float(alpha_bars[i]), float(alpha_bars[i + 1])
            x0 = _x0(denoiser(x, _gamma(shape[0], a, device)), clip)
            x = x0 if a_next >= 1.0 else self.update(x, x0, a, a_next, state, generator, device)
            if callback:
                callback(i + 1, n)
        return x

    def update(self, x, x0, a, a_next, state, generator, device) -> torch.Tensor:
        raise NotImplementedError


class AncestralSampler(Sampler):
    """DDPM ancestral sampling on a (respaced) sequence of levels."""
    name = "ddpm"
    stochastic = True

    def update(self, x, x0, a, a_next, state, generator, device):
        beta = 1.0 - a / a_next
        c0 = math.sqrt(a_next) * beta / (1.0 - a)
        ct = math.sqrt(a / a_next) * (1.0 - a_next) / (1.0 - a)
        var = beta * (1.0 - a_next) / (1.0 - a)
        return c0 * x0 + ct * x + math.sqrt(var) * _randn(x.shape, generator, device)


class DDIMSampler(Sampler):
    """Deterministic DDIM (eta = 0): only the starting noise is random."""
    name = "ddim"

    def update(self, x, x0, a, a_next, state, generator, device):
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1.0 - a)
        return math.sqrt(a_next) * x0 + math.sqrt(1.0 - a_next) * eps


class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction, first order on the first and last step."""
    name = "dpmpp2m"

    def update(self, x, x0, a, a_next, state, generator, device):
        lam = 0.5 * math.log(a / (1.0 - a))
        lam_next = 0.5 * math.log(a_next / (1.0 - a_next))
        h = lam_next - lam
        prev_x0, prev_h = state.get("x0"), state.get("h")
        if prev_x0 is None or prev_h <= 0 or h <= 0:
            d = x0
        else:
            r = prev_h / h
            d = (1.0 + 1.0 / (2.0 * r)) * x0 - (1.0 / (2.0 * r)) * prev_x0
        sigma, sigma_next = math.sqrt(1.0 - a), math.sqrt(1.0 - a_next)
        state["x0"], state["h"] = x0, h
        return (sigma_next / sigma) * x - math.sqrt(a_next) * math.expm1(-h) * d


SAMPLERS: dict[str, type] = {
    "ddpm": AncestralSampler,
    "ddim": DDIMSampler,
    "dpmpp2m": DPMSolverPP2M,
}
assert set(SAMPLERS) == set(SAMPLER_NAMES)
#: Step spacing per sampler: few-step solvers do best with log-SNR spacing.
DEFAULT_SPACING = {"ddpm": "trailing", "ddim": "logsnr", "dpmpp2m": "logsnr"}


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"sampler: unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]()
