"""Real z, issue 21: the default mean, what its uncertainty costs and how it ranks the error, and
how sharp one sample is — side by side in one run on the FlyEM FIB-SEM cube.

Every 5th slice of the cube is kept (thin slices; 10 × 10 × 50 nm), the tiny model is trained
self-supervised on the kept sections only (or loaded with ``--model``), and everything is scored on
the dropped slices with the definitions of NOTES.md (service/engine/metrics.py):
- the whole cube: linear and cubic interpolation, the mean (default), the mean with the
  uncertainty layer (the error head and the views' disagreement; no extra network evaluations):
  cost (wall time over the mean-only restore, each timed twice), patch Spearman ((k−1) × 16 × 16
  and × 32 × 32 patches), sparsification (RMSE of the 80 % least uncertain voxels over all; the
  oracle that sorts by the true error sets the floor), per-voxel Spearman; each source alone;
- a lateral crop (``--sample-crop``, all z): the mean, one sample (the views' residual draws
  combined variance-preservingly: the default ``sample``), the earlier average of the two views'
  draws, each view's draw alone, and 4 samples (mean of 4, and their spread added to the map):
  PSNR and the z high-frequency power ratio; and the truth's own high-frequency power along y and
  x relative to z (what a model that learns from XY sections can know).
Data: Janelia Research Campus / HHMI FlyEM (CC-BY), ``../shared/data/flyem-fibsem/``.

    python bench/realz_uncertainty.py [--steps 2000] [--model DIR | --save-model DIR] [--sample-crop 96]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from bench.common import machine, today  # noqa: E402
from realz import FLYEM, cubic, linear, read_tif, save_local, train_model  # noqa: E402
from service.engine import metrics  # noqa: E402
from service.engine.model import RestorationModel  # noqa: E402
from service.engine.normalize import IntensityNorm  # noqa: E402
from service.engine.restore import (_Estimator, _estimate_view, combine_views_sample, restore,  # noqa: E402
                                    uncertainty_map)

K = 5
VS = (10.0, 10.0, 10.0 * K)


def quality(out, truth) -> dict:
    gen = np.ones(truth.shape[0], bool)
    gen[::K] = False
    r, t = out[gen].astype(np.float32), truth[gen].astype(np.float32)
    hf, corr = metrics.z_hf_power(out, truth, K)
    return {"psnr": metrics.psnr(r, t, 255.0), "ssim": metrics.ssim(r, t, 255.0), "hf_power": hf, "hf_corr": corr}


def ranking(std, out, truth) -> dict:
    from scipy.stats import spearmanr
    gen = np.ones(truth.shape, bool)
    gen[::K] = False
    rng = np.random.default_rng(0)
    pick = rng.choice(int(gen.sum()), min(1_000_000, int(gen.sum())), replace=False)
    err = np.abs(out.astype(np.float32) - truth.astype(np.float32))
    return {"patch16": metrics.patch_spearman(std, out, truth, K), "patch32": metrics.patch_spearman(std, out, truth, K, 32),
            "sparsification": metrics.sparsification(std, out, truth, K),
            "voxel": float(spearmanr(std[gen][pick], err[gen][pick])[0]),
            "predicted_rms": float(np.sqrt((std[gen].astype(np.float64) ** 2).mean())),
            "rmse": float(np.sqrt((err[gen].astype(np.float64) ** 2).mean()))}


def timed(fn):
    t = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t


def whole_cube(model, kept, truth, log) -> dict:
    res = {"rows": {}, "ranking": {}}
    for name, fn in (("linear interpolation", lambda: linear(kept, K)), ("cubic interpolation", lambda: cubic(kept, K))):
        res["rows"][name] = quality(fn(), truth)
    restore(model, kept[:3, :32, :32], voxel_size_nm=VS)  # warm-up (allocator, layout)
    mean, t1 = timed(lambda: restore(model, kept, voxel_size_nm=VS))
    unc, t2 = timed(lambda: restore(model, kept, voxel_size_nm=VS, uncertainty=True))
    _, t3 = timed(lambda: restore(model, kept, voxel_size_nm=VS))
    _, t4 = timed(lambda: restore(model, kept, voxel_size_nm=VS, uncertainty=True))
    assert np.array_equal(mean.mean, unc.mean)
    res["bit_exact_sources"] = bool(np.array_equal(mean.mean[::K], kept))
    res["rows"]["ours: mean (default)"] = {**quality(mean.mean, truth), "seconds": [t1, t3],
                                           "evals_per_voxel": mean.evaluations_per_voxel}
    res["rows"]["ours: mean + uncertainty layer"] = {**quality(unc.mean, truth), "seconds": [t2, t4],
                                                    "evals_per_voxel": unc.evaluations_per_voxel}
    res["cost"] = (t2 + t4) / (t1 + t3)
    res["needs_finetuning_score"] = unc.score
    for name, std in [("default: error head + views' disagreement", unc.std)] + [
            (f"{k} alone", v) for k, v in (unc.std_parts or {}).items()]:
        res["ranking"][name] = ranking(std, unc.mean, truth)
        log(f"[unc] {name}: {res['ranking'][name]}")
    err2 = (unc.mean.astype(np.float32) - truth.astype(np.float32)) ** 2
    res["oracle_sparsification"] = metrics.sparsification(err2, unc.mean, truth, K)
    from scipy.ndimage import gaussian_filter
    for s in (1.5, 3.0):
        o = np.sqrt(gaussian_filter(err2, s))
        res[f"oracle_sigma{s:g}"] = {"sparsification": metrics.sparsification(o, unc.mean, truth, K),
                                     "patch16": metrics.patch_spearman(o, unc.mean, truth, K)}
    log(f"[unc] cost {res['cost']:.3f} (mean {t1:.1f}/{t3:.1f} s, with uncertainty {t2:.1f}/{t4:.1f} s); "
        f"oracles {res['oracle_sparsification']:.3f} {res.get('oracle_sigma1.5')} {res.get('oracle_sigma3')}")
    return res


@torch.no_grad()
def sample_crop(model, kept, truth, log, seed: int = 1) -> dict:
    """One set of draws per view on the crop, assembled every way the table compares."""
    res = {"rows": {}, "ranking": {}}
    dev = torch.device("cpu")
    norm = IntensityNorm.from_volume(kept)
    vol_n = norm.forward(kept)
    task = model.task

    def out(v):
        o = norm.inverse(v, np.uint8)
        o[::K] = kept
        return o

    for Kd, steps in ((1, 10), (4, 10)):
        est = _Estimator(model, dev, "dpmpp2m", steps, None, 256, 32, 12)
        points, draws, heads, means = {}, {}, {}, {}
        t = time.perf_counter()
        for vi, (name, im) in enumerate(task.images(vol_n)):
            points[name], draws[name], heads[name], means[name] = _estimate_view(
                est, im, vi, "sample" if Kd == 1 else "sample-mean", Kd, seed, 0, max(1, 12 // Kd), None, [0], 1)
        secs = time.perf_counter() - t
        mean_n = task.assemble(means, vol_n)
        if Kd == 1:
            res["rows"]["ours: mean (default)"] = quality(out(mean_n), truth)
            res["rows"]["ours: one sample (default: views' residuals combined, variance kept)"] = {
                **quality(out(combine_views_sample(task, points, means, vol_n)), truth), "seconds": secs}
            res["rows"]["one sample, the two views' draws averaged (before)"] = quality(out(task.assemble(points, vol_n)), truth)
            for v in points:
                res["rows"][f"one sample, {v.upper()} view alone"] = quality(out(task.assemble({v: points[v]}, vol_n)), truth)
            std = uncertainty_map(task, draws, vol_n, heads, means=means)["auto"]
            res["ranking"]["error head + views' disagreement"] = ranking(norm.scale_std(std), out(mean_n), truth)
        else:
            res["rows"]["ours: mean of 4 samples"] = {**quality(out(task.assemble(points, vol_n)), truth), "seconds": secs}
            by = uncertainty_map(task, draws, vol_n, heads, estimate="mean")
            for name, key in (("error head + spread of 4 samples per view", "auto"), ("spread of 4 samples alone", "samples")):
                res["ranking"][name] = ranking(norm.scale_std(by[key]), out(mean_n), truth)
        log(f"[unc] crop, {Kd} sample(s): {secs:.1f} s")
    # the truth's own high-frequency power along the lateral axes, relative to z
    for axis, name in ((1, "y"), (2, "x")):
        res[f"truth_hf_{name}_over_z"] = hf_density(truth, axis) / hf_density(truth, 0)
    return res


def hf_density(vol, axis: int) -> float:
    """Mean power spectral density along ``axis`` (mean removed, Hann window) over the band above
    the source sections' Nyquist, 1/(2k) … 1/2 cycles per voxel: comparable between axes of
    different lengths (a density, not a sum over bins)."""
    a = np.moveaxis(np.asarray(vol, np.float64), axis, 0)
    a = a - a.mean(0, keepdims=True)
    w = np.hanning(a.shape[0]).reshape((-1,) + (1,) * (a.ndim - 1))
    p = (np.abs(np.fft.rfft(a * w, axis=0)) ** 2).mean(axis=tuple(range(1, a.ndim))) / (w ** 2).sum()
    return float(p[np.fft.rfftfreq(a.shape[0]) > 1.0 / (2 * K)].mean())


def report(rep) -> str:
    w = rep["whole"]
    lines = [f"# Real z: uncertainty and sharpness (issue 21)\n\n{rep['date']}, {rep['machine']}, {rep['threads']} torch "
             f"threads. FlyEM FIB-SEM (data: Janelia Research Campus / HHMI FlyEM, CC-BY), every {K}th slice kept "
             f"({rep['shape']} restored, scores over the dropped slices); tiny model, {rep['model']}.\n",
             "## Whole cube\n", "| method | network evals per output voxel | PSNR dB | SSIM | z HF power | seconds |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in w["rows"].items():
        secs = " / ".join(f"{s:.1f}" for s in r.get("seconds", [])) or "-"
        lines.append(f"| {name} | {r.get('evals_per_voxel', 0)} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['hf_power']:.2f} | {secs} |")
    lin = w["rows"]["linear interpolation"]["psnr"]
    lines += ["", f"Mean − linear: **{w['rows']['ours: mean (default)']['psnr'] - lin:+.2f} dB**; sources bit-exact: "
              f"{w['bit_exact_sources']}. Uncertainty layer cost: **{w['cost']:.3f}×** the mean-only restore (each timed "
              f"twice, alternating); needs-fine-tuning score {w['needs_finetuning_score']}.\n",
              "| uncertainty map | patch Spearman 4×16×16 | 4×32×32 | sparsification (80 %) | voxel Spearman | predicted RMS | RMSE |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in w["ranking"].items():
        lines.append(f"| {name} | {r['patch16']:.3f} | {r['patch32']:.3f} | {r['sparsification']:.3f} | {r['voxel']:.3f} | "
                     f"{r['predicted_rms']:.2f} | {r['rmse']:.2f} |")
    o15, o3 = w["oracle_sigma1.5"], w["oracle_sigma3"]
    lines += ["", f"Oracles (know the true error): sorting voxels by it {w['oracle_sparsification']:.3f}; its local RMS over "
              f"σ = 1.5 voxels {o15['sparsification']:.3f} (patch Spearman {o15['patch16']:.3f}), over σ = 3 "
              f"{o3['sparsification']:.3f} ({o3['patch16']:.3f}); random order 1.\n"]
    c = rep.get("crop")
    if c:
        lines += [f"## Lateral crop {rep['sample_crop']}×{rep['sample_crop']} px, all z: samples\n",
                  "| method | PSNR dB | SSIM | z HF power | HF spectral corr. | seconds |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, r in c["rows"].items():
            secs = f"{r['seconds']:.1f}" if "seconds" in r else "-"
            lines.append(f"| {name} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['hf_power']:.2f} | {r['hf_corr']:.3f} | {secs} |")
        lines += ["", "| uncertainty map (crop) | patch Spearman 4×16×16 | 4×32×32 | sparsification | voxel Spearman |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for name, r in c["ranking"].items():
            lines.append(f"| {name} | {r['patch16']:.3f} | {r['patch32']:.3f} | {r['sparsification']:.3f} | {r['voxel']:.3f} |")
        lines.append(f"\nThe truth's own high-frequency power along y and x (same band, same crop) relative to z: "
                     f"{c['truth_hf_y_over_z']:.2f} and {c['truth_hf_x_over_z']:.2f}.")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--model", help="a saved FlyEM k = 5 model (skips training)")
    ap.add_argument("--save-model", help="save the trained model here")
    ap.add_argument("--sample-crop", type=int, default=96, help="lateral crop for the sample rows (0: skip them)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--lateral", type=int, default=0, help="a lateral crop of the cube for everything (0: all of it)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not os.path.exists(FLYEM):
        print(f"[unc] FlyEM data not found at {FLYEM}; nothing to do")
        return 0
    vol = read_tif(FLYEM)
    if a.lateral:
        vol = vol[:, :a.lateral, :a.lateral]
    kept = vol[::K]
    truth = vol[:(kept.shape[0] - 1) * K + 1]
    logs = []

    def log(msg):
        print(msg, flush=True)
        logs.append(msg)

    if a.model:
        model = RestorationModel.load(a.model)
        desc = f"loaded from {os.path.basename(a.model.rstrip('/'))} ({model.training.get('steps')} steps)"
    else:
        model = train_model(kept, K, a.steps, VS)
        desc = f"trained {a.steps} steps self-supervised on the kept sections in {model.training.get('wall_seconds')} s"
        if a.save_model:
            save_local(model, a.save_model)
    log(f"[unc] model {desc}")
    rep = {"date": today(), "machine": machine(), "threads": torch.get_num_threads(), "shape": list(truth.shape),
           "model": desc, "sample_crop": a.sample_crop, "logs": logs}
    rep["whole"] = whole_cube(model, kept, truth, log)
    if a.sample_crop:
        c = a.sample_crop
        rep["crop"] = sample_crop(model, kept[:, :c, :c], truth[:, :c, :c], log)
    text = report(rep)
    print(text)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "realz_uncertainty.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.out, "realz_uncertainty.json"), "w") as f:
        json.dump(rep, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
