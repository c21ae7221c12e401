"""Helpers of the tests that need a running emrestore service: :class:`RunningService` (the real
gRPC server over the real JobManager + LocalExecutor) and :func:`wait_for`."""

from __future__ import annotations

import os
import time


class RunningService:
    """A real emrestore gRPC server (127.0.0.1, ephemeral port) over a real JobManager whose
    LocalExecutor runs ``emrestore worker`` subprocesses. ``models_dir``: model directory URL."""

    def __init__(self, tmp_path, models_dir: str | None, token: str | None = None,
                 block_xyz=(64, 64, 0), max_cutout_voxels: int = 4_194_304, shard_bytes: int | None = None):
        from service.api.server import build_server
        from service.jobs.executors import LocalExecutor
        from service.jobs.manager import JobManager

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        ledger = f"file://{tmp_path}/ledger"
        self.manager = JobManager(ledger, LocalExecutor(ledger, default_parallelism=1,
                                                        log_dir=str(tmp_path / "worker-logs"),
                                                        env={"OMP_NUM_THREADS": "1"}),
                                  models_dir=models_dir, poll_interval_s=0.2, block_size_xyz=block_xyz,
                                  max_cutout_voxels=max_cutout_voxels, shard_bytes=shard_bytes)
        self.manager.start()
        self.server, self.port = build_server(self.manager, "127.0.0.1", 0, token=token)
        self.server.start()
        self.target = f"127.0.0.1:{self.port}"
        self.token = token

    def close(self) -> None:
        self.server.stop(1).wait()
        self.manager.close()


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.2, what: str = "condition"):
    t_end = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() > t_end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
