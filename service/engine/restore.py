"""Inference: restore a stack with a model — batching, estimating, assembling.

Estimates (``estimate=``):

- ``mean`` (default): the predictor's posterior mean, one network evaluation per image.
- ``sample``: one sharp realisation — the prediction plus one residual sampled by the diffusion
  model (``steps`` evaluations); EMDiffuse-style detail, about 3 dB below the mean in PSNR.
- ``sample-mean``: the mean of the ``samples`` realisations.

With ``samples`` K ≥ 2 every estimate also returns the per-voxel standard deviation of the K
realisations (the uncertainty) and the needs-fine-tuning score (``domain_check``). Isotropic
restoration evaluates XZ and YZ views (``tasks.IsotropicTask``), so the default costs two
evaluations per output voxel.
Noise for an image comes from a generator seeded by (seed, view, image id), so the result does not
depend on batching and re-running a block writes the same bytes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .model import LOGVAR_RANGE, ModelError, RestorationModel, gap_mismatch, resolve_device
from .normalize import IntensityNorm
from .sampler_names import MAX_SAMPLES
from .samplers import DEFAULT_SAMPLER, DEFAULT_SPACING, DEFAULT_STEPS, get_sampler
from .tiling import TiledDenoiser, auto_max_batch

ESTIMATES = ("mean", "sample", "sample-mean")
DEFAULT_ESTIMATE = "mean"
#: needs-fine-tuning threshold on the score of ``domain_check``: how far the error head's
#: prediction is off on rows cut from the input itself (a factor, either way; 1.0 = as calibrated
#: as on the training data). bench/domain_check.py (README, 2026-11-28), viewer-size cutouts of
#: FlyEM and ISBI: 1.00–1.13 in domain (≤ 1.16 in the hardest quarter of the patches), 1.44–2.23
#: for a model of the other data set.
UNCERTAINTY_THRESHOLD = 1.25
#: patches of the needs-fine-tuning check (predictor only: one evaluation each)
CHECK_PATCHES, CHECK_PATCH = 32, 64
UNCERTAINTY_SOURCES = ("auto", "samples", "head")


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (job seed, block, image id …), independent of global state."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]
                                      + [int(p) >> 32 & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


@dataclass
class RestoreResult:
    mean: np.ndarray            # the restored stack (the requested estimate), (Z', Y', X')
    std: np.ndarray | None      # per-voxel standard deviation in intensity units (K ≥ 2), float32
    score: float | None         # needs-fine-tuning score (K ≥ 2), see domain_check
    needs_finetuning: bool
    evaluations: int            # network evaluations per image (predictor + denoiser steps × K)
    images: int                 # network images (sections, or XZ + YZ views)
    seconds: float
    estimate: str = DEFAULT_ESTIMATE
    spread: float | None = None  # mean std over generated voxels in normalised units (K ≥ 2)
    evaluations_per_voxel: int = 0  # network evaluations that touch each output voxel
    #: with an error head and K ≥ 2: the uncertainty from each source alone ("samples", "head"),
    #: in intensity units like ``std`` (for comparisons; ``std`` combines them)
    std_parts: dict | None = None
    #: the needs-fine-tuning check's measurements (see ``domain_check``); None when not run
    domain_check: dict | None = None


def output_norm(model: RestorationModel, input_norm: IntensityNorm) -> IntensityNorm:
    """Output intensity frame: the training input→target relation carried over to this input."""
    i, t = model.input_norm, model.target_norm
    if model.task.name == "isotropic" or i is None or t is None:
        return input_norm
    s = (input_norm.hi - input_norm.lo) / (i.hi - i.lo)
    return IntensityNorm(input_norm.lo + (t.lo - i.lo) * s, input_norm.lo + (t.hi - i.lo) * s)


def check_voxel_size(model: RestorationModel, voxel_size_nm) -> None:
    """Isotropic: refuse input whose z/xy ratio differs from the geometry the model learned."""
    why = gap_mismatch(model.task.name, model.task.factor, model.gap, voxel_size_nm)
    if why:
        raise ValueError(f"voxel_size: {why}")


def validate_request(model: RestorationModel, vol: np.ndarray, sampler: str, steps: int, samples: int,
                     estimate: str = DEFAULT_ESTIMATE):
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
    if estimate not in ESTIMATES:
        raise ValueError(f"estimate: must be one of {', '.join(ESTIMATES)}, got {estimate!r}")
    if model.denoiser is None and (estimate != "mean" or samples > 1):
        raise ValueError(f"estimate: a regression model gives only the mean with 1 sample "
                         f"(got estimate={estimate}, samples={samples})")


# ------------------------------------------------------------------------- estimating
class _Estimator:
    """Point estimate and K realisations for a batch of conditioning images (network units)."""

    def __init__(self, model: RestorationModel, dev: torch.device, sampler: str, steps: int,
                 spacing: str | None, tile: int, overlap: int, max_batch: int):
        self.model, self.dev = model, dev
        self.smp = get_sampler(sampler)
        self.alpha_bars = model.schedule.inference_alpha_bars(steps, spacing or DEFAULT_SPACING[sampler])
        self.tile, self.overlap, self.mb = tile, overlap, max_batch
        self.autocast = torch.bfloat16 if dev.type == "cuda" else None
        self.evaluations = 0

    def _tiled(self, fn, cond, K):
        mult = self.model.predictor.config.downsample_factor
        return TiledDenoiser(fn, cond, K, self.tile, self.overlap, self.mb, mult, self.autocast)

    def predict(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Posterior mean (N, 1, H, W) and, with an error head, the predicted variance of its
        error (N, 1, H, W; 0 at known pixels), from one predictor evaluation."""
        m = self.model
        den = self._tiled(lambda xin, g: m.predictor(xin), cond, 1)
        out = den(torch.zeros((cond.shape[0], 0) + cond.shape[2:], device=cond.device),
                  torch.zeros(cond.shape[0], device=cond.device))
        self.evaluations = 1
        n = m.task.out_channels
        base = m.task.base(cond)
        mu = base + out[:, :n]
        var = torch.exp(out[:, n:n + 1].clamp(*LOGVAR_RANGE)) if out.shape[1] > n else None
        known = m.task.known(cond)
        if known is not None:
            mu = torch.where(known > 0.5, base, mu)
            if var is not None:
                var = torch.where(known > 0.5, torch.zeros_like(var), var)
        return mu, var

    def realisations(self, cond: torch.Tensor, mu: torch.Tensor, K: int, gens) -> torch.Tensor:
        """K residual samples around ``mu`` → (N, K, 1, H, W) restored images."""
        m, diff = self.model, self.model.diffusion
        tiled = self._tiled(m.denoiser, torch.cat([cond, mu], 1), K)

        def den(x, gamma):
            return diff.x0_from_output(tiled(x, gamma), x, gamma)

        N, _, H, W = mu.shape
        r = self.smp.sample(den, (N * K, 1, H, W), self.alpha_bars, gens, self.dev, clip=diff.clip)
        x = diff.decode(r.reshape(N, K, 1, H, W), mu[:, None])
        known = m.task.known(cond)
        if known is not None:
            x = torch.where(known[:, None] > 0.5, mu[:, None], x)
        self.evaluations = 1 + tiled.evaluations
        return x.clamp(-1.0, 1.0)


def _batches(n: int, group: int):
    """Index ranges of images processed together."""
    for g0 in range(0, n, group):
        yield g0, min(n, g0 + group)


def _estimate_view(est: _Estimator, images: np.ndarray, view_index: int, estimate: str, K: int,
                   seed: int, image_ids_offset: int, group: int, progress, done: list, total: int):
    """Point estimate (N, H, W) and realisations (K, N, H, W) (or None) of one view's images."""
    N, _, H, W = images.shape
    point = np.empty((N, H, W), np.float32)
    draws = np.empty((K, N, H, W), np.float32) if (K > 1 or estimate != "mean") else None
    errvar = np.empty((N, H, W), np.float32) if est.model.has_error_head else None
    for g0, g1 in _batches(N, group):
        cond = torch.from_numpy(images[g0:g1]).to(est.dev)
        mu, var = est.predict(cond)
        if errvar is not None:
            errvar[g0:g1] = var[:, 0].float().cpu().numpy()
        if draws is not None:
            gens = [torch.Generator().manual_seed(derive_seed(seed, view_index, image_ids_offset, i))
                    for i in range(g0, g1)]
            x = est.realisations(cond, mu, K, gens)[:, :, 0]  # (n, K, H, W)
            draws[:, g0:g1] = x.permute(1, 0, 2, 3).float().cpu().numpy()
        if estimate == "mean":
            point[g0:g1] = mu[:, 0].float().cpu().numpy()
        elif estimate == "sample":
            point[g0:g1] = draws[0, g0:g1]
        else:
            point[g0:g1] = draws[:, g0:g1].mean(0)
        done[0] += g1 - g0
        if progress:
            progress(done[0], total)
    return point, draws, errvar


@torch.no_grad()
def restore(model: RestorationModel, vol: np.ndarray, *, sampler: str = DEFAULT_SAMPLER,
            steps: int = DEFAULT_STEPS, samples: int = 1, seed: int = 0,
            norm: IntensityNorm | None = None, tile: int = 256, overlap: int = 32,
            device: str = "auto", max_batch: int | None = None, image_ids_offset: int = 0,
            out_dtype=None, spacing: str | None = None,
            progress: Callable[[int, int], None] | None = None,
            estimate: str = DEFAULT_ESTIMATE, voxel_size_nm=None,
            uncertainty_source: str = "auto", views: tuple[str, ...] | None = None) -> RestoreResult:
    """Restore a (Z, Y, X) stack. Isotropic: output (Z−1)·k+1 sections, index k·i = section i
    (source sections pass through bit-exactly when the output dtype is the input's).

    ``estimate``: ``mean`` (default), ``sample`` or ``sample-mean`` (see module doc); ``samples``
    K ≥ 2 adds the uncertainty. ``norm`` should come from statistics of the whole dataset
    (default: of ``vol``). ``image_ids_offset`` is the global index of the block (for seeds).
    ``voxel_size_nm`` (x, y, z) of the input, when known, is checked against the model's geometry.
    ``uncertainty_source``: ``auto`` (the error head and the samples' spread together when the
    model has the head, else the spread), ``samples`` or ``head`` alone (for comparisons).
    ``views``: isotropic only, the views to restore and average (default both, ``("xz", "yz")``);
    one view where the other's columns are not at the lateral pixel the model learned (the ISBI
    lateral-plane proxy of bench/realz.py, whose YZ columns are z at 50 nm).
    """
    if uncertainty_source not in UNCERTAINTY_SOURCES:
        raise ValueError(f"uncertainty_source: must be one of {', '.join(UNCERTAINTY_SOURCES)}, "
                         f"got {uncertainty_source!r}")
    if uncertainty_source == "head" and not model.has_error_head:
        raise ValueError("uncertainty_source: this model has no error head (trained before it existed)")
    validate_request(model, vol, sampler, steps, samples, estimate)
    if views is not None and (not views or len(set(views)) != len(views)
                              or any(v not in model.task.views for v in views)):
        raise ValueError(f"views: a non-empty subset of {', '.join(model.task.views)} for "
                         f"{model.task.name}, got {views!r}")
    check_voxel_size(model, voxel_size_nm)
    t0 = time.time()
    dev = resolve_device(device)
    model.to(dev).eval()
    norm = norm or IntensityNorm.from_volume(vol)
    onorm = output_norm(model, norm)
    vol_n = norm.forward(vol)
    task = model.task
    K = samples
    view_images = task.images(vol_n, views)  # [(view name, (N, Cc, H, W))]
    total = sum(len(v) for _, v in view_images)
    H, W = view_images[0][1].shape[-2:]
    tiles_per_image = math.ceil(H / max(1, tile - overlap)) * math.ceil(W / max(1, tile - overlap))
    width = (model.denoiser or model.predictor).config.base_channels
    mb = max_batch or auto_max_batch(min(tile, max(H, W)), dev, width)
    group = max(1, mb // max(1, K * tiles_per_image))
    est = _Estimator(model, dev, sampler, steps, spacing, tile, overlap, mb)
    points, draws, errvars = {}, {}, {}
    done = [0]
    for vi, (name, images) in enumerate(view_images):
        points[name], draws[name], errvars[name] = _estimate_view(
            est, images, vi, estimate, K, seed, image_ids_offset, group, progress, done, total)
    point_n = task.assemble(points, vol_n)
    std_n, spread, score, parts_n, check = None, None, None, None, None
    if K > 1:
        by_source = uncertainty(task, draws, vol_n, errvars if model.has_error_head else None, estimate=estimate)
        std_n = by_source[uncertainty_source]
        if model.has_error_head:
            parts_n = {"samples": by_source["samples"], "head": by_source["head"]}
        spread = sample_spread(task, draws, vol_n)
        check = domain_check(model, vol, norm, dev, voxel_size_nm, seed)
        score = check["score"] if check else None
    out_dtype = np.dtype(out_dtype or vol.dtype)
    mean = onorm.inverse(point_n, out_dtype)
    if task.name == "isotropic" and out_dtype == vol.dtype:
        mean[::task.factor] = vol  # source sections are passed through bit-exactly
    std = onorm.scale_std(std_n) if std_n is not None else None
    parts = {k: onorm.scale_std(v) for k, v in parts_n.items()} if parts_n else None
    return RestoreResult(mean=mean, std=std, score=score, std_parts=parts,
                         needs_finetuning=bool(score is not None and score > UNCERTAINTY_THRESHOLD),
                         evaluations=est.evaluations, images=total, seconds=time.time() - t0,
                         estimate=estimate, spread=spread, domain_check=check,
                         evaluations_per_voxel=est.evaluations * len(view_images))


#: spatial smoothing (voxels) of the ensemble variance: a 4-sample variance is too noisy per voxel
#: to rank errors; the local average of it is not (bench/realz.py, Spearman with and without).
UNCERTAINTY_SMOOTHING = 1.5


def uncertainty(task, draws: dict[str, np.ndarray], vol_n: np.ndarray,
                errvars: dict[str, np.ndarray] | None = None, estimate: str = DEFAULT_ESTIMATE,
                smoothing: float = UNCERTAINTY_SMOOTHING) -> dict[str, np.ndarray]:
    """Per-voxel standard deviation (normalised units) of the error of the output, by source
    (``UNCERTAINTY_SOURCES``; ``head`` only with ``errvars``), each computed once.

    ``samples``: the variance of the ensemble of all realisations of all views (isotropic: K
    samples in XZ and K in YZ, so disagreement between the views counts), averaged over a
    Gaussian neighbourhood of ``smoothing`` voxels (a 4-sample variance is too noisy per voxel).
    ``head``: the error head's prediction (averaged over the views). Both estimate the mean's
    expected squared error; ``auto`` is their average (two independent estimates), or the spread
    without a head. With the head, the ``sample`` and ``sample-mean`` estimates add the samples'
    own spread around the mean (a sample's expected squared error is the mean's plus its distance
    from it; the mean of n samples', 1/n of it)."""
    from scipy.ndimage import gaussian_filter
    vols = task.view_volumes(draws, vol_n)            # each (K, Z', Y', X')
    n = sum(v.shape[0] for v in vols)
    mean = sum(v.sum(0) for v in vols) / n
    var = sum(((v - mean) ** 2).sum(0) for v in vols) / max(1, n - 1)
    if smoothing:
        var = gaussian_filter(var, smoothing, mode="nearest")
    variances = {"samples": var, "auto": var}
    if errvars is not None:
        head = task.view_volumes({k: v[None] for k, v in errvars.items()}, vol_n)
        head_var = sum(h[0] for h in head) / len(head)
        extra = var if estimate == "sample" else (var / n if estimate == "sample-mean" else 0.0)
        variances["head"] = head_var + extra
        variances["auto"] = 0.5 * (head_var + var) + extra
    generated = _generated_mask(task, var.shape)
    out = {}
    for name, v in variances.items():
        std = np.sqrt(v).astype(np.float32)
        std[~generated] = 0.0
        out[name] = std
    return out


def sample_spread(task, draws, vol_n) -> float:
    """Mean within-view std of the samples over generated voxels (what ``calibrate`` measures
    on training pairs): the numerator of the needs-fine-tuning score."""
    vals = []
    for v in task.view_volumes(draws, vol_n):
        s = v.std(0, ddof=1)
        m = _generated_mask(task, s.shape)
        vals.append(float(s[m].mean()) if m.any() else 0.0)
    return float(np.mean(vals))


@torch.no_grad()
def domain_check(model: RestorationModel, vol: np.ndarray, norm: IntensityNorm, dev: torch.device,
                 voxel_size_nm=None, seed: int = 0) -> dict | None:
    """The needs-fine-tuning check: does the model know how wrong it is on this data?

    Cuts the model's own training task out of the input (``task.check_pairs``: for isotropic
    restoration, rows removed inside the input's XY sections at the learned gap), restores those
    rows with the predictor and compares its actual RMSE there with the RMS error its error head
    predicts. On data like its training data the two agree (their ratio is stored at calibration);
    data that is merely hard raises both together; a model used out of its domain mispredicts
    its error, by a factor either way. ``score`` = that factor (≥ 1), relative to calibration.

    None for models without an error head and for tasks whose input holds no reference (denoise,
    superres). Costs ``CHECK_PATCHES`` predictor evaluations of ``CHECK_PATCH``² pixels."""
    if not model.has_error_head:
        return None
    pairs = model.task.check_pairs(vol, norm, voxel_size_nm, model.gap)
    if pairs is None:
        return None
    est = _Estimator(model, dev, DEFAULT_SAMPLER, DEFAULT_STEPS, None, 256, 32, CHECK_PATCHES)
    patch = min(CHECK_PATCH, *vol.shape[1:])  # no mirrored padding on small inputs
    cond, target = pairs.sample(CHECK_PATCHES, patch, np.random.default_rng(derive_seed(seed, 7919)))
    cond, target = torch.from_numpy(cond).to(dev), torch.from_numpy(target).to(dev)
    m = _error_rms(model, est, cond, target)
    ref = (model.calibration or {}).get("error_ratio") or 1.0  # actual / predicted on training pairs
    ratio = (m["rmse"] / max(m["predicted_rmse"], 1e-8)) / ref
    return {"score": round(max(ratio, 1.0 / max(ratio, 1e-8)), 4), "error_ratio": round(ratio, 4),
            **{k: round(v, 5) for k, v in m.items()}, "patches": CHECK_PATCHES, "patch": patch}


def _error_rms(model, est: _Estimator, cond: torch.Tensor, target: torch.Tensor) -> dict:
    """RMS over generated pixels of the predictor's error, of the error its head predicts, and of
    the base (classical) estimate's error (normalised units)."""
    mu, var = est.predict(cond)
    known = model.task.known(cond)
    gen = (known < 0.5) if known is not None else torch.ones_like(mu, dtype=torch.bool)
    rms = lambda t: float(t[gen].float().mean().sqrt())  # noqa: E731
    out = {"rmse": rms((mu - target) ** 2), "linear_rmse": rms((model.task.base(cond) - target) ** 2)}
    if var is not None:
        out["predicted_rmse"] = rms(var)
    return out


def _generated_mask(task, shape) -> np.ndarray:
    m = np.ones(shape, bool)
    if task.name == "isotropic":
        m[::task.factor] = False
    return m


@torch.no_grad()
def calibrate(model: RestorationModel, pairs, patch: int, seed: int = 0, batches: int = 2,
              samples: int = 4) -> dict:
    """In-domain spread: mean std of ``samples`` realisations over generated pixels of training
    pairs, the predictor's RMSE there and, with an error head, the ratio of that RMSE to the RMS
    error the head predicts (``error_ratio``, the reference of ``domain_check``); normalised
    units, stored in model.json."""
    dev = next(model.predictor.parameters()).device
    model.eval()
    rng = np.random.default_rng(seed + 104729)
    est = _Estimator(model, dev, DEFAULT_SAMPLER, DEFAULT_STEPS, None, 256, 32, 64)
    spreads, errs, head = [], [], []
    for b in range(batches):
        cond, target = pairs.sample(8, patch, rng)
        cond, target = torch.from_numpy(cond).to(dev), torch.from_numpy(target).to(dev)
        mu, var = est.predict(cond)
        gens = [torch.Generator().manual_seed(derive_seed(seed, b, i)) for i in range(cond.shape[0])]
        x = est.realisations(cond, mu, samples, gens)
        known = model.task.known(cond)
        gen = (known < 0.5) if known is not None else torch.ones_like(mu, dtype=torch.bool)
        spreads.append(x.std(1, unbiased=True)[gen].float())
        errs.append(((mu - target) ** 2)[gen].float())
        if var is not None:
            head.append(var[gen].float())
    rmse = float(torch.cat(errs).mean().sqrt())
    out = {"spread": round(float(torch.cat(spreads).mean()), 6), "rmse": round(rmse, 6),
           "samples": samples, "patches": batches * 8, "patch": patch}
    if head:
        out["error_ratio"] = round(rmse / max(float(torch.cat(head).mean().sqrt()), 1e-8), 6)
    return out


def check_model_for_task(model: RestorationModel, task: str | None = None, factor: int | None = None):
    """ModelError when a model does not do what a request asks."""
    if task is not None and model.task.name != task:
        raise ModelError(f"model: model does {model.task.name}, request asks for {task}")
    if factor is not None and model.task.factor != factor:
        raise ModelError(f"factor: model restores by factor {model.task.factor}, request asks for {factor}")
