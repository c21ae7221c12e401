"""Intensity normalisation from statistics of the whole input (never per tile or per block)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class IntensityNorm:
    """Maps [lo, hi] linearly to [-1, 1] (the network's range) and back."""
    lo: float
    hi: float

    def __post_init__(self):
        if not np.isfinite(self.lo) or not np.isfinite(self.hi) or self.hi <= self.lo:
            raise ValueError(f"normalisation: need finite lo < hi, got lo={self.lo}, hi={self.hi}")

    @classmethod
    def from_volume(cls, vol: np.ndarray, percentiles=(0.5, 99.5), max_samples: int = 4_000_000,
                    seed: int = 0) -> "IntensityNorm":
        """Percentiles of the whole volume (a fixed random subsample for large volumes)."""
        flat = np.asarray(vol).reshape(-1)
        if flat.size == 0:
            raise ValueError("input: empty volume")
        if flat.size > max_samples:
            idx = np.random.default_rng(seed).choice(flat.size, max_samples, replace=False)
            flat = flat[np.sort(idx)]
        lo, hi = np.percentile(flat.astype(np.float64), percentiles)
        if hi <= lo:  # constant image: use the dtype's range instead of dividing by zero
            lo, hi = float(lo), float(lo) + 1.0
        return cls(float(lo), float(hi))

    def forward(self, arr: np.ndarray) -> np.ndarray:
        return ((np.asarray(arr, dtype=np.float32) - self.lo) * (2.0 / (self.hi - self.lo)) - 1.0).astype(np.float32)

    def inverse(self, arr: np.ndarray, dtype=np.float32) -> np.ndarray:
        out = (np.asarray(arr, dtype=np.float64) + 1.0) * (0.5 * (self.hi - self.lo)) + self.lo
        dtype = np.dtype(dtype)
        if dtype.kind in "ui":
            info = np.iinfo(dtype)
            out = np.clip(np.rint(out), info.min, info.max)
        return out.astype(dtype)

    def scale_std(self, std: np.ndarray) -> np.ndarray:
        """Standard deviation in network units → intensity units."""
        return (np.asarray(std, dtype=np.float32) * (0.5 * (self.hi - self.lo))).astype(np.float32)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "IntensityNorm":
        return cls(float(d["lo"]), float(d["hi"]))
