"""On a GPU node: train and restore on the FlyEM cube, throughput, achieved TFLOP/s, what pays, and
the GPU-hours per mm³ per preset. One prepared script, < 8 min on an H100/H200.

1. The worker's CUDA check: ``require_device("cuda")`` passes, ``cuda:N`` beyond the visible
   devices and a container that sees no GPU stop with exit code 3 and one line.
2. Train the tiny model self-supervised on the FlyEM cube's kept sections (k = 5, every 5th
   slice; Janelia Research Campus / HHMI FlyEM, CC-BY), restore the whole cube — the mean (the
   default) with the error head's uncertainty, and one sample — and score against the dropped
   slices (PSNR, linear interpolation beside it): generated voxels per second for each estimate.
3. Per preset (tiny, small, base) and variant, the network's forward time per 256² tile and the
   achieved TFLOP/s against the card's bf16 peak: fp32, bf16 autocast, + channels-last,
   + ``torch.compile``, + CUDA graphs, at batch 8 / 32 / 128 tiles.
4. The cost table: GPU-hours per mm³ (8 × 8 × 40 nm restored to 8 nm isotropic, k = 5) per
   preset and estimate, from the best variant's measured time per pixel-evaluation.

Writes ``bench/results/gpu_check.md`` and ``.json``. ``--smoke`` runs every step on the CPU with
a tiny setting (a small crop, a few training steps, small tiles, no compile) to check the script
end to end where no GPU is lent; its figures mean nothing.

    python bench/gpu_check.py [--smoke] [--data DIR] [--steps 2000] [--budget 420]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from service.engine import metrics  # noqa: E402
from service.engine.model import RestorationModel  # noqa: E402
from service.engine.network import count_parameters  # noqa: E402
from service.engine.pairs import IsotropicPairs  # noqa: E402
from service.engine.restore import restore  # noqa: E402
from service.engine.tasks import make_task, linear_rows  # noqa: E402
from service.engine.training import TrainConfig, train  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.environ.get("EMRESTORE_DATA", os.path.join(HERE, "..", "..", "shared", "data"))
#: dense bf16 tensor-core peaks (TFLOP/s, without sparsity) of the cards the device tool lends
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.5, "H100": 989.4,
                    "A100": 312.0, "L40S": 362.1, "L4": 121.0}
#: 1 mm³ at 8 × 8 × 40 nm restored to 8 nm isotropic voxels (deploy/SCALE.md's target)
MM3_OUTPUT_VOXELS = 1e18 / (8.0 * 8.0 * 8.0)
K = 5


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, v in BF16_PEAK_TFLOPS.items():
        if key in name:
            return v
    return None


def device_checks() -> dict:
    from service.jobs.device import DeviceUnavailable, require_device
    out = {"require_cuda": require_device("cuda")}
    try:
        require_device(f"cuda:{torch.cuda.device_count()}")
        out["require_cuda_out_of_range"] = "passed (wrong)"
    except DeviceUnavailable as e:
        out["require_cuda_out_of_range"] = str(e)
    hidden = subprocess.run([sys.executable, "-c", "from service.jobs.device import require_device_or_exit; "
                             "require_device_or_exit('cuda')"], capture_output=True, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, cwd=os.path.join(HERE, ".."))
    out["no_gpu_visible"] = {"exit": hidden.returncode, "stderr": hidden.stderr.strip()}
    return out


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- 2. train and restore
def train_and_restore(vol: np.ndarray, steps: int, dev: torch.device, smoke: bool) -> dict:
    kept = vol[::K]
    truth = vol[:(kept.shape[0] - 1) * K + 1].astype(np.float32)
    vs = (10.0, 10.0, 10.0 * K)
    task = make_task("isotropic", K)
    pairs = IsotropicPairs(task, kept, self_supervised=True, voxel_size_nm=vs)
    m = RestorationModel.create(task, "tiny", voxel_size_nm=vs, seed=0)
    m.input_norm = m.target_norm = pairs.norm
    m.learn_gap(vs, zoom=pairs.zoom)
    cfg = TrainConfig(steps=steps, batch_size=8, patch=32 if smoke else 64, lr=1e-3,
                      warmup=min(100, steps // 5 + 1), seed=0, device=str(dev))
    t = time.time()
    train(m, pairs, cfg, progress=False, mode="self-supervised")
    sync(dev)
    out = {"train_steps": steps, "train_seconds": round(time.time() - t, 1)}
    gen = np.ones(truth.shape[0], bool)
    gen[::K] = False
    n_gen = int(gen.sum()) * truth.shape[1] * truth.shape[2]
    lin = linear_rows(kept, K)
    out["psnr_linear"] = metrics.psnr(lin[gen], truth[gen], 255)
    tile = 64 if smoke else 256
    for name, kw in (("mean + uncertainty (error head)", dict(uncertainty=True)),
                     ("one sample (10 steps)", dict(estimate="sample"))):
        restore(m, kept[:3, :32, :32], device=str(dev), tile=tile, overlap=16, **kw)  # warm-up
        sync(dev)
        t = time.time()
        r = restore(m, kept, device=str(dev), seed=1, voxel_size_nm=vs, tile=tile, overlap=16 if smoke else 32, **kw)
        sync(dev)
        s = time.time() - t
        hf, _ = metrics.z_hf_power(r.mean, truth, K)
        out[name] = {"seconds": round(s, 3), "generated_voxels_per_s": n_gen / s,
                     "psnr": metrics.psnr(r.mean[gen].astype(np.float32), truth[gen], 255), "z_hf_power": hf,
                     "evaluations_per_voxel": r.evaluations_per_voxel}
        if r.std is not None:
            out[name]["patch_spearman"] = metrics.patch_spearman(r.std, r.mean, truth, K)
    return out


# ----------------------------------------------------------------------------- 3. network timings
def flops_per_eval(net, in_ch: int, tile: int, noise: bool) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(1, in_ch, tile, tile)
    g = torch.full((1,), 0.5)
    net = net.cpu()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(x, g) if noise else net(x)
    return float(fc.get_total_flops())


def _time(fn, dev, reps: int) -> float:
    for _ in range(2):
        fn()
    sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(dev)
    return (time.perf_counter() - t) / reps


def variant_timings(preset: str, dev: torch.device, batches, tile: int, smoke: bool, deadline: float,
                    peak: float | None) -> list[dict]:
    """The residual denoiser's forward (what sampling repeats) per variant and batch size."""
    task = make_task("isotropic", K)
    m = RestorationModel.create(task, preset)
    net = m.denoiser.eval()
    in_ch = net.config.in_channels
    fl = flops_per_eval(net, in_ch, tile, noise=True)
    net = net.to(dev)
    rows = []
    bf16 = dev.type == "cuda"
    variants = [("fp32", False, False, False, False)]
    variants.append(("bf16 autocast", bf16, False, False, False))
    variants.append(("bf16 + channels-last", bf16, True, False, False))
    if not smoke:
        variants.append(("bf16 + channels-last + torch.compile", bf16, True, True, False))
    if dev.type == "cuda":
        variants.append(("bf16 + channels-last + CUDA graph", bf16, True, False, True))
    for batch in batches:
        for name, use_bf16, cl, comp, graph in variants:
            if comp and batch != batches[len(batches) // 2]:
                continue  # compiling takes a minute per shape: the middle batch size only
            if time.time() > deadline:
                rows.append({"preset": preset, "variant": name, "batch": batch, "skipped": "time budget"})
                continue
            x = torch.randn(batch, in_ch, tile, tile, device=dev)
            g = torch.rand(batch, device=dev)
            mod = net.to(memory_format=torch.channels_last) if cl else net.to(memory_format=torch.contiguous_format)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            fn_net = torch.compile(mod) if comp else mod

            def call():
                with torch.no_grad(), torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                    return fn_net(x, g)
            try:
                if graph:
                    call()
                    sync(dev)
                    cg = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(cg):
                        call()
                    fn = cg.replay
                else:
                    fn = call
                t0 = time.time()
                s = _time(fn, dev, 3 if smoke else 10)
                rows.append({"preset": preset, "variant": name, "batch": batch, "s_per_tile": s / batch,
                             "tflops": fl * batch / s / 1e12, "gflop_per_tile": fl / 1e9,
                             "percent_of_peak": (100 * fl * batch / s / 1e12 / peak) if peak else None,
                             "setup_seconds": round(time.time() - t0, 1)})
            except Exception as e:  # noqa: BLE001 - a variant that fails is reported, not fatal
                rows.append({"preset": preset, "variant": name, "batch": batch, "error": repr(e)[:200]})
            print(f"[gpu_check] {rows[-1]}", flush=True)
    return rows


# ----------------------------------------------------------------------------- 4. cost table
def cost_table(timings: list[dict], steps: int = 10) -> list[dict]:
    """GPU-hours per mm³ per preset and estimate from the fastest measured variant: the mean costs
    one evaluation per view image (2 per output voxel), the head's uncertainty nothing more, one
    sample 1 + ``steps`` per view image, the mean of 4 samples 1 + 4·``steps``."""
    out = []
    for preset in dict.fromkeys(r["preset"] for r in timings):
        ok = [r for r in timings if r["preset"] == preset and "s_per_tile" in r]
        if not ok:
            continue
        best = min(ok, key=lambda r: r["s_per_tile"])
        s_px = best["s_per_tile"] / best["tile"] ** 2
        row = {"preset": preset, "variant": f"{best['variant']}, batch {best['batch']}", "s_per_pixel_eval": s_px}
        for est, evals in (("mean (+ head uncertainty)", 1), ("one sample", 1 + steps), ("mean of 4 samples", 1 + 4 * steps)):
            row[est] = MM3_OUTPUT_VOXELS * 2 * evals * s_px / 3600.0
        out.append(row)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny setting: checks the script end to end")
    ap.add_argument("--data", default=DATA, help="directory holding flyem-fibsem/sample1.tif")
    ap.add_argument("--steps", type=int, default=2000, help="training steps of the tiny model")
    ap.add_argument("--budget", type=float, default=420, help="seconds for everything (timings stop in time)")
    ap.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if not in the built-in list")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args(argv)
    t_start = time.time()
    dev = torch.device("cpu" if a.smoke else "cuda")
    if not a.smoke and not torch.cuda.is_available():
        print("[gpu_check] no CUDA device here; run with --smoke to check the script on the CPU")
        return 2
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "CPU (smoke run)"
    peak = peak_tflops(name, a.peak_tflops)
    rep = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": name, "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "bf16_peak_tflops": peak, "smoke": a.smoke}
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        rep["device_checks"] = device_checks()
    path = os.path.join(a.data, "flyem-fibsem", "sample1.tif")
    if os.path.exists(path):
        import tifffile
        vol = np.asarray(tifffile.imread(path))
        if a.smoke:
            vol = vol[:31, :32, :32]
        rep["data"] = f"FlyEM FIB-SEM {vol.shape} (Janelia Research Campus / HHMI FlyEM, CC-BY), k = {K}"
        rep["restore"] = train_and_restore(vol, 5 if a.smoke else a.steps, dev, a.smoke)
        print(f"[gpu_check] restore: {rep['restore']}", flush=True)
    else:
        rep["data"] = f"not found at {path}: training and restore skipped"
        print(f"[gpu_check] {rep['data']}")
    tile = 64 if a.smoke else 256
    batches = (2,) if a.smoke else (8, 32, 128)
    timings = []
    presets = ("tiny",) if a.smoke else ("tiny", "small", "base")
    for i, preset in enumerate(presets):  # an equal share of what is left for each preset
        share = (a.budget - (time.time() - t_start)) / (len(presets) - i)
        rows = variant_timings(preset, dev, batches, tile, a.smoke, time.time() + max(share, 1.0), peak)
        for r in rows:
            r["tile"] = tile
        timings += rows
    rep["timings"] = timings
    rep["cost_per_mm3"] = cost_table(timings)
    rep["seconds"] = round(time.time() - t_start, 1)
    text = report(rep)
    print(text)
    if not a.smoke:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "gpu_check.md"), "w") as f:
            f.write(text)
        with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
            json.dump(rep, f, indent=1, default=float)
    return 0


def report(rep: dict) -> str:
    lines = [f"# GPU check, {rep['date']}, {rep['device']}, torch {rep['torch']} (CUDA {rep['torch_cuda']})"
             + (" — SMOKE RUN on the CPU: the figures check the script, they measure nothing" if rep["smoke"] else ""),
             "", f"Data: {rep['data']}. bf16 peak taken as {rep['bf16_peak_tflops']} TFLOP/s.", ""]
    r = rep.get("restore")
    if r:
        lines += [f"Tiny model trained {r['train_steps']} steps in {r['train_seconds']} s; linear interpolation "
                  f"PSNR {r['psnr_linear']:.2f} dB.", "",
                  "| estimate | network evals per output voxel | seconds | generated voxels/s | PSNR dB | z HF power |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for k, v in r.items():
            if isinstance(v, dict):
                lines.append(f"| {k} | {v['evaluations_per_voxel']} | {v['seconds']} | {v['generated_voxels_per_s']:.3g} | "
                             f"{v['psnr']:.2f} | {v['z_hf_power']:.2f} |")
        lines.append("")
    lines += ["Residual denoiser forward per tile (what sampling repeats); speed-up against fp32 at the same "
              "preset and batch (what paid):", "",
              "| preset | variant | batch | ms per tile | TFLOP/s | % of bf16 peak | speed-up vs fp32 |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    fp32 = {(t["preset"], t["batch"]): t["s_per_tile"] for t in rep["timings"]
            if t["variant"] == "fp32" and "s_per_tile" in t}
    for t in rep["timings"]:
        if "s_per_tile" in t:
            pct = f"{t['percent_of_peak']:.1f}" if t.get("percent_of_peak") is not None else "-"
            ref = fp32.get((t["preset"], t["batch"]))
            gain = f"{ref / t['s_per_tile']:.2f}×" if ref else "-"
            lines.append(f"| {t['preset']} | {t['variant']} | {t['batch']} | {1e3 * t['s_per_tile']:.3f} | "
                         f"{t['tflops']:.2f} | {pct} | {gain} |")
        else:
            lines.append(f"| {t['preset']} | {t['variant']} | {t['batch']} | {t.get('skipped') or t.get('error')} | | | |")
    lines += ["", "GPU-hours per mm³ (8 × 8 × 40 nm → 8 nm isotropic, k = 5; 2 view images per output voxel; "
              "network time only, fastest variant):", "",
              "| preset | fastest variant | mean (+ head uncertainty) | one sample (10 steps) | mean of 4 samples |",
              "| --- | --- | ---: | ---: | ---: |"]
    for c in rep["cost_per_mm3"]:
        lines.append(f"| {c['preset']} | {c['variant']} | {c['mean (+ head uncertainty)']:.0f} | "
                     f"{c['one sample']:.0f} | {c['mean of 4 samples']:.0f} |")
    if r:  # the engine as it runs today (bf16 autocast, no compile or graphs), tiny preset
        mean_vps = r["mean + uncertainty (error head)"]["generated_voxels_per_s"]
        sample_vps = r["one sample (10 steps)"]["generated_voxels_per_s"]
        gen = MM3_OUTPUT_VOXELS * (K - 1) / K  # the generated voxels (the sources pass through)
        lines.append(f"| tiny, the engine end to end (restore() on the cube: tiling, assembly, host copies) | "
                     f"- | {gen / mean_vps / 3600:.0f} | {gen / sample_vps / 3600:.0f} | - |")
    lines.append(f"\nTotal {rep['seconds']} s.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
