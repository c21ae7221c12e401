"""The README's demo: real EM (a crop of the FlyEM FIB-SEM cube, every 5th slice kept, the dropped
slices as ground truth) → self-supervised tiny model → isotropic restoration with its uncertainty
→ pictures. Without the data (or with ``quick``, for the tests) it uses the synthetic phantom.

Runs on a 2-core CPU in a few minutes. With the service part it also writes the input as a
Neuroglancer Precomputed layer, restores it through the gRPC service with local workers, and
writes a Neuroglancer state showing source, restored and uncertainty layers.

The FlyEM cube is read from beside the checkout (``../shared/data/flyem-fibsem/sample1.tif``),
from ``--data PATH`` (the TIFF or a directory holding ``flyem-fibsem/sample1.tif``) or from
``$EMRESTORE_DATA`` (such a directory); it is never copied into the repository.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

K = 5
FLYEM_FILE = os.path.join("flyem-fibsem", "sample1.tif")
FLYEM_CREDIT = "data: FlyEM FIB-SEM cube, Janelia Research Campus / HHMI FlyEM (CC-BY)"
#: the real-EM crop: lateral window (pixels) of the 250³ cube, all its slices; training steps and
#: patch sized so that the whole demo stays under 5 minutes on 2 idle cores (README)
FLYEM_WINDOW = (60, 60, 96)   # y0, x0, size
FLYEM_STEPS, FLYEM_PATCH = 500, 48


def linear_interp(stack: np.ndarray, k: int) -> np.ndarray:
    """Linear interpolation along z to (Z−1)·k+1 sections (the classical baseline)."""
    Z = stack.shape[0]
    out = np.empty(((Z - 1) * k + 1,) + stack.shape[1:], np.float32)
    s = stack.astype(np.float32)
    for j in range(out.shape[0]):
        i, r = divmod(j, k)
        out[j] = s[i] if r == 0 else (1 - r / k) * s[i] + (r / k) * s[i + 1]
    return out


def find_flyem(data: str | None = None) -> tuple[str | None, str]:
    """(path of the FlyEM TIFF or None, where it was looked for): ``data`` (the file or a directory
    holding ``flyem-fibsem/sample1.tif``), else ``$EMRESTORE_DATA``, else ``../shared/data`` beside
    the checkout and beside the working directory."""
    if data:
        cands = [data if data.lower().endswith((".tif", ".tiff")) else os.path.join(data, FLYEM_FILE)]
    elif os.environ.get("EMRESTORE_DATA"):
        cands = [os.path.join(os.environ["EMRESTORE_DATA"], FLYEM_FILE)]
    else:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        cands = [os.path.join(base, "..", "shared", "data", FLYEM_FILE) for base in (repo, os.getcwd())]
    for c in cands:
        if os.path.isfile(c):
            return os.path.abspath(c), c
    return None, cands[0]


def _flyem_input(path: str):
    from .volume.tiff import read_stack
    y0, x0, s = FLYEM_WINDOW
    vol = read_stack(path)[:, y0:y0 + s, x0:x0 + s]
    aniso = np.ascontiguousarray(vol[::K])
    truth = np.ascontiguousarray(vol[:(aniso.shape[0] - 1) * K + 1])
    return aniso, truth, (10.0, 10.0, 10.0 * K), 10.0, (
        f"FlyEM FIB-SEM crop: {aniso.shape[0]} sections of {s}×{s} px (every {K}th slice of a 10 nm isotropic "
        f"cube: 10×10×{10 * K} nm); ground truth: the {truth.shape[0]} slices at 10 nm")


def _phantom_input(quick: bool):
    from .engine import phantom
    shape = (21, 48, 48) if quick else (81, 128, 128)
    iso = phantom.make_phantom(shape, seed=1)
    aniso = phantom.to_uint8(phantom.thick_sections(iso, K, mode="average"))
    truth = phantom.to_uint8(iso[:(aniso.shape[0] - 1) * K + 1])
    return aniso, truth, (8.0, 8.0, 8.0 * K), 8.0, (
        f"phantom: {aniso.shape[0]} sections of {aniso.shape[1]}×{aniso.shape[2]} at 8×8×{8 * K} nm "
        f"(anisotropy {K}); ground truth {truth.shape[0]} sections at 8 nm")


def run_demo(workdir: str = "demo-output", quick: bool = False, with_service: bool = True,
             data: str | None = None) -> dict:
    from .engine import metrics
    from .engine.model import RestorationModel
    from .engine.pairs import IsotropicPairs
    from .engine.restore import restore
    from .engine.tasks import make_task
    from .engine.training import TrainConfig, train
    from .viz import heat8, nearest_z, panels_png, to_gray8
    from .volume.tiff import write_stack

    t0 = time.time()
    os.makedirs(workdir, exist_ok=True)
    path, looked = (None, "") if quick else find_flyem(data)
    if path:
        aniso, truth, vs, iso_nm, what = _flyem_input(path)
        steps, patch, lr, credit, kind = FLYEM_STEPS, FLYEM_PATCH, 2e-3, FLYEM_CREDIT, "flyem"
    else:
        if not quick:
            print(f"[demo] FlyEM data not found at {looked} (give --data PATH or set EMRESTORE_DATA); "
                  f"using the phantom instead")
        aniso, truth, vs, iso_nm, what = _phantom_input(quick)
        steps, patch, lr, credit, kind = (20 if quick else 700), 48, 2e-3, "synthetic phantom", "phantom"
    write_stack(os.path.join(workdir, "anisotropic.tif"), aniso, voxel_size_nm=vs)
    write_stack(os.path.join(workdir, "truth.tif"), truth, voxel_size_nm=(iso_nm,) * 3)
    print(f"[demo] {what}")

    task = make_task("isotropic", K)
    model = RestorationModel.create(task, "tiny", voxel_size_nm=vs, seed=0)
    pairs = IsotropicPairs(task, aniso, self_supervised=True, voxel_size_nm=vs)
    model.input_norm = model.target_norm = pairs.norm
    model.learn_gap(vs, zoom=pairs.zoom)
    model.name = "demo-iso5"
    model_url = os.path.abspath(os.path.join(workdir, "models", "demo-iso5"))
    print(f"[demo] training a tiny self-supervised model ({model.num_parameters / 1e6:.2f} M "
          f"parameters, {steps} steps) on the anisotropic stack itself")
    t_train = time.time()
    train(model, pairs, TrainConfig(steps=steps, batch_size=8, patch=patch, lr=lr, warmup=50, seed=0),
          out_url=model_url, progress=True, mode="self-supervised")
    t_train = time.time() - t_train

    # the default output (posterior mean, one evaluation per view image) with its uncertainty: the
    # error head and the views' disagreement, from the same evaluations
    res = restore(model, aniso, seed=0, voxel_size_nm=vs, uncertainty=True)
    write_stack(os.path.join(workdir, "restored.tif"), res.mean, voxel_size_nm=(iso_nm,) * 3)
    write_stack(os.path.join(workdir, "uncertainty.tif"), res.std, voxel_size_nm=(iso_nm,) * 3)
    lin = linear_interp(aniso, K)
    gen = np.ones(truth.shape[0], bool)
    gen[::K] = False  # score only generated sections
    out, ref = res.mean[gen].astype(np.float32), truth[gen].astype(np.float32)
    rep = {
        "data": kind, "data_path": path, "credit": credit,
        "psnr_restored": metrics.psnr(out, ref, 255), "psnr_linear": metrics.psnr(lin[gen], ref, 255),
        "ssim_restored": metrics.ssim(out, ref, 255), "ssim_linear": metrics.ssim(lin[gen], ref, 255),
        "needs_finetuning_score": res.score,
        "needs_finetuning": res.needs_finetuning,
        "estimate": res.estimate,
        "network_evaluations_per_voxel_default": res.evaluations_per_voxel,
        "network_evaluations_per_image_with_uncertainty": res.evaluations,
        "train_steps": steps, "train_seconds": round(t_train, 1),
        "restore_seconds": round(res.seconds, 1),
    }
    if gen.any() and truth.shape[1] >= 16:
        rep["uncertainty_patch_spearman"] = metrics.patch_spearman(res.std, res.mean, truth, K)
    y = truth.shape[1] // 2
    panels = [
        ("input (XZ, nearest)", to_gray8(nearest_z(aniso, K, truth.shape[0])[:, y, :], 0, 255)),
        ("linear interpolation", to_gray8(lin[:, y, :], 0, 255)),
        ("emrestore (default: mean)", to_gray8(res.mean[:, y, :], 0, 255)),
        ("ground truth", to_gray8(truth[:, y, :], 0, 255)),
        ("uncertainty (error head + views)", heat8(res.std[:, y, :])),
    ]
    png = panels_png(os.path.join(workdir, "before_after_xz.png"), panels, scale=2, caption=credit)
    z = K * (aniso.shape[0] // 2) + K // 2  # a generated section
    panels_png(os.path.join(workdir, "generated_section_xy.png"), [
        (f"linear, z={z}", to_gray8(lin[z], 0, 255)),
        (f"emrestore, z={z}", to_gray8(res.mean[z], 0, 255)),
        (f"truth, z={z}", to_gray8(truth[z], 0, 255)),
        ("uncertainty", heat8(res.std[z])),
    ], caption=credit)
    print(f"[demo] restored {truth.shape[0]} sections (default mean with its uncertainty: "
          f"{res.evaluations_per_voxel} network evaluations per voxel, {res.seconds:.1f} s): PSNR "
          f"{rep['psnr_restored']:.2f} dB vs linear {rep['psnr_linear']:.2f} dB; SSIM {rep['ssim_restored']:.3f} vs "
          f"{rep['ssim_linear']:.3f}; needs-fine-tuning score {res.score:.3f}")
    print(f"[demo] pictures: {png}")
    if with_service:
        from .api.demo_service import run_service_demo
        rep.update(run_service_demo(workdir, aniso, vs, model_url, quick=quick, caption=credit))
    rep["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(rep, f, indent=2, default=float)
    print(f"[demo] done in {rep['seconds']:.0f} s; report: {os.path.join(workdir, 'report.json')}")
    return rep
