"""``emrestore worker --ledger URL --job ID [--task-index I] [--num-tasks T]``: the worker entry
point run by the local executor's processes and by Kubernetes Indexed Job pods.

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


def cmd_worker(a):
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
    p = sub.add_parser("worker", help="run one task of a job (used by the executors)")
    p.add_argument("--ledger", required=True, help="job ledger URL")
    p.add_argument("--job", required=True, help="job id")
    p.add_argument("--task-index", type=int, default=None, help="task I (default $JOB_COMPLETION_INDEX)")
    p.add_argument("--num-tasks", type=int, default=None, help="tasks T (default: from the job's plan)")
    p.set_defaults(func=cmd_worker)
