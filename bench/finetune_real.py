"""Fine-tuning from one image pair on real EM: a denoise model trained on one volume (FlyEM FIB-SEM,
10 nm, ``denoise_real.py --save-model DIR``) fine-tuned with one (noisy, clean) section of another
(ISBI 2012 ssTEM, 4 nm; a new sample and pixel size, imaged through the same calibrated SEM noise
model at the same dose), scored before and after on held-out sections of the other volume, beside
the same budget spent training from scratch on that one pair and BM3D (no training).

Fine-tuning uses the engine's ``emrestore finetune`` settings (300 steps, lr 2e-4, batch 8, 64² px):
the pair is the first section of the ISBI train stack; scores on ``--test-sections`` sections of the
test stack.

    python bench/finetune_real.py --base DIR [--steps 300] [--snr 2] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import em_common as E  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="our FlyEM denoise model (denoise_real.py --save-model); absent: trained here")
    ap.add_argument("--base-steps", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--snr", type=float, default=2.0)
    ap.add_argument("--test-sections", type=int, default=8)
    ap.add_argument("--crop", type=int, default=256, help="lateral crop of the scored sections (px)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-anchors", action="store_true")
    ap.add_argument("--out", default=E.RESULTS)
    ap.add_argument("--picture", default=os.path.join(E.IMG, "finetune_real.png"))
    a = ap.parse_args(argv)
    threads = E.set_threads(a.threads)
    if not os.path.exists(os.path.join(E.ISBI, "train-volume.tif")):
        print(f"[bench] ISBI data not found at {E.ISBI}; nothing to do")
        return 0
    from anchors import have_anchors
    from service.engine.model import RestorationModel
    from service.engine.noise import denoise_pairs
    from service.engine.pairs import RegisteredPairs
    from service.engine.restore import restore
    from service.engine.tasks import make_task
    from service.engine.training import TrainConfig, train
    vol = E.flyem()
    noise, _ = E.noise_model(vol)
    tr = E.read_tif(os.path.join(E.ISBI, "train-volume.tif"))
    te = E.read_tif(os.path.join(E.ISBI, "test-volume.tif"))
    steps = min(a.steps, 20) if a.quick else a.steps
    c = 64 if a.quick else a.crop
    pair_clean = tr[:1]
    test_clean = te[np.linspace(0, te.shape[0] - 1, 2 if a.quick else a.test_sections).round().astype(int), :c, :c]
    dose = noise.dose_for_snr(pair_clean, a.snr)
    pair_noisy = noise.simulate(pair_clean, dose, seed=5)
    test_noisy = noise.simulate(test_clean, dose, seed=6)
    task = make_task("denoise")
    if a.base:
        base = RestorationModel.load(a.base)
        base_src = a.base
    else:
        fl = vol[E.TRAIN_Z[0]:E.TRAIN_Z[1]]
        if a.quick:
            fl = fl[::6, :96, :96]
        snrs = (1.0, 2.0, 4.0)
        n, cl, _ = denoise_pairs(noise, fl, [noise.dose_for_snr(fl, s) for s in snrs], seed=0)
        base = E.train_ours(task, RegisteredPairs(task, n, cl), min(a.base_steps, 30) if a.quick else a.base_steps)
        base_src = f"trained here ({base.training.get('steps')} steps)"
    name = "finetune_real_quick" if a.quick else "finetune_real"
    rep = E.Report(name, "Fine-tuning from one image pair on real EM (FlyEM → ISBI 2012)", a.out)
    rep.note(f"Base: our tiny denoise model trained on FlyEM FIB-SEM ({E.FLYEM_CREDIT}; 10 nm; SNR 1, 2, 4 mixed), "
             f"{base_src}. New volume: ISBI 2012 ssTEM ({E.ISBI_CREDIT}; 4 nm) through the same calibrated SEM "
             f"noise model at SNR {a.snr:g} (dose {dose:.3f}). One pair: section 0 of the train stack "
             f"({pair_clean.shape[1]}×{pair_clean.shape[2]} px). Scored on {test_clean.shape[0]} sections of the "
             f"test stack ({c}×{c} px crops). Fine-tune: {steps} steps × batch 8 × 64², lr 2e-4 (the "
             f"`emrestore finetune` defaults); from scratch on the pair: the same steps at the training lr "
             f"1e-3. Torch threads {threads}. Intensities: every model sees the pair's normalisation.")
    pairs = RegisteredPairs(task, pair_noisy, pair_clean)
    outs = {"noisy input": (test_noisy.astype(np.float32), 0.0)}

    def run(label, m, **kw):
        t = time.time()
        outs[label] = (restore(m, test_noisy, norm=pairs.input_norm, out_dtype=np.float32, **kw).mean, time.time() - t)

    # before: the base model, on the new volume (its own input→target mapping, the pair's intensity frame)
    run("before: FlyEM model (mean)", base)
    ft = RestorationModel.load(a.base) if a.base else base
    ft.input_norm, ft.target_norm = pairs.input_norm, pairs.target_norm
    ft.training = {"base": {"url": base_src}}
    t0 = time.time()
    train(ft, pairs, TrainConfig(steps=steps, batch_size=8, patch=64, lr=2e-4, warmup=min(100, max(1, steps // 5)),
                                 seed=0), progress=False, mode="finetune")
    ft_secs = time.time() - t0
    run("after: fine-tuned on one pair (mean)", ft)
    run("after: fine-tuned on one pair (one sample)", ft, estimate="sample", seed=1)
    scratch = E.train_ours(task, pairs, steps)
    run("from scratch on the one pair, same steps (mean)", scratch)
    if not a.no_anchors and have_anchors():
        from anchors import bm3d_vst
        t = time.time()
        outs["BM3D (GAT, scan-line PSD; no training)"] = (bm3d_vst(test_noisy, noise, dose), time.time() - t)
    rows, raw = [], {}
    for label, (o, secs) in outs.items():
        sc = E.scores(o, test_clean, 4.0)
        raw[label] = sc
        rows.append([label, round(sc["psnr"], 2), round(sc["ssim"], 3), round(sc["hf_ratio"], 2),
                     round(sc["frc_nm"], 1), round(secs, 1)])
    rep.table(f"ISBI test sections, SNR {a.snr:g}", ["method", "PSNR dB", "SSIM",
              f"HF power ratio ({E.HF_BAND[0]}–{E.HF_BAND[1]} c/px; clean = 1)", "FRC resolution vs clean (nm, 1/7)",
              "seconds (inference)"], rows, key="finetune", raw=raw)
    gain = raw["after: fine-tuned on one pair (mean)"]["psnr"] - raw["before: FlyEM model (mean)"]["psnr"]
    rep.note(f"Fine-tuning: **{gain:+.2f} dB** on the new volume ({ft_secs:.0f} s for {steps} steps; from scratch "
             f"on the same pair and steps: {scratch.training['wall_seconds']} s).", gain_db=gain, finetune_seconds=ft_secs)
    y0 = max(0, c // 2 - 44)
    sl = (0, slice(y0, y0 + 88), slice(y0, y0 + 88))
    panels = [("noisy", outs["noisy input"][0][sl])]
    for key, title in (("before", "before (FlyEM model)"), ("after: fine-tuned on one pair (mean)", "after fine-tune"),
                       ("from scratch", "scratch, 1 pair"), ("BM3D", "BM3D")):
        for label, (o, _) in outs.items():
            if label.startswith(key):
                panels.append((title, o[sl]))
                break
    panels.append(("clean (real EM)", test_clean[sl]))
    E.crops_png(a.picture if not a.quick else a.picture.replace(".png", "_quick.png"), panels)
    print("\n".join(rep.lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
