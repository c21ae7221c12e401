"""The tools labs use today, as anchors for the real-EM benchmarks: CAREamics (CARE, N2V) and BM3D.

Installed for the benchmarks only (``make bench-venv``: the ``bench`` extra with the installed
torch kept); the service and the tests never import this module.

Two compatibility shims, both for packaging only (no algorithm changes):

- PyPI's torchvision wheels are CUDA builds. With the CPU torch their compiled ops cannot load,
  and ``import torchvision`` then fails registering fake kernels for ``torchvision::nms``/``qnms``
  (its ``_meta_registrations`` does not check that the ops exist). CAREamics imports torchvision
  (through torchmetrics and its LVAE models) but CARE and N2V use none of its ops; we declare the
  two op schemas before the import so that it succeeds.
- bm3d 4.0.3's PSD code calls ``np.trapz``, removed in numpy 2.4; it is ``np.trapezoid``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time

import numpy as np

_TV_LIB = None


def _torchvision_without_ops():
    global _TV_LIB
    import torch
    spec = importlib.util.find_spec("torchvision")
    if spec is None or _TV_LIB is not None:
        return
    lib_dir = list(spec.submodule_search_locations or [])[0]
    so = [f for f in os.listdir(lib_dir) if f.startswith("_C") and f.endswith(".so")]
    try:
        if so:
            torch.ops.load_library(os.path.join(lib_dir, so[0]))
            return  # the ops load: a torchvision built for this torch
    except (OSError, RuntimeError):
        pass
    _TV_LIB = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _TV_LIB.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def versions() -> dict:
    out = {}
    for name in ("careamics", "bm3d", "torchvision", "lightning"):
        try:
            from importlib.metadata import version
            out[name] = version(name)
        except Exception:  # noqa: BLE001 - absent: not installed
            out[name] = None
    return out


def have_anchors() -> bool:
    return all(importlib.util.find_spec(n) is not None for n in ("careamics", "bm3d"))


# ------------------------------------------------------------------------------- CAREamics
def careamics_fit_predict(kind: str, train_in: np.ndarray, train_target: np.ndarray | None,
                          tests: list[np.ndarray], steps: int, batch: int = 8, patch: int = 64,
                          seed: int = 1, epochs: int | None = None, log=print) -> tuple[list[np.ndarray], dict]:
    """Train CAREamics ``kind`` ("care", "n2v", "structn2v") on (S, Y, X) arrays for ``steps``
    optimizer steps (batch × patch² each), predict each (S, Y, X) array in ``tests``.

    Configured with CAREamics' factories and defaults (UNet depth 2, 32 initial channels, Adam,
    ReduceLROnPlateau, mean/std normalisation, flips and 90° rotations; N2V: 0.2 % masked pixels,
    11-px ROI; structN2V: the horizontal mask CAREamics recommends for noise correlated along
    lines, span 5, no augmentation); the budget is split into epochs of 100 steps so that the
    learning-rate schedule sees several validations. CARE's default early stopping is given a
    patience longer than the run, so that every method trains the same number of steps."""
    _torchvision_without_ops()
    from careamics import CAREamist
    from careamics.config import create_advanced_care_config, create_advanced_n2v_config
    per_epoch = min(100, steps)
    epochs = epochs or max(1, steps // per_epoch)
    common = dict(experiment_name=kind, data_type="array", axes="SYX", patch_size=[patch, patch],
                  batch_size=batch, num_epochs=epochs, num_steps=per_epoch, num_workers=0, seed=seed,
                  trainer_params={"enable_progress_bar": False, "enable_model_summary": False,
                                  "log_every_n_steps": per_epoch})
    if kind == "care":
        cfg = create_advanced_care_config(**common, early_stopping_params={
            "monitor": "val_loss", "mode": "min", "patience": epochs + 1})
    elif kind == "n2v":
        cfg = create_advanced_n2v_config(**common)
    elif kind == "structn2v":
        cfg = create_advanced_n2v_config(**common, augmentations=[], struct_n2v_axes="horizontal",
                                         struct_n2v_span=5)
    else:
        raise ValueError(f"kind: care, n2v or structn2v, got {kind!r}")
    work = tempfile.mkdtemp(prefix=f"careamics-{kind}-")
    try:
        c = CAREamist(cfg, work_dir=work, enable_progress_bar=False)
        t0 = time.time()
        c.train(train_data=train_in.astype(np.float32),
                train_data_target=None if train_target is None else train_target.astype(np.float32))
        secs = time.time() - t0
        n_params = sum(p.numel() for p in c.model.parameters())
        outs = []
        for arr in tests:
            tile = min(256, arr.shape[-2] // 16 * 16, arr.shape[-1] // 16 * 16)
            kw = {} if tile >= max(arr.shape[-2:]) or tile < 64 else {"tile_size": (tile, tile), "tile_overlap": (48, 48)}
            pred = c.predict(arr.astype(np.float32), data_type="array", axes="SYX", **kw)
            pred = pred[0] if isinstance(pred, tuple) else pred
            pred = pred[0] if isinstance(pred, list) else pred
            outs.append(np.asarray(pred, np.float32).reshape(arr.shape))
        info = {"steps": int(c.trainer.global_step), "seconds": round(secs, 1), "parameters": int(n_params),
                "epochs": epochs, "steps_per_epoch": per_epoch, "batch": batch, "patch": patch}
        log(f"[anchors] CAREamics {kind}: {info}")
        return outs, info
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------- BM3D
def _bm3d():
    if not hasattr(np, "trapz"):
        np.trapz = np.trapezoid
    import bm3d
    return bm3d


def bm3d_plain(noisy: np.ndarray, noise, dose: float, clean_mean_var: float) -> np.ndarray:
    """BM3D with the noise model's PSD (scan-line correlated) at its mean variance for this dose."""
    b = _bm3d()
    return np.stack([b.bm3d(np.asarray(im, np.float64), noise.noise_psd(im.shape, clean_mean_var))
                     for im in noisy]).astype(np.float32)


def gat_forward(y, noise, dose):
    """Generalised Anscombe transform (Makitalo & Foi 2013) for the model's Poisson-Gaussian
    noise at ``dose``: signal u = sign·(y − zero), var(u) = α·u + σ² → unit variance."""
    a, s2 = noise.shot / dose, noise.read / dose
    u = noise.sign * (np.asarray(y, np.float64) - noise.zero_level)
    return 2.0 / a * np.sqrt(np.maximum(a * u + 0.375 * a * a + s2, 0.0))


def gat_inverse(d, noise, dose):
    """Closed-form approximation of the exact unbiased inverse of the GAT (Makitalo & Foi 2013)."""
    a, s2 = noise.shot / dose, noise.read / dose
    d = np.maximum(np.asarray(d, np.float64), 1e-3)
    r = np.sqrt(1.5)
    p = 0.25 * d ** 2 + 0.25 * r / d - 1.375 / d ** 2 + 0.625 * r / d ** 3 - 0.125 - s2 / a ** 2
    u = a * np.maximum(p, 0.0)
    return noise.zero_level + noise.sign * u


def bm3d_vst(noisy: np.ndarray, noise, dose: float) -> np.ndarray:
    """BM3D for Poisson-Gaussian noise as its authors recommend: GAT to unit variance, BM3D with
    the scan filter's PSD at variance 1, exact unbiased inverse."""
    b = _bm3d()
    out = []
    for im in noisy:
        z = gat_forward(im, noise, dose)
        out.append(gat_inverse(b.bm3d(z, noise.noise_psd(im.shape, 1.0)), noise, dose))
    return np.stack(out).astype(np.float32)


def gaussian_best(noisy: np.ndarray, clean: np.ndarray, sigmas=(0.5, 0.75, 1.0, 1.5, 2.0, 3.0)):
    """Gaussian filter with the σ (pixels) that gives the best PSNR on these images (an oracle
    choice: the baseline's best case). Returns (output, σ)."""
    from scipy import ndimage

    from service.engine import metrics
    best = None
    for s in sigmas:
        out = ndimage.gaussian_filter(np.asarray(noisy, np.float64), (0, s, s)).astype(np.float32)
        p = metrics.psnr(out, clean, 255.0)
        if best is None or p > best[0]:
            best = (p, out, s)
    return best[1], best[2]
