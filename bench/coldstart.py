"""Cold start vs warm pool: time from a restore-region request to its first restored block.

Measured here, side by side on one machine (same region, same model preset, local processes
standing in for pods):
- cold (the Indexed-Job path once its container runs): the JobManager plans the job and starts a
  fresh ``emrestore worker`` process — Python + torch import, model load, read, restore, write,
  ledger; request → first block marker in the ledger (``EMRESTORE_WORKER_START=exec``);
- local batch worker, forked: the embedded default's batch path — the same worker forked from the
  template process that already imported torch (service/jobs/processes.py): no imports, but the
  model load, read, restore, write;
- warm pool, model not cached: a running ``emrestore worker --pool`` process (imports done) that
  has not loaded this model yet leases the block, loads the model and restores it;
- warm pool, model cached: the same pool worker for a second region with the same model (the
  LRU model cache hit) — what a shift+R on a warm pool costs.

The Kubernetes delays in front of a cold pod (scheduling, image pull, node scale-up) cannot be
measured here; deploy/SCALE.md adds them as stated assumptions.

    python bench/coldstart.py [--size 128] [--sections 13] [--preset base]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.common import machine, table, today, write_report  # noqa: E402
from service.engine import phantom  # noqa: E402
from service.engine.model import RestorationModel  # noqa: E402
from service.engine.tasks import make_task  # noqa: E402
from service.jobs.executors import LocalExecutor  # noqa: E402
from service.jobs.manager import JobManager  # noqa: E402
from service.jobs.pool_executor import ExecutionRouter, LocalPool, PoolExecutor  # noqa: E402
from service.jobs.processes import START_ENV, start_worker  # noqa: E402
from service.jobs.spec import RestoreSpec  # noqa: E402
from service.volume import precomputed as pc  # noqa: E402


def first_block(mgr: JobManager, spec: RestoreSpec) -> tuple[float, float]:
    """(seconds to the first block marker, seconds to SUCCEEDED) of one submitted job."""
    t0 = time.perf_counter()
    job = mgr.submit(spec)
    first = None
    while True:
        st = mgr.get(job.job_id)
        if first is None and st.blocks_done >= 1:
            first = time.perf_counter() - t0
        if st.state in ("SUCCEEDED", "FAILED", "CANCELLED"):
            break
        time.sleep(0.02)
    assert st.state == "SUCCEEDED", st.message
    return first if first is not None else time.perf_counter() - t0, time.perf_counter() - t0


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
    model = RestorationModel.create(make_task("isotropic", k), a.preset, seed=0)
    urls = []
    for name in ("cold", "pool"):
        model.name = f"coldstart-{a.preset}-{name}"
        urls.append(f"file://{tmp}/models/{model.name}")
        model.save(urls[-1])
    cold_url, pool_url = urls
    env = {"OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    region = dict(region_start_xyz=(0, 0, 0), region_stop_xyz=(a.size, a.size, a.sections), steps=a.steps)
    n = [0]

    def spec(model_url, execution):
        n[0] += 1
        return RestoreSpec(source=src, model=model_url, output=f"file://{tmp}/out-{n[0]}", execution=execution,
                           **region)

    cold, forked, uncached, cached = [], [], [], []
    for start, times in (("exec", cold), ("fork", forked)):
        os.environ[START_ENV] = start
        ledger = f"file://{tmp}/ledger-{start}"
        mgr = JobManager(ledger, LocalExecutor(ledger, default_parallelism=1, env=env), poll_interval_s=0.05,
                         block_size_xyz=(256, 256, 0))
        mgr.start()
        try:
            if start == "fork":  # the template starts with the service, before any request
                start_worker(["--help"], dict(os.environ)).wait(120)
            for _ in range(a.repeats):
                times.append(first_block(mgr, spec(cold_url, "batch")))
        finally:
            mgr.close()
    os.environ.pop(START_ENV, None)
    ledger = f"file://{tmp}/ledger-pool"
    pool = LocalPool(ledger, 1, log_dir=f"{tmp}/logs", env=env).start()
    mgr = JobManager(ledger, ExecutionRouter(ledger, PoolExecutor(ledger, size=1),
                                             LocalExecutor(ledger, env=env), pool),
                     poll_interval_s=0.05, block_size_xyz=(256, 256, 0))
    mgr.start()
    try:
        t0 = time.time()  # the pool worker is up (imports done) before the first request
        while time.time() - t0 < 120 and "leasing blocks" not in open(f"{tmp}/logs/pool-0.log").read():
            time.sleep(0.1)
        uncached.append(first_block(mgr, spec(pool_url, "pool")))
        for _ in range(a.repeats):
            cached.append(first_block(mgr, spec(pool_url, "pool")))
    finally:
        mgr.close()
    best = min
    rows = [
        ["cold (Indexed-Job path): new worker process — imports, model load, read, restore, write, ledger",
         best(c[0] for c in cold), best(c[1] for c in cold)],
        ["local batch worker forked from the torch-warm template (embedded default): model load, read, "
         "restore, write, ledger", best(c[0] for c in forked), best(c[1] for c in forked)],
        ["warm pool worker, model not yet cached (lease, model load, read, restore, write)",
         uncached[0][0], uncached[0][1]],
        ["warm pool worker, model cached (lease, read, restore, write)",
         best(c[0] for c in cached), best(c[1] for c in cached)],
    ]
    blocks = mgr.get(mgr.ledger.list_jobs()[0][0].job_id).blocks_total
    text = [f"Cold start vs warm pool, {today()}, {machine()}; {a.preset} preset, dpmpp2m {a.steps} steps "
            f"(= network evaluations per gap), restore-region of {a.size}×{a.size}×{a.sections} source voxels at "
            f"factor {k}, {blocks} block(s); pool poll interval 0.5 s; cold, forked and cached best of {a.repeats}, "
            "uncached one run.\n",
            table(["path", "s to first block", "s to SUCCEEDED"], rows,
                  "Time from a restore-region request to its first restored block (local processes for pods)")]
    write_report("coldstart", "\n".join(text))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
