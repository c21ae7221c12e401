"""Does the needs-fine-tuning score separate a model used out of its domain from hard data?

Two models saved by ``bench/realz.py --save-models DIR`` (tiny preset, self-supervised, k = 5):
one trained on the FlyEM FIB-SEM cube's kept sections, one on the ISBI 2012 train stack's XY
sections. Each restores both data sets: in domain (its own) and out of domain (the other's).
Side by side, in one run:

- the score of ``restore(samples=4)`` (``domain_check``: the error head's calibration on rows cut
  from the input itself), on the whole stack and on 12 random cutouts of 6 sections × 48² px
  (the size of a viewer's restore-region; intensity normalised over the whole data set, as the
  service does), with the fraction flagged at the threshold;
- the previous score on the same cutouts (the samples' spread over the model's in-domain spread,
  threshold 1.3), which did not separate the cases;
- hard vs easy data in domain: the check's patches ranked by the error of linear interpolation
  into quarters — the score should stay near 1 while the error grows.

Data: Janelia Research Campus / HHMI FlyEM (CC-BY), ``../shared/data/flyem-fibsem/``; ISBI 2012
EM segmentation challenge (Cardona et al.), ``../shared/data/isbi2012/``.

    python bench/realz.py --no-isbi ... --save-models DIR     # or the ISBI run, see README
    python bench/domain_check.py --flyem-model DIR/flyem-k5 --isbi-model DIR/isbi-k5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.common import machine, table, today, write_report  # noqa: E402

DATA = os.environ.get("EMRESTORE_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
FLYEM = os.path.join(DATA, "flyem-fibsem", "sample1.tif")
ISBI_TEST = os.path.join(DATA, "isbi2012", "test-volume.tif")
PREVIOUS_THRESHOLD = 1.3


def quarters(model, vol, norm, n=128, seed=3):
    """The check's pairs from ``vol``, ranked by linear interpolation's error into quarters:
    per quarter (linear RMSE, model RMSE, predicted RMSE, ratio) in normalised units."""
    import torch
    from service.engine.restore import DEFAULT_SAMPLER, DEFAULT_STEPS, CHECK_PATCH, _Estimator
    pairs = model.task.check_pairs(vol, norm, None, model.gap)
    cond, target = pairs.sample(n, CHECK_PATCH, np.random.default_rng(seed))
    cond, target = torch.from_numpy(cond), torch.from_numpy(target)
    est = _Estimator(model, torch.device("cpu"), DEFAULT_SAMPLER, DEFAULT_STEPS, None, 256, 32, 32)
    with torch.no_grad():
        mu, var = est.predict(cond)
    gen = (model.task.known(cond) < 0.5).float()
    per = lambda t: ((t * gen).sum((1, 2, 3)) / gen.sum((1, 2, 3))).numpy()  # noqa: E731
    lin, err, pred = per((model.task.base(cond) - target) ** 2), per((mu - target) ** 2), per(var)
    ref = (model.calibration or {}).get("error_ratio") or 1.0
    out = []
    for idx in np.array_split(np.argsort(lin), 4):
        a, p = float(np.sqrt(err[idx].mean())), float(np.sqrt(pred[idx].mean()))
        out.append((float(np.sqrt(lin[idx].mean())), a, p, a / p / ref))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flyem-model", required=True, help="FlyEM k=5 model directory (bench/realz.py --save-models)")
    ap.add_argument("--isbi-model", required=True, help="ISBI k=5 model directory (bench/realz.py --save-models)")
    ap.add_argument("--cutouts", type=int, default=12)
    ap.add_argument("--size", type=int, default=48, help="cutout width and height (px)")
    ap.add_argument("--sections", type=int, default=6, help="cutout sections")
    a = ap.parse_args(argv)
    if not (os.path.exists(FLYEM) and os.path.exists(ISBI_TEST)):
        print(f"[domain] data not found under {DATA}; nothing to do")
        return 0
    import tifffile
    import torch
    from service.engine.model import RestorationModel
    from service.engine.normalize import IntensityNorm
    from service.engine.restore import UNCERTAINTY_THRESHOLD, domain_check, restore
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.time()
    models = {"FlyEM": RestorationModel.load(a.flyem_model), "ISBI": RestorationModel.load(a.isbi_model)}
    data = {"FlyEM": tifffile.imread(FLYEM)[::5], "ISBI": tifffile.imread(ISBI_TEST)}
    norms = {n: IntensityNorm.from_volume(v) for n, v in data.items()}
    rows, qrows, summary = [], [], {"cases": []}
    rng = np.random.default_rng(0)
    for mname, model in models.items():
        for dname, vol in data.items():
            where = "in domain" if mname == dname else "out of domain"
            whole = domain_check(model, vol, norms[dname], torch.device("cpu"))
            new, old = [], []
            for _ in range(a.cutouts):
                z = rng.integers(vol.shape[0] - a.sections + 1)
                y, x = (rng.integers(vol.shape[i] - a.size + 1) for i in (1, 2))
                cut = vol[z:z + a.sections, y:y + a.size, x:x + a.size]
                r = restore(model, cut, samples=4, seed=1, norm=norms[dname])
                new.append(r.score)
                old.append(r.spread / model.calibration["spread"])
            new, old = np.array(new), np.array(old)
            case = f"{mname} model on {dname} ({where})"
            rows.append([case, whole["score"], whole["error_ratio"],
                         f"{new.min():.2f} / {np.median(new):.2f} / {new.max():.2f}",
                         f"{(new > UNCERTAINTY_THRESHOLD).mean():.0%}",
                         f"{old.min():.2f} / {np.median(old):.2f} / {old.max():.2f}",
                         f"{(old > PREVIOUS_THRESHOLD).mean():.0%}"])
            summary["cases"].append({"case": case, "whole": whole, "cutout_scores": new.tolist(),
                                     "cutout_previous_scores": old.tolist()})
            print(f"[domain] {case}: whole {whole['score']:.3f}; cutouts {np.round(new, 3).tolist()}; "
                  f"previous {np.round(old, 3).tolist()}", flush=True)
            if mname == dname:
                for qi, (lin, act, pred, ratio) in enumerate(quarters(model, vol, norms[dname])):
                    qrows.append([case, qi + 1, lin, act, pred, ratio])
    text = [f"# Needs-fine-tuning score in and out of domain, {today()}\n",
            f"Machine: {machine()}. Models: `{a.flyem_model}`, `{a.isbi_model}` (tiny, k = 5). "
            f"Cutouts: {a.cutouts} random {a.sections} sections × {a.size}² px per case. "
            f"Score threshold {UNCERTAINTY_THRESHOLD} (flag above it); previous score threshold "
            f"{PREVIOUS_THRESHOLD}. Run time {time.time() - t0:.0f} s.\n",
            table(["case", "score, whole stack", "error / predicted error", "score, cutouts min / median / max",
                   "cutouts flagged", "previous score, cutouts min / median / max", "flagged (previous)"], rows),
            "\nIn domain, patches of the check ranked by linear interpolation's error (normalised units; "
            "ratio = model error / predicted error, relative to calibration):\n",
            table(["case", "quarter (1 = easiest)", "linear RMSE", "model RMSE", "predicted RMSE", "ratio"], qrows)]
    report = "\n".join(text)
    path = write_report("domain_check", report)
    with open(path[:-3] + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    print(f"[domain] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
