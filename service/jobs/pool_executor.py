"""The server side of the warm pool: the pool executor, the per-job choice between the pool and
the batch executor (Indexed Jobs or local tasks), local pool processes for one machine, and the
queue depth the pool is scaled on.

- ``PoolExecutor``: launching a job starts nothing — its blocks are in the ledger, where pool
  workers (``emrestore worker --pool``) lease them; its status comes from the ledger.
- ``ExecutionRouter``: an ``Executor`` that sends each job to the pool or to the batch executor
  according to the ``execution`` recorded in its plan (the manager resolves ``auto`` by size).
- ``LocalPool``: N local ``emrestore worker --pool`` processes (``serve --pool-workers N``),
  restarted when they die.
- ``queue_depth`` / ``metrics_text``: pending blocks (not done, not leased) by priority, in the
  Prometheus text format (``serve --metrics-port``; deploy/README.md: KEDA / HPA on it).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time

from .executors import Executor, ExecutorStatus
from .ledger import Ledger
from .processes import start_worker, worker_env
from .plans import PRIORITIES, PlanMissing, plan_from_dict

#: worker_failed events after which the pool executor reports a job's workers as failed
POOL_MAX_FAILURES = 3


class PoolExecutor:
    """Jobs run by the warm pool: ``launch`` only makes the blocks visible (they already are,
    in the ledger); status from the ledger (leased blocks are the active workers)."""
    name = "pool"

    def __init__(self, ledger_url: str, size: int = 0, default_parallelism: int = 1):
        self.ledger = Ledger(ledger_url)
        self.size = size  # workers in the pool (informational: the pool share of the GPU budget)
        self.default_parallelism = default_parallelism
        self._jobs: set[str] = set()

    def launch(self, job_id: str, num_tasks: int, parallelism: int) -> None:
        self._jobs.add(job_id)

    def status(self, job_id: str) -> ExecutorStatus:
        done, total = self.ledger.progress(job_id)
        failures = [e.message for e in self.ledger.events(job_id)[0] if e.kind == "worker_failed"]
        active = len(self.ledger.leased_blocks(job_id)) if done < total else 0
        st = ExecutorStatus(active=active, succeeded=done, failed=0, finished=done >= total)
        if len(failures) >= POOL_MAX_FAILURES and done < total:
            st.finished, st.failed, st.messages = True, len(failures), failures[-POOL_MAX_FAILURES:]
        return st

    def known(self, job_id: str) -> bool:
        return True  # stateless over the ledger: a restarted server has nothing to relaunch

    def cancel(self, job_id: str) -> None:
        self._jobs.discard(job_id)  # the manager requested the cancel in the ledger: workers skip it

    def shutdown(self) -> None:
        pass


class ExecutionRouter:
    """Sends each job to ``pool`` or ``batch`` by the ``execution`` in its persisted plan."""

    def __init__(self, ledger_url: str, pool: PoolExecutor, batch: Executor,
                 local_pool: "LocalPool | None" = None):
        self.ledger = Ledger(ledger_url)
        self.pool = pool
        self.batch = batch
        self.local_pool = local_pool
        self.name = f"{pool.name}+{batch.name}"
        self.default_parallelism = batch.default_parallelism
        self._where: dict[str, Executor] = {}

    def executor_for(self, job_id: str) -> Executor:
        ex = self._where.get(job_id)
        if ex is None:
            try:
                plan = plan_from_dict(self.ledger.get_plan(job_id), job_id)
                ex = self.pool if getattr(plan, "execution", "batch") == "pool" else self.batch
            except PlanMissing:
                ex = self.batch
            self._where[job_id] = ex
        return ex

    def launch(self, job_id: str, num_tasks: int, parallelism: int) -> None:
        self.executor_for(job_id).launch(job_id, num_tasks, parallelism)

    def status(self, job_id: str) -> ExecutorStatus:
        return self.executor_for(job_id).status(job_id)

    def known(self, job_id: str) -> bool:
        return self.executor_for(job_id).known(job_id)

    def cancel(self, job_id: str) -> None:
        self.executor_for(job_id).cancel(job_id)

    def shutdown(self) -> None:
        self.batch.shutdown()
        self.pool.shutdown()
        if self.local_pool is not None:
            self.local_pool.stop()


class LocalPool:
    """``n`` local pool worker processes (the embedded stand-in for the pool Deployment);
    a process that exits is started again."""

    def __init__(self, ledger_url: str, n: int, max_models: int = 2, log_dir: str | None = None,
                 env: dict | None = None):
        self.ledger_url = ledger_url
        self.n = n
        self.max_models = max_models
        self.log_dir = log_dir
        self.env = env or {}
        self.procs: list = [None] * n  # subprocess.Popen or processes.WorkerProcess
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def args(self) -> list[str]:
        return ["worker", "--pool", "--ledger", self.ledger_url, "--max-models", str(self.max_models)]

    def _spawn(self, i: int):
        log = os.path.join(self.log_dir, f"pool-{i}.log") if self.log_dir else None
        return start_worker(self.args(), worker_env(self.env, self.n), log)

    def start(self) -> "LocalPool":
        for i in range(self.n):
            self.procs[i] = self._spawn(i)
        self._thread = threading.Thread(target=self._watch, daemon=True, name="local-pool")
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            for i, p in enumerate(self.procs):
                if p is not None and p.poll() is not None and not self._stop.is_set():
                    self.procs[i] = self._spawn(i)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.terminate()
        for p in self.procs:
            if p is not None:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()


def queue_depth(ledger: Ledger) -> dict[str, dict[str, int]]:
    """Blocks of live jobs by priority: ``{priority: {"waiting": n, "leased": n}}`` (waiting:
    neither done nor under a live lease — what the pool is scaled on)."""
    out = {p: {"waiting": 0, "leased": 0} for p in PRIORITIES}
    for rec in ledger.pending_jobs():
        try:
            plan = plan_from_dict(ledger.get_plan(rec.job_id), rec.job_id)
        except PlanMissing:
            continue
        prio = getattr(plan, "priority", "batch")
        prio = prio if prio in out else "batch"
        leased = len(ledger.leased_blocks(rec.job_id))  # live leases: blocks being worked on
        out[prio]["leased"] += leased
        out[prio]["waiting"] += max(0, rec.num_blocks - rec.blocks_done - leased)
    return out


def metrics_text(ledger: Ledger, pool_size: int = 0, max_batch_gpus: int | None = None) -> str:
    """The queue depth (and the GPU budget) in the Prometheus text exposition format 0.0.4."""
    q = queue_depth(ledger)
    lines = ["# HELP emrestore_queue_blocks Blocks of live jobs waiting for a worker (not done, not leased).",
             "# TYPE emrestore_queue_blocks gauge"]
    lines += [f'emrestore_queue_blocks{{class="{p}"}} {q[p]["waiting"]}' for p in PRIORITIES]
    lines += ["# HELP emrestore_leased_blocks Blocks of live jobs being restored now (live lease).",
              "# TYPE emrestore_leased_blocks gauge"]
    lines += [f'emrestore_leased_blocks{{class="{p}"}} {q[p]["leased"]}' for p in PRIORITIES]
    lines += ["# HELP emrestore_pool_workers Pool workers configured (the pool share of the GPU budget).",
              "# TYPE emrestore_pool_workers gauge", f"emrestore_pool_workers {pool_size}"]
    if max_batch_gpus is not None:
        lines += ["# HELP emrestore_batch_gpus_max GPUs whole-dataset Indexed Jobs may add to the pool.",
                  "# TYPE emrestore_batch_gpus_max gauge", f"emrestore_batch_gpus_max {max_batch_gpus}"]
    return "\n".join(lines) + "\n"


def serve_metrics(ledger_url: str, host: str, port: int, pool_size: int = 0,
                  max_batch_gpus: int | None = None):
    """Serve ``GET /metrics`` on a daemon thread; returns the HTTP server (``server_address``
    holds the bound port; ``shutdown()`` stops it)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    ledger = Ledger(ledger_url)
    cache: dict[str, tuple[float, bytes]] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404, "only /metrics")
                return
            t, body = cache.get("m", (0.0, b""))
            if time.monotonic() - t > 2.0:  # scrapers poll often; the ledger is listed at most every 2 s
                try:
                    body = metrics_text(ledger, pool_size, max_batch_gpus).encode()
                except Exception as e:  # noqa: BLE001 - a scrape error, not a crash
                    self.send_error(500, f"{type(e).__name__}")
                    return
                cache["m"] = (time.monotonic(), body)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # quiet
            pass

    httpd = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True, name="metrics").start()
    return httpd
