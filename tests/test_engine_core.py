"""Network, schedule, samplers and tiling: behaviour against analytic references."""

import math

import numpy as np
import pytest
import torch

from service.engine.network import PRESETS, UNet, count_parameters, preset_config
from service.engine.samplers import SAMPLERS, get_sampler
from service.engine.schedule import NoiseSchedule
from service.engine.tiling import TiledDenoiser, blend_window, tile_starts


def test_presets_shapes_and_sizes():
    net = UNet(preset_config("tiny", 6, 4))
    out = net(torch.randn(2, 6, 32, 48), torch.rand(2))
    assert out.shape == (2, 4, 32, 48)
    base = UNet(preset_config("base", 3, 1))
    n = count_parameters(base)
    assert 13e6 < n < 18e6, n  # the paper's size (≈16 M)
    assert base.config.channel_mults == (1, 2, 4, 8) and base.config.dropout == 0.2
    with pytest.raises(ValueError, match="multiple of 8"):
        base(torch.randn(1, 3, 30, 32), torch.rand(1))
    with pytest.raises(ValueError, match="preset"):
        preset_config("huge", 1, 1)


def test_noise_level_conditioning_changes_output():
    torch.manual_seed(0)
    net = UNet(preset_config("tiny", 2, 1)).eval()
    x = torch.randn(1, 2, 32, 32)
    a = net(x, torch.tensor([0.1]))
    b = net(x, torch.tensor([0.9]))
    assert (a - b).abs().mean() > 1e-4


def test_schedule_matches_reference_recipe():
    s = NoiseSchedule()
    ab = s.alpha_bars()
    assert len(ab) == 2001 and ab[0] == 1.0 and np.all(np.diff(ab) < 0)
    assert math.isclose(1 - ab[1], 1e-6, rel_tol=1e-9)
    assert ab[-1] < 1e-4  # essentially pure noise at T
    g = s.sample_gammas(10000, torch.Generator().manual_seed(0))
    assert float(g.min()) >= math.sqrt(ab[-1]) and float(g.max()) <= 1.0
    for spacing in ("trailing", "uniform", "logsnr"):
        seq = s.inference_alpha_bars(10, spacing)
        assert len(seq) == 11 and seq[-1] == 1.0 and np.all(np.diff(seq) > 0)
    with pytest.raises(ValueError, match="steps"):
        s.inference_alpha_bars(0)
    with pytest.raises(ValueError, match="spacing"):
        s.inference_alpha_bars(5, "cubic")


def _gaussian_denoiser(sigma_data):
    """Exact data prediction E[x0 | x] for data ~ N(0, sigma_data²) per pixel."""
    def den(x, gamma):
        a = (gamma ** 2)[:, None, None, None]
        return torch.sqrt(a) * sigma_data ** 2 * x / (a * sigma_data ** 2 + 1 - a)
    return den


def _point_denoiser(x0):
    def den(x, gamma):
        return x0.expand_as(x)
    return den


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_recover_point_mass(name):
    x0 = torch.linspace(-0.9, 0.9, 64).reshape(1, 1, 8, 8)
    seq = NoiseSchedule().inference_alpha_bars(8, "logsnr")
    out = get_sampler(name).sample(_point_denoiser(x0), (3, 1, 8, 8), seq, torch.Generator().manual_seed(0))
    assert torch.allclose(out, x0.expand(3, 1, 8, 8), atol=1e-4)


@pytest.mark.parametrize("name,steps", [("ddpm", 200), ("ddim", 100), ("dpmpp2m", 10)])
def test_samplers_reproduce_gaussian_spread(name, steps):
    """Sampling a Gaussian data distribution gives its standard deviation (not collapsed)."""
    sd = 0.4
    seq = NoiseSchedule().inference_alpha_bars(steps, "trailing" if name == "ddpm" else "logsnr")
    out = get_sampler(name).sample(_gaussian_denoiser(sd), (64, 1, 32, 32), seq,
                                   torch.Generator().manual_seed(1))
    assert abs(float(out.std()) - sd) < 0.03, float(out.std())
    assert abs(float(out.mean())) < 0.02


def test_sampler_noise_independent_of_batching():
    seq = NoiseSchedule().inference_alpha_bars(5)
    den = _gaussian_denoiser(0.5)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (11, 12)]
    both = get_sampler("ddpm").sample(den, (4, 1, 8, 8), seq, gens())
    first = get_sampler("ddpm").sample(den, (2, 1, 8, 8), seq, [torch.Generator().manual_seed(11)])
    assert torch.equal(both[:2], first)
    with pytest.raises(ValueError, match="sampler"):
        get_sampler("euler-magic")


def test_tile_starts_and_window():
    assert tile_starts(100, 256, 32) == [0]
    s = tile_starts(600, 256, 32)
    assert s[0] == 0 and s[-1] == 600 - 256
    assert all(b - a <= 256 - 32 for a, b in zip(s, s[1:]))
    w = blend_window(64, 16)
    assert w.min() > 0 and w.max() == 1.0 and np.allclose(w, w[::-1])
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(10, 8, 8)


def test_tiled_equals_whole_for_pointwise_net():
    """Blending is a partition of unity: a pointwise network gives the same result tiled."""
    net = lambda x, g: 2 * x[:, :1] + x[:, 1:2] * g[:, None, None, None]
    cond = torch.randn(1, 1, 150, 170)
    x = torch.randn(2, 1, 150, 170)
    g = torch.tensor([0.3, 0.7])
    tiled = TiledDenoiser(net, cond, samples=2, tile=64, overlap=16, max_batch=5, multiple=8)(x, g)
    assert torch.allclose(tiled, net(torch.cat([x, cond.expand(2, -1, -1, -1)], 1), g), atol=1e-5)


def test_tiled_conv_net_has_no_seams():
    """A real UNet run tiled differs from the whole-image result only slightly, and not more at
    tile borders than inside (blended, never hard-cut)."""
    torch.manual_seed(0)
    net = UNet(preset_config("tiny", 2, 1)).eval()
    cond = torch.randn(1, 1, 96, 96)
    x = torch.randn(1, 1, 96, 96)
    g = torch.tensor([0.5])
    with torch.no_grad():
        whole = net(torch.cat([x, cond], 1), g)
        tiled = TiledDenoiser(net, cond, 1, tile=48, overlap=16, multiple=4)(x, g)
    err = (tiled - whole).abs()[0, 0].numpy()
    assert err.mean() < 0.25 * whole.abs().mean()  # GroupNorm sees tile statistics
    # a hard cut would make the error jump between neighbouring columns at tile edges
    step = np.abs(np.diff(tiled[0, 0].numpy(), axis=1)).mean()
    seam = np.abs(tiled[0, 0, :, 40] - tiled[0, 0, :, 39]).mean()
    assert seam < 3 * step
