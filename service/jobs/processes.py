"""Starting local worker processes warm: forked from a template process that has torch loaded.

An ``emrestore worker`` process spends ~4.5 s of CPU importing torch and ~4 s importing the
storage clients before it reads its first block (~1.3 s when forked from the template); on a
laptop that is most of a small viewer restore. The local executors (``LocalExecutor``, ``LocalPool``) therefore start workers through
multiprocessing's *forkserver*: one template process per service imports the heavy, environment-
free libraries once (``PRELOAD``), and each worker is a fork of it that runs the worker's own entry
point (``service.jobs.worker_main.main(["worker", ...])``: the ``emrestore worker`` command with its
own small parser, so a worker never loads the client commands or the connectors) with the same
exit codes (docs/CONTRACTS.md).

What a fork would otherwise inherit wrongly is set per worker: the environment (the template's is
the service's at the time it started — cloud-volume's secrets modules read it at import, so they are
*not* preloaded), the working directory, stdout/stderr (the task's log file) and torch's thread count
(OpenMP read ``OMP_NUM_THREADS`` when the template loaded it). Where forkserver does not exist
(Windows) or ``EMRESTORE_WORKER_START=exec``, workers are plain
``python -m service.jobs.worker_main worker …`` subprocesses. Kubernetes pods always run the command (kube/manifest.py).
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading

# imported once by the template (~8 of a worker's ~9 s of import CPU); none of them keeps what it
# reads from the environment at import (cloudfiles/cloudvolume and fsspec do: not preloaded)
PRELOAD = ["numpy", "scipy.ndimage", "tifffile", "torch", "torch.nn.functional", "requests", "boto3",
           "botocore.session", "google.cloud.storage", "python_jsonschema_objects", "osteoid", "networkx",
           "gevent.monkey", "pathos.pools", "psutil", "tenacity"]
START_ENV = "EMRESTORE_WORKER_START"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_lock = threading.Lock()
_context = None


def _forkserver():
    global _context
    with _lock:
        if _context is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)
            _context = ctx
        return _context


def warm_up() -> None:
    """Start the template now (in the background), so the first request does not wait for its
    imports: what ``emrestore serve`` does with local workers."""
    if start_method() != "fork":
        return
    from multiprocessing import forkserver
    _forkserver()
    threading.Thread(target=forkserver.ensure_running, daemon=True, name="worker-template").start()


def start_method() -> str:
    """``fork`` (from the warm template) or ``exec`` (a fresh interpreter per worker)."""
    wanted = os.environ.get(START_ENV, "fork").strip().lower()
    if wanted == "exec" or "forkserver" not in multiprocessing.get_all_start_methods():
        return "exec"
    return "fork"


def _run_worker(args: list[str], env: dict, log_path: str | None) -> None:
    """The forked worker: the environment, directory, output and threads of a fresh process, then
    the worker's entry point."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    fd = os.open(log_path or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    threads = env.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        import torch
        torch.set_num_threads(int(threads))
    from .worker_main import main
    code = main(args)
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(code)


class WorkerProcess:
    """The part of ``subprocess.Popen`` the executors use (pid, poll, terminate, kill, wait), over
    a forked worker."""

    def __init__(self, args: list[str], env: dict, log_path: str | None):
        self._proc = _forkserver().Process(target=_run_worker, args=(args, env, log_path),
                                           name="emrestore-worker", daemon=True)
        self._proc.start()
        self.pid = self._proc.pid
        self.args = args

    def poll(self) -> int | None:
        return self._proc.exitcode

    @property
    def returncode(self) -> int | None:
        return self._proc.exitcode

    def terminate(self) -> None:
        if self._proc.exitcode is None:
            self._proc.terminate()

    def kill(self) -> None:
        if self._proc.exitcode is None:
            self._proc.kill()

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(["emrestore", *self.args], timeout)
        return self._proc.exitcode


def worker_env(extra: dict, workers: int) -> dict:
    """The environment of a local worker: the service's, the executor's ``extra``, torch threads
    split between ``workers`` concurrent workers, and the registered S3-compatible aliases."""
    env = dict(os.environ)
    env.update(extra)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, workers))))
    from ..volume.stores import ENDPOINTS_ENV, endpoints_json
    if ENDPOINTS_ENV not in env and endpoints_json() != "[]":
        env[ENDPOINTS_ENV] = endpoints_json()  # workers reach the same S3-compatible aliases
    return env


def start_worker(args: list[str], env: dict, log_path: str | None = None):
    """Start ``emrestore <args>`` as a worker process with exactly ``env`` as its environment and
    its output appended to ``log_path`` (discarded when None). Returns a Popen-like handle."""
    if log_path:
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        open(log_path, "ab").close()  # exists when this returns, as a subprocess's redirected output does
    if start_method() == "fork":
        return WorkerProcess(args, env, log_path)
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen([sys.executable, "-m", "service.jobs.worker_main", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    finally:
        if log_path:
            out.close()
