"""Inference: restore a stack with a model, K samples per image, mean as output, spread as uncertainty.

All K samples of several images run as one batch through one sampler chain; isotropic restoration
generates the k−1 sections of a gap jointly (one chain per gap). Noise for an image comes from a
generator seeded by (seed, image id), so the result does not depend on how images are batched and
re-running a block writes the same bytes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .model import ModelError, RestorationModel
from .normalize import IntensityNorm
from .pairs import upsample
from .samplers import DEFAULT_SAMPLER, DEFAULT_SPACING, DEFAULT_STEPS, get_sampler
from .tasks import base_prediction
from .tiling import TiledDenoiser, auto_max_batch
from .training import resolve_device

#: Uncertainty score above which a model is flagged as needing fine-tuning on this data:
#: mean per-voxel standard deviation of the K samples over generated voxels, as a fraction of
#: the normalised intensity range. Calibrated in bench/quality.py (README): a tiny model on its
#: own phantom data scored 0.074; models used out of their domain 0.086–0.102, and an
#: undertrained in-domain model that did not beat linear interpolation 0.121.
UNCERTAINTY_THRESHOLD = 0.08
MAX_SAMPLES = 64


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (job seed, block, image id …), independent of global state."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]
                                      + [int(p) >> 32 & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


@dataclass
class RestoreResult:
    mean: np.ndarray            # restored stack, (Z', Y', X'), dtype of the input unless asked otherwise
    std: np.ndarray | None      # per-voxel standard deviation in intensity units (K ≥ 2), float32
    score: float | None         # uncertainty score (K ≥ 2), see UNCERTAINTY_THRESHOLD
    needs_finetuning: bool
    evaluations: int            # network evaluations per image (= sampler steps)
    images: int                 # images (sections or gaps) generated
    seconds: float

    @property
    def evaluations_per_image(self) -> int:
        return self.evaluations


class _DataPrediction:
    """Network output (v or ε) → predicted clean sample, for the samplers."""

    def __init__(self, model: RestorationModel, tiled: TiledDenoiser):
        self.model, self.tiled = model, tiled

    def __call__(self, x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        return self.model.x0_from_output(self.tiled(x, gamma), x, gamma)


def output_norm(model: RestorationModel, input_norm: IntensityNorm) -> IntensityNorm:
    """Output intensity frame: the training input→target relation carried over to this input."""
    i, t = model.input_norm, model.target_norm
    if model.task.name == "isotropic" or i is None or t is None:
        return input_norm
    s = (input_norm.hi - input_norm.lo) / (i.hi - i.lo)
    return IntensityNorm(input_norm.lo + (t.lo - i.lo) * s, input_norm.lo + (t.hi - i.lo) * s)


def _items(model: RestorationModel, vol_n: np.ndarray):
    """Conditioning images (Cc, H, W) in network units, one per output image."""
    task = model.task
    if task.name == "isotropic":
        for i in range(vol_n.shape[0] - 1):
            yield i, vol_n[i:i + 2]
    elif task.name == "superres":
        for z in range(vol_n.shape[0]):
            yield z, upsample(vol_n[z][None, None], task.factor)[0].numpy()
    else:
        for z in range(vol_n.shape[0]):
            yield z, vol_n[z][None]


def validate_request(model: RestorationModel, vol: np.ndarray, sampler: str, steps: int, samples: int):
    if not isinstance(vol, np.ndarray) or vol.ndim != 3:
        raise ValueError(f"input: expected a (Z, Y, X) stack, got shape {getattr(vol, 'shape', None)}")
    if vol.dtype not in (np.uint8, np.uint16, np.float32):
        raise ValueError(f"input: dtype {vol.dtype} not supported; use uint8, uint16 or float32")
    if min(vol.shape) < 1:
        raise ValueError(f"input: empty stack of shape {vol.shape}")
    if model.task.name == "isotropic" and vol.shape[0] < 2:
        raise ValueError(f"input: isotropic restoration needs at least 2 sections, got {vol.shape[0]}")
    if min(vol.shape[1:]) < 8:
        raise ValueError(f"input: sections must be at least 8×8 pixels, got {vol.shape[1:]}")
    get_sampler(sampler)
    if not isinstance(steps, int) or not 1 <= steps <= model.schedule.num_steps:
        raise ValueError(f"steps: must be an integer in [1, {model.schedule.num_steps}], got {steps!r}")
    if not isinstance(samples, int) or not 1 <= samples <= MAX_SAMPLES:
        raise ValueError(f"samples: must be an integer in [1, {MAX_SAMPLES}], got {samples!r}")


@torch.no_grad()
def restore(model: RestorationModel, vol: np.ndarray, *, sampler: str = DEFAULT_SAMPLER,
            steps: int = DEFAULT_STEPS, samples: int = 1, seed: int = 0,
            norm: IntensityNorm | None = None, tile: int = 256, overlap: int = 32,
            device: str = "auto", max_batch: int | None = None, image_ids_offset: int = 0,
            out_dtype=None, spacing: str | None = None,
            progress: Callable[[int, int], None] | None = None) -> RestoreResult:
    """Restore a (Z, Y, X) stack. Isotropic: output (Z−1)·k+1 sections, index k·i = section i.

    ``norm`` should come from statistics of the whole dataset (default: of ``vol``).
    ``image_ids_offset`` is the global index of the first section/gap (for seeds in blocks).
    """
    validate_request(model, vol, sampler, steps, samples)
    t0 = time.time()
    dev = resolve_device(device)
    net = model.net.to(dev).eval()
    norm = norm or IntensityNorm.from_volume(vol)
    onorm = output_norm(model, norm)
    vol_n = norm.forward(vol)
    task = model.task
    K = samples
    items = list(_items(model, vol_n))
    H, W = items[0][1].shape[-2:]
    Co = task.out_channels
    mult = net.config.downsample_factor
    tiles_per_image = math.ceil(H / max(1, tile - overlap)) * math.ceil(W / max(1, tile - overlap))
    mb = max_batch or auto_max_batch(min(tile, max(H, W)), dev, net.config.base_channels)
    group = max(1, mb // max(1, K * tiles_per_image))
    smp = get_sampler(sampler)
    alpha_bars = model.schedule.inference_alpha_bars(steps, spacing or DEFAULT_SPACING[sampler])
    autocast = torch.bfloat16 if dev.type == "cuda" else None
    means = np.zeros((len(items), Co, H, W), np.float32)
    stds = np.zeros((len(items), Co, H, W), np.float32) if K > 1 else None
    done = 0
    evals = 0
    for g0 in range(0, len(items), group):
        chunk = items[g0:g0 + group]
        cond = torch.from_numpy(np.stack([c for _, c in chunk])).to(dev)
        if model.kind == "regression":
            den = TiledDenoiser(lambda x, g: net(x), cond, 1, tile, overlap, mb, mult, autocast)
            x = den(torch.zeros((len(chunk), 0, H, W), device=dev), torch.zeros(len(chunk), device=dev))
            x = x.clamp(-1, 1).reshape(len(chunk), 1, Co, H, W)
            evals = 1
        else:
            tiled = TiledDenoiser(net, cond, K, tile, overlap, mb, mult, autocast)
            den = _DataPrediction(model, tiled)
            gens = [torch.Generator().manual_seed(derive_seed(seed, image_ids_offset + i)) for i, _ in chunk]
            rs = model.residual_scale
            x = smp.sample(den, (len(chunk) * K, Co, H, W), alpha_bars, gens, dev,
                           clip=2.0 * rs if rs else 1.0)
            x = x.reshape(len(chunk), K, Co, H, W)
            if rs:
                x = (base_prediction(task, cond)[:, None] + x / rs).clamp(-1.0, 1.0)
            evals = tiled.evaluations
        means[g0:g0 + len(chunk)] = x.mean(1).float().cpu().numpy()
        if stds is not None:
            stds[g0:g0 + len(chunk)] = x.std(1, unbiased=True).float().cpu().numpy()
        done += len(chunk)
        if progress:
            progress(done, len(items))
    out_dtype = np.dtype(out_dtype or vol.dtype)
    score = float(stds.mean() / 2.0) if stds is not None else None
    if task.name == "isotropic":
        k = task.factor
        Zo = task.output_sections(vol.shape[0])
        mean_n = np.empty((Zo, H, W), np.float32)
        mean_n[::k] = vol_n
        std_n = np.zeros((Zo, H, W), np.float32) if stds is not None else None
        for i in range(len(items)):
            mean_n[k * i + 1:k * i + k] = means[i]
            if std_n is not None:
                std_n[k * i + 1:k * i + k] = stds[i]
    else:
        mean_n = means[:, 0]
        std_n = stds[:, 0] if stds is not None else None
    mean = onorm.inverse(mean_n, out_dtype)
    if task.name == "isotropic" and out_dtype == vol.dtype:
        mean[::task.factor] = vol  # source sections are passed through bit-exactly
    std = onorm.scale_std(std_n) if std_n is not None else None
    return RestoreResult(mean=mean, std=std, score=score,
                         needs_finetuning=bool(score is not None and score > UNCERTAINTY_THRESHOLD),
                         evaluations=evals, images=len(items), seconds=time.time() - t0)


def check_model_for_task(model: RestorationModel, task: str | None = None, factor: int | None = None):
    """ModelError when a model does not do what a request asks."""
    if task is not None and model.task.name != task:
        raise ModelError(f"model: model does {model.task.name}, request asks for {task}")
    if factor is not None and model.task.factor != factor:
        raise ModelError(f"factor: model restores by factor {model.task.factor}, request asks for {factor}")
