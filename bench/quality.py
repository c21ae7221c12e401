"""Quality benchmark: our few-step sampler vs the reference setting and classical baselines.

Side by side on the same data in one run:
- linear and cubic interpolation;
- a regression UNet of the same size and training budget (CARE-style, L1);
- our diffusion model with the default sampler at several step counts, one sample and mean of K;
- the same model with 200-step ancestral sampling (the reference setting);
on (a) a synthetic phantom with isotropic ground truth (z-restoration) and (b) real ssTEM (ISBI
2012, when ../shared/data/isbi2012 is present): self-supervised training on the train stack,
evaluation on held-out lateral planes of the test stack. Also: tile-border vs interior error
(seams) and the uncertainty score in and out of the training domain.

    python bench/quality.py [--steps 1500] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.common import Timer, cubic_interp, isbi_stacks, linear_interp, machine, table, today, write_report  # noqa: E402
from service.engine import metrics, phantom  # noqa: E402
from service.engine.model import RestorationModel  # noqa: E402
from service.engine.pairs import IsotropicPairs  # noqa: E402
from service.engine.restore import UNCERTAINTY_THRESHOLD, restore  # noqa: E402
from service.engine.tasks import make_task  # noqa: E402
from service.engine.training import TrainConfig, train  # noqa: E402


def train_pair(train_stack, k, steps, preset, seed=0):
    """A diffusion model and a regression UNet, same preset and budget, self-supervised."""
    task = make_task("isotropic", k)
    out = {}
    for kind in ("diffusion", "regression"):
        m = RestorationModel.create(task, preset, kind=kind, seed=seed)
        pairs = IsotropicPairs(task, train_stack, self_supervised=True)
        m.input_norm = m.target_norm = pairs.norm
        with Timer() as t:
            train(m, pairs, TrainConfig(steps=steps, batch_size=8, patch=48, lr=2e-3, warmup=100, seed=seed),
                  progress=False, mode="self-supervised")
        print(f"[quality] trained {kind} {preset} for {steps} steps in {t.seconds:.0f} s", flush=True)
        out[kind] = m
    return out


def score(restored, truth, k, pixel_nm):
    gen = np.ones(truth.shape[0], bool)
    gen[::k] = False
    r = restored[gen].astype(np.float32)
    t = truth[gen].astype(np.float32)
    psnr = metrics.psnr(r, t, 255.0)
    ssim = metrics.ssim(r, t, 255.0)
    # FRC between the generated sections and the true ones (curve averaged over sections)
    res = metrics.frc_resolution(r, t, pixel_size=pixel_nm)
    return psnr, ssim, res


def evaluate(label, models, aniso, truth, k, pixel_nm, quick):
    rows = []
    gaps = aniso.shape[0] - 1
    for name, fn in (("linear interpolation", linear_interp), ("cubic interpolation", cubic_interp)):
        with Timer() as t:
            out = fn(aniso, k)
        rows.append([name, 0, *score(np.clip(np.rint(out), 0, 255), truth, k, pixel_nm), t.seconds])
    with Timer() as t:
        r = restore(models["regression"], aniso)
    rows.append(["regression UNet (L1, same size/budget)", 1, *score(r.mean, truth, k, pixel_nm), t.seconds])
    diff = models["diffusion"]
    settings = [("dpmpp2m", 5, 1), ("dpmpp2m", 10, 1), ("dpmpp2m", 20, 1), ("ddim", 10, 1),
                ("dpmpp2m", 10, 4), ("dpmpp2m", 10, 8)]
    settings.append(("ddpm", 50 if quick else 200, 1))
    scores = {}
    for sampler, steps, K in settings:
        with Timer() as t:
            r = restore(diff, aniso, sampler=sampler, steps=steps, samples=K, seed=1,
                        estimate="sample" if K == 1 else "sample-mean")
        label_s = f"diffusion {sampler} {steps} steps" + (f", mean of {K}" if K > 1 else "")
        rows.append([label_s, steps, *score(r.mean, truth, k, pixel_nm), t.seconds])
        if r.score is not None:
            scores[(sampler, steps, K)] = r.score
        print(f"[quality] {label}: {label_s}: PSNR {rows[-1][2]:.2f} dB ({t.seconds:.0f} s)", flush=True)
    hdr = ["method", "network evals per gap", "PSNR dB", "SSIM", "FRC resolution of generated sections (nm, 1/7)",
           "seconds"]
    return table(hdr, rows, f"{label}: {gaps} gaps, factor {k}"), rows, scores


def seams(model, aniso, truth, k):
    """Error at tile borders vs interior with small tiles (64 px, 16 px overlap)."""
    r = restore(model, aniso, samples=4, seed=3, tile=64, overlap=16)
    gen = np.ones(truth.shape[0], bool)
    gen[::k] = False
    err = np.abs(r.mean[gen].astype(np.float32) - truth[gen].astype(np.float32)).mean(0)
    b, i = metrics.border_interior_error(err, 64, 16)
    return b, i


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500, help="training steps for each model")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--quick", action="store_true", help="small data, short training (smoke run)")
    a = ap.parse_args(argv)
    k = 5
    steps = 60 if a.quick else a.steps
    text = [f"Quality benchmark, {today()}, {machine()}; preset {a.preset}, {steps} training steps per model, "
            f"self-supervised (no ground truth seen in training).\n"]
    # (a) phantom with isotropic ground truth: restore along z
    shape = (21, 64, 64) if a.quick else (81, 192, 192)
    iso = phantom.make_phantom(shape, seed=11)
    aniso = phantom.to_uint8(phantom.thick_sections(iso, k, mode="sample"))
    truth = phantom.to_uint8(iso[:(aniso.shape[0] - 1) * k + 1])
    ph_models = train_pair(aniso, k, steps, a.preset)
    t, rows_ph, sc_ph = evaluate("Phantom (z-restoration, 8 nm voxels, k = 5)", ph_models, aniso, truth, k, 8.0, a.quick)
    text.append(t)
    b, i = seams(ph_models["diffusion"], aniso, truth, k)
    text.append(table(["tile border error", "interior error", "ratio"], [[b, i, b / i]],
                      "Seams: mean absolute error within 2 px of tile borders vs elsewhere (64 px tiles, 16 px overlap)"))
    unc_rows = [["phantom model on phantom (in domain)", sc_ph.get(("dpmpp2m", 10, 4))]]
    # (b) real EM: ISBI 2012, self-supervised on the train stack, held-out lateral planes of the test stack
    stacks = isbi_stacks()
    if stacks is None:
        text.append("ISBI 2012 data not found (../shared/data/isbi2012): real-EM rows skipped.\n")
    else:
        train_stack, test_stack = stacks
        if a.quick:
            train_stack, test_stack = train_stack[:, :128, :128], test_stack[:, :128, :128]
        n_planes = (8 if a.quick else 16) * k + 1
        view = test_stack.transpose(1, 0, 2)[:n_planes]  # (y, z, x): y planes are Z×X images
        em_aniso, em_truth = view[::k], view
        em_models = train_pair(train_stack, k, steps, a.preset)
        t, rows_em, sc_em = evaluate("ISBI 2012 ssTEM (held-out y planes of the test stack, 4 nm, k = 5)",
                                     em_models, em_aniso, em_truth, k, 4.0, a.quick)
        text.append(t)
        unc_rows.append(["ISBI model on ISBI test stack (in domain)", sc_em.get(("dpmpp2m", 10, 4))])
        r = restore(ph_models["diffusion"], em_aniso, samples=4, seed=1)
        unc_rows.append(["phantom model on ISBI (out of domain)", r.score])
        r = restore(em_models["diffusion"], aniso, samples=4, seed=1)
        unc_rows.append(["ISBI model on phantom (out of domain)", r.score])
    unc_rows = [[n, s, "flag" if s is not None and s > UNCERTAINTY_THRESHOLD else "ok"] for n, s in unc_rows]
    text.append(table(["case", "uncertainty score (mean of 4)", f"threshold {UNCERTAINTY_THRESHOLD}"], unc_rows,
                      "Uncertainty score in and out of the training domain"))
    write_report("quality", "\n".join(text))


if __name__ == "__main__":
    main()
