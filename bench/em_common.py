"""Shared pieces of the real-EM task benchmarks (denoise_real, superres_real, isotropic_real,
finetune_real): data, the noise calibration, metrics, training our models, results and pictures.

Scripts drive the engine through its Python API only (pairs, ``train``, ``restore``, model
directories), so they need no edits when the CLI changes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from service.engine import metrics  # noqa: E402
from service.engine.noise import calibrate  # noqa: E402

DATA = os.environ.get("EMRESTORE_DATA", os.path.join(HERE, "..", "..", "shared", "data"))
FLYEM = os.path.join(DATA, "flyem-fibsem", "sample1.tif")
ISBI = os.path.join(DATA, "isbi2012")
RESULTS = os.path.join(HERE, "results")
IMG = os.path.join(HERE, "..", "docs", "img")
FLYEM_CREDIT = "Janelia Research Campus / HHMI FlyEM, CC-BY"
ISBI_CREDIT = "ISBI 2012 ssTEM (Cardona et al. 2010; Arganda-Carreras et al. 2015), non-commercial"
#: FlyEM split for denoise / superres: train on the z-slab [0, 120), score on [130, 250)
TRAIN_Z, TEST_Z = (0, 120), (130, 250)
#: the frequency band of the sharpness measure, cycles per pixel (periods of 4–10 pixels)
HF_BAND = (0.1, 0.25)


def read_tif(path):
    import tifffile
    return np.asarray(tifffile.imread(path))


def flyem():
    if not os.path.exists(FLYEM):
        print(f"[bench] FlyEM data not found at {FLYEM}; nothing to do")
        sys.exit(0)
    return read_tif(FLYEM)


def noise_model(vol):
    """The SEM noise model calibrated on the training slab only (the test slab is never looked at)."""
    return calibrate(vol[TRAIN_Z[0]:TRAIN_Z[1]])


def set_threads(n: int | None):
    import torch
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


# ------------------------------------------------------------------------------------ metrics
def radial_power(img: np.ndarray, band=HF_BAND) -> float:
    """Power of a 2-D image (mean removed, Hann window) in the radial frequency band."""
    a = np.asarray(img, np.float64)
    a = a - a.mean()
    w = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
    p = np.abs(np.fft.fft2(a * w)) ** 2
    r = np.hypot(np.fft.fftfreq(a.shape[0])[:, None], np.fft.fftfreq(a.shape[1])[None, :])
    return float(p[(r >= band[0]) & (r < band[1])].sum())


def hf_ratio(out: np.ndarray, ref: np.ndarray, band=HF_BAND) -> float:
    """HF power ratio over sections: Σ power of ``out`` in the band / Σ power of ``ref`` (1 = as much
    fine detail as the reference; a blurred estimate < 1, added noise or invented detail > 1)."""
    return float(sum(radial_power(o, band) for o in out) / sum(radial_power(r, band) for r in ref))


def scores(out, clean, pixel_nm: float) -> dict:
    """PSNR, SSIM (data range 255), HF power ratio and FRC resolution (1/7, vs the clean) of a
    restored (S, Y, X) stack."""
    o, c = np.asarray(out, np.float32), np.asarray(clean, np.float32)
    return {"psnr": metrics.psnr(o, c, 255.0), "ssim": metrics.ssim(o, c, 255.0), "hf_ratio": hf_ratio(o, c),
            "frc_nm": metrics.frc_resolution(o, c, pixel_size=pixel_nm)}


# ------------------------------------------------------------------------------------ our models
def train_ours(task, pairs, steps, batch=8, patch=64, kind="diffusion", seed=0, preset="tiny",
               voxel_size=None, log=print, lr=1e-3):
    """A tiny model of ours trained on ``pairs`` (the engine's pairs object) for ``steps`` steps."""
    from service.engine.model import RestorationModel
    from service.engine.training import TrainConfig, train
    m = RestorationModel.create(task, preset, kind=kind, voxel_size_nm=voxel_size, seed=seed)
    norm_in = getattr(pairs, "input_norm", None) or pairs.norm
    norm_out = getattr(pairs, "target_norm", None) or pairs.norm
    m.input_norm, m.target_norm = norm_in, norm_out
    cfg = TrainConfig(steps=steps, batch_size=batch, patch=patch, lr=lr, warmup=min(100, steps // 5 + 1), seed=seed)
    t0 = time.time()
    train(m, pairs, cfg, progress=False, mode="benchmark")
    m.training["wall_seconds"] = round(time.time() - t0, 1)
    log(f"[bench] ours ({kind}, {preset}, {m.num_parameters / 1e6:.2f} M parameters): {steps} steps × batch {batch} "
        f"× {patch}² in {m.training['wall_seconds']} s")
    return m


# ------------------------------------------------------------------------------------ results
def machine_line() -> str:
    from common import machine
    return machine()


class Report:
    """Collects rows and notes, writes ``bench/results/NAME.md`` and ``.json`` (after every table,
    so a run cut short keeps what it measured)."""

    def __init__(self, name: str, title: str, out_dir: str = RESULTS):
        self.name, self.out_dir = name, out_dir
        self.started = time.time()
        self.data = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     "machine": machine_line(), "tables": [], "notes": []}
        self.lines = [f"# {title}", "", f"{self.data['date']}, {self.data['machine']}.", ""]

    def note(self, text: str, **data):
        self.lines += [text, ""]
        self.data["notes"].append(text)
        self.data.update(data)
        self.flush()

    def table(self, title: str, headers: list[str], rows: list[list], key: str | None = None, raw=None):
        def fmt(v):
            if isinstance(v, float):
                return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"
            return str(v)
        self.lines += [f"### {title}", "", "| " + " | ".join(headers) + " |",
                       "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
        self.lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
        self.lines.append("")
        self.data["tables"].append({"title": title, "key": key, "headers": headers, "rows": rows, "raw": raw})
        self.flush()

    def flush(self):
        os.makedirs(self.out_dir, exist_ok=True)
        self.data["seconds"] = round(time.time() - self.started, 1)
        with open(os.path.join(self.out_dir, f"{self.name}.md"), "w") as f:
            f.write("\n".join(self.lines) + f"\nRun time {self.data['seconds']:.0f} s.\n")
        with open(os.path.join(self.out_dir, f"{self.name}.json"), "w") as f:
            json.dump(self.data, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def crops_png(path: str, panels: list[tuple[str, np.ndarray]], lo=0.0, hi=255.0, scale=2):
    """Crops side by side on one grey scale (small PNG)."""
    from service.viz import panels_png, to_gray8
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    from PIL import Image
    panels_png(path, [(t, to_gray8(a, lo, hi)) for t, a in panels], scale=scale)
    Image.open(path).convert("L").save(path, optimize=True)  # grey: a third of the RGB file
    print(f"[bench] wrote {path} ({os.path.getsize(path) // 1024} KiB)")
