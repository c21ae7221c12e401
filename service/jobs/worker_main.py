"""``emrestore worker --ledger URL --job ID [--task-index I] [--num-tasks T]``: the worker entry
point run by the local executor's processes and by Kubernetes Indexed Job pods; and
``emrestore worker --pool --ledger URL [--max-models N] [--idle-exit S]``, the warm pool worker
(pool.py). Both check the device first (``$EMRESTORE_DEVICE``; exit 3 when CUDA is required and
unusable).

``WORKER`` is the command in the ``emrestore`` tree (service/cli.py); :func:`main` is the same
command with its own small parser, what forked local workers run (service/jobs/processes.py) and
``python -m service.jobs.worker_main worker …``: a worker never loads the client commands or
the connectors' plug-ins.

Exit 0 when this task's blocks are done, 2 for bad input (``WORKER_BAD_INPUT_CODES``: what another
attempt cannot fix), 1 otherwise; errors are one line ``emrestore: error: CODE: message``
(service/commandline.py). Module import stays light (no torch until a task runs).
"""

from __future__ import annotations

import os
import sys

from ..commandline import WORKER_BAD_INPUT_CODES, Command, build_parser
from ..commandline import main as run_command_line
from ..errors import EmrestoreError


def _require_device() -> None:
    """CUDA-required start-up check (service/jobs/device.py) before any model loads: exit 3 with
    one line when $EMRESTORE_DEVICE names a device this container cannot use."""
    from .device import require_device
    require_device(os.environ.get("EMRESTORE_DEVICE", "auto"))


def cmd_pool(a):
    if a.max_models < 1:
        raise EmrestoreError("--max-models", f"must be ≥ 1, got {a.max_models}")
    if a.idle_exit is not None and a.idle_exit < 0:
        raise EmrestoreError("--idle-exit", f"must be ≥ 0 seconds, got {a.idle_exit}")
    if a.job is not None or a.task_index is not None or a.num_tasks is not None:
        raise EmrestoreError("--pool", "leases blocks of any job; do not give --job, --task-index or --num-tasks")
    _require_device()
    import signal

    from .pool import PoolWorker
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    worker = PoolWorker(a.ledger, max_models=a.max_models, log=log)
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
        raise EmrestoreError("--job", "required (or --pool to lease blocks of any job)")
    task_index = a.task_index
    if task_index is None:
        env = os.environ.get("JOB_COMPLETION_INDEX")
        if env is None:
            raise EmrestoreError("--task-index", "not given and $JOB_COMPLETION_INDEX is unset")
        try:
            task_index = int(env)
        except ValueError:
            raise EmrestoreError("--task-index", f"$JOB_COMPLETION_INDEX={env[:200]!r} is not an integer") from None
    if task_index < 0:
        raise EmrestoreError("--task-index", f"must be ≥ 0, got {task_index}")
    if a.num_tasks is not None and a.num_tasks < 1:
        raise EmrestoreError("--num-tasks", f"must be ≥ 1, got {a.num_tasks}")
    _require_device()
    from .worker import run_task
    n = run_task(a.ledger, a.job, task_index, a.num_tasks, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"[worker {task_index}] finished: {n} block(s) done by this task", file=sys.stderr, flush=True)


def worker_arguments(p) -> None:
    p.add_argument("--ledger", required=True, help="job ledger URL")
    p.add_argument("--job", default=None, help="job id (not with --pool)")
    p.add_argument("--pool", action="store_true",
                   help="warm pool worker: lease blocks of any job, interactive first, models kept loaded")
    p.add_argument("--max-models", type=int, default=2, help="--pool: models kept loaded (default %(default)s)")
    p.add_argument("--idle-exit", type=float, default=None,
                   help="--pool: exit after this many seconds without work (default: never)")
    p.add_argument("--task-index", type=int, default=None, help="task I (default $JOB_COMPLETION_INDEX)")
    p.add_argument("--num-tasks", type=int, default=None, help="tasks T (default: from the job's plan)")


WORKER = Command("worker", "run one task of a job (used by the executors), or a pool worker",
                 run=cmd_worker, arguments=worker_arguments, bad_input=WORKER_BAD_INPUT_CODES)


def main(argv: list[str] | None = None) -> int:
    """``emrestore worker …`` with only the worker command: ``argv`` starts with ``worker``."""
    return run_command_line(build_parser([WORKER]), argv)


if __name__ == "__main__":
    sys.exit(main())
