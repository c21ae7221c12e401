"""Training, checkpoints and restoration with a tiny model trained in the test."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from service.engine.model import ModelError, RestorationModel, list_models, read_metadata
from service.engine.pairs import IsotropicPairs, RegisteredPairs, StackGapPairs
from service.engine.restore import check_model_for_task, derive_seed, restore
from service.engine.tasks import TaskSpec
from service.engine.training import TrainConfig, train


def _smooth_volume(shape, seed=0):
    rng = np.random.default_rng(seed)
    v = ndimage.gaussian_filter(rng.random(shape), 2.5)
    v = (v - v.min()) / (v.max() - v.min())
    return (v * 200 + 20).astype(np.uint8)


@pytest.fixture(scope="module")
def iso_model(tmp_path_factory):
    vol = _smooth_volume((31, 64, 64))
    aniso = vol[::3]
    task = TaskSpec("isotropic", 3)
    m = RestorationModel.create(task, "tiny", voxel_size_nm=(8, 8, 24))
    pairs = IsotropicPairs(task, aniso, self_supervised=True)
    m.input_norm = m.target_norm = pairs.norm
    url = str(tmp_path_factory.mktemp("models") / "iso3")
    log = []
    train(m, pairs, TrainConfig(steps=80, batch_size=8, patch=32, warmup=10, lr=2e-3), out_url=url,
          progress=False, mode="self-supervised", log=log)
    return url, aniso, vol, log


def test_training_reduces_loss(iso_model):
    _, _, _, log = iso_model
    assert np.mean(log[-15:]) < 0.7 * np.mean(log[:5])


def test_checkpoint_is_self_describing(iso_model):
    url, *_ = iso_model
    meta = read_metadata(url)
    assert meta["task"] == "isotropic" and meta["factor"] == 3 and meta["preset"] == "tiny"
    assert meta["voxel_size_nm"] == [8, 8, 24]
    assert meta["training"]["mode"] == "self-supervised" and meta["training"]["steps"] == 80
    assert meta["input_norm"]["hi"] > meta["input_norm"]["lo"]
    assert meta["code_version"] and meta["schedule"]["num_steps"] == 2000
    m = RestorationModel.load(url)
    assert m.task == TaskSpec("isotropic", 3)


def test_models_on_memory_fs_and_listing(iso_model):
    url, *_ = iso_model
    m = RestorationModel.load(url)
    m.save("memory://lab/models/a")
    m.name = "b-model"
    m.save("memory://lab/models/b")
    names = [x["name"] for x in list_models("memory://lab/models")]
    assert "b-model" in names and len(names) == 2
    again = RestorationModel.load("memory://lab/models/a")
    for p, q in zip(again.net.parameters(), m.net.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ModelError, match="no model"):
        RestorationModel.load("memory://lab/models/none")


def test_resume_is_exact(tmp_path):
    """20 steps straight give the same weights as 10 steps, stop, resume to 20."""
    vol = _smooth_volume((16, 40, 40), seed=3)
    task = TaskSpec("isotropic", 3)

    def run(url, **kw):
        m = RestorationModel.create(task, "tiny", seed=1)
        p = IsotropicPairs(task, vol, self_supervised=False)
        cfg = TrainConfig(steps=12, batch_size=2, patch=32, warmup=3)
        return train(m, p, cfg, out_url=url, progress=False, **kw)

    a = run(str(tmp_path / "a"))
    run(str(tmp_path / "b"), stop_at=5)
    assert RestorationModel.load(str(tmp_path / "b")).training["steps"] == 5
    b = run(str(tmp_path / "b"), resume=True)
    assert b.training["steps"] == 12
    for p, q in zip(a.net.state_dict().values(), b.net.state_dict().values()):
        assert torch.equal(p, q)


def test_restore_shapes_determinism_and_uncertainty(iso_model):
    url, aniso, _, _ = iso_model
    m = RestorationModel.load(url)
    a = restore(m, aniso[:4], samples=3, steps=4, seed=7)
    assert a.mean.shape == (10, 64, 64) and a.mean.dtype == np.uint8
    assert np.array_equal(a.mean[::3], aniso[:4])  # source sections pass through exactly
    assert a.std.shape == a.mean.shape and np.all(a.std[::3] == 0) and a.std[1].mean() > 0
    assert a.score is not None and a.evaluations == 4
    b = restore(m, aniso[:4], samples=3, steps=4, seed=7)
    assert np.array_equal(a.mean, b.mean) and np.array_equal(a.std, b.std)
    c = restore(m, aniso[:4], samples=3, steps=4, seed=8)
    assert not np.array_equal(a.mean, c.mean)
    one = restore(m, aniso[:4], samples=1, steps=4, seed=7)
    assert one.std is None and one.score is None and not one.needs_finetuning


def test_restore_tiled_matches_shape_and_is_seamless(iso_model):
    """Restoring with small tiles gives no jumps at tile borders: the column-to-column change
    there is like the one the untiled restoration has at the same columns."""
    url, _, _, _ = iso_model
    m = RestorationModel.load(url)
    big = _smooth_volume((7, 128, 128), seed=9)[::3]
    tiled = restore(m, big, samples=2, steps=4, tile=48, overlap=16, seed=1)
    whole = restore(m, big, samples=2, steps=4, tile=256, seed=1)
    assert tiled.mean.shape == whole.mean.shape == (7, 128, 128)
    from service.engine.tiling import tile_starts
    edges = sorted({c for s0 in tile_starts(128, 48, 16) for c in (s0, s0 + 48) if 0 < c < 128})

    def jumps(vol):
        gen = vol[[1, 2, 4, 5]].astype(np.float32)
        return np.abs(np.diff(gen, axis=2)).mean(axis=(0, 1))  # per column boundary

    jt, jw = jumps(tiled.mean), jumps(whole.mean)
    for c in edges:
        assert jt[c - 1] < 1.5 * jw[c - 1] + 1.0, (c, jt[c - 1], jw[c - 1])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m"])
def test_every_sampler_restores(iso_model, sampler):
    url, aniso, _, _ = iso_model
    r = restore(RestorationModel.load(url), aniso[:2], sampler=sampler, steps=3, seed=0)
    assert r.mean.shape == (4, 64, 64)


def test_restore_bad_input(iso_model):
    url, aniso, _, _ = iso_model
    m = RestorationModel.load(url)
    with pytest.raises(ValueError, match="at least 2 sections"):
        restore(m, aniso[:1])
    with pytest.raises(ValueError, match="dtype"):
        restore(m, aniso.astype(np.int64))
    with pytest.raises(ValueError, match="steps"):
        restore(m, aniso[:2], steps=0)
    with pytest.raises(ValueError, match="samples"):
        restore(m, aniso[:2], samples=65)
    with pytest.raises(ValueError, match="sampler"):
        restore(m, aniso[:2], sampler="nope")
    with pytest.raises(ValueError, match="input"):
        restore(m, aniso[0])
    with pytest.raises(ModelError, match="denoise"):
        check_model_for_task(m, "denoise")
    with pytest.raises(ModelError, match="factor"):
        check_model_for_task(m, "isotropic", 5)


def test_denoise_and_superres_train_and_restore():
    clean = _smooth_volume((4, 64, 64), seed=5)
    rng = np.random.default_rng(0)
    noisy = np.clip(clean + rng.normal(0, 25, clean.shape), 0, 255).astype(np.uint8)
    t = TaskSpec("denoise")
    m = RestorationModel.create(t, "tiny")
    p = RegisteredPairs(t, noisy, clean)
    m.input_norm, m.target_norm = p.input_norm, p.target_norm
    train(m, p, TrainConfig(steps=30, batch_size=4, patch=32, warmup=5), progress=False)
    r = restore(m, noisy[:2], steps=3, samples=2)
    assert r.mean.shape == (2, 64, 64)

    low = clean[:, ::2, ::2]
    t2 = TaskSpec("superres", 2)
    m2 = RestorationModel.create(t2, "tiny")
    p2 = RegisteredPairs(t2, low, clean)
    m2.input_norm, m2.target_norm = p2.input_norm, p2.target_norm
    train(m2, p2, TrainConfig(steps=10, batch_size=4, patch=32, warmup=5), progress=False)
    r2 = restore(m2, low[:2], steps=2, samples=1)
    assert r2.mean.shape == (2, 64, 64)
    with pytest.raises(ValueError, match="target"):
        RegisteredPairs(t2, low, clean[:, :60])


def test_regression_baseline_and_gap_pairs():
    vol = _smooth_volume((13, 48, 48), seed=2)
    t = TaskSpec("isotropic", 3)
    m = RestorationModel.create(t, "tiny", kind="regression")
    p = StackGapPairs(t, vol[::3], vol[:13])
    train(m, p, TrainConfig(steps=10, batch_size=2, patch=32, warmup=2), progress=False)
    r = restore(m, vol[::3], samples=1)
    assert r.mean.shape == (13, 48, 48) and r.evaluations == 1
    with pytest.raises(ValueError, match="target"):
        StackGapPairs(t, vol[::3], vol[:12])


def test_task_validation_and_seeds():
    with pytest.raises(ValueError, match="factor"):
        TaskSpec("superres", 3)
    with pytest.raises(ValueError, match="task"):
        TaskSpec("deblur")
    assert TaskSpec("isotropic", 5).out_channels == 4
    assert TaskSpec("isotropic", 5).output_sections(10) == 46
    assert derive_seed(1, 2) == derive_seed(1, 2) != derive_seed(2, 1)
