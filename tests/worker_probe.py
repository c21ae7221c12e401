"""Runs a forked worker's entry point exactly as service/jobs/processes.py does, then writes what it
loaded: ``{"code": exit status, "modules": sorted(sys.modules)}`` (tests/test_structure.py)."""

import json
import sys


def run(args: list[str], env: dict, log_path: str, out_path: str) -> None:
    from service.jobs import processes
    code = None
    try:
        processes._run_worker(args, env, log_path)
    except SystemExit as e:
        code = e.code
    with open(out_path, "w") as f:
        json.dump({"code": code, "modules": sorted(sys.modules)}, f)
