"""``emrestore worker --ledger URL --job ID [--task-index I] [--num-tasks T]``: the worker entry
point run by the local executor's processes and by Kubernetes Indexed Job pods; and
``emrestore worker --pool --ledger URL [--max-models N] [--idle-exit S]``, the warm pool worker
(pool.py). Both check the device first (``$EMRESTORE_DEVICE``; exit 3 when CUDA is required and
unusable).

Exit 0 when this task's blocks are done, 2 for bad input, 1 otherwise; errors are one line
``emrestore: error: CODE: message``. Module import stays light (no torch until a task runs).
"""

from __future__ import annotations

import os
import sys

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
_BAD = ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "PERMISSION_DENIED")


def _fail(code: str, message: str) -> None:
    print(f"emrestore: error: {code}: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_BAD_INPUT if code in _BAD else EXIT_FAILURE)


def _require_device() -> None:
    """CUDA-required start-up check (service/jobs/device.py) before any model loads: exit 3 with
    one line when $EMRESTORE_DEVICE names a device this container cannot use."""
    from .device import require_device_or_exit
    require_device_or_exit(os.environ.get("EMRESTORE_DEVICE", "auto"))


def cmd_pool(a):
    if a.max_models < 1:
        _fail("INVALID_ARGUMENT", f"--max-models: must be ≥ 1, got {a.max_models}")
    if a.idle_exit is not None and a.idle_exit < 0:
        _fail("INVALID_ARGUMENT", f"--idle-exit: must be ≥ 0 seconds, got {a.idle_exit}")
    if a.job is not None or a.task_index is not None or a.num_tasks is not None:
        _fail("INVALID_ARGUMENT", "--pool: leases blocks of any job; do not give --job, --task-index or --num-tasks")
    _require_device()
    import signal

    from ..errors import status_of
    from .pool import PoolWorker
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        worker = PoolWorker(a.ledger, max_models=a.max_models, log=log)
    except Exception as e:  # noqa: BLE001 - bad ledger URL etc.: one line
        _fail(*status_of(e))
    # SIGTERM (scale-down, drain): finish the current block, then stop
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    log(f"[pool {worker.owner}] leasing blocks from {a.ledger} (max {a.max_models} model(s) cached)")
    n = worker.run(idle_exit_s=a.idle_exit)
    log(f"[pool {worker.owner}] stopped: {n} block(s) done, model cache {worker.cache.hits} hit(s), "
        f"{worker.cache.misses} load(s)")


def cmd_worker(a):
    if a.pool:
        return cmd_pool(a)
    if a.job is None:
        _fail("INVALID_ARGUMENT", "--job: required (or --pool to lease blocks of any job)")
    task_index = a.task_index
    if task_index is None:
        env = os.environ.get("JOB_COMPLETION_INDEX")
        if env is None:
            _fail("INVALID_ARGUMENT", "--task-index: not given and $JOB_COMPLETION_INDEX is unset")
        try:
            task_index = int(env)
        except ValueError:
            _fail("INVALID_ARGUMENT", f"--task-index: $JOB_COMPLETION_INDEX={env[:200]!r} is not an integer")
    if task_index < 0:
        _fail("INVALID_ARGUMENT", f"--task-index: must be ≥ 0, got {task_index}")
    if a.num_tasks is not None and a.num_tasks < 1:
        _fail("INVALID_ARGUMENT", f"--num-tasks: must be ≥ 1, got {a.num_tasks}")
    _require_device()
    from ..errors import status_of
    from .worker import run_task
    try:
        n = run_task(a.ledger, a.job, task_index, a.num_tasks,
                     log=lambda m: print(m, file=sys.stderr, flush=True))
    except Exception as e:  # noqa: BLE001 - every failure is one line and an exit code
        code, msg = status_of(e)
        if code not in _BAD:
            import traceback
            traceback.print_exc(file=sys.stderr)
        _fail(code, msg)
    print(f"[worker {task_index}] finished: {n} block(s) done by this task", file=sys.stderr, flush=True)


def register(sub) -> None:
    p = sub.add_parser("worker", help="run one task of a job (used by the executors), or a pool worker")
    p.add_argument("--ledger", required=True, help="job ledger URL")
    p.add_argument("--job", default=None, help="job id (not with --pool)")
    p.add_argument("--pool", action="store_true",
                   help="warm pool worker: lease blocks of any job, interactive first, models kept loaded")
    p.add_argument("--max-models", type=int, default=2, help="--pool: models kept loaded (default %(default)s)")
    p.add_argument("--idle-exit", type=float, default=None,
                   help="--pool: exit after this many seconds without work (default: never)")
    p.add_argument("--task-index", type=int, default=None, help="task I (default $JOB_COMPLETION_INDEX)")
    p.add_argument("--num-tasks", type=int, default=None, help="tasks T (default: from the job's plan)")
    p.set_defaults(func=cmd_worker)
