"""Cold start vs warm worker: time from a restore-region request to its first restored block.

Measured here (side by side, one run, same region, base preset, 2 network evaluations per gap):
- cold: the path of an Indexed Job pod once its container runs — the JobManager plans the job and
  starts a fresh ``emrestore worker`` process (Python + torch import, model load, read, restore,
  write, ledger); request → first block marker in the ledger;
- the cold worker process's start-up alone (imports and model load);
- warm: a worker that already holds the model reads and restores the same block (what a warm pool
  worker does once it has leased the block; the pool's lease/poll latency is not included).

The Kubernetes delays in front of a cold pod (scheduling, image pull, node scale-up) cannot be
measured here; deploy/SCALE.md adds them as stated assumptions.

    python bench/coldstart.py [--size 128] [--sections 13]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.common import Timer, machine, table, today, write_report  # noqa: E402
from service.engine import phantom  # noqa: E402
from service.engine.model import RestorationModel  # noqa: E402
from service.engine.tasks import TaskSpec  # noqa: E402
from service.jobs.executors import LocalExecutor  # noqa: E402
from service.jobs.manager import JobManager  # noqa: E402
from service.jobs.spec import RestoreSpec  # noqa: E402
from service.jobs.worker import job_plan, restore_block  # noqa: E402
from service.volume import precomputed as pc  # noqa: E402

STARTUP = ("import sys, time; t = time.perf_counter(); "
           "from service.engine.model import RestorationModel; import service.jobs.worker; "
           "m = RestorationModel.load(sys.argv[1]); print(time.perf_counter() - t)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", type=int, default=13)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="network evaluations per gap (dpmpp2m steps)")
    ap.add_argument("--preset", default="base")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    k = a.k
    tmp = tempfile.mkdtemp(prefix="emrestore-coldstart-")
    iso = phantom.make_phantom(((a.sections - 1) * k + 1, a.size, a.size), seed=4)
    stack = phantom.to_uint8(phantom.thick_sections(iso, k, mode="sample"))
    src = f"file://{tmp}/em"
    pc.create_source_layer(src, stack, (8, 8, 8 * k), (0, 0, 0), (64, 64, 4))
    model = RestorationModel.create(TaskSpec("isotropic", k), a.preset, seed=0)
    model.name = f"coldstart-{a.preset}"
    model_url = f"file://{tmp}/models/{model.name}"
    model.save(model_url)
    ledger = f"file://{tmp}/ledger"
    env = {"OMP_NUM_THREADS": str(os.cpu_count() or 1)}

    cold_first, cold_total, startup, warm = [], [], [], []
    mgr = JobManager(ledger, LocalExecutor(ledger, default_parallelism=1, env=env), poll_interval_s=0.05,
                     block_size_xyz=(256, 256, 0))
    mgr.start()
    try:
        for r in range(a.repeats):
            t0 = time.perf_counter()
            job = mgr.submit(RestoreSpec(source=src, model=model_url, output=f"file://{tmp}/out-{r}", steps=a.steps))
            first = None
            while True:
                st = mgr.get(job.job_id)
                if first is None and st.blocks_done >= 1:
                    first = time.perf_counter() - t0
                if st.state in ("SUCCEEDED", "FAILED", "CANCELLED"):
                    break
                time.sleep(0.02)
            assert st.state == "SUCCEEDED", st.message
            cold_first.append(first if first is not None else time.perf_counter() - t0)
            cold_total.append(time.perf_counter() - t0)
            spec = mgr.ledger.get_job(job.job_id).spec
        for _ in range(a.repeats):
            out = subprocess.run([sys.executable, "-c", STARTUP, model_url], capture_output=True, text=True,
                                 check=True, env={**os.environ, **env},
                                 cwd=os.path.join(os.path.dirname(__file__), ".."))
            startup.append(float(out.stdout.strip().splitlines()[-1]))
    finally:
        mgr.close()
    _, blocks = job_plan(spec)
    loaded = RestorationModel.load(model_url)
    restore_block(spec, blocks[0], loaded, pc.read_zyx(src, blocks[0].read_start, blocks[0].read_stop))  # warm-up
    for _ in range(a.repeats):
        with Timer() as t:
            data = pc.read_zyx(src, blocks[0].read_start, blocks[0].read_stop)
            restore_block(spec, blocks[0], loaded, data)
        warm.append(t.seconds)
    best = min
    rows = [
        ["cold: request → first block (new worker process: imports, model load, read, restore, write, ledger)",
         best(cold_first), best(cold_total)],
        ["  of which worker start-up (Python, torch, emrestore imports, model load)", best(startup), ""],
        ["warm: block on a worker that holds the model (read + restore)", best(warm), ""],
    ]
    text = [f"Cold-start benchmark, {today()}, {machine()}; {a.preset} preset, dpmpp2m {a.steps} steps "
            f"(= network evaluations per gap), restore-region of {a.size}×{a.size}×{a.sections} source voxels at "
            f"factor {k}, {len(blocks)} block(s); best of {a.repeats}.\n",
            table(["path", "seconds to first block", "seconds to SUCCEEDED"], rows,
                  "Time from a restore-region request to its first restored block (local processes)")]
    write_report("coldstart", "\n".join(text))


if __name__ == "__main__":
    main()
