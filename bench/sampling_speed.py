"""Where restore's time goes on the CPU: wall, user and kernel (sys) time, page faults, and network
evaluations per second for the mean and for samples, against the network's own per-evaluation cost
at the same batch shape — before and after the CPU runtime (service/engine/cpu_runtime.py: glibc
keeps freed memory, channels-last tiles), side by side in one run.

A crop of the FlyEM cube's kept sections (k = 5; Janelia Research Campus / HHMI FlyEM, CC-BY;
a random phantom when the data is absent). The "before" rows run first, in the same process, with
the runtime switched off (glibc's defaults cannot be restored once changed).

    python bench/sampling_speed.py [--model DIR] [--crop 64] [--sections 25] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import machine, today  # noqa: E402
from service.engine import cpu_runtime, restore as restore_mod, tiling  # noqa: E402
from service.engine.model import RestorationModel  # noqa: E402
from service.engine.tasks import make_task  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.environ.get("EMRESTORE_DATA", os.path.join(HERE, "..", "..", "shared", "data"))
MODES = {"mean": {}, "mean + uncertainty (error head)": {"uncertainty": True},
         "one sample (10 steps)": {"estimate": "sample"}, "4 samples + uncertainty": {"samples": 4}}


def usage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime, r.ru_stime, r.ru_minflt


class CallLog:
    """Wraps a network: counts its calls and records the batch shapes it saw."""

    def __init__(self, net):
        self.net, self.shapes = net, []

    def __call__(self, x, *a):
        self.shapes.append(tuple(x.shape))
        return self.net(x, *a)


def net_seconds(model, shapes, runtime: bool) -> float:
    """The bare network's time for the recorded calls (each distinct shape timed, times count)."""
    total = 0.0
    for shape, count in {s: shapes.count(s) for s in set(shapes)}.items():
        noisy = shape[1] == model.denoiser.config.in_channels
        net = model.denoiser if noisy else model.predictor
        x = torch.randn(shape)
        if runtime:
            x = x.contiguous(memory_format=torch.channels_last)
        g = torch.rand(shape[0])
        with torch.no_grad():
            net(x, g) if noisy else net(x)
            t = time.perf_counter()
            for _ in range(2):
                net(x, g) if noisy else net(x)
        total += (time.perf_counter() - t) / 2 * count
    return total


def run(model, kept, mode: str, runtime: bool) -> dict:
    shapes = []
    orig = tiling.TiledDenoiser.__call__

    def counted(self, x, gamma):  # record every network call's batch shape
        net = self.net
        log = CallLog(net)
        self.net = log
        try:
            return orig(self, x, gamma)
        finally:
            self.net = net
            shapes.extend(log.shapes)
    tiling.TiledDenoiser.__call__ = counted
    try:
        t0, u0, s0, f0 = usage()
        r = restore_mod.restore(model, kept, seed=0, **MODES[mode])
        t1, u1, s1, f1 = usage()
    finally:
        tiling.TiledDenoiser.__call__ = orig
    evals = r.images * r.evaluations
    wall = t1 - t0
    pure = net_seconds(model, shapes, runtime)
    return {"mode": mode, "runtime": runtime, "wall_s": wall, "user_s": u1 - u0, "sys_s": s1 - s0,
            "minor_faults": f1 - f0, "image_evaluations": evals, "evals_per_s": evals / wall,
            "network_calls": len(shapes), "batch_shapes": sorted({str(list(s)) for s in shapes}),
            "network_only_s": pure, "network_evals_per_s": evals / pure, "overhead": wall / pure - 1}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a FlyEM k = 5 model directory (default: an untrained tiny model, same cost)")
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--sections", type=int, default=25)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--before-modes", default="mean,one sample (10 steps)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    path = os.path.join(DATA, "flyem-fibsem", "sample1.tif")
    if os.path.exists(path):
        import tifffile
        kept = np.asarray(tifffile.imread(path))[::5][:a.sections, :a.crop, :a.crop]
        data = f"FlyEM FIB-SEM kept sections (every 5th), {kept.shape} (Janelia Research Campus / HHMI FlyEM, CC-BY)"
    else:
        kept = (np.random.default_rng(0).random((a.sections, a.crop, a.crop)) * 255).astype(np.uint8)
        data = f"random stack {kept.shape} (FlyEM data not found at {path})"
    model = RestorationModel.load(a.model) if a.model else RestorationModel.create(make_task("isotropic", 5), "tiny")
    model.eval()
    rows = []
    # before: the runtime switched off (runs first: glibc's defaults cannot be restored afterwards)
    prep, cl = cpu_runtime.prepare, tiling.channels_last
    cpu_runtime.prepare, tiling.channels_last = (lambda dev, *nets: None), (lambda x: x)
    try:
        for mode in [m for m in a.before_modes.split(",") if m]:
            rows.append(run(model, kept, mode, False))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        cpu_runtime.prepare, tiling.channels_last = prep, cl
    for mode in MODES:
        rows.append(run(model, kept, mode, True))
        print(json.dumps(rows[-1]), flush=True)
    text = [f"# Sampling speed on the CPU\n\n{today()}, {machine()}, {torch.get_num_threads()} torch threads; "
            f"{data}; tiny preset{' (' + os.path.basename(a.model.rstrip('/')) + ')' if a.model else ' (untrained: same cost)'}; "
            f"k = 5, dpmpp2m. Image evaluations: view images × network evaluations per image. Network only: the "
            f"same calls' batch shapes timed on the bare network (the runtime's layout for the 'after' rows).\n",
            "| estimate | CPU runtime | wall s | user s | sys s | minor faults | image evals/s | network only, evals/s | overhead vs network |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        text.append(f"| {r['mode']} | {'on' if r['runtime'] else 'off (before)'} | {r['wall_s']:.1f} | {r['user_s']:.1f} | "
                    f"{r['sys_s']:.1f} | {r['minor_faults']} | {r['evals_per_s']:.2f} | {r['network_evals_per_s']:.2f} | "
                    f"{100 * r['overhead']:+.0f} % |")
    text.append("\nBatch shapes per estimate (after): " + "; ".join(
        f"{r['mode']}: {', '.join(r['batch_shapes'])}" for r in rows if r["runtime"]))
    out = "\n".join(text) + "\n"
    print(out)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "sampling_speed.md"), "w") as f:
        f.write(out)
    with open(os.path.join(a.out, "sampling_speed.json"), "w") as f:
        json.dump({"date": today(), "machine": machine(), "data": data, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
