"""The README's demo: phantom → self-supervised tiny model → isotropic restoration → pictures.

Runs on a 2-core CPU in a few minutes. With the service part it also writes the phantom as a
Neuroglancer Precomputed layer, restores it through the gRPC service with local workers, and
writes a Neuroglancer state showing source, restored and uncertainty layers.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np


def linear_interp(stack: np.ndarray, k: int) -> np.ndarray:
    """Linear interpolation along z to (Z−1)·k+1 sections (the classical baseline)."""
    Z = stack.shape[0]
    out = np.empty(((Z - 1) * k + 1,) + stack.shape[1:], np.float32)
    s = stack.astype(np.float32)
    for j in range(out.shape[0]):
        i, r = divmod(j, k)
        out[j] = s[i] if r == 0 else (1 - r / k) * s[i] + (r / k) * s[i + 1]
    return out


def run_demo(workdir: str = "demo-output", quick: bool = False, with_service: bool = True) -> dict:
    from .engine import metrics, phantom
    from .engine.model import RestorationModel
    from .engine.pairs import IsotropicPairs
    from .engine.restore import restore
    from .engine.tasks import make_task
    from .engine.training import TrainConfig, train
    from .viz import heat8, nearest_z, panels_png, to_gray8
    from .volume.tiff import write_stack

    t0 = time.time()
    os.makedirs(workdir, exist_ok=True)
    k = 5
    shape = (21, 48, 48) if quick else (81, 128, 128)
    steps = 20 if quick else 700
    iso = phantom.make_phantom(shape, seed=1)
    aniso = phantom.to_uint8(phantom.thick_sections(iso, k, mode="average"))
    truth = phantom.to_uint8(iso[:(aniso.shape[0] - 1) * k + 1])
    vs = (8.0, 8.0, 8.0 * k)
    write_stack(os.path.join(workdir, "anisotropic.tif"), aniso, voxel_size_nm=vs)
    write_stack(os.path.join(workdir, "truth.tif"), truth, voxel_size_nm=(8.0, 8.0, 8.0))
    print(f"[demo] phantom: {aniso.shape[0]} sections of {aniso.shape[1]}×{aniso.shape[2]} at "
          f"8×8×{8 * k} nm (anisotropy {k}); ground truth {truth.shape[0]} sections at 8 nm")

    task = make_task("isotropic", k)
    model = RestorationModel.create(task, "tiny", voxel_size_nm=vs, seed=0)
    pairs = IsotropicPairs(task, aniso, self_supervised=True, voxel_size_nm=vs)
    model.input_norm = model.target_norm = pairs.norm
    model.learn_gap(vs, zoom=pairs.zoom)
    model.name = "demo-iso5"
    model_url = os.path.abspath(os.path.join(workdir, "models", "demo-iso5"))
    print(f"[demo] training a tiny self-supervised model ({model.num_parameters / 1e6:.2f} M "
          f"parameters, {steps} steps) on the anisotropic stack itself")
    train(model, pairs, TrainConfig(steps=steps, batch_size=8, patch=48, lr=2e-3, warmup=50, seed=0),
          out_url=model_url, progress=True, mode="self-supervised")

    # the default output (posterior mean, one evaluation per view image) with the uncertainty of K samples
    sampler_steps = 2 if quick else 10
    n_samples = 2 if quick else 4
    res = restore(model, aniso, samples=n_samples, steps=sampler_steps, seed=0, voxel_size_nm=vs)
    write_stack(os.path.join(workdir, "restored.tif"), res.mean, voxel_size_nm=(8.0, 8.0, 8.0))
    write_stack(os.path.join(workdir, "uncertainty.tif"), res.std, voxel_size_nm=(8.0, 8.0, 8.0))
    lin = linear_interp(aniso, k)
    gen = np.ones(truth.shape[0], bool)
    gen[::k] = False  # score only generated sections
    rep = {
        "psnr_restored": metrics.psnr(res.mean[gen].astype(np.float32), truth[gen].astype(np.float32), 255),
        "psnr_linear": metrics.psnr(lin[gen], truth[gen].astype(np.float32), 255),
        "ssim_restored": metrics.ssim(res.mean[gen].astype(np.float32), truth[gen].astype(np.float32), 255),
        "ssim_linear": metrics.ssim(lin[gen], truth[gen].astype(np.float32), 255),
        "needs_finetuning_score": res.score,
        "needs_finetuning": res.needs_finetuning,
        "estimate": res.estimate,
        "network_evaluations_per_voxel_default": 2,   # mean: one predictor evaluation per XZ and YZ image
        "network_evaluations_per_image_with_uncertainty": res.evaluations,
        "sampler_steps": sampler_steps,
        "restore_seconds": round(res.seconds, 1),
    }
    y = truth.shape[1] // 2
    panels = [
        ("input (XZ, nearest)", to_gray8(nearest_z(aniso, k, truth.shape[0])[:, y, :], 0, 255)),
        ("linear interpolation", to_gray8(lin[:, y, :], 0, 255)),
        ("emrestore (default: mean)", to_gray8(res.mean[:, y, :], 0, 255)),
        ("ground truth", to_gray8(truth[:, y, :], 0, 255)),
        (f"uncertainty ({n_samples} samples + error head)", heat8(res.std[:, y, :])),
    ]
    png = panels_png(os.path.join(workdir, "before_after_xz.png"), panels, scale=2 if quick else 2)
    z = k * (aniso.shape[0] // 2) + k // 2  # a generated section
    panels_png(os.path.join(workdir, "generated_section_xy.png"), [
        (f"linear, z={z}", to_gray8(lin[z], 0, 255)),
        (f"emrestore, z={z}", to_gray8(res.mean[z], 0, 255)),
        (f"truth, z={z}", to_gray8(truth[z], 0, 255)),
        ("uncertainty", heat8(res.std[z])),
    ])
    print(f"[demo] restored {truth.shape[0]} sections (default mean: 2 network evaluations per voxel; "
          f"with {n_samples} samples for the uncertainty {res.evaluations} per image, {res.seconds:.1f} s): PSNR {rep['psnr_restored']:.2f} dB vs linear {rep['psnr_linear']:.2f} dB; "
          f"SSIM {rep['ssim_restored']:.3f} vs {rep['ssim_linear']:.3f}; needs-fine-tuning score {res.score:.3f}")
    print(f"[demo] pictures: {png}")
    if with_service:
        from .api.demo_service import run_service_demo
        rep.update(run_service_demo(workdir, aniso, vs, model_url, quick=quick))
    rep["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(rep, f, indent=2, default=float)
    print(f"[demo] done in {rep['seconds']:.0f} s; report: {os.path.join(workdir, 'report.json')}")
    return rep
