"""50 concurrent clients (threads, each with its own channel) against one server on loopback.

A mix of GetJob, ListJobs, ListModels and health checks for a few seconds must give zero errors.
The server runs the real JobManager over a file ledger (its executor launches nothing).
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from service.api.client import EmrestoreClient
from service.jobs.executors import InProcessExecutor
from service.jobs.manager import JobManager
from tests.test_api import make_model, make_source, start_server

pytestmark = pytest.mark.timeout(120)

CLIENTS = 50
DURATION_S = 3.0


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    src, vol = make_source(str(root))
    models = str(root / "models")
    make_model(models, "iso3", vol)
    mgr = JobManager(f"file://{root}/ledger", InProcessExecutor(), models_dir=models, poll_interval_s=0.5)
    mgr.start()
    server, port = start_server(mgr)
    target = f"127.0.0.1:{port}"
    with EmrestoreClient(target) as c:
        job_ids = [c.restore_region(src, "iso3", f"file://{root}/out-{i}", (0, 0, 0), (64, 64, 8), steps=1).job_id
                   for i in range(4)]
        c.cancel(job_ids[0])
    yield target, job_ids
    server.stop(0).wait()
    mgr.close()


def test_fifty_concurrent_clients_without_errors(loaded):
    target, job_ids = loaded
    start = threading.Barrier(CLIENTS)
    errors: list[str] = []
    counts: Counter = Counter()
    lock = threading.Lock()

    def client_loop(n: int):
        local: Counter = Counter()
        try:
            with EmrestoreClient(target, timeout=20) as c:
                start.wait(timeout=30)
                deadline = time.monotonic() + DURATION_S
                i = n
                while time.monotonic() < deadline:
                    op = i % 4
                    if op == 0:
                        job = c.get_job(job_ids[i % len(job_ids)])
                        assert job.job_id == job_ids[i % len(job_ids)]
                        local["GetJob"] += 1
                    elif op == 1:
                        jobs = list(c.list_jobs(page_size=3))
                        assert {j.job_id for j in jobs} == set(job_ids)
                        local["ListJobs"] += 1
                    elif op == 2:
                        assert [m["name"] for m in c.models()] == ["iso3"]
                        local["ListModels"] += 1
                    else:
                        assert c.health() == "SERVING"
                        local["health"] += 1
                    i += 1
        except Exception as e:  # noqa: BLE001 - every failure is counted
            with lock:
                errors.append(f"client {n}: {type(e).__name__}: {e}")
        with lock:
            counts.update(local)

    threads = [threading.Thread(target=client_loop, args=(n,), daemon=True) for n in range(CLIENTS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    elapsed = time.monotonic() - t0
    assert not any(t.is_alive() for t in threads), "clients did not finish"
    assert errors == [], errors[:5]
    assert set(counts) == {"GetJob", "ListJobs", "ListModels", "health"}, counts
    assert sum(counts.values()) >= CLIENTS, counts
    assert elapsed < 45
    print(f"{sum(counts.values())} calls by {CLIENTS} clients in {elapsed:.1f} s: {dict(counts)}")
    with EmrestoreClient(target) as c:  # still healthy afterwards
        assert c.health() == "SERVING"
