import numpy as np
import pytest
from scipy import ndimage as ndi

from service.engine.metrics import (
    border_interior_error,
    frc,
    frc_resolution,
    frc_stack,
    psnr,
    seam_mask,
    ssim,
)


def _smooth_image(shape=(96, 96), seed=0, sigma=3.0):
    rng = np.random.default_rng(seed)
    img = ndi.gaussian_filter(rng.random(shape), sigma)
    img -= img.min()
    return img / img.max()


# --- PSNR ---------------------------------------------------------------------------------


def test_psnr_known_values():
    ref = np.linspace(0.0, 1.0, 100).reshape(10, 10)
    pred = ref + 0.1  # MSE = 0.01
    assert psnr(pred, ref, data_range=1.0) == pytest.approx(20.0)
    assert psnr(pred, ref) == pytest.approx(20.0)  # default range: ref.max() - ref.min() = 1
    assert psnr(2 * pred, 2 * ref) == pytest.approx(20.0)  # scale invariant with default range
    assert psnr(pred, ref, data_range=255.0) == pytest.approx(10 * np.log10(255.0**2 / 0.01))


def test_psnr_identical_and_ordering():
    ref = _smooth_image()
    assert psnr(ref, ref) == float("inf")
    rng = np.random.default_rng(1)
    low = psnr(ref + rng.normal(0, 0.1, ref.shape), ref)
    high = psnr(ref + rng.normal(0, 0.01, ref.shape), ref)
    assert high == pytest.approx(low + 20.0, abs=0.5)


def test_psnr_bad_input():
    with pytest.raises(ValueError, match="shape"):
        psnr(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="data_range"):
        psnr(np.zeros((4, 4)), np.ones((4, 4)))  # constant ref and no range
    with pytest.raises(ValueError, match="data_range"):
        psnr(np.zeros((4, 4)), np.eye(4), data_range=0)
    with pytest.raises(ValueError, match="finite"):
        psnr(np.full((4, 4), np.nan), np.eye(4))


# --- SSIM ---------------------------------------------------------------------------------


def _ssim_reference(a, b, data_range):
    """Independent SSIM (scipy Gaussian filter, 11-tap window, border of 5 px cropped)."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def f(x):
        return ndi.gaussian_filter(x, 1.5, truncate=5 / 1.5)[5:-5, 5:-5]

    mu_a, mu_b = f(a), f(b)
    va, vb = f(a * a) - mu_a**2, f(b * b) - mu_b**2
    cov = f(a * b) - mu_a * mu_b
    m = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return float(m.mean())


def test_ssim_identical_is_one():
    img = _smooth_image()
    assert ssim(img, img) == pytest.approx(1.0, abs=1e-12)


def test_ssim_matches_independent_implementation():
    ref = _smooth_image((64, 80), seed=2)
    pred = np.clip(ref + np.random.default_rng(3).normal(0, 0.1, ref.shape), 0, 1)
    assert ssim(pred, ref, data_range=1.0) == pytest.approx(_ssim_reference(pred, ref, 1.0), abs=1e-10)


def test_ssim_decreases_with_noise_and_is_symmetric():
    ref = _smooth_image()
    rng = np.random.default_rng(4)
    values = [ssim(ref + rng.normal(0, s, ref.shape), ref, data_range=1.0) for s in (0.01, 0.05, 0.2)]
    assert values[0] > values[1] > values[2]
    assert values[0] > 0.9 and values[2] < 0.5
    noisy = ref + rng.normal(0, 0.05, ref.shape)
    assert ssim(noisy, ref, data_range=1.0) == pytest.approx(ssim(ref, noisy, data_range=1.0))
    assert ssim(1.0 - ref, ref, data_range=1.0) < 0  # contrast inversion


def test_ssim_constant_images_luminance_term():
    # Zero variance: SSIM reduces to (2·μa·μb + C1) / (μa² + μb² + C1).
    a, b = np.full((20, 20), 0.2), np.full((20, 20), 0.6)
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    assert ssim(a, b, data_range=1.0) == pytest.approx(expected)


def test_ssim_3d_is_mean_over_planes():
    ref = np.stack([_smooth_image((40, 40), seed=s) for s in range(3)])
    pred = ref + np.random.default_rng(5).normal(0, 0.05, ref.shape)
    per_plane = [ssim(p, r, data_range=1.0) for p, r in zip(pred, ref)]
    assert ssim(pred, ref, data_range=1.0) == pytest.approx(np.mean(per_plane))


def test_ssim_bad_input():
    with pytest.raises(ValueError, match="11"):
        ssim(np.zeros((10, 30)), np.eye(10, 30))
    with pytest.raises(ValueError, match="shape"):
        ssim(np.zeros((20, 20)), np.zeros((20, 21)))


# --- FRC ----------------------------------------------------------------------------------


def test_frc_identical_images_is_one():
    img = _smooth_image((128, 128), sigma=1.0)
    freq, curve = frc(img, img)
    assert len(freq) == len(curve) == 64
    assert np.all(np.diff(freq) > 0) and 0 < freq[0] and freq[-1] < 0.5
    np.testing.assert_allclose(curve, 1.0, atol=1e-9)


def test_frc_independent_noise_is_near_zero():
    rng = np.random.default_rng(6)
    a, b = rng.random((256, 256)), rng.random((256, 256))
    _, curve = frc(a, b)
    assert abs(float(curve.mean())) < 0.03
    assert float(np.mean(np.abs(curve[16:]))) < 0.1
    _, stack_curve = frc_stack(rng.random((4, 128, 128)), rng.random((4, 128, 128)))
    assert abs(float(stack_curve.mean())) < 0.03


def test_frc_stack_averages_plane_curves():
    rng = np.random.default_rng(7)
    base = rng.random((3, 64, 64))
    a = base + 0.5 * rng.random(base.shape)
    b = base + 0.5 * rng.random(base.shape)
    _, mean_curve = frc_stack(a, b)
    curves = [frc(x, y)[1] for x, y in zip(a, b)]
    np.testing.assert_allclose(mean_curve, np.mean(curves, axis=0))


def _band_limited_pair(cutoff, size=256, seed=8):
    """Shared signal with power only below `cutoff` (cycles/px) plus independent weak noise."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.fftfreq(size)[None, :]
    mask = np.sqrt(fy**2 + fx**2) < cutoff
    signal = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=(size, size))) * mask))
    noise = signal.std() * 0.05
    return signal + rng.normal(0, noise, signal.shape), signal + rng.normal(0, noise, signal.shape)


def test_frc_resolution_known_cutoff():
    a, b = _band_limited_pair(cutoff=0.2)
    # The curve falls from ~1 to ~0 at 0.2 cycles/px: resolution 1/0.2 = 5 px, 20 nm at 4 nm/px.
    assert frc_resolution(a, b) == pytest.approx(5.0, rel=0.1)
    assert frc_resolution(a, b, pixel_size=4.0) == pytest.approx(20.0, rel=0.1)


def test_frc_resolution_limits_and_ordering():
    img = _smooth_image((128, 128), sigma=1.0)
    assert frc_resolution(img, img, pixel_size=4.0) == pytest.approx(8.0)  # never crosses: Nyquist
    rng = np.random.default_rng(9)
    clean = _smooth_image((128, 128), sigma=2.0)

    def noisy(s):
        return clean + rng.normal(0, s, clean.shape)

    fine = frc_resolution(noisy(0.02), noisy(0.02))
    coarse = frc_resolution(noisy(0.2), noisy(0.2))
    assert 2.0 <= fine < coarse
    unrelated = frc_resolution(rng.random((128, 128)), rng.random((128, 128)))
    assert unrelated > coarse


def test_frc_bad_input():
    with pytest.raises(ValueError, match="shape"):
        frc(np.zeros((32, 32)), np.zeros((32, 33)))
    with pytest.raises(ValueError, match="2-D"):
        frc(np.zeros((2, 32, 32)), np.zeros((2, 32, 32)))
    with pytest.raises(ValueError, match="8"):
        frc(np.zeros((4, 32)), np.zeros((4, 32)))
    with pytest.raises(ValueError, match="n_bins"):
        frc(np.eye(32), np.eye(32), n_bins=1)
    with pytest.raises(ValueError, match="window"):
        frc(np.eye(32), np.eye(32), window="blackman")
    with pytest.raises(ValueError, match="pixel_size"):
        frc_resolution(np.eye(32), np.eye(32), pixel_size=0)


# --- tile seams ---------------------------------------------------------------------------


def test_seam_mask_positions():
    # size 100, tile 40, overlap 8: tiles [0,40) [32,72) and a last one [60,100).
    mask = seam_mask((100, 100), tile=40, overlap=8)
    expected = sorted({p for edge in (32, 40, 60, 72) for p in range(edge - 2, edge + 2)})
    np.testing.assert_array_equal(np.nonzero(mask.all(axis=1))[0], expected)
    np.testing.assert_array_equal(np.nonzero(mask.all(axis=0))[0], expected)
    assert mask.sum() == 2 * 100 * len(expected) - len(expected) ** 2
    # An image no larger than one tile has no seams.
    assert not seam_mask((40, 30), tile=40, overlap=8).any()


def test_border_interior_error():
    mask = seam_mask((96, 96), tile=32, overlap=8)
    err = np.where(mask, 3.0, 1.0)
    assert border_interior_error(err, 32, 8) == (3.0, 1.0)
    assert border_interior_error(-err, 32, 8) == (3.0, 1.0)  # absolute error
    stack = np.stack([err, err])
    assert border_interior_error(stack, 32, 8) == (3.0, 1.0)
    flat = np.full((96, 96), 0.5)
    assert border_interior_error(flat, 32, 8) == pytest.approx((0.5, 0.5))
    border, interior = border_interior_error(np.ones((20, 20)), 32, 8)
    assert np.isnan(border) and interior == 1.0


def test_border_interior_error_bad_input():
    with pytest.raises(ValueError, match="overlap"):
        border_interior_error(np.ones((64, 64)), 32, 32)
    with pytest.raises(ValueError, match="tile"):
        border_interior_error(np.ones((64, 64)), 0, 0)
    with pytest.raises(ValueError, match="err_map"):
        border_interior_error(np.ones(64), 32, 8)
