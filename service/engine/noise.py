"""Scanning-EM acquisition noise, calibrated on real data, for making training pairs from real EM.

A lab with clean (long-dwell, or already averaged) EM images makes its own denoise and
super-resolution training pairs here: estimate the detector's noise from the data
(:func:`calibrate`), then simulate the same acquisition at a lower dose (:meth:`SEMNoise.simulate`,
:func:`denoise_pairs`) or at a coarser pixel (:func:`superres_pairs`).

The model, per pixel of a section whose grey level ``g`` is the expected signal:

- **signal**: electrons detected, proportional to ``s = sign · (g − zero_level)`` ≥ 0 (``sign`` −1
  for inverted contrast, e.g. back-scattered FIB-SEM shown with membranes dark);
- **Poisson counting**: ``Poisson(dose · s / gain)`` electrons, with ``gain`` grey levels per
  electron at ``dose`` 1 (the calibrated acquisition);
- **Gaussian read noise**: the detector's own noise, integrated over the dwell time like the
  signal (its variance scales with ``dose`` in electrons, as the signal's does);
- **scan-line correlation**: the detector's low-pass along the fast-scan axis (x, the last axis):
  a first-order filter ``y[i] = (1 − ρ)·c[i] + ρ·y[i − 1]`` along each scan line, which keeps the
  mean and correlates neighbouring pixels of a line (lag-1 ``ρ``), not neighbouring lines;
- the counts are scaled back to grey levels (``gain / dose`` per electron: the image keeps its
  brightness) and rounded/clipped to the input's integer range.

So the noise variance at grey level ``g`` is ``(shot · s + read) / dose``: ``shot`` and ``read`` are
what :func:`calibrate` measures (grey², after the scan filter), and ``dose`` < 1 is a faster or
lower-current acquisition. ρ is kept at its measured value at every dose (the filter's time
constant in pixels, for a fixed dwell time).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from scipy.signal import lfilter


def _rng(seed):
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def scan_filter(img: np.ndarray, rho: float) -> np.ndarray:
    """First-order low-pass along the last axis (each scan line), started at steady state so the
    first pixel of a line is not special: ``y[i] = (1 − ρ)·x[i] + ρ·y[i − 1]``."""
    x = np.asarray(img, np.float64)
    if rho <= 0:
        return x
    b, a = [1.0 - rho], [1.0, -rho]
    zi = (rho * x[..., :1])  # steady state for a line that started at its first value
    y, _ = lfilter(b, a, x, axis=-1, zi=zi)
    return y


@dataclass(frozen=True)
class SEMNoise:
    """Calibrated SEM noise (see the module doc). Grey-level units of the calibrated data."""
    shot: float            # grey² of noise variance per grey level of signal, at dose 1
    read: float = 0.0      # grey² of signal-independent (read) noise variance, at dose 1
    line_corr: float = 0.0  # ρ: lag-1 correlation of the scan filter along x (0 ≤ ρ < 1)
    zero_level: float = 0.0  # grey level of zero signal
    sign: int = 1          # +1: signal = g − zero_level; −1: signal = zero_level − g (inverted)

    def __post_init__(self):
        if not (np.isfinite(self.shot) and self.shot > 0):
            raise ValueError(f"shot: must be a finite number > 0, got {self.shot!r}")
        if not (np.isfinite(self.read) and self.read >= 0):
            raise ValueError(f"read: must be a finite number ≥ 0, got {self.read!r}")
        if not 0 <= self.line_corr < 1:
            raise ValueError(f"line_corr: must be in [0, 1), got {self.line_corr!r}")
        if self.sign not in (1, -1):
            raise ValueError(f"sign: must be +1 or −1, got {self.sign!r}")

    # ------------------------------------------------------------------ derived quantities
    @property
    def filter_gain(self) -> float:
        """Σh² of the scan filter: the variance left after it (1 without correlation)."""
        r = self.line_corr
        return (1.0 - r) / (1.0 + r)

    @property
    def gain(self) -> float:
        """Grey levels per detected electron at dose 1 (before the scan filter)."""
        return self.shot / self.filter_gain

    def signal(self, grey) -> np.ndarray:
        return np.clip(self.sign * (np.asarray(grey, np.float64) - self.zero_level), 0.0, None)

    def electrons(self, grey, dose: float = 1.0) -> np.ndarray:
        """Mean detected electrons per pixel at grey level(s) ``grey`` and ``dose``."""
        return dose * self.signal(grey) / self.gain

    def variance(self, grey, dose: float = 1.0) -> np.ndarray:
        """Noise variance (grey²) per pixel at grey level(s) ``grey`` and ``dose``."""
        return (self.shot * self.signal(grey) + self.read) / dose

    def snr(self, clean, dose: float) -> float:
        """Amplitude signal-to-noise ratio of an image at ``dose``: std of the clean image over
        the rms noise."""
        c = np.asarray(clean, np.float64)
        return float(c.std() / np.sqrt(self.variance(c, dose).mean()))

    def dose_for_snr(self, clean, snr: float) -> float:
        """The dose at which ``clean`` has amplitude SNR ``snr`` (the noise variance ∝ 1/dose)."""
        if not snr > 0:
            raise ValueError(f"snr: must be > 0, got {snr!r}")
        return float(self.snr(clean, 1.0) ** -2 * snr ** 2)

    # ------------------------------------------------------------------ simulation
    def simulate(self, clean, dose: float, seed=0, area: int = 1) -> np.ndarray:
        """A noisy acquisition of ``clean`` (…, Y, X) at ``dose`` (1 = the calibrated one).

        ``area``: pixels integrate ``area`` calibrated pixels' worth of electrons (a pixel f× larger
        in x and y at the same dose per area: ``area`` = f²). Integer input (uint8/uint16) gives
        the same dtype, rounded and clipped to its range; float input gives float32."""
        if not (np.isfinite(dose) and dose > 0):
            raise ValueError(f"dose: must be a finite number > 0, got {dose!r}")
        if not (isinstance(area, (int, np.integer)) and area >= 1):
            raise ValueError(f"area: must be an integer ≥ 1, got {area!r}")
        clean = np.asarray(clean)
        rng = _rng(seed)
        d = dose * area
        lam = self.electrons(clean, d)
        counts = rng.poisson(lam).astype(np.float64)
        if self.read > 0:  # read noise in electrons, integrated over the dwell like the signal
            read_e = np.sqrt(d * self.read / self.filter_gain) / self.gain
            counts += rng.normal(0.0, read_e, size=clean.shape)
        counts = scan_filter(counts, self.line_corr)
        out = self.zero_level + self.sign * counts * self.gain / d
        if clean.dtype.kind in "ui":
            info = np.iinfo(clean.dtype)
            return np.clip(np.rint(out), info.min, info.max).astype(clean.dtype)
        return out.astype(np.float32)

    def noise_psd(self, shape: tuple[int, int], variance: float) -> np.ndarray:
        """2-D power spectrum (FFT grid of ``shape``) of this model's noise with pixel variance
        ``variance``, scaled as ``bm3d`` expects for ``sigma_psd`` (|FFT of the noise kernel|²·H·W,
        kernel of L2 norm √variance): white noise gives variance·H·W everywhere."""
        H, W = shape
        r = self.line_corr
        w = np.fft.fftfreq(W) * 2 * np.pi
        line = (1 - r ** 2) / (1 - 2 * r * np.cos(w) + r ** 2)  # |H|²/Σh²: mean 1 over frequencies
        return np.broadcast_to(variance * H * W * line[None, :], (H, W)).copy()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SEMNoise":
        return cls(**{k: d[k] for k in ("shot", "read", "line_corr", "zero_level", "sign") if k in d})


# ---------------------------------------------------------------------------------- pairs
def bin_area(stack, factor: int) -> np.ndarray:
    """Lateral binning by area integration: the mean of each ``factor`` × ``factor`` block of the
    last two axes (cropped to multiples of ``factor``), float64 — a pixel ``factor``× larger that
    collects the signal of its whole area."""
    a = np.asarray(stack, np.float64)
    if not (isinstance(factor, (int, np.integer)) and factor >= 1):
        raise ValueError(f"factor: must be an integer ≥ 1, got {factor!r}")
    H, W = a.shape[-2] // factor * factor, a.shape[-1] // factor * factor
    if H == 0 or W == 0:
        raise ValueError(f"factor: {factor} is larger than the image {a.shape[-2:]}")
    a = a[..., :H, :W]
    return a.reshape(a.shape[:-2] + (H // factor, factor, W // factor, factor)).mean(axis=(-3, -1))


def denoise_pairs(model: SEMNoise, clean, doses, seed=0):
    """Training pairs for denoising: every section of ``clean`` (Z, Y, X) at every dose.

    Returns (noisy, clean, dose per section): (len(doses)·Z, Y, X) stacks, dose-major, with the
    dtype of ``clean`` for the noisy stack."""
    clean = np.asarray(clean)
    if clean.ndim != 3:
        raise ValueError(f"clean: expected a (Z, Y, X) stack, got shape {clean.shape}")
    rng = _rng(seed)
    noisy = np.concatenate([model.simulate(clean, float(d), rng) for d in doses])
    return noisy, np.concatenate([clean] * len(doses)), np.repeat(np.asarray(doses, float), clean.shape[0])


def superres_pairs(model: SEMNoise, clean, factor: int, dose: float, seed=0):
    """Training pairs for lateral super-resolution: the input is ``clean`` binned ``factor``× by
    area integration and acquired at the same dose per area (each pixel collects factor² times the
    electrons); the target is ``clean`` cropped to multiples of ``factor``.

    Returns (low (Z, Y/f, X/f), high (Z, Y', X')), low in the dtype of ``clean``."""
    clean = np.asarray(clean)
    low = bin_area(clean, factor)
    H, W = low.shape[-2] * factor, low.shape[-1] * factor
    noisy = model.simulate(low.astype(np.float32), dose, seed, area=factor * factor)
    if clean.dtype.kind in "ui":
        info = np.iinfo(clean.dtype)
        noisy = np.clip(np.rint(noisy), info.min, info.max).astype(clean.dtype)
    return noisy, clean[..., :H, :W]


# ---------------------------------------------------------------------------------- calibration
def _psd_1d(a: np.ndarray, axis: int) -> np.ndarray:
    a = np.moveaxis(a, axis, -1)
    a = a - a.mean(-1, keepdims=True)
    w = np.hanning(a.shape[-1])
    p = np.abs(np.fft.rfft(a * w, axis=-1)) ** 2
    return p.reshape(-1, p.shape[-1]).mean(0) / (w ** 2).sum()


def fit_line_corr(residual: np.ndarray, fmin: float = 0.3) -> tuple[float, dict]:
    """ρ of the scan filter from noise residuals (…, Y, X): the ratio of their power spectra along
    x and along y above ``fmin`` cycles/pixel (where the signal's share is smallest), least squares
    against the first-order filter's (1 − ρ²)/(1 − 2ρ·cos 2πf + ρ²)."""
    px, py = _psd_1d(residual, -1), _psd_1d(residual, -2)
    n = min(len(px), len(py))
    f = np.fft.rfftfreq(2 * (n - 1))[:n]
    band = f >= fmin
    ratio = px[:n][band] / np.maximum(py[:n][band], 1e-12)
    w = 2 * np.pi * f[band]
    grid = np.linspace(0.0, 0.95, 191)
    err = [np.mean((ratio - (1 - r ** 2) / (1 - 2 * r * np.cos(w) + r ** 2)) ** 2) for r in grid]
    rho = float(grid[int(np.argmin(err))])
    return rho, {"band_cycles_per_px": [fmin, 0.5], "psd_ratio_x_over_y_at_nyquist": float(ratio[-1])}


def calibrate(volume, bins: int = 10, flat_fraction: float = 0.3, max_level: float | None = None):
    """Estimate :class:`SEMNoise` from a stack of consecutive thin sections (Z ≥ 3, Y, X) of one
    acquisition — e.g. an isotropic FIB-SEM volume.

    - the noise of each section is isolated by the second difference across sections,
      ``d = v[z] − (v[z−1] + v[z+1]) / 2`` (independent acquisitions: noise variance 1.5·σ²; the
      signal mostly cancels between neighbouring thin slices);
    - in flat regions (the ``flat_fraction`` of pixels with the lowest smoothed lateral gradient)
      the variance of d/√1.5 is binned by the local mean and fitted as a line, variance =
      α + β·grey: |β| is ``shot``, its sign the contrast's polarity; the split of α between read
      noise and the zero-signal level is not identifiable from a line, so zero signal is put at the
      end of the data's range (255 for inverted 8-bit data, 0 otherwise; ``max_level`` to choose)
      and ``read`` takes the rest (0 if that is negative, zero signal then where the line meets 0);
    - ρ from the x/y spectra of d (:func:`fit_line_corr`).

    Returns (model, report) — the report holds the binned variances, the fit and the spectra ratio.
    """
    v = np.asarray(volume, np.float64)
    if v.ndim != 3 or v.shape[0] < 3:
        raise ValueError(f"volume: expected (Z ≥ 3, Y, X) consecutive thin sections, got shape {v.shape}")
    d = (v[1:-1] - 0.5 * (v[:-2] + v[2:])) / np.sqrt(1.5)
    mid = v[1:-1]
    mu = ndimage.uniform_filter(mid, (1, 5, 5))
    sm = ndimage.gaussian_filter(mid, (0, 1.5, 1.5))
    grad = np.hypot(ndimage.sobel(sm, 1), ndimage.sobel(sm, 2))
    flat = grad <= np.quantile(grad, flat_fraction)
    edges = np.quantile(mu[flat], np.linspace(0, 1, bins + 1))
    levels, variances, counts = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = flat & (mu >= lo) & (mu <= hi)
        if m.sum() < 100:
            continue
        x = d[m]
        mad = 1.4826 * np.median(np.abs(x - np.median(x))) or x.std()
        x = x[np.abs(x - np.median(x)) <= 5 * mad]  # a few outliers (edges, debris) per bin
        levels.append(float(mu[m].mean()))
        variances.append(float(x.var()))
        counts.append(int(m.sum()))
    if len(levels) < 2:
        raise ValueError("volume: too few flat pixels to calibrate the noise")
    beta, alpha = np.polyfit(levels, variances, 1, w=np.sqrt(counts))
    sign = -1 if beta < 0 else 1
    shot = abs(float(beta))
    if shot <= 0:
        raise ValueError("volume: the noise does not grow with the signal (no Poisson part found)")
    top = max_level if max_level is not None else (255.0 if v.max() <= 255 else float(v.max()))
    zero = top if sign < 0 else 0.0
    read = float(alpha + beta * zero)
    if read < 0:  # the line reaches 0 inside the range: zero signal there, no read noise
        zero, read = float(-alpha / beta), 0.0
    rho, spec = fit_line_corr(d)
    model = SEMNoise(shot=shot, read=read, line_corr=rho, zero_level=float(zero), sign=sign)
    report = {"levels": levels, "variances": variances, "pixels": counts,
              "fit": {"intercept": float(alpha), "slope": float(beta)},
              "mean_grey": float(v.mean()), "std_grey": float(v.std()),
              "noise_std_at_mean": float(np.sqrt(model.variance(v.mean()))),
              "native_snr": model.snr(v[::max(1, v.shape[0] // 16)], 1.0),
              "electrons_at_mean": float(model.electrons(v.mean())), **spec}
    return model, report
