"""CPU efficiency: FLOPs per output voxel per preset and estimate, achieved FLOP/s against the
CPU's peak, and what pays (bf16 autocast, channels-last, batch size), each with its numerical
cost (max / RMS difference of the network output against fp32, in grey levels of an 8-bit range).

    python bench/efficiency.py [--size 128] [--reps 3] [--peak-gflops 237]

Peak: 2 Zen 4 cores × ~3.7 GHz × 32 fp32 FLOP/cycle (two 256-bit FMA pipes; AVX-512 is issued as
two halves) ≈ 237 GFLOP/s fp32; AVX512-BF16 dot products double that for bf16 (≈ 474).
Isotropic restoration evaluates XZ and YZ views: every output voxel is covered by 2 images.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from service.engine.model import RestorationModel  # noqa: E402
from service.engine.tasks import make_task  # noqa: E402


def flops_per_pixel(net, in_ch, size=64, noise=False) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(1, in_ch, size, size)
    g = torch.full((1,), 0.5)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(x, g) if noise else net(x)
    return fc.get_total_flops() / (size * size)


def timed(fn, reps):
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--peak-gflops", type=float, default=237.0)
    ap.add_argument("--presets", default="tiny,small,base")
    ap.add_argument("--flops-only", action="store_true", help="only the FLOP table (no timing)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = ap.parse_args(argv)
    task = make_task("isotropic", 5)
    lines = [f"CPU efficiency, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; peak taken as {a.peak_gflops:.0f} GFLOP/s fp32. The machine was "
             f"shared with other jobs (load 6–10 on 2 cores), so achieved rates are lower bounds.\n",
             "| preset | predictor FLOP/px | denoiser FLOP/px | mean (default) FLOP/voxel | one sample (10 steps) | mean of 4 + uncertainty |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    models = {}
    for p in a.presets.split(","):
        m = RestorationModel.create(task, p)
        models[p] = m
        fp = flops_per_pixel(m.predictor, 2)
        fd = flops_per_pixel(m.denoiser, 4, noise=True)
        lines.append(f"| {p} | {fp / 1e3:.1f} k | {fd / 1e3:.1f} k | {2 * fp / 1e3:.0f} k | "
                     f"{2 * (fp + 10 * fd) / 1e6:.2f} M | {2 * (fp + 40 * fd) / 1e6:.2f} M |")
    lines += ["", "Predictor forward (the default estimate), batch × size², seconds per call and achieved rate:", "",
              "| preset | variant | batch | s / call | GFLOP/s | % of peak | max / RMS diff vs fp32 (grey levels) |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    S = a.size
    for p, m in ({} if a.flops_only else models).items():
        net = m.predictor.eval()
        # a non-trivial output layer (the zero-initialised correction would hide numerical differences)
        torch.nn.init.normal_(net.out[-1].weight, std=0.05)
        fp = flops_per_pixel(net, 2)
        for batch in (1, 4):
            x = torch.randn(batch, 2, S, S)
            with torch.no_grad():
                ref = net(x)
            variants = [("fp32", lambda: net(x), None)]
            xcl = x.contiguous(memory_format=torch.channels_last)

            def cl():
                return net.to(memory_format=torch.channels_last)(xcl)

            def bf16():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return net(x)

            def bf16cl():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return net.to(memory_format=torch.channels_last)(xcl)

            variants += [("channels-last", cl, None), ("bf16 autocast", bf16, None),
                         ("bf16 + channels-last", bf16cl, None)]
            for name, fn, _ in variants:
                with torch.no_grad():
                    sec = timed(fn, a.reps)
                    out = fn().float()
                net.to(memory_format=torch.contiguous_format)
                d = (out - ref) * 127.5  # network units [-1, 1] → 8-bit grey levels
                gf = fp * batch * S * S / sec / 1e9
                lines.append(f"| {p} | {name} | {batch} | {sec:.3f} | {gf:.1f} | {100 * gf / a.peak_gflops:.1f} | "
                             f"{float(d.abs().max()):.2f} / {float(d.pow(2).mean().sqrt()):.3f} |")
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "efficiency.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
