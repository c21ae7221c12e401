"""Speed benchmark: network evaluations and wall time per restored megavoxel, ours vs the reference.

Reference setting (EMDiffuse): ancestral sampling with 200 steps and one chain per missing section
(k − 1 chains per gap), vEM network of the paper's size at 256² tiles. Ours: the default few-step
sampler, all k − 1 sections of a gap generated jointly in one chain. Both use the ``base`` preset
(paper size) for the per-evaluation cost, measured side by side in this run; the end-to-end row
restores a real stack with ours and a step-truncated reference chain (its per-step cost measured,
scaled to 200 steps).

    python bench/speed.py [--k 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.common import machine, table, today, write_report  # noqa: E402
from service.engine import phantom  # noqa: E402
from service.engine.model import RestorationModel  # noqa: E402
from service.engine.network import UNet, count_parameters, preset_config  # noqa: E402
from service.engine.restore import restore  # noqa: E402
from service.engine.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS  # noqa: E402
from service.engine.tasks import make_task  # noqa: E402

REFERENCE_STEPS = 200


def forward_seconds(net, in_ch, tile, repeats, device, dtype=None):
    x = torch.randn(1, in_ch, tile, tile, device=device)
    g = torch.rand(1, device=device)
    with torch.no_grad():
        for _ in range(2):
            with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None):
                net(x, g)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None):
                net(x, g)
            if device.type == "cuda":
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    k, tile = a.k, a.tile
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else None
    torch.manual_seed(0)
    ours_net = UNet(preset_config("base", (k - 1) + 2, k - 1)).to(dev).eval()
    ref_net = UNet(preset_config("base", 1 + 2, 1)).to(dev).eval()  # one section per chain
    # interleaved, so both settings see the same machine load; medians of the repeats
    ours_t, ref_t = [], []
    for _ in range(a.repeats):
        ours_t.append(forward_seconds(ours_net, (k - 1) + 2, tile, 1, dev, dtype))
        ref_t.append(forward_seconds(ref_net, 3, tile, 1, dev, dtype))
    t_ours, t_ref = float(np.median(ours_t)), float(np.median(ref_t))
    vox_per_gap = (k - 1) * tile * tile
    ev_ours = DEFAULT_STEPS
    ev_ref = REFERENCE_STEPS * (k - 1)
    s_ours = ev_ours * t_ours
    s_ref = ev_ref * t_ref
    rows = [
        [f"reference: ancestral {REFERENCE_STEPS} steps, one chain per section", count_parameters(ref_net) / 1e6,
         ev_ref, t_ref, s_ref, ev_ref / (vox_per_gap / 1e6), vox_per_gap / s_ref / 1e3, 1.0],
        [f"emrestore: {DEFAULT_SAMPLER} {DEFAULT_STEPS} steps, {k - 1} sections jointly", count_parameters(ours_net) / 1e6,
         ev_ours, t_ours, s_ours, ev_ours / (vox_per_gap / 1e6), vox_per_gap / s_ours / 1e3, s_ref / s_ours],
    ]
    hdr = ["setting (base preset, paper size)", "parameters (M)", "network evals per gap", f"s per {tile}² eval",
           f"s per gap ({tile}², k={k})", "evals per restored Mvoxel", "kvoxel/s", "speed-up"]
    text = [f"Speed benchmark, {today()}, {machine()}; factor k = {k}, {tile}² tiles, batch 1"
            + (", bf16 autocast" if dtype else ", float32") + ".\n",
            table(hdr, rows, "Per gap, per-evaluation cost measured side by side")]

    # end to end on a phantom stack with the base preset (untrained weights: speed only)
    shape = (11, 128, 128) if a.quick else (21, 256, 256)
    iso = phantom.make_phantom(shape, seed=2)
    stack = phantom.to_uint8(phantom.thick_sections(iso, k, mode="sample"))
    model = RestorationModel.create(make_task("isotropic", k), "base", seed=0)
    model.residual_scale = 3.0
    t0 = time.perf_counter()
    r = restore(model, stack, device=str(dev))
    t_e2e = time.perf_counter() - t0
    vox = (stack.shape[0] - 1) * (k - 1) * stack.shape[1] * stack.shape[2]
    # reference chain per section: measure a few steps of ancestral sampling with one output section
    ref_model = RestorationModel.create(make_task("isotropic", 2), "base", seed=0)  # 1 section per chain
    probe = 4
    t0 = time.perf_counter()
    restore(ref_model, stack[:2], sampler="ddpm", steps=probe, device=str(dev))
    t_ref_gap_section = (time.perf_counter() - t0) / probe * REFERENCE_STEPS
    t_ref_e2e = t_ref_gap_section * (stack.shape[0] - 1) * (k - 1)
    rows2 = [
        ["reference (200-step ancestral, one chain per section; per-step cost measured, ×200)", t_ref_e2e, vox / t_ref_e2e / 1e3],
        [f"emrestore ({DEFAULT_SAMPLER}, {DEFAULT_STEPS} steps, joint)", t_e2e, vox / t_e2e / 1e3],
    ]
    text.append(table(["end to end", "seconds", "kvoxel/s"], rows2,
                      f"End to end: {stack.shape[0]} sections of {stack.shape[1]}² → {r.mean.shape[0]} sections "
                      f"({vox / 1e6:.2f} M generated voxels)"))
    text.append(f"Speed-up end to end: {t_ref_e2e / t_e2e:.0f}×.\n")
    write_report("speed", "\n".join(text))


if __name__ == "__main__":
    main()
