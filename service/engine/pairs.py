"""Training pairs: random patches of (conditioning, target), scaled to [-1, 1].

- ``RegisteredPairs``: supervised denoise or super-resolution from registered image pairs.
- ``IsotropicPairs``: isotropic restoration learned from an isotropic volume (sub-sample by k along
  any axis), or **self-supervised** from the anisotropic volume itself: the volume is viewed as
  planes along a lateral axis (y or x); the model learns to fill the k−1 planes between planes
  p and p+k, and is then applied to real sections along z.
Both augment with flips and 90° rotations; isotropic pairs also with reversing the gap.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .normalize import IntensityNorm
from .tasks import TaskSpec


def upsample(img: np.ndarray | torch.Tensor, factor: int) -> torch.Tensor:
    """Bicubic upsampling of (B, C, h, w) to the high-resolution grid (super-resolution input)."""
    t = torch.as_tensor(img, dtype=torch.float32)
    return F.interpolate(t, scale_factor=factor, mode="bicubic", align_corners=False)


def _augment(cond: np.ndarray, target: np.ndarray, rng: np.random.Generator):
    """Same random flip/rotation for (C, P, P) cond and target."""
    if rng.random() < 0.5:
        cond, target = cond[:, :, ::-1], target[:, :, ::-1]
    if rng.random() < 0.5:
        cond, target = cond[:, ::-1, :], target[:, ::-1, :]
    if cond.shape[1] == cond.shape[2] and rng.random() < 0.5:
        cond, target = np.rot90(cond, 1, (1, 2)), np.rot90(target, 1, (1, 2))
    return np.ascontiguousarray(cond), np.ascontiguousarray(target)


def _crop_or_pad(img: np.ndarray, size_hw: tuple[int, int], y: int, x: int) -> np.ndarray:
    """Crop (C, H, W) at (y, x); reflect-pad axes shorter than the patch (few sections)."""
    ph, pw = size_hw
    c = img[:, y:y + ph, x:x + pw]
    pad_h, pad_w = ph - c.shape[1], pw - c.shape[2]
    if pad_h > 0 or pad_w > 0:
        c = np.pad(c, ((0, 0), (0, max(pad_h, 0)), (0, max(pad_w, 0))), mode="symmetric")
    return c


class RegisteredPairs:
    """Registered (low-quality, high-quality) stacks for denoise (same shape) or superres."""

    def __init__(self, task: TaskSpec, low: np.ndarray, high: np.ndarray,
                 input_norm: IntensityNorm | None = None, target_norm: IntensityNorm | None = None):
        if task.name not in ("denoise", "superres"):
            raise ValueError(f"task: registered pairs are for denoise or superres, not {task.name}")
        low = np.asarray(low)
        high = np.asarray(high)
        if low.ndim != 3 or high.ndim != 3:
            raise ValueError("input: expected (Z, Y, X) stacks for input and target")
        f = task.factor
        expect = (low.shape[0], low.shape[1] * f, low.shape[2] * f)
        if high.shape != expect:
            raise ValueError(f"target: shape {high.shape} does not match input {low.shape} "
                             f"for {task.name} ×{f} (expected {expect})")
        self.task = task
        self.input_norm = input_norm or IntensityNorm.from_volume(low)
        self.target_norm = target_norm or IntensityNorm.from_volume(high)
        self.low = self.input_norm.forward(low)
        self.high = self.target_norm.forward(high)

    def sample(self, batch: int, patch: int, rng: np.random.Generator):
        f = self.task.factor
        lp = patch // f
        Z, h, w = self.low.shape
        conds, targets = [], []
        for _ in range(batch):
            z = rng.integers(Z)
            y = rng.integers(max(h - lp, 0) + 1)
            x = rng.integers(max(w - lp, 0) + 1)
            lo = _crop_or_pad(self.low[z:z + 1], (lp, lp), y, x)
            hi = _crop_or_pad(self.high[z:z + 1], (patch, patch), y * f, x * f)
            if f > 1:
                lo = upsample(lo[None], f)[0].numpy()
            c, t = _augment(lo, hi, rng)
            conds.append(c)
            targets.append(t)
        return np.stack(conds), np.stack(targets)


class IsotropicPairs:
    """Gap-filling pairs: cond = planes (p, p+k), target = planes p+1 … p+k−1 along ``gap_axes``.

    ``self_supervised=True`` takes an anisotropic (Zs, Y, X) volume and uses the lateral axes
    (y: 1, x: 2) as gap axes; otherwise the volume is isotropic and any axis may serve.
    """

    def __init__(self, task: TaskSpec, volume: np.ndarray, self_supervised: bool,
                 norm: IntensityNorm | None = None, gap_axes: tuple[int, ...] | None = None):
        if task.name != "isotropic":
            raise ValueError(f"task: isotropic pairs need the isotropic task, not {task.name}")
        vol = np.asarray(volume)
        if vol.ndim != 3:
            raise ValueError(f"input: expected a (Z, Y, X) volume, got shape {vol.shape}")
        k = task.factor
        self.task = task
        self.self_supervised = self_supervised
        self.gap_axes = gap_axes or ((1, 2) if self_supervised else (0, 1, 2))
        for a in self.gap_axes:
            if vol.shape[a] < k + 1:
                raise ValueError(f"input: axis {'zyx'[a]} has {vol.shape[a]} planes; factor {k} "
                                 f"needs at least {k + 1}")
        if self_supervised and vol.shape[0] < 2:
            raise ValueError("input: self-supervised training needs at least 2 sections")
        self.norm = norm or IntensityNorm.from_volume(vol)
        self.vol = self.norm.forward(vol)

    def sample(self, batch: int, patch: int, rng: np.random.Generator):
        k = self.task.factor
        conds, targets = [], []
        for _ in range(batch):
            axis = self.gap_axes[rng.integers(len(self.gap_axes))]
            v = np.moveaxis(self.vol, axis, 0)  # gap axis first; image axes follow
            p = rng.integers(v.shape[0] - k)
            H, W = v.shape[1:]
            y = rng.integers(max(H - patch, 0) + 1)
            x = rng.integers(max(W - patch, 0) + 1)
            planes = _crop_or_pad(v[p:p + k + 1], (patch, patch), y, x)  # (k+1, P, P)
            if rng.random() < 0.5:  # the gap read backwards is a gap too
                planes = planes[::-1]
            cond = planes[[0, k]]
            target = planes[1:k]
            c, t = _augment(cond, target, rng)
            conds.append(c)
            targets.append(t)
        return np.stack(conds), np.stack(targets)


class StackGapPairs:
    """One registered isotropic pair: an anisotropic stack (Zs sections) and its isotropic
    counterpart ((Zs−1)·k+1 sections, section i at k·i) — for fine-tuning from one image pair."""

    def __init__(self, task: TaskSpec, low: np.ndarray, high: np.ndarray, norm: IntensityNorm | None = None):
        k = task.factor
        if task.name != "isotropic":
            raise ValueError(f"task: gap pairs need the isotropic task, not {task.name}")
        expect = ((low.shape[0] - 1) * k + 1,) + tuple(low.shape[1:])
        if low.ndim != 3 or low.shape[0] < 2 or tuple(high.shape) != expect:
            raise ValueError(f"target: shape {tuple(high.shape)} does not match input {tuple(low.shape)} "
                             f"for isotropic ×{k} (expected {expect})")
        self.task = task
        self.norm = norm or IntensityNorm.from_volume(low)
        self.low = self.norm.forward(low)
        self.high = self.norm.forward(high)

    def sample(self, batch: int, patch: int, rng: np.random.Generator):
        k = self.task.factor
        gaps = self.low.shape[0] - 1
        H, W = self.high.shape[1:]
        conds, targets = [], []
        for _ in range(batch):
            i = rng.integers(gaps)
            y = rng.integers(max(H - patch, 0) + 1)
            x = rng.integers(max(W - patch, 0) + 1)
            planes = _crop_or_pad(self.high[k * i:k * i + k + 1], (patch, patch), y, x).copy()
            planes[[0, k]] = _crop_or_pad(self.low[i:i + 2], (patch, patch), y, x)
            if rng.random() < 0.5:
                planes = planes[::-1]
            c, t = _augment(planes[[0, k]], planes[1:k], rng)
            conds.append(c)
            targets.append(t)
        return np.stack(conds), np.stack(targets)
