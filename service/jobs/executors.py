"""Executors run a job's tasks: ``emrestore worker`` processes here, or Kubernetes pods (kube.py).

Both follow the worker contract in docs/CONTRACTS.md: task I of T runs
``emrestore worker --ledger URL --job ID --task-index I --num-tasks T``.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from .processes import start_worker, worker_env


@dataclass
class ExecutorStatus:
    active: int = 0
    succeeded: int = 0
    failed: int = 0
    finished: bool = False
    messages: list[str] = field(default_factory=list)


class Executor(Protocol):
    """What the manager calls, and nothing else (local processes here, Kubernetes pods in kube)."""
    name: str
    default_parallelism: int

    def launch(self, job_id: str, num_tasks: int, parallelism: int) -> None: ...
    def status(self, job_id: str) -> ExecutorStatus: ...
    def known(self, job_id: str) -> bool: ...
    def cancel(self, job_id: str) -> None: ...
    def shutdown(self) -> None: ...


class InProcessExecutor:
    """Starts no worker: whoever submitted the job runs its tasks in its own process
    (``worker.run_task``, a ``pool.PoolWorker`` thread) or marks its blocks done — tests and
    benchmarks that run, time or fake the worker code path without processes. ``launched`` and
    ``cancelled`` list the jobs it was asked to start and to cancel; a launched job is reported
    active (so the supervisor neither relaunches nor fails it) until the ledger says done; a job it
    never launched is unknown (a restarted service relaunches it). ``default_parallelism``: the
    tasks a job is planned for when the request does not say."""
    name = "in-process"

    def __init__(self, default_parallelism: int = 1):
        self.default_parallelism = default_parallelism
        self.launched: list[str] = []
        self.cancelled: list[str] = []

    def launch(self, job_id: str, num_tasks: int, parallelism: int) -> None:
        self.launched.append(job_id)

    def status(self, job_id: str) -> ExecutorStatus:
        return ExecutorStatus(active=1)

    def known(self, job_id: str) -> bool:
        return job_id in self.launched

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)

    def shutdown(self) -> None:
        pass


def worker_args(ledger_url: str, job_id: str, task_index: int | None, num_tasks: int) -> list[str]:
    """The ``emrestore`` arguments of one task (the worker contract)."""
    args = ["worker", "--ledger", ledger_url, "--job", job_id, "--num-tasks", str(num_tasks)]
    if task_index is not None:
        args += ["--task-index", str(task_index)]
    return args


class _LocalJob:
    def __init__(self, job_id: str, num_tasks: int, parallelism: int):
        self.job_id = job_id
        self.num_tasks = num_tasks
        self.parallelism = max(1, parallelism)
        self.queue = list(range(num_tasks))
        self.running: dict[int, Any] = {}  # subprocess.Popen or processes.WorkerProcess
        self.attempts = {i: 0 for i in range(num_tasks)}
        self.succeeded: set[int] = set()
        self.failed: set[int] = set()
        self.messages: list[str] = []
        self.cancelled = False
        self.thread: threading.Thread | None = None


class LocalExecutor:
    """Runs each task as an ``emrestore worker`` process (forked warm, processes.py), at most
    ``parallelism`` at once, retrying a failed task up to ``max_retries`` times. Torch threads are
    split between workers."""
    name = "local"

    def __init__(self, ledger_url: str, max_retries: int = 2, default_parallelism: int = 1,
                 env: dict | None = None, log_dir: str | None = None):
        self.ledger_url = ledger_url
        self.max_retries = max_retries
        self.default_parallelism = default_parallelism
        self.env = env or {}
        self.log_dir = log_dir
        self._jobs: dict[str, _LocalJob] = {}
        self._lock = threading.Lock()

    def launch(self, job_id: str, num_tasks: int, parallelism: int) -> None:
        with self._lock:
            old = self._jobs.get(job_id)
            if old is not None and old.thread is not None and old.thread.is_alive():
                return  # already running
            job = _LocalJob(job_id, num_tasks, parallelism or self.default_parallelism)
            self._jobs[job_id] = job
        job.thread = threading.Thread(target=self._run, args=(job,), daemon=True, name=f"local-{job_id}")
        job.thread.start()

    def _spawn(self, job: _LocalJob, i: int):
        env = worker_env(self.env, job.parallelism)
        env["JOB_COMPLETION_INDEX"] = str(i)
        # appended: logs of earlier attempts and earlier launches are kept
        log = os.path.join(self.log_dir, f"{job.job_id}-{i}-{job.attempts[i]}.log") if self.log_dir else None
        job.attempts[i] += 1
        return start_worker(worker_args(self.ledger_url, job.job_id, None, job.num_tasks), env, log)

    def _run(self, job: _LocalJob):
        while not job.cancelled and (job.queue or job.running):
            while job.queue and len(job.running) < job.parallelism and not job.cancelled:
                i = job.queue.pop(0)
                job.running[i] = self._spawn(job, i)
            time.sleep(0.1)
            for i, proc in list(job.running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del job.running[i]
                if rc == 0:
                    job.succeeded.add(i)
                elif rc == 2 or job.attempts[i] > self.max_retries:
                    job.failed.add(i)
                    job.messages.append(f"task {i} failed with exit code {rc} after {job.attempts[i]} attempt(s)")
                else:
                    job.messages.append(f"task {i} exited with code {rc}; retrying")
                    job.queue.append(i)
        if job.cancelled:
            for proc in job.running.values():
                proc.terminate()
            for proc in job.running.values():
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            job.running.clear()

    def status(self, job_id: str) -> ExecutorStatus:
        job = self._jobs.get(job_id)
        if job is None:
            return ExecutorStatus(finished=True, messages=["not launched by this executor"])
        alive = job.thread is not None and job.thread.is_alive()
        return ExecutorStatus(active=len(job.running), succeeded=len(job.succeeded), failed=len(job.failed),
                              finished=not alive, messages=list(job.messages))

    def known(self, job_id: str) -> bool:
        return job_id in self._jobs

    def cancel(self, job_id: str) -> None:
        job = self._jobs.get(job_id)
        if job is None:
            return
        job.cancelled = True
        if job.thread is not None:
            job.thread.join(timeout=15)

    def shutdown(self) -> None:
        for job_id in list(self._jobs):
            self.cancel(job_id)
