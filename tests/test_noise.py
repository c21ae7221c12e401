"""The SEM noise model and the pairs made with it (service/engine/noise.py), on small synthetic data."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine.noise import SEMNoise, bin_area, calibrate, denoise_pairs, scan_filter, superres_pairs

MODEL = SEMNoise(shot=0.2, read=8.0, line_corr=0.4, zero_level=255.0, sign=-1)


def _clean(shape=(4, 64, 64), seed=0):
    """A smooth uint8 image stack with structure (values 60–200)."""
    rng = np.random.default_rng(seed)
    from scipy import ndimage
    f = ndimage.gaussian_filter(rng.normal(size=shape), (0, 4, 4))
    f = (f - f.min()) / (f.max() - f.min())
    return np.rint(60 + 140 * f).astype(np.uint8)


def _lag1(noise, axis):
    a = np.moveaxis(noise - noise.mean(), axis, -1)
    return float((a[..., 1:] * a[..., :-1]).mean() / (a * a).mean())


def test_simulate_keeps_shape_dtype_and_mean():
    clean = _clean()
    noisy = MODEL.simulate(clean, 0.2, seed=1)
    assert noisy.shape == clean.shape and noisy.dtype == np.uint8
    assert abs(float(noisy.mean()) - float(clean.mean())) < 1.0  # Poisson and the filter keep the mean
    f = MODEL.simulate(clean.astype(np.float32), 0.2, seed=1)
    assert f.dtype == np.float32 and f.shape == clean.shape


def test_same_seed_same_noise_other_seed_other_noise():
    clean = _clean()
    a, b, c = (MODEL.simulate(clean, 0.1, seed=s) for s in (3, 3, 4))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    n1, _, d1 = denoise_pairs(MODEL, clean, [0.1, 0.5], seed=7)
    n2, _, _ = denoise_pairs(MODEL, clean, [0.1, 0.5], seed=7)
    assert np.array_equal(n1, n2)


def test_noise_variance_follows_the_dose_and_the_signal():
    flat = np.full((8, 64, 64), 150.0, np.float32)
    v = {d: float((MODEL.simulate(flat, d, seed=2) - flat).var()) for d in (0.1, 0.4)}
    assert v[0.1] / v[0.4] == pytest.approx(4.0, rel=0.1)       # variance ∝ 1 / dose
    assert v[0.4] == pytest.approx(float(MODEL.variance(150.0, 0.4)), rel=0.1)
    dark = np.full_like(flat, 80.0)                              # inverted: dark = more electrons
    vd = float((MODEL.simulate(dark, 0.4, seed=2) - dark).var())
    assert vd == pytest.approx(float(MODEL.variance(80.0, 0.4)), rel=0.1) and vd > v[0.4]
    clean = _clean()
    snr = {d: clean.std() / (MODEL.simulate(clean.astype(np.float32), d, seed=5) - clean).std() for d in (0.05, 0.8)}
    assert snr[0.8] / snr[0.05] == pytest.approx(4.0, rel=0.15)  # SNR ∝ √dose
    d2 = MODEL.dose_for_snr(clean, 2.0)
    assert MODEL.snr(clean, d2) == pytest.approx(2.0, rel=1e-6)


def test_scan_lines_are_correlated_along_x_only():
    flat = np.full((8, 64, 64), 150.0, np.float32)
    noise = MODEL.simulate(flat, 0.3, seed=9) - flat
    assert _lag1(noise, -1) == pytest.approx(0.4, abs=0.05)     # along the scan line: ρ
    assert abs(_lag1(noise, -2)) < 0.05                          # between lines: none
    white = SEMNoise(shot=0.2).simulate(flat - 100, 0.3, seed=9) - (flat - 100)
    assert abs(_lag1(white, -1)) < 0.05
    x = np.random.default_rng(0).normal(size=(4, 256))
    assert scan_filter(x, 0.0) is not None and np.allclose(scan_filter(x, 0.0), x)


def test_bin_area_integrates_blocks():
    a = np.arange(2 * 6 * 9, dtype=np.float64).reshape(2, 6, 9)
    b = bin_area(a, 3)
    assert b.shape == (2, 2, 3)
    assert b[1, 1, 2] == pytest.approx(a[1, 3:6, 6:9].mean())
    assert bin_area(np.ones((5, 7)), 2).shape == (2, 3)           # cropped to multiples
    with pytest.raises(ValueError, match="factor"):
        bin_area(a, 0)


def test_superres_pairs_bin_and_collect_the_area_dose():
    clean = _clean((2, 64, 66))
    low, high = superres_pairs(MODEL, clean, 2, dose=0.2, seed=1)
    assert low.shape == (2, 32, 33) and high.shape == (2, 64, 66) and low.dtype == np.uint8
    flat = np.full((8, 64, 64), 150.0, np.float32)
    lo2, _ = superres_pairs(MODEL, flat, 2, dose=0.2, seed=1)
    # a pixel 2× larger at the same dose per area collects 4× the electrons: 1/4 of the variance
    assert float(lo2.var()) == pytest.approx(float(MODEL.variance(150.0, 0.2)) / 4, rel=0.15)
    pairs = denoise_pairs(MODEL, clean, [0.1, 0.2, 0.4], seed=0)
    assert pairs[0].shape == (6, 64, 66) and pairs[1].shape == (6, 64, 66)
    assert list(pairs[2]) == [0.1, 0.1, 0.2, 0.2, 0.4, 0.4]


def test_calibrate_recovers_the_model_from_its_own_noise():
    # a section repeated along z (the signal cancels in the second difference), noisy per slice
    clean = np.repeat(_clean((1, 128, 128)), 8, axis=0)
    noisy = MODEL.simulate(clean.astype(np.float32), 1.0, seed=11)
    fit, report = calibrate(noisy)
    assert fit.sign == -1 and fit.zero_level == 255.0
    assert fit.shot == pytest.approx(MODEL.shot, rel=0.35)  # the slope of a few flat bins is noisy
    assert fit.line_corr == pytest.approx(MODEL.line_corr, abs=0.06)
    assert fit.variance(130.0) == pytest.approx(float(MODEL.variance(130.0)), rel=0.1)
    assert len(report["levels"]) >= 2


def test_bad_parameters_name_the_field():
    with pytest.raises(ValueError, match="shot"):
        SEMNoise(shot=0)
    with pytest.raises(ValueError, match="line_corr"):
        SEMNoise(shot=1, line_corr=1.0)
    with pytest.raises(ValueError, match="dose"):
        MODEL.simulate(_clean(), 0)
    with pytest.raises(ValueError, match="volume"):
        calibrate(np.zeros((2, 8, 8)))
    assert SEMNoise.from_dict(MODEL.to_dict()) == MODEL
