"""Image-quality metrics for restoration benchmarks (numpy only, float64 internally).

Arrays are 2-D images (H, W) or stacks (..., H, W); plane-wise metrics use the last two axes.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = [
    "psnr",
    "ssim",
    "frc",
    "frc_stack",
    "frc_resolution",
    "seam_mask",
    "border_interior_error",
    "gap_patches",
    "patch_spearman",
    "sparsification",
    "z_hf_power",
]

SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_RADIUS = 5  # 11×11 window, as in Wang et al. 2004
FRC_THRESHOLD = 1.0 / 7.0


def _pair(pred, ref, min_ndim=1):
    a = np.asarray(pred, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"pred shape {a.shape} does not match ref shape {b.shape}")
    if a.ndim < min_ndim or a.size == 0:
        raise ValueError(f"pred/ref must be non-empty with at least {min_ndim} dims, got shape {a.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("pred/ref must contain only finite values")
    return a, b


def _data_range(ref: np.ndarray, data_range) -> float:
    if data_range is None:
        data_range = float(ref.max() - ref.min())
        if data_range <= 0:
            raise ValueError("data_range is 0 for a constant ref; pass data_range > 0 explicitly")
        return data_range
    if not isinstance(data_range, numbers.Real) or not np.isfinite(data_range) or data_range <= 0:
        raise ValueError(f"data_range must be a finite number > 0, got {data_range!r}")
    return float(data_range)


def psnr(pred, ref, data_range=None) -> float:
    """Peak signal-to-noise ratio in dB: 10·log10(data_range² / MSE); inf when identical.

    data_range defaults to ref.max() − ref.min().
    """
    a, b = _pair(pred, ref)
    dr = _data_range(b, data_range)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(dr * dr / mse))


def _gauss_window() -> np.ndarray:
    x = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return w / w.sum()


def _filter_valid(img: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable correlation with w over the last two axes, 'valid' region only."""
    n = len(w)
    h, wd = img.shape[-2], img.shape[-1]
    tmp = sum(w[i] * img[..., i : h - n + 1 + i, :] for i in range(n))
    return sum(w[i] * tmp[..., :, i : wd - n + 1 + i] for i in range(n))


def ssim_map(pred, ref, data_range=None) -> np.ndarray:
    """SSIM map (…, H−10, W−10) with an 11×11 Gaussian window (sigma 1.5), valid region only."""
    a, b = _pair(pred, ref, min_ndim=2)
    n = 2 * SSIM_RADIUS + 1
    if a.shape[-2] < n or a.shape[-1] < n:
        raise ValueError(f"pred/ref planes must be at least {n}×{n} for SSIM, got {a.shape[-2:]}")
    dr = _data_range(b, data_range)
    c1 = (SSIM_K1 * dr) ** 2
    c2 = (SSIM_K2 * dr) ** 2
    w = _gauss_window()
    mu_a = _filter_valid(a, w)
    mu_b = _filter_valid(b, w)
    var_a = _filter_valid(a * a, w) - mu_a**2
    var_b = _filter_valid(b * b, w) - mu_b**2
    cov = _filter_valid(a * b, w) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return num / den


def ssim(pred, ref, data_range=None) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian window sigma 1.5, K1 0.01, K2 0.03).

    Computed per 2-D plane over the last two axes (valid region, planes >= 11×11) and averaged
    over all planes for 3-D input. data_range defaults to ref.max() − ref.min() of the whole ref.
    """
    return float(np.mean(ssim_map(pred, ref, data_range)))


def _window_2d(shape, window: str) -> np.ndarray:
    def one(n):
        if n < 3:
            return np.ones(n)
        if window == "hann":
            return np.hanning(n)
        if window == "tukey":  # alpha 0.25: flat centre, cosine tapers on the outer 12.5% each side
            alpha = 0.25
            x = np.linspace(0.0, 1.0, n)
            out = np.ones(n)
            edge = alpha / 2
            lo = x < edge
            hi = x > 1 - edge
            out[lo] = 0.5 * (1 + np.cos(np.pi * (2 * x[lo] / alpha - 1)))
            out[hi] = 0.5 * (1 + np.cos(np.pi * (2 * x[hi] / alpha - 2 / alpha + 1)))
            return out
        return np.ones(n)

    if window not in ("hann", "tukey", "none"):
        raise ValueError(f"window must be 'hann', 'tukey' or 'none', got {window!r}")
    return np.outer(one(shape[0]), one(shape[1]))


def _frc_parts(a: np.ndarray, b: np.ndarray, n_bins, window):
    """Per-ring sums Re(Fa·conj(Fb)), |Fa|², |Fb|² of two 2-D images."""
    h, w = a.shape[-2:]
    if h < 8 or w < 8:
        raise ValueError(f"images must be at least 8×8 for FRC, got {h}×{w}")
    if n_bins is None:
        n_bins = min(h, w) // 2
    if not isinstance(n_bins, numbers.Integral) or isinstance(n_bins, bool) or n_bins < 2:
        raise ValueError(f"n_bins must be an int >= 2, got {n_bins!r}")
    win = _window_2d((h, w), window)
    # Subtract the window-weighted mean so that the windowed images have no DC term.
    a = (a - np.sum(a * win) / np.sum(win)) * win
    b = (b - np.sum(b * win) / np.sum(win)) * win
    fa = np.fft.fft2(a)
    fb = np.fft.fft2(b)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    r = np.sqrt(fy**2 + fx**2)  # cycles per pixel
    # Ring i holds frequencies in (i·Δ, (i+1)·Δ], Δ = 0.5/n_bins; DC and beyond Nyquist are left out.
    idx = (np.ceil(r / (0.5 / n_bins) - 1e-9).astype(int) - 1).ravel()
    keep = (idx >= 0) & (idx < n_bins)
    idx = idx[keep]

    def ring_sum(x):
        return np.bincount(idx, weights=x.ravel()[keep], minlength=n_bins)

    cross = ring_sum(np.real(fa * np.conj(fb)))
    pa = ring_sum(np.abs(fa) ** 2)
    pb = ring_sum(np.abs(fb) ** 2)
    freq = (np.arange(n_bins) + 0.5) * 0.5 / n_bins
    return freq, cross, pa, pb


def _curve(cross, pa, pb):
    den = np.sqrt(pa * pb)
    out = np.zeros_like(cross)
    np.divide(cross, den, out=out, where=den > 0)
    return out


def frc(img_a, img_b, n_bins=None, window: str = "hann"):
    """Fourier ring correlation of two 2-D images of equal shape.

    Each image has its mean removed and is multiplied by a 2-D window ("hann", "tukey" or
    "none") before the FFT. Rings are n_bins (default min(H, W)//2) equal-width bins from 0
    (excluded) to Nyquist (0.5 cycles/pixel). Returns (spatial_freq in cycles/pixel at ring
    centres, curve in [−1, 1]; 0 for an empty or zero-power ring).
    """
    a, b = _pair(img_a, img_b, min_ndim=2)
    if a.ndim != 2:
        raise ValueError(f"frc expects 2-D images, got shape {a.shape}; use frc_stack for stacks")
    freq, cross, pa, pb = _frc_parts(a, b, n_bins, window)
    return freq, _curve(cross, pa, pb)


def frc_stack(vol_a, vol_b, n_bins=None, window: str = "hann"):
    """FRC curve averaged over the planes of two (Z, H, W) stacks (or 2-D images)."""
    a, b = _pair(vol_a, vol_b, min_ndim=2)
    if a.ndim == 2:
        return frc(a, b, n_bins, window)
    if a.ndim != 3:
        raise ValueError(f"frc_stack expects (Z, H, W) stacks, got shape {a.shape}")
    curves = []
    for pa_, pb_ in zip(a, b):
        freq, cross, p1, p2 = _frc_parts(pa_, pb_, n_bins, window)
        curves.append(_curve(cross, p1, p2))
    return freq, np.mean(curves, axis=0)


def frc_resolution(img_a, img_b, pixel_size: float = 1.0, threshold: float = FRC_THRESHOLD,
                   n_bins=None, window: str = "hann") -> float:
    """Resolution (pixel_size units) where the FRC first drops below threshold.

    The crossing frequency f is interpolated linearly between rings; resolution = pixel_size/f.
    Returns 2·pixel_size (Nyquist) if the curve never drops below threshold, and
    pixel_size / (first ring frequency) if it starts below. 3-D input: curve averaged over planes.
    """
    if not isinstance(pixel_size, numbers.Real) or not np.isfinite(pixel_size) or pixel_size <= 0:
        raise ValueError(f"pixel_size must be a finite number > 0, got {pixel_size!r}")
    if not isinstance(threshold, numbers.Real) or not -1 < threshold < 1:
        raise ValueError(f"threshold must be a number in (-1, 1), got {threshold!r}")
    freq, curve = frc_stack(img_a, img_b, n_bins, window)
    below = np.nonzero(curve < threshold)[0]
    if len(below) == 0:
        return 2.0 * float(pixel_size)
    i = int(below[0])
    if i == 0:
        return float(pixel_size / freq[0])
    c0, c1 = curve[i - 1], curve[i]
    t = (c0 - threshold) / (c0 - c1)
    f = freq[i - 1] + t * (freq[i] - freq[i - 1])
    return float(pixel_size / f)


def _tile_starts(size: int, tile: int, step: int) -> list[int]:
    starts = list(range(0, max(size - tile, 0) + 1, step))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def seam_mask(shape, tile: int, overlap: int, width: int = 2) -> np.ndarray:
    """Boolean (H, W) mask of pixels within `width` px of an interior tile edge.

    Tiles of size `tile` start at 0, step, 2·step, … (step = tile − overlap); if the last one
    does not reach the image end, one more tile ends exactly at the end. Every start and end of
    a tile that lies strictly inside the image is a seam; the image border is not.
    """
    if len(shape) < 2:
        raise ValueError(f"shape must have at least 2 dims, got {shape!r}")
    for name, v, lo in (("tile", tile, 1), ("overlap", overlap, 0), ("width", width, 0)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if overlap >= tile:
        raise ValueError(f"overlap must be < tile ({tile}), got {overlap}")
    step = tile - overlap
    h, w = int(shape[-2]), int(shape[-1])

    def axis_mask(size):
        m = np.zeros(size, dtype=bool)
        pos = np.arange(size)
        for s in _tile_starts(size, tile, step):
            for edge in (s, s + tile):
                if 0 < edge < size:  # seam between pixels edge−1 and edge
                    m |= (pos >= edge - width) & (pos < edge + width)
        return m

    return axis_mask(h)[:, None] | axis_mask(w)[None, :]


def border_interior_error(err_map, tile: int, overlap: int, width: int = 2):
    """(border_mean, interior_mean) of |err_map| near tile seams vs elsewhere.

    err_map: (…, H, W); the seams follow seam_mask(err_map.shape, tile, overlap, width).
    A mean over no pixels is nan.
    """
    err = np.abs(np.asarray(err_map, dtype=np.float64))
    if err.ndim < 2 or err.size == 0:
        raise ValueError(f"err_map must be a non-empty array with >= 2 dims, got shape {err.shape}")
    mask = np.broadcast_to(seam_mask(err.shape, tile, overlap, width), err.shape)
    border = float(err[mask].mean()) if mask.any() else float("nan")
    interior = float(err[~mask].mean()) if (~mask).any() else float("nan")
    return border, interior


# ----------------------------------------------------------------------------- z restoration
# Definitions of /work/shared/NOTES.md ("Scoring an uncertainty map", "Sharpness along z"): over the
# generated sections of an isotropic restoration by factor k (section k·i is source section i).

def _generated(shape, k: int) -> np.ndarray:
    gen = np.ones(shape[0], bool)
    gen[::k] = False
    return gen


def gap_patches(vol, k: int, patch: int = 16) -> np.ndarray:
    """Mean of ``vol`` (Z', Y, X) over each patch of (k−1) × patch × patch generated voxels: one
    patch per gap and lateral tile (lateral remainders dropped) → (gaps, Y // patch, X // patch)."""
    a = np.asarray(vol, np.float64)
    gaps = (a.shape[0] - 1) // k
    ny, nx = a.shape[1] // patch, a.shape[2] // patch
    if gaps < 1 or ny < 1 or nx < 1:
        raise ValueError(f"vol: shape {a.shape} holds no gap patch of (k−1)×{patch}×{patch} at k = {k}")
    g = a[:gaps * k].reshape(gaps, k, a.shape[1], a.shape[2])[:, 1:, :ny * patch, :nx * patch]
    return g.reshape(gaps, k - 1, ny, patch, nx, patch).mean(axis=(1, 3, 5))


def patch_spearman(std, out, truth, k: int, patch: int = 16) -> float:
    """Spearman rank correlation, over (k−1) × patch × patch patches of the generated voxels, of
    the true RMS error of ``out`` and the RMS of the predicted standard deviation ``std``."""
    from scipy.stats import spearmanr
    err2 = (np.asarray(out, np.float64) - np.asarray(truth, np.float64)) ** 2
    true_rms = np.sqrt(gap_patches(err2, k, patch)).ravel()
    pred_rms = np.sqrt(gap_patches(np.asarray(std, np.float64) ** 2, k, patch)).ravel()
    return float(spearmanr(pred_rms, true_rms)[0])


def sparsification(std, out, truth, k: int, keep: float = 0.8) -> float:
    """RMSE of the fraction ``keep`` of generated voxels with the lowest predicted std, divided
    by the RMSE of all generated voxels (random order: 1; sorting by the true error: the floor)."""
    gen = _generated(np.shape(truth), k)
    e2 = ((np.asarray(out, np.float64)[gen] - np.asarray(truth, np.float64)[gen]) ** 2).ravel()
    order = np.argsort(np.asarray(std, np.float64)[gen].ravel(), kind="stable")
    n = max(1, int(round(keep * e2.size)))
    return float(np.sqrt(e2[order[:n]].mean() / max(e2.mean(), 1e-300)))


def z_hf_power(vol, truth, k: int) -> tuple[float, float]:
    """z high-frequency power ratio and spectral correlation of a restored stack vs the truth:
    per (y, x) column, the power spectrum along z (mean removed, Hann window) summed over the
    frequencies above the source sections' Nyquist (f > 1/(2k) cycles per voxel), divided by the
    truth's (1 = as sharp as the truth; linear interpolation ≈ 0.2); and the correlation of the two
    spectra's complex amplitudes over that band."""
    a, b = _pair(vol, truth, 3)
    a = a - a.mean(0, keepdims=True)
    b = b - b.mean(0, keepdims=True)
    w = np.hanning(a.shape[0])[:, None, None]
    fa, fb = np.fft.rfft(a * w, axis=0), np.fft.rfft(b * w, axis=0)
    band = np.fft.rfftfreq(a.shape[0]) > 1.0 / (2 * k)
    pa, pb = (np.abs(fa[band]) ** 2).sum(), (np.abs(fb[band]) ** 2).sum()
    cross = (fa[band] * np.conj(fb[band])).real.sum()
    return float(pa / pb), float(cross / np.sqrt(pa * pb))
