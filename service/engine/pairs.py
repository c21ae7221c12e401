"""Training pairs: random patches of (conditioning, target), scaled to [-1, 1].

- ``RegisteredPairs``: supervised denoise or super-resolution from registered image pairs.
- ``IsotropicPairs``: row filling (see ``tasks.IsotropicTask``) learned from an isotropic volume,
  or **self-supervised** from full-resolution XY sections of the anisotropic volume itself.
- ``StackGapPairs``: fine-tuning from one registered (anisotropic, isotropic) pair.
Registered pairs augment with flips and 90° rotations; row pairs with flips only.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .normalize import IntensityNorm


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

    def __init__(self, task, low: np.ndarray, high: np.ndarray,
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


def _rows_window(block: np.ndarray, known: np.ndarray, k: int, patch: int, rng: np.random.Generator,
                 task) -> tuple[np.ndarray, np.ndarray]:
    """One training pair from a row block: ``block`` (R, C) target rows with R = (n−1)·k+1, the
    measured rows ``known`` (n, C) at rows 0, k, 2k, … → cond (2, P, P), target (1, P, P).

    The crop starts at a random row phase (the mask channel tells where the known rows are);
    blocks shorter or narrower than the patch are mirrored."""
    cond = task.row_conditioning(known)          # (2, R, C)
    target = block[None].astype(np.float32)      # (1, R, C)
    R, C = block.shape
    y = rng.integers(max(R - patch, 0) + 1) if R > patch else 0
    x = rng.integers(max(C - patch, 0) + 1)
    c = _crop_or_pad(cond, (patch, patch), y, x)
    t = _crop_or_pad(target, (patch, patch), y, x)
    # flips keep rows as rows (no 90° rotations: the gap runs along the rows)
    if rng.random() < 0.5:
        c, t = c[:, ::-1], t[:, ::-1]
    if rng.random() < 0.5:
        c, t = c[:, :, ::-1], t[:, :, ::-1]
    return np.ascontiguousarray(c), np.ascontiguousarray(t)


def lateral_zoom(factor: int, voxel_size_nm) -> float:
    """Resampling of the gap axis of XY sections so that the learned row spacing equals the
    output z spacing: zoom = factor / (z / xy). ValueError (one line) when it is out of range."""
    if voxel_size_nm is None:
        return 1.0
    vx, vy, vz = (float(v) for v in voxel_size_nm)
    ratio = vz / min(vx, vy)
    zoom = factor / ratio
    if not 0.25 <= zoom <= 4.0:
        raise ValueError(f"factor: output factor {factor} does not fit the physical z/xy ratio {ratio:.2f} "
                         f"of voxel size {vx:g}×{vy:g}×{vz:g} nm (the lateral resampling {zoom:.2f} is "
                         f"outside [0.25, 4]); choose a factor near {max(2, round(ratio))}")
    return 1.0 if abs(zoom - 1.0) < 0.02 else zoom


def _zoom_rows(vol: np.ndarray, zoom: float) -> np.ndarray:
    """Resample axis 1 of (N, R, C) by ``zoom`` (linear; area-averaged when shrinking)."""
    if zoom == 1.0:
        return vol
    t = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))[:, None]
    R = max(2, int(round(vol.shape[1] * zoom)))
    mode = "bilinear" if zoom > 1 else "area"
    kw = {"align_corners": False} if mode == "bilinear" else {}
    out = F.interpolate(t, size=(R, vol.shape[2]), mode=mode, **kw)
    return out[:, 0].numpy()


class IsotropicPairs:
    """Row-filling pairs (CARE-style isotropic training) for the isotropic task.

    ``self_supervised=True``: ``volume`` is the anisotropic (Zs, Y, X) stack itself. Its XY
    sections are full resolution; rows are removed along y (and, in a second view, along x), the
    input is the linear interpolation along that axis, and the loss is on the removed rows. The
    row axis is first resampled so that the learned row spacing is the output z spacing
    (voxel z / factor): see ``lateral_zoom``. Without ``voxel_size_nm`` the factor is taken to be
    the physical z/xy ratio.

    ``self_supervised=False``: ``volume`` is isotropic; rows are removed along z, y or x, in
    planes of any two axes (train on an isotropic volume, apply to anisotropic data).

    ``section_thickness=True`` makes the known rows the average of ``factor`` neighbouring rows
    (sections that integrate their thickness, e.g. serial-section TEM with thick cuts); off by
    default, and wrong for FIB-SEM or any data where a section is a thin slice.
    """

    def __init__(self, task, volume: np.ndarray, self_supervised: bool,
                 norm: IntensityNorm | None = None, gap_axes: tuple[int, ...] | None = None,
                 voxel_size_nm=None, section_thickness: bool = False):
        if task.name != "isotropic":
            raise ValueError(f"task: isotropic pairs need the isotropic task, not {task.name}")
        vol = np.asarray(volume)
        if vol.ndim != 3:
            raise ValueError(f"input: expected a (Z, Y, X) volume, got shape {vol.shape}")
        k = task.factor
        self.task = task
        self.self_supervised = self_supervised
        self.section_thickness = bool(section_thickness)
        self.gap_axes = gap_axes or ((1, 2) if self_supervised else (0, 1, 2))
        if self_supervised and 0 in self.gap_axes:
            raise ValueError("gap_axes: self-supervised training removes rows along y or x, not z")
        self.zoom = lateral_zoom(k, voxel_size_nm) if self_supervised else 1.0
        self.norm = norm or IntensityNorm.from_volume(vol)
        v = self.norm.forward(vol)
        # sources: (N, R, C) arrays whose axis 1 is the row (gap) axis
        self.sources = []
        for a in self.gap_axes:
            others = [b for b in (0, 1, 2) if b != a]
            if self_supervised:
                src = _zoom_rows(np.moveaxis(v, a, 1), self.zoom)  # z stays the image index
                self.sources.append(src)
            else:
                for o in others:
                    n_ax = [b for b in others if b != o][0]
                    self.sources.append(np.transpose(v, (n_ax, a, o)))
        for src in self.sources:
            if src.shape[1] < k + 1:
                raise ValueError(f"input: {src.shape[1]} rows along a gap axis; factor {k} needs at least {k + 1}")
        self.vol = v

    def sample(self, batch: int, patch: int, rng: np.random.Generator):
        k = self.task.factor
        conds, targets = [], []
        n = -(-(patch + k) // k) + 1  # known rows spanning the patch at any phase
        for _ in range(batch):
            src = self.sources[rng.integers(len(self.sources))]
            img = src[rng.integers(src.shape[0])]
            R = img.shape[0]
            nn_ = min(n, (R - 1) // k + 1)
            a = rng.integers(R - (nn_ - 1) * k)
            block = img[a:a + (nn_ - 1) * k + 1]
            if rng.random() < 0.5:
                block = block[::-1]
            if self.section_thickness:
                known = np.stack([block[max(0, r - k // 2):r + (k + 1) // 2].mean(0)
                                  for r in range(0, block.shape[0], k)])
            else:
                known = block[::k]
            c, t = _rows_window(block, known, k, patch, rng, self.task)  # random row phase
            conds.append(c)
            targets.append(t)
        return np.stack(conds), np.stack(targets)


class StackGapPairs:
    """One registered isotropic pair: an anisotropic stack (Zs sections) and its isotropic
    counterpart ((Zs−1)·k+1 sections, section i at k·i) — for fine-tuning from one image pair.
    Pairs are XZ and YZ views of the isotropic stack with the anisotropic sections as known rows."""

    def __init__(self, task, low: np.ndarray, high: np.ndarray, norm: IntensityNorm | None = None):
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
        conds, targets = [], []
        for _ in range(batch):
            if rng.random() < 0.5:   # XZ view at a random y
                y = rng.integers(self.high.shape[1])
                block, known = self.high[:, y, :], self.low[:, y, :]
            else:                    # YZ view at a random x
                x = rng.integers(self.high.shape[2])
                block, known = self.high[:, :, x], self.low[:, :, x]
            c, t = _rows_window(block, known, k, patch, rng, self.task)
            conds.append(c)
            targets.append(t)
        return np.stack(conds), np.stack(targets)
