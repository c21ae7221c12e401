"""Real-z benchmark: z-restoration of real FIB-SEM with real ground truth, side by side.

FlyEM FIB-SEM cube (10 nm isotropic, Janelia Research Campus / HHMI FlyEM): keep every k-th slice
(acquisition model: thin sections, every k-th slice; voxel 10 × 10 × 10k nm), train the model
self-supervised on the kept sections only, restore z, score the dropped slices against the truth.
Methods in one run: linear and cubic interpolation, a regression UNet (predictor alone, same size
and steps), our estimates (mean = default, one sample, mean of 4 samples; 4 samples give the
uncertainty), and the reference setting (200-step ancestral, one chain per image) on a lateral
subset. Also: the ISBI 2012 lateral-plane table, and the needs-fine-tuning score in and out of
domain.

Metrics over generated (dropped) slices: PSNR, SSIM, the high-frequency z spectrum — power ratio
(restored/true, 1 = as sharp as the truth) and spectral correlation with the truth over the
frequencies above the kept sections' Nyquist (1/2k … 1/2 cycles/voxel; 123 frequency bins along
z at k = 5) — and Spearman's rank correlation between the per-voxel std and the absolute error.

Runs on CPU or CUDA (only numpy, scipy, tifffile, torch needed):

    python bench/realz.py [--steps 2000] [--quick] [--out DIR] [--save-models DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from common import machine  # noqa: E402  (bench/common.py, beside this script)
from service.engine import metrics  # noqa: E402
from service.engine.model import RestorationModel  # noqa: E402
from service.engine.pairs import IsotropicPairs  # noqa: E402
from service.engine.restore import UNCERTAINTY_THRESHOLD, restore  # noqa: E402
from service.engine.tasks import make_task, linear_rows  # noqa: E402
from service.engine.training import TrainConfig, train  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.environ.get("EMRESTORE_DATA", os.path.join(HERE, "..", "..", "shared", "data"))
FLYEM = os.path.join(DATA, "flyem-fibsem", "sample1.tif")
ISBI = os.path.join(DATA, "isbi2012")


def read_tif(path):
    import tifffile
    return np.asarray(tifffile.imread(path))


# ----------------------------------------------------------------------------- baselines
def linear(kept, k):
    return np.clip(np.rint(linear_rows(kept.astype(np.float32), k)), 0, 255).astype(np.uint8)


def cubic(kept, k):
    from scipy.interpolate import CubicSpline
    n = kept.shape[0]
    cs = CubicSpline(np.arange(n) * k, kept.astype(np.float32), axis=0)
    out = np.clip(np.rint(cs(np.arange((n - 1) * k + 1))), 0, 255).astype(np.uint8)
    out[::k] = kept
    return out


# ----------------------------------------------------------------------------- metrics
def z_spectrum(vol, truth, k):
    """High-frequency z spectrum of the restored stack vs the truth: (power ratio, correlation)."""
    a = vol.astype(np.float64)
    b = truth.astype(np.float64)
    a = a - a.mean(0, keepdims=True)
    b = b - b.mean(0, keepdims=True)
    w = np.hanning(a.shape[0])[:, None, None]
    fa = np.fft.rfft(a * w, axis=0)
    fb = np.fft.rfft(b * w, axis=0)
    f = np.fft.rfftfreq(a.shape[0])
    band = f > 1.0 / (2 * k)
    pa = (np.abs(fa[band]) ** 2).sum()
    pb = (np.abs(fb[band]) ** 2).sum()
    cross = (fa[band] * np.conj(fb[band])).real.sum()
    return float(pa / pb), float(cross / np.sqrt(pa * pb)), int(band.sum())


def score(out, truth, k):
    gen = np.ones(truth.shape[0], bool)
    gen[::k] = False
    r, t = out[gen].astype(np.float32), truth[gen].astype(np.float32)
    ratio, corr, bins = z_spectrum(out, truth, k)
    return {"psnr": metrics.psnr(r, t, 255.0), "ssim": metrics.ssim(r, t, 255.0),
            "hf_power": ratio, "hf_corr": corr, "bins": bins}


def spearman(std, out, truth, k, max_n=2_000_000, seed=0):
    from scipy.stats import spearmanr
    gen = np.ones(truth.shape[0], bool)
    gen[::k] = False
    s = std[gen].reshape(-1)
    e = np.abs(out[gen].astype(np.float32) - truth[gen].astype(np.float32)).reshape(-1)
    if s.size > max_n:
        idx = np.random.default_rng(seed).choice(s.size, max_n, replace=False)
        s, e = s[idx], e[idx]
    rho = float(spearmanr(s, e)[0])
    edges = np.quantile(s, np.linspace(0, 1, 11))
    dec = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, 9)
    table = [(float(s[dec == d].mean()), float(e[dec == d].mean()),
              float(np.sqrt((e[dec == d] ** 2).mean()))) for d in range(10)]
    return rho, table


# ----------------------------------------------------------------------------- models
def train_model(kept, k, steps, voxel_size, kind="diffusion", preset="tiny", seed=0, seconds=None,
                device="auto", batch=8, patch=64):
    task = make_task("isotropic", k)
    pairs = IsotropicPairs(task, kept, self_supervised=True, voxel_size_nm=voxel_size)
    m = RestorationModel.create(task, preset, kind=kind, voxel_size_nm=voxel_size, seed=seed)
    m.input_norm = m.target_norm = pairs.norm
    m.gap = {"row_spacing_nm": (voxel_size[2] / k) if voxel_size else None,
             "lateral_nm": min(voxel_size[:2]) if voxel_size else None, "zoom": pairs.zoom,
             "section_thickness": False}
    cfg = TrainConfig(steps=steps, batch_size=batch, patch=patch, lr=1e-3, warmup=min(100, steps // 5 + 1),
                      seed=seed, device=device)
    t0 = time.time()
    stop = None
    if seconds:  # time-limited: measure the step rate on 20 steps, then stop in time
        log = []
        train(m, pairs, cfg, progress=False, mode="self-supervised", stop_at=20, log=log, calibrate=False)
        rate = 20 / (time.time() - t0)
        stop = max(21, min(steps, int(rate * seconds)))
        m = RestorationModel.create(task, preset, kind=kind, voxel_size_nm=voxel_size, seed=seed)
        m.input_norm = m.target_norm = pairs.norm
        cfg.steps = stop
        t0 = time.time()
    train(m, pairs, cfg, progress=False, mode="self-supervised")
    m.training["wall_seconds"] = round(time.time() - t0, 1)
    return m


def save_local(model, path):
    """model directory without fsspec (what RestorationModel.save writes)."""
    import io

    import torch
    os.makedirs(path, exist_ok=True)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    with open(os.path.join(path, "weights.pt"), "wb") as f:
        f.write(buf.getvalue())
    with open(os.path.join(path, "model.json"), "w") as f:
        json.dump(model.metadata(), f, indent=2)


# ----------------------------------------------------------------------------- runs
def run_flyem(k, steps, full, quick, log, save_dir=None, ref_crop=128, device="auto", crop=0, regression=True):
    vol = read_tif(FLYEM)
    if crop:  # a lateral crop (CPU runs): all z, crop × crop pixels
        vol = vol[:, :crop, :crop]
    if quick:
        vol = vol[:, :48, :48]
        ref_crop = 16
    kept = vol[::k]
    Zo = (kept.shape[0] - 1) * k + 1
    truth = vol[:Zo]
    vs = (10.0, 10.0, 10.0 * k)
    res = {"k": k, "kept_sections": int(kept.shape[0]), "shape": list(truth.shape), "rows": [], "subset_rows": []}

    def row(name, out, secs, evals, rows=res["rows"], tr=truth):
        sc = score(out, tr, k)
        sc.update(method=name, seconds=round(secs, 1), evals_per_voxel=evals)
        rows.append(sc)
        log(f"[realz] k={k} {name}: PSNR {sc['psnr']:.2f} SSIM {sc['ssim']:.3f} HF power {sc['hf_power']:.2f} "
            f"HF corr {sc['hf_corr']:.3f} ({secs:.1f} s)")
        return sc

    t = time.time()
    lin = linear(kept, k)
    row("linear interpolation", lin, time.time() - t, 0)
    t = time.time()
    row("cubic interpolation", cubic(kept, k), time.time() - t, 0)
    model = train_model(kept, k, steps, vs, device=device)
    res["train_seconds"] = model.training.get("wall_seconds")
    res["calibration"] = model.calibration
    log(f"[realz] k={k} trained diffusion model ({steps} steps) in {res['train_seconds']} s; calibration {model.calibration}")
    if save_dir:
        save_local(model, os.path.join(save_dir, f"flyem-k{k}"))
    if full and regression:
        reg = train_model(kept, k, steps, vs, kind="regression", device=device)
        t = time.time()
        r = restore(reg, kept, voxel_size_nm=vs, device=device)
        row("regression UNet (predictor alone, L2, same size/steps)", r.mean, time.time() - t, r.evaluations_per_voxel)
    t = time.time()
    r = restore(model, kept, voxel_size_nm=vs, device=device)
    res["bit_exact_sources"] = bool(np.array_equal(r.mean[::k], kept))
    row("ours: mean (default, predictor)", r.mean, time.time() - t, r.evaluations_per_voxel)
    mean_out = r.mean
    t = time.time()
    r4 = restore(model, kept, samples=4, seed=1, voxel_size_nm=vs, device=device)
    row("ours: mean + uncertainty (4 samples)", r4.mean, time.time() - t, r4.evaluations_per_voxel)
    rho, dec = spearman(r4.std, r4.mean, truth, k)
    res["spearman_mean_4"] = rho
    res["deciles"] = dec
    res["score_in_domain"] = r4.score
    res["uncertainty_source"] = ("error head and spread of the samples" if model.has_error_head
                                 else "spread of the samples")
    log(f"[realz] k={k} Spearman(std, |error|) = {rho:.3f} ({res['uncertainty_source']}); "
        f"needs-fine-tuning score {r4.score:.3f}")
    for src, std_alone in (r4.std_parts or {}).items():  # the same samples, each source alone
        res[f"spearman_mean_4_{src}"], res[f"deciles_{src}"] = spearman(std_alone, r4.mean, truth, k)
        log(f"[realz] k={k} Spearman({src} alone, |error|) = {res[f'spearman_mean_4_{src}']:.3f}")
    std_out = r4.std
    sample_out = None
    if full:
        t = time.time()
        r = restore(model, kept, samples=1, estimate="sample", seed=1, voxel_size_nm=vs, device=device)
        row("ours: one sample (10-step DPM-Solver++)", r.mean, time.time() - t, r.evaluations_per_voxel)
        sample_out = r.mean
        t = time.time()
        r = restore(model, kept, samples=4, estimate="sample-mean", seed=1, voxel_size_nm=vs, device=device)
        row("ours: mean of 4 samples", r.mean, time.time() - t, r.evaluations_per_voxel)
        rho_s, _ = spearman(r.std, r.mean, truth, k)
        res["spearman_sample_mean_4"] = rho_s
    if full and ref_crop:
        # reference setting on a lateral subset: 200-step ancestral, one chain per image
        c = ref_crop
        sub_kept, sub_truth = kept[:, :c, :c], truth[:, :c, :c]
        sub = res["subset_rows"]
        row("linear interpolation", lin[:, :c, :c], 0, 0, sub, sub_truth)
        t = time.time()
        r = restore(model, sub_kept, voxel_size_nm=vs, device=device)
        row("ours: mean (default)", r.mean, time.time() - t, r.evaluations_per_voxel, sub, sub_truth)
        t = time.time()
        r = restore(model, sub_kept, estimate="sample", seed=1, voxel_size_nm=vs, device=device)
        row("ours: one sample (10-step DPM-Solver++)", r.mean, time.time() - t, r.evaluations_per_voxel, sub, sub_truth)
        t = time.time()
        r = restore(model, sub_kept, estimate="sample", sampler="ddpm", steps=200, seed=1, voxel_size_nm=vs,
                    device=device)
        row("reference setting: 200-step ancestral, one chain", r.mean, time.time() - t,
            r.evaluations_per_voxel, sub, sub_truth)
        res["subset"] = f"lateral crop {c}×{c} px, all {Zo} z"
    res["model"] = model
    return res, kept, truth, lin, mean_out, sample_out, std_out


#: the ISBI proxy restores y from every k-th y plane of a (y, z, x) stack: its XZ view (rows y,
#: columns x) is an XY section with rows removed, the training task; its YZ view's columns are
#: the 50 nm sections, which the model never saw, so the proxy restores with the XZ view alone
ISBI_VIEWS = ("xz",)


def run_isbi_lateral(k, steps, quick, log, device="auto", save_dir=None):
    """ISBI 2012 ssTEM: train on XY sections of the train stack (no voxel size: rows at the
    lateral pixel, the geometry of this proxy), restore held-out y planes of the test stack
    (``ISBI_VIEWS``)."""
    tr = read_tif(os.path.join(ISBI, "train-volume.tif"))
    te = read_tif(os.path.join(ISBI, "test-volume.tif"))
    if quick:
        tr, te = tr[:, :64, :64], te[:, :64, :64]
    n_planes = (4 if quick else 16) * k + 1
    view = np.ascontiguousarray(te.transpose(1, 0, 2)[:n_planes])  # (y, z, x)
    aniso, truth = view[::k], view
    out = {"rows": []}
    model = train_model(tr, k, steps, None, device=device)
    reg = train_model(tr, k, steps, None, kind="regression", device=device)
    if save_dir:
        save_local(model, os.path.join(save_dir, f"isbi-k{k}"))
        save_local(reg, os.path.join(save_dir, f"isbi-k{k}-regression"))
    v = ISBI_VIEWS
    for name, fn in (("linear interpolation", lambda: linear(aniso, k)), ("cubic interpolation", lambda: cubic(aniso, k)),
                     ("regression UNet (L2, same size/steps)", lambda: restore(reg, aniso, device=device, views=v).mean),
                     ("ours: mean (default)", lambda: restore(model, aniso, device=device, views=v).mean),
                     ("ours: mean, both views (the YZ view's columns are 50 nm z)",
                      lambda: restore(model, aniso, device=device).mean),
                     ("ours: one sample", lambda: restore(model, aniso, estimate="sample", seed=1, device=device,
                                                          views=v).mean),
                     ("ours: mean of 4 samples", lambda: restore(model, aniso, estimate="sample-mean", samples=4,
                                                                 seed=1, device=device, views=v).mean)):
        t = time.time()
        o = fn()
        sc = score(o, truth, k)
        sc.update(method=name, seconds=round(time.time() - t, 1))
        out["rows"].append(sc)
        log(f"[realz] ISBI lateral {name}: PSNR {sc['psnr']:.2f}")
    r = restore(model, aniso, samples=4, seed=1, device=device, views=v)
    out["score_in_domain"] = r.score
    out["model"] = model
    out["aniso"] = aniso
    return out


def fmt_rows(rows, hdr_extra=True):
    lines = ["| method | network evals per output voxel | PSNR dB | SSIM | HF power ratio (1 = truth) | HF spectral corr. | seconds |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r.get('evals_per_voxel', '-')} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
                     f"{r['hf_power']:.2f} | {r['hf_corr']:.3f} | {r['seconds']} |")
    return "\n".join(lines)


def picture(path, kept, truth, lin, mean, sample, std, k, y=None, npz=None):
    y = truth.shape[1] // 2 if y is None else y
    if npz:  # the XZ slices, so the picture can be drawn where matplotlib is
        np.savez_compressed(npz, kept=kept[:, y], truth=truth[:, y], lin=lin[:, y], mean=mean[:, y],
                            sample=sample[:, y] if sample is not None else np.zeros(0), std=std[:, y], k=k)
    draw_picture(path, np.load(npz) if npz else dict(kept=kept[:, y], truth=truth[:, y], lin=lin[:, y],
                 mean=mean[:, y], sample=sample[:, y] if sample is not None else np.zeros(0), std=std[:, y], k=k))


def draw_picture(path, d):
    """The XZ panels side by side (PIL through service.viz, so any machine draws it): the kept
    sections on the output grid, linear, our mean, one sample, the truth, and the uncertainty."""
    from service.viz import heat8, panels_png, to_gray8
    k = int(d["k"])
    truth = d["truth"]
    x1, z1 = min(truth.shape[1], 160), min(truth.shape[0], 120)
    gray = lambda a: to_gray8(a[:z1, :x1], 0, 255)  # noqa: E731 - the same grey scale in every panel
    panels = [(f"input: every {k}th slice", gray(np.repeat(d["kept"], k, 0)[:truth.shape[0]])),
              ("linear interpolation", gray(d["lin"])), ("ours: mean (default)", gray(d["mean"]))]
    if d["sample"].size:
        panels.append(("ours: one sample", gray(d["sample"])))
    std = d["std"][:z1, :x1]
    gen = std[std > 0]  # source sections carry no uncertainty (drawn black)
    lo, hi = (np.percentile(gen, 1), np.percentile(gen, 99)) if gen.size else (0.0, 1.0)
    panels += [("ground truth", gray(truth)),
               (f"uncertainty (std {lo:.0f}-{hi:.0f})", heat8(np.where(std > 0, np.clip(std - lo, 0, None) + 1e-3, 0),
                                                             hi - lo))]
    panels_png(path, panels, scale=2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ks", default="5,3,8", help="factors; the first gets every method")
    ap.add_argument("--no-isbi", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--picture", default=os.path.join(HERE, "..", "docs", "img", "realz_xz.png"))
    ap.add_argument("--save-models")
    ap.add_argument("--base-seconds", type=float, default=0, help="also train the base preset this long (GPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--crop", type=int, default=0, help="FlyEM lateral crop in pixels (0: the whole 250²)")
    ap.add_argument("--ref-crop", type=int, default=128,
                    help="lateral crop of the 200-step reference subset (200 evaluations per image; 0: skip it)")
    ap.add_argument("--no-regression", action="store_true", help="skip the regression baseline (CPU runs)")
    ap.add_argument("--no-flyem", action="store_true",
                    help="skip the FlyEM tables (ISBI and the needs-fine-tuning table only)")
    ap.add_argument("--flyem-model", help="with --no-flyem: a FlyEM k=5 model saved by --save-models, for "
                                          "the needs-fine-tuning table (in and out of domain)")
    ap.add_argument("--picture-from", help="draw the XZ picture from saved slices (realz_xz_slices.npz) and stop")
    a = ap.parse_args(argv)
    if a.picture_from:
        draw_picture(a.picture, np.load(a.picture_from))
        print(f"[realz] wrote {a.picture}")
        return 0
    if not os.path.exists(FLYEM):
        print(f"[realz] FlyEM data not found at {FLYEM}; nothing to do")
        return 0
    os.makedirs(a.out, exist_ok=True)
    steps = min(a.steps, 40) if a.quick else a.steps
    logs = []

    def log(msg):
        print(msg, flush=True)
        logs.append(msg)

    summary = {"date": dt.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
               "steps": steps, "crop": a.crop, "preset": "tiny", "flyem": [], "isbi": None}
    if a.no_flyem:  # only the ISBI lateral proxy (its section says what it scores)
        text = [f"# Real-z benchmark: ISBI lateral proxy only\n\n{summary['date']}, {summary['machine']}; "
                f"tiny preset, {steps} training steps per model (batch 8, 64 px patches).\n"]
    else:
        text = [f"# Real-z benchmark\n\n{summary['date']}, {summary['machine']}; tiny preset, {steps} training "
                f"steps per model (batch 8, 64 px patches), self-supervised on the kept sections only. "
                f"Acquisition model: every k-th slice of the FlyEM FIB-SEM cube (data: Janelia Research "
                f"Campus / HHMI FlyEM, CC-BY). Scores over the dropped slices."
                + (f" FlyEM lateral crop {a.crop}×{a.crop} px (all z)." if a.crop else "") + "\n"]
    ks = [int(v) for v in a.ks.split(",")]

    def flush():  # partial results survive a run cut short
        with open(os.path.join(a.out, "realz.md"), "w") as f:
            f.write("\n".join(text) + "\n")
        with open(os.path.join(a.out, "realz.json"), "w") as f:
            json.dump(summary, f, indent=1, default=float)

    models = {}
    if a.no_flyem:
        ks = []
        if a.flyem_model:
            from service.engine.model import RestorationModel
            vol = read_tif(FLYEM)
            fkept = (vol[:, :a.crop, :a.crop] if a.crop else vol)[::5]
            fm = RestorationModel.load(a.flyem_model)
            models[5] = (fm, fkept)
            score_in = restore(fm, fkept, samples=4, seed=1, device=a.device).score
            summary["flyem"].append({"score_in_domain": score_in, "model": a.flyem_model})
            log(f"[realz] FlyEM model {a.flyem_model} on its own data: needs-fine-tuning score {score_in:.3f}")
    for i, k in enumerate(ks):
        res, kept, truth, lin, mean, sample, std = run_flyem(k, steps, i == 0, a.quick, log, a.save_models,
                                                             device=a.device, crop=a.crop, ref_crop=a.ref_crop,
                                                             regression=not a.no_regression)
        models[k] = (res.pop("model"), kept)
        summary["flyem"].append(res)
        text.append(f"\n## FlyEM, k = {k} ({res['kept_sections']} kept sections → {res['shape'][0]} slices)\n")
        text.append(fmt_rows(res["rows"]))
        lin_psnr = res["rows"][0]["psnr"]
        mean_row = [r for r in res["rows"] if r["method"].startswith("ours: mean (default")][0]
        text.append(f"\nDefault output − linear: **{mean_row['psnr'] - lin_psnr:+.2f} dB**. "
                    f"Source sections bit-exact: {res['bit_exact_sources']}. "
                    f"Spearman(uncertainty, |error|) over generated voxels: **{res['spearman_mean_4']:.3f}** "
                    f"({res['uncertainty_source']})"
                    + (f"; the smoothed spread of the 4 samples alone: {res['spearman_mean_4_samples']:.3f}, "
                       f"the error head alone: {res['spearman_mean_4_head']:.3f}"
                       if 'spearman_mean_4_samples' in res else "")
                    + (f"; mean-of-4 estimate: {res['spearman_sample_mean_4']:.3f}" if 'spearman_sample_mean_4' in res else "")
                    + f". Training took {res['train_seconds']} s.\n")
        if res.get("subset_rows"):
            text.append(f"\nReference setting on a subset ({res['subset']}):\n")
            text.append(fmt_rows(res["subset_rows"]))
        if i == 0:
            text.append("\nError by uncertainty decile (k = %d, 4 samples; grey levels):\n" % k)
            text.append("| std decile | mean std | mean abs. error | RMSE |\n| ---: | ---: | ---: | ---: |")
            for d, (s, e, rm) in enumerate(res["deciles"]):
                text.append(f"| {d + 1} | {s:.1f} | {e:.1f} | {rm:.1f} |")
            try:
                os.makedirs(os.path.dirname(a.picture), exist_ok=True)
                picture(a.picture, kept, truth, lin, mean, sample, std, k,
                        npz=os.path.join(a.out, "realz_xz_slices.npz"))
                log(f"[realz] wrote {a.picture}")
            except Exception as e:  # noqa: BLE001 - matplotlib may be absent; slices are saved
                log(f"[realz] no picture: {e!r}")
        flush()
    try:
        isbi_and_base(a, steps, log, text, summary, models)
    except Exception as e:  # noqa: BLE001 - keep the FlyEM results of a long run
        import traceback
        log(f"[realz] ISBI/base part failed: {e!r}\n{traceback.format_exc()}")
    flush()
    print("\n".join(text))
    return 0


def isbi_and_base(a, steps, log, text, summary, models):
    unc = []
    if not a.no_isbi and os.path.exists(os.path.join(ISBI, "test-volume.tif")):
        iso = run_isbi_lateral(5, steps, a.quick, log, device=a.device, save_dir=a.save_models)
        im = iso.pop("model")
        aniso = iso.pop("aniso")
        summary["isbi"] = iso
        text.append("\n## ISBI 2012 ssTEM, held-out lateral (y) planes of the test stack, k = 5\n")
        text.append("Trained on XY sections of the train stack with rows at the lateral pixel (this proxy's "
                    "geometry); it tests the training task on new data, not real z. The proxy restores y "
                    "from every 5th y plane of a (y, z, x) stack: its XZ view is an XY section with rows "
                    "removed (the training task), its YZ view's columns are the 50 nm sections, so our rows "
                    "use the XZ view alone (`views=(\"xz\",)`); one row shows both views averaged.\n")
        text.append(fmt_rows(iso["rows"]))
        lin_p = iso["rows"][0]["psnr"]
        text.append(f"\nDefault output − linear: **{iso['rows'][3]['psnr'] - lin_p:+.2f} dB**; regression "
                    f"baseline − linear: {iso['rows'][2]['psnr'] - lin_p:+.2f} dB.\n")
        if 5 in models:
            fm, fkept = models[5]
            unc = [["FlyEM k=5 model on FlyEM (in domain)", summary["flyem"][0]["score_in_domain"]],
                   ["ISBI model on ISBI test planes (in domain)", iso["score_in_domain"]],
                   ["FlyEM model on ISBI test planes (out of domain)",
                    restore(fm, aniso, samples=4, seed=1, device=a.device, views=ISBI_VIEWS).score],
                   ["ISBI model on FlyEM (out of domain)",
                    restore(im, fkept, samples=4, seed=1, device=a.device).score]]
            summary["needs_finetuning"] = unc
            text.append("\n## Needs-fine-tuning score (the error head's calibration on rows cut from the input; "
                        "cutouts and the previous score: bench/domain_check.py)\n")
            text.append(f"| case | score | threshold {UNCERTAINTY_THRESHOLD} |\n| --- | ---: | --- |")
            for n, s in unc:
                text.append(f"| {n} | {s:.3f} | {'flag' if s > UNCERTAINTY_THRESHOLD else 'ok'} |")
    if a.base_seconds > 0 and 5 in models:
        _, fkept = models[5]
        vol = read_tif(FLYEM)
        k = 5
        truth = vol[:(fkept.shape[0] - 1) * k + 1]
        bm = train_model(fkept, k, 100000, (10.0, 10.0, 50.0), preset="base", seconds=a.base_seconds,
                         device=a.device, batch=16, patch=128)
        t = time.time()
        r = restore(bm, fkept, device=a.device)
        sc = score(r.mean, truth, k)
        steps_done = bm.training.get("steps")
        sps = steps_done / max(1e-9, bm.training.get("wall_seconds", 1))
        summary["base"] = {"steps": steps_done, "seconds": bm.training.get("wall_seconds"),
                           "steps_per_s": sps, "psnr": sc["psnr"], "restore_seconds": time.time() - t,
                           "params": bm.num_parameters}
        log(f"[realz] base preset: {steps_done} steps in {bm.training.get('wall_seconds')} s; PSNR {sc['psnr']:.2f}")
        text.append(f"\n## base preset (GPU run)\n\nbase preset ({bm.num_parameters / 1e6:.1f} M parameters), "
                    f"batch 16 × 128 px, {steps_done} steps in {bm.training.get('wall_seconds')} s "
                    f"({sps:.1f} steps/s), FlyEM k = 5: default output PSNR {sc['psnr']:.2f} dB "
                    f"(linear {summary['flyem'][0]['rows'][0]['psnr']:.2f}); restore {time.time() - t:.1f} s.\n")


if __name__ == "__main__":
    sys.exit(main())
