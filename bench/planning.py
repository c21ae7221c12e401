"""Planning a whole 1 mm³ dataset, side by side: the plan as grids (this service) vs a list of
every block (how plans were made before: one Block object per block, measured on the first 10⁶
blocks and extrapolated), and the dry run's price of the job.

The source is only an info file: 200 000 × 200 000 × 20 000 voxels at 5 × 5 × 50 nm, uint8 jpeg,
7 scales, sharded (preshift 9 / minishard 6 / shard 15 bits on 64³ chunks, as FlyEM's), no
chunk written. The model is a tiny isotropic ×9 model (untrained: planning reads its metadata
only). ``python bench/planning.py`` (writes bench/results/planning.md and .json).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from common import OUT_DIR, machine, table, today, write_report  # noqa: E402


def mm3_source(root: str) -> str:
    scales = []
    for m in range(7):
        f = 2 ** m
        scales.append({"key": f"{5 * f}_{5 * f}_50", "size": [-(-200_000 // f), -(-200_000 // f), 20_000],
                       "voxel_offset": [0, 0, 0], "resolution": [5 * f, 5 * f, 50], "chunk_sizes": [[64, 64, 64]],
                       "encoding": "jpeg", "sharding": {"@type": "neuroglancer_uint64_sharded_v1", "hash": "identity",
                                                         "preshift_bits": 9, "minishard_bits": 6, "shard_bits": 15,
                                                         "minishard_index_encoding": "gzip", "data_encoding": "raw"}})
    os.makedirs(f"{root}/mm3", exist_ok=True)
    with open(f"{root}/mm3/info", "w") as f:
        json.dump({"type": "image", "data_type": "uint8", "num_channels": 1, "scales": scales}, f)
    return f"file://{root}/mm3"


def main():
    from service.engine.model import RestorationModel
    from service.engine.normalize import IntensityNorm
    from service.engine.tasks import make_task
    from service.jobs.estimate import format_estimate
    from service.jobs.executors import InProcessExecutor
    from service.jobs.manager import JobManager
    from service.jobs.spec import RestoreSpec
    from service.volume.blocks import Block
    from service.volume.geometry import Box

    root = tempfile.mkdtemp(prefix="emrestore-plan-")
    src = mm3_source(root)
    m = RestorationModel.create(make_task("isotropic", 9), "tiny", voxel_size_nm=(5, 5, 50))
    m.learn_gap((5, 5, 50))
    m.name = "iso9"
    m.save(f"file://{root}/models/iso9")
    rows, out = [], {"date": today(), "machine": machine(), "cases": []}
    for sharding in ("sharded", "unsharded"):
        mgr = JobManager(f"file://{root}/ledger-{sharding}", InProcessExecutor(default_parallelism=1000), models_dir=f"file://{root}/models",
                         block_size_xyz=(256, 256, 0))
        mgr.limits = type(mgr.limits)(**{**mgr.limits.__dict__, "max_job_voxels": 10 ** 17})
        mgr.planner._norms[(src, 0)] = IntensityNorm(20.0, 230.0)  # the normalisation read is part A's (dataset_norm)
        spec = dict(source=src, model="iso9", output=f"file://{root}/out-{sharding}")
        mgr.submit(RestoreSpec(**spec), output_sharding=sharding, dry_run=True)  # warm: imports, model metadata
        tracemalloc.start()
        t0 = time.perf_counter()
        est = mgr.submit(RestoreSpec(**spec), output_sharding=sharding, dry_run=True)
        secs = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        t0 = time.perf_counter()
        st = mgr.submit(RestoreSpec(**spec), output_sharding=sharding)
        submit_secs = time.perf_counter() - t0
        job_dir = f"{root}/ledger-{sharding}/jobs/{st.job_id}"
        ledger_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(job_dir) for f in fs)
        plan_bytes = os.path.getsize(f"{job_dir}/plan.json")
        t0 = time.perf_counter()
        for _ in range(3):
            mgr.get(st.job_id)
        get_secs = (time.perf_counter() - t0) / 3
        case = {"output": sharding, "plan_seconds": secs, "plan_peak_bytes": peak, "submit_seconds": submit_secs,
                "ledger_bytes": ledger_bytes, "plan_json_bytes": plan_bytes, "get_seconds": get_secs,
                "tasks": est["tasks"], "blocks": est["restoration_blocks"], "estimate": est}
        out["cases"].append(case)
        rows.append([f"grids ({sharding} output)", f"{secs:.2f}", f"{peak / 1e6:.1f}", est["tasks"],
                     est["restoration_blocks"], f"{plan_bytes}", f"{ledger_bytes}", f"{get_secs * 1e3:.0f}"])
        print(format_estimate(est))
    # the baseline: one Block object per block (a plan of format 1), on the first 10⁶ blocks
    n = 1_000_000
    tracemalloc.start()
    t0 = time.perf_counter()
    blocks = [Block(i, Box((0, 0, i), (18, 256, i + 256)), Box((0, 0, i), (9, 256, i + 256)), (0, 1)) for i in range(n)]
    text_len = len(json.dumps([b.to_dict() for b in blocks[:10000]])) * (n // 10000)
    secs = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del blocks
    full = out["cases"][1]["blocks"]
    scale = full / n
    out["baseline"] = {"blocks_measured": n, "seconds": secs, "peak_bytes": peak, "json_bytes": text_len,
                       "extrapolated_to": full, "seconds_full": secs * scale, "peak_full": peak * scale}
    rows.append([f"a list of every block (10⁶ measured, × {scale:.0f})", f"{secs * scale:.0f}",
                 f"{peak * scale / 1e6:.0f}", "—", full, f"{text_len * scale:.3g}", "—", "—"])
    text = (f"Planning 1 mm³, {today()}, {machine()}: 200 000 × 200 000 × 20 000 voxels at 5×5×50 nm (info only, "
            "jpeg, 7 scales, sharded like FlyEM's), isotropic ×9 → 200 000 × 200 000 × 179 992 voxels at 5×5×5.6 nm. "
            f"peak = Python allocations while planning (tracemalloc); process max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} MB.\n\n")
    text += table(["plan", "seconds", "peak MB", "tasks", "restoration blocks", "plan.json bytes", "ledger bytes",
                   "GetJob ms"], rows, "Plan as grids vs a list of blocks")
    text += "\n```\n" + format_estimate(out["cases"][0]["estimate"]) + "\n```\n"
    text += "\n```\n" + format_estimate(out["cases"][1]["estimate"]) + "\n```\n"
    write_report("planning", text)
    with open(os.path.join(OUT_DIR, "planning.json"), "w") as f:
        json.dump(out, f, indent=1, default=float)


if __name__ == "__main__":
    main()
