import numpy as np
import pytest
from scipy import ndimage as ndi

from service.engine.phantom import (
    add_poisson_gaussian,
    blur_downsample,
    isotropic_ground_truth,
    make_pair,
    make_phantom,
    thick_sections,
    to_uint8,
)


@pytest.fixture(scope="module")
def vol():
    return make_phantom((40, 112, 112), seed=3)


# --- make_phantom -------------------------------------------------------------------------


def test_phantom_shape_dtype_range(vol):
    assert vol.shape == (40, 112, 112)
    assert vol.dtype == np.float32
    assert vol.min() >= 0.0 and vol.max() <= 1.0


def test_phantom_deterministic_for_seed():
    a = make_phantom((12, 48, 56), seed=7)
    b = make_phantom((12, 48, 56), seed=7)
    c = make_phantom((12, 48, 56), seed=8)
    np.testing.assert_array_equal(a, b)
    assert np.mean(np.abs(a - c)) > 0.05


def test_phantom_intensity_classes(vol):
    # Mostly bright cytoplasm, with a minority of dark voxels (membranes, organelles).
    median = float(np.median(vol))
    assert 0.55 <= median <= 0.8
    dark = float(np.mean(vol < 0.35))
    assert 0.03 < dark < 0.4
    assert np.percentile(vol, 1) < 0.3


def test_phantom_membranes_partition_planes_into_cells(vol):
    # Bright regions separated by dark membranes: many separate cells in every orientation.
    for plane in (vol[20], vol[:, 56, :], vol[:, :, 56]):
        labels, n = ndi.label(plane > 0.45)
        sizes = np.bincount(labels.ravel())[1:]
        assert np.sum(sizes >= 30) >= 4


def test_phantom_is_isotropic_and_genuinely_3d(vol):
    grads = [float(np.mean(np.abs(np.diff(vol, axis=a)))) for a in range(3)]
    assert min(grads) > 0.01  # cross-sections change from plane to plane along every axis
    assert max(grads) / min(grads) < 1.15

    def lag_corr(axis, lag):
        a = np.moveaxis(vol, axis, 0)
        return float(np.corrcoef(a[:-lag].ravel(), a[lag:].ravel())[0, 1])

    # Autocorrelation at each lag is alike along z, y and x, and it falls off with distance,
    # so filling the planes between sections k apart is non-trivial.
    for lag in (1, 4, 12):
        c = [lag_corr(axis, lag) for axis in range(3)]
        assert max(c) - min(c) < 0.08, (lag, c)
    assert lag_corr(0, 4) < 0.7 and lag_corr(0, 12) < 0.3


@pytest.mark.parametrize("shape", [(8, 8), (0, 8, 8), (4, 8, 8, 8), (4.0, 8, 8), "abc"])
def test_phantom_bad_shape(shape):
    with pytest.raises(ValueError, match="shape"):
        make_phantom(shape)


def test_phantom_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        make_phantom((4, 16, 16), seed=-1)


# --- thick_sections -----------------------------------------------------------------------


def _ramp(z, y=3, x=4):
    return np.broadcast_to(np.arange(z, dtype=np.float32)[:, None, None], (z, y, x)).copy()


@pytest.mark.parametrize("z,k", [(10, 3), (9, 4), (2, 2), (1, 2), (31, 5), (30, 5), (64, 8)])
def test_thick_sections_count_and_ground_truth_length(z, k):
    vol = _ramp(z)
    zs = (z - 1) // k + 1
    for mode in ("average", "sample"):
        assert thick_sections(vol, k, mode).shape == (zs, 3, 4)
    gt = isotropic_ground_truth(vol, k)
    assert gt.shape[0] == (zs - 1) * k + 1
    np.testing.assert_array_equal(gt, vol[: (zs - 1) * k + 1])


def test_thick_sections_sample_hits_planes_exactly():
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 255, size=(17, 5, 6), dtype=np.uint8)
    out = thick_sections(vol, 4, mode="sample")
    assert out.dtype == np.uint8
    for i in range(out.shape[0]):
        np.testing.assert_array_equal(out[i], vol[4 * i])
    # The sampled sections sit on every k-th plane of the ground truth.
    np.testing.assert_array_equal(isotropic_ground_truth(vol, 4)[::4], out)


@pytest.mark.parametrize("k", [3, 5, 7])
def test_thick_sections_average_is_centred_odd_k(k):
    z = 6 * k + 1
    out = thick_sections(_ramp(z), k)
    assert out.dtype == np.float32
    centre = out[:, 0, 0]
    # Interior sections: the mean of a ramp over a window centred on k·i is k·i.
    np.testing.assert_allclose(centre[1:-1], k * np.arange(1, len(centre) - 1), atol=1e-5)
    # Edge sections are clipped to the volume: planes 0..(k-1)//2 and Z-1-(k-1)//2..Z-1.
    h = (k - 1) // 2
    assert centre[0] == pytest.approx(np.mean(np.arange(0, h + 1)))
    assert centre[-1] == pytest.approx(np.mean(np.arange(z - 1 - h, z)))


@pytest.mark.parametrize("k", [2, 4, 6])
def test_thick_sections_average_even_k_half_voxel(k):
    out = thick_sections(_ramp(5 * k + 1), k)[:, 0, 0]
    # Window k·i-(k-1)//2 … k·i+k//2 has k planes centred at k·i + 0.5.
    np.testing.assert_allclose(out[1:-1], k * np.arange(1, len(out) - 1) + 0.5, atol=1e-5)


def test_thick_sections_average_window_contents():
    rng = np.random.default_rng(1)
    vol = rng.random((13, 4, 4)).astype(np.float32)
    out = thick_sections(vol, 4)
    np.testing.assert_allclose(out[1], vol[3:7].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(out[3], vol[11:13].mean(axis=0), rtol=1e-6)


@pytest.mark.parametrize("k", [1, 0, 2.0, True, "3", None])
def test_thick_sections_bad_k(k):
    with pytest.raises(ValueError, match="k"):
        thick_sections(_ramp(10), k)


def test_thick_sections_bad_mode_and_volume():
    with pytest.raises(ValueError, match="mode"):
        thick_sections(_ramp(10), 2, mode="max")
    with pytest.raises(ValueError, match="vol"):
        thick_sections(np.zeros((10, 10)), 2)


# --- noise, downsampling, uint8 -----------------------------------------------------------


def test_poisson_gaussian_statistics_and_determinism():
    img = np.full((256, 256), 0.5, dtype=np.float32)
    a = add_poisson_gaussian(img, photons=20.0, read_sigma=0.02, seed=5)
    b = add_poisson_gaussian(img, photons=20.0, read_sigma=0.02, seed=5)
    c = add_poisson_gaussian(img, photons=20.0, read_sigma=0.02, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.float32 and a.min() >= 0.0 and a.max() <= 1.0
    assert float(a.mean()) == pytest.approx(0.5, abs=0.01)
    expected_std = np.sqrt(0.5 / 20.0 + 0.02**2)
    assert float(a.std()) == pytest.approx(expected_std, rel=0.05)
    # More photons: less noise.
    d = add_poisson_gaussian(img, photons=500.0, read_sigma=0.0, seed=5)
    assert float(d.std()) == pytest.approx(np.sqrt(0.5 / 500.0), rel=0.05)
    # Read noise alone (shot noise negligible at 1e7 photons).
    e = add_poisson_gaussian(img, photons=1e7, read_sigma=0.05, seed=5)
    assert float(e.std()) == pytest.approx(0.05, rel=0.05)


def test_poisson_gaussian_bad_input():
    img = np.full((8, 8), 0.5, dtype=np.float32)
    with pytest.raises(ValueError, match="photons"):
        add_poisson_gaussian(img, photons=0)
    with pytest.raises(ValueError, match="read_sigma"):
        add_poisson_gaussian(img, read_sigma=-0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        add_poisson_gaussian(img * 3)


def test_blur_downsample_shapes_and_mean():
    rng = np.random.default_rng(0)
    img = rng.random((2, 64, 48)).astype(np.float32)
    out = blur_downsample(img, 4)
    assert out.shape == (2, 16, 12) and out.dtype == np.float32
    assert float(out.mean()) == pytest.approx(float(img.mean()), abs=0.01)
    np.testing.assert_allclose(blur_downsample(np.full((8, 8), 0.3), 2), 0.3, rtol=1e-6)
    assert blur_downsample(img, 2, axes=(0,)).shape == (1, 64, 48)
    assert blur_downsample(img, 2, axes=(-1,)).shape == (2, 64, 24)


def test_blur_downsample_is_anti_aliased():
    # A sinusoid near the input Nyquist must not survive downsampling by 2; plain 2×2 area
    # averaging would keep about cos(0.45·π) ≈ 16 % of its amplitude.
    x = np.arange(128)
    img = np.tile(0.5 + 0.4 * np.cos(2 * np.pi * 0.45 * x), (64, 1))
    out = blur_downsample(img, 2)
    assert float(np.std(out[:, 4:-4])) < 0.4 / np.sqrt(2) * 0.05


def test_blur_downsample_divisibility_error_names_axis():
    with pytest.raises(ValueError, match="axis -1"):
        blur_downsample(np.zeros((8, 10)), 4)
    with pytest.raises(ValueError, match="axis -2"):
        blur_downsample(np.zeros((6, 8)), 4)
    with pytest.raises(ValueError, match="factor"):
        blur_downsample(np.zeros((8, 8)), 0)


def test_to_uint8():
    out = to_uint8(np.array([-0.2, 0.0, 0.5, 1.0, 1.3]))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [0, 0, 128, 255, 255])
    with pytest.raises(ValueError, match="finite"):
        to_uint8(np.array([np.nan]))


# --- make_pair ----------------------------------------------------------------------------


def test_make_pair_denoise(vol):
    clean = vol[:4]
    low, high = make_pair("denoise", clean, seed=1)
    low2, _ = make_pair("denoise", clean, seed=1)
    np.testing.assert_array_equal(high, clean)
    np.testing.assert_array_equal(low, low2)
    assert low.shape == clean.shape and not np.array_equal(low, clean)
    with pytest.raises(ValueError, match="factor"):
        make_pair("denoise", clean, factor=2)


@pytest.mark.parametrize("factor", [2, 4])
def test_make_pair_superres(vol, factor):
    clean = vol[:3, :110, :106]
    low, high = make_pair("superres", clean, factor=factor)
    h, w = 110 - 110 % factor, 106 - 106 % factor
    assert high.shape == (3, h, w)
    np.testing.assert_array_equal(high, clean[:, :h, :w])
    assert low.shape == (3, h // factor, w // factor)


def test_make_pair_superres_default_and_bad_factor(vol):
    low, high = make_pair("superres", vol[0])
    assert low.shape == (56, 56) and high.shape == (112, 112)
    with pytest.raises(ValueError, match="superres"):
        make_pair("superres", vol[0], factor=3)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_make_pair_isotropic(vol, k):
    clean = vol[:23]
    low, high = make_pair("isotropic", clean, factor=k)
    zs = (23 - 1) // k + 1
    assert low.shape == (zs, 112, 112)
    assert high.shape == ((zs - 1) * k + 1, 112, 112)
    np.testing.assert_array_equal(high, clean[: (zs - 1) * k + 1])
    np.testing.assert_allclose(low, thick_sections(clean, k), rtol=1e-6)


def test_make_pair_bad_task_and_factor(vol):
    with pytest.raises(ValueError, match="task"):
        make_pair("deblur", vol)
    with pytest.raises(ValueError, match="isotropic"):
        make_pair("isotropic", vol, factor=1)
    with pytest.raises(ValueError, match="planes"):
        make_pair("isotropic", vol[:3], factor=3)
    with pytest.raises(ValueError, match="clean"):
        make_pair("denoise", vol * 2)
