"""Pipeline benchmark: end-to-end voxels per second on a precomputed volume (tiny model), and the
pipeline's overhead (read, normalise, blend, assemble, write, downsample, ledger) as a share of
pure model time — side by side in one run on the same blocks.

Rows:
- model only: ``restore_block`` on blocks read into memory beforehand (the network's work);
- worker in-process: ``run_task`` over the same job (reads overlap the model, writes, ledger);
- service end to end: submit through the JobManager with a local worker process until SUCCEEDED
  (adds process start-up, model loading and supervision).

    python bench/pipeline.py [--sections 17] [--size 256]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.common import Timer, machine, table, today, write_report  # noqa: E402
from service.engine import phantom  # noqa: E402
from service.engine.model import RestorationModel  # noqa: E402
from service.engine.tasks import make_task  # noqa: E402
from service.jobs.executors import InProcessExecutor, LocalExecutor  # noqa: E402
from service.jobs.manager import JobManager  # noqa: E402
from service.jobs.spec import RestoreSpec  # noqa: E402
from service.jobs.worker import load_plan, restore_block, run_task  # noqa: E402
from service.volume import precomputed as pc  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", type=int, default=17)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args(argv)
    k = a.k
    tmp = tempfile.mkdtemp(prefix="emrestore-bench-")
    iso = phantom.make_phantom(((a.sections - 1) * k + 1, a.size, a.size), seed=4)
    stack = phantom.to_uint8(phantom.thick_sections(iso, k, mode="sample"))
    src = f"file://{tmp}/em"
    pc.create_source_layer(src, stack, (8, 8, 8 * k), (0, 0, 0), (64, 64, 4))
    model = RestorationModel.create(make_task("isotropic", k), "tiny", seed=0)
    model.residual_scale = 3.0
    model.name = "bench-tiny"
    model_url = f"file://{tmp}/models/bench-tiny"
    model.save(model_url)
    ledger = f"file://{tmp}/ledger"

    # one job record for the in-process rows (the manager plans it; workers are not launched)
    mgr = JobManager(ledger, InProcessExecutor(), block_size_xyz=(256, 256, 0))
    job = mgr.submit(RestoreSpec(source=src, model=model_url, output=f"file://{tmp}/out_inproc", steps=a.steps))
    plan = load_plan(mgr.ledger, job.job_id)
    blocks = plan.blocks.blocks
    data = [pc.read_zyx(src, b.read_start, b.read_stop) for b in blocks]
    loaded = RestorationModel.load(model_url)
    restore_block(plan, blocks[0], loaded, data[0])  # warm-up
    with Timer() as t_model:
        for b, d in zip(blocks, data):
            mean, _, _ = restore_block(plan, b, loaded, d)
    with Timer() as t_worker:
        n = run_task(ledger, job.job_id, 0, 1, log=lambda m: None)
    assert n == len(blocks)
    out_vox = sum(b.write_shape[0] * b.write_shape[1] * b.write_shape[2] for b in blocks)

    # service end to end with a local worker process
    mgr2 = JobManager(ledger, LocalExecutor(ledger, default_parallelism=1), poll_interval_s=0.2,
                      block_size_xyz=(256, 256, 0))
    mgr2.start()
    try:
        with Timer() as t_e2e:
            j2 = mgr2.submit(RestoreSpec(source=src, model=model_url, output=f"file://{tmp}/out_service",
                                         steps=a.steps))
            while mgr2.get(j2.job_id).state not in ("SUCCEEDED", "FAILED", "CANCELLED"):
                time.sleep(0.2)
        state = mgr2.get(j2.job_id).state
    finally:
        mgr2.close()
    rows = [
        ["model only (restore_block on blocks in memory)", t_model.seconds, out_vox / t_model.seconds / 1e3, 0.0],
        ["worker in-process (read, model, write, downsample, ledger)", t_worker.seconds,
         out_vox / t_worker.seconds / 1e3, (t_worker.seconds - t_model.seconds) / t_model.seconds * 100],
        [f"service end to end (1 local worker process; {state})", t_e2e.seconds, out_vox / t_e2e.seconds / 1e3,
         (t_e2e.seconds - t_model.seconds) / t_model.seconds * 100],
    ]
    text = [f"Pipeline benchmark, {today()}, {machine()}; tiny preset, dpmpp2m {a.steps} steps, K = 1, "
            f"{a.sections} sections of {a.size}² at factor {k} → {out_vox / 1e6:.1f} M output voxels in "
            f"{len(blocks)} blocks.\n",
            table(["path", "seconds", "kvoxel/s", "overhead vs model (%)"], rows,
                  "End-to-end throughput and pipeline overhead (target: overhead under 10 %)")]
    write_report("pipeline", "\n".join(text))


if __name__ == "__main__":
    main()
