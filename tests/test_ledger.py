"""Job ledger on real local files, memory:// and the shared moto S3 server (tests/conftest.py)."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import random
import threading
import time
import uuid

import pytest

from service.jobs import ledger as L
from service.jobs.ledger import (CANCELLED, FAILED, PENDING, RUNNING, SUCCEEDED,
                                 IllegalTransition, JobExists, JobNotFound, Ledger)

class FakeClock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Backend:
    """A ledger location. make() opens a Ledger on ``url``; other processes use
    ``proc_url``/``proc_options`` (an S3 alias is registered only in this process)."""

    def __init__(self, name: str, url: str, proc_url: str | None = None,
                 proc_options: dict | None = None):
        self.name, self.url = name, url
        self.proc_url, self.proc_options = proc_url or url, proc_options

    def make(self, **kw) -> Ledger:
        return Ledger(self.url, **kw)


def _s3_backend(ep) -> Backend:
    """A fresh prefix on the shared moto server (tests/conftest.py s3_endpoint), via its alias."""
    prefix = f"ledger-{uuid.uuid4().hex[:12]}"
    options = {"key": ep.access_key_id, "secret": ep.secret_access_key,
               "client_kwargs": {"endpoint_url": ep.endpoint_url, "region_name": "us-east-1"}}
    return Backend("s3", ep.url(prefix), f"s3://{ep.bucket}/{prefix}", options)


def _gcs_backend(ep) -> Backend:
    """A fresh prefix on the session's GCS emulator (tests/conftest.py gcs_endpoint)."""
    return Backend("gs", ep.url(f"ledger-{uuid.uuid4().hex[:12]}"))


@pytest.fixture(params=["file", "memory", "s3", "gs"])
def backend(request, tmp_path):
    if request.param == "file":
        return Backend("file", f"file://{tmp_path}/ledger")
    if request.param == "memory":
        return Backend("memory", f"memory://ledger-{uuid.uuid4().hex}")
    if request.param == "gs":
        return _gcs_backend(request.getfixturevalue("gcs_endpoint"))
    return _s3_backend(request.getfixturevalue("s3_endpoint"))


@pytest.fixture(params=["file", "s3", "gs"])
def durable(request, tmp_path):
    """Backends that other processes can reach."""
    if request.param == "file":
        return Backend("file", f"file://{tmp_path}/ledger")
    if request.param == "gs":
        return _gcs_backend(request.getfixturevalue("gcs_endpoint"))
    return _s3_backend(request.getfixturevalue("s3_endpoint"))


# ----------------------------------------------------------------- jobs

def test_job_ids_sort_and_are_dns_labels():
    ids = [L.new_job_id() for _ in range(200)]
    assert ids == sorted(ids) and len(set(ids)) == 200
    for i in ids:
        assert L.validate_job_id(i) == i
        assert len(i) == 26 and i == i.lower()


def test_create_get_and_not_found(backend):
    led = backend.make()
    spec = {"kind": "restore", "factor": 3, "region": [0, 0, 0, 64, 64, 8]}
    rec = led.create_job(spec, num_blocks=12)
    assert rec.state == PENDING and rec.num_blocks == 12 and rec.blocks_done == 0
    assert rec.spec == spec and not rec.cancel_requested
    got = led.get_job(rec.job_id)
    assert got == rec
    assert got.created == got.updated

    missing = L.new_job_id()
    with pytest.raises(JobNotFound) as err:
        led.get_job(missing)
    assert isinstance(err.value, KeyError) and missing in str(err.value)
    assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)
    assert "not found" in str(err.value)

    with pytest.raises(JobExists):
        led.create_job({"other": 1}, 3, job_id=rec.job_id)
    assert led.get_job(rec.job_id).spec == spec

    own = L.new_job_id()
    assert led.create_job({}, 0, job_id=own).job_id == own


def test_create_rejects_bad_input(backend):
    led = backend.make()
    with pytest.raises(ValueError, match="spec"):
        led.create_job(["not", "a", "dict"], 1)
    with pytest.raises(ValueError, match="spec"):
        led.create_job({"x": object()}, 1)
    for n in (-1, True, 1.5, L.MAX_BLOCKS + 1):
        with pytest.raises(ValueError, match="num_blocks"):
            led.create_job({}, n)
    assert led.list_jobs() == ([], None)


def test_list_jobs_newest_first_paging_and_filter(backend):
    clock = FakeClock()
    led = backend.make(clock=clock)
    ids = []
    for i in range(7):
        clock.t += 1
        ids.append(led.create_job({"n": i}, 2).job_id)
    for j in ids[1::2]:
        led.set_state(j, RUNNING)

    seen, token, pages = [], None, 0
    while True:
        page, token = led.list_jobs(page_size=3, page_token=token)
        pages += 1
        seen += [r.job_id for r in page]
        if token is None:
            break
    assert seen == ids[::-1] and pages == 3

    running, token = led.list_jobs(state=RUNNING, page_size=2)
    rest, token2 = led.list_jobs(state=RUNNING, page_size=2, page_token=token)
    assert [r.job_id for r in running + rest] == ids[1::2][::-1]
    assert all(r.state == RUNNING for r in running + rest)
    assert token2 is None
    pending, _ = led.list_jobs(state=PENDING)
    assert [r.job_id for r in pending] == ids[0::2][::-1]
    assert pending[0].spec == {"n": 6}

    with pytest.raises(ValueError, match="state"):
        led.list_jobs(state="DONE")
    with pytest.raises(ValueError, match="page_size"):
        led.list_jobs(page_size=0)
    with pytest.raises(ValueError, match="page_token"):
        led.list_jobs(page_token="../etc")


def test_state_transitions(backend):
    led = backend.make()
    job = led.create_job({}, 4).job_id
    with pytest.raises(ValueError, match="state must be one of"):
        led.set_state(job, "DONE")
    r = led.set_state(job, RUNNING, "started")
    assert (r.state, r.message) == (RUNNING, "started")
    r = led.set_state(job, RUNNING, "2/4 blocks")
    assert (r.state, r.message) == (RUNNING, "2/4 blocks")
    with pytest.raises(IllegalTransition) as err:
        led.set_state(job, PENDING)
    assert isinstance(err.value, ValueError)
    assert "RUNNING" in str(err.value) and "allowed: CANCELLED, FAILED, SUCCEEDED" in str(err.value)

    led.mark_block_done(job, 0, {})
    r = led.set_state(job, SUCCEEDED, "done")
    assert r.state == SUCCEEDED and r.blocks_done == 1
    again = led.set_state(job, SUCCEEDED, "other message")  # idempotent, no change
    assert again.message == "done" and again.updated == r.updated
    for bad in (RUNNING, FAILED, CANCELLED, PENDING):
        with pytest.raises(IllegalTransition, match="none \\(terminal state\\)"):
            led.set_state(job, bad)
    assert led.get_job(job).state == SUCCEEDED

    other = led.create_job({}, 1).job_id
    assert led.set_state(other, FAILED, "boom").state == FAILED
    with pytest.raises(IllegalTransition):
        led.set_state(other, CANCELLED)
    with pytest.raises(JobNotFound):
        led.set_state(L.new_job_id(), RUNNING)


def test_cancel(backend):
    led = backend.make()
    pending = led.create_job({}, 2).job_id
    r = led.request_cancel(pending)
    assert r.state == CANCELLED and r.cancel_requested
    assert led.cancel_requested(pending)

    running = led.create_job({}, 2).job_id
    led.set_state(running, RUNNING)
    assert not led.cancel_requested(running)
    r = led.request_cancel(running)
    assert r.state == RUNNING and r.cancel_requested
    assert led.cancel_requested(running)
    assert led.get_job(running).cancel_requested
    assert led.set_state(running, CANCELLED, "workers stopped").state == CANCELLED

    done = led.create_job({}, 1).job_id
    led.set_state(done, SUCCEEDED)
    r = led.request_cancel(done)
    assert r.state == SUCCEEDED and not r.cancel_requested
    assert led.cancel_requested(done)  # finished jobs stop workers too


# ----------------------------------------------------------------- blocks

def test_block_markers_idempotent(backend):
    clock = FakeClock()
    led = backend.make(clock=clock)
    job = led.create_job({}, 10).job_id
    assert led.done_blocks(job) == set() and led.progress(job) == (0, 10)
    info = {"worker": "w-1", "seconds": 1.25, "digest": "sha256:ab"}
    assert led.mark_block_done(job, 3, info) is True
    clock.t += 5
    assert led.mark_block_done(job, 3, {"worker": "w-2"}) is False
    assert led.mark_block_done(job, 0) is True
    assert led.done_blocks(job) == {0, 3}
    assert led.progress(job) == (2, 10)
    assert led.get_job(job).blocks_done == 2
    marker = led.block_info(job, 3)
    assert marker["info"] == info and marker["index"] == 3 and marker["done_at"] == 1_000_000.0
    assert led.block_info(job, 4) is None
    for bad in (-1, 10, True, "3", 2.0):
        with pytest.raises(ValueError, match="index"):
            led.mark_block_done(job, bad, {})
    with pytest.raises(ValueError, match="info"):
        led.mark_block_done(job, 1, ["x"])
    with pytest.raises(JobNotFound):
        led.done_blocks(L.new_job_id())


def test_cutout_result_written_once_and_taken_once(backend):
    led = backend.make()
    job = led.create_job({}, 1).job_id
    assert led.get_result(job) is None and led.take_result(job) is None
    assert led.put_result(job, b"arrays") is True
    assert led.put_result(job, b"other") is False  # written once
    assert led.get_result(job) == b"arrays"
    assert led.take_result(job) == b"arrays"
    # taken: gone from the store for every reader, the job itself stays
    assert led.take_result(job) is None and led.get_result(job) is None
    assert backend.make().get_result(job) is None
    assert led.get_job(job).job_id == job
    with pytest.raises(ValueError):
        led.take_result("../x")


def test_done_counts_read_group_bitmaps_never_markers(durable):
    """Progress of a job is read from its done groups (one bitmap per 4096 blocks), never from
    a listing of its markers; a full group is read once and then remembered; a marker whose bit
    was lost (a worker killed between the two writes) is repaired by ``is_done``."""
    from service.jobs.markers import GROUP
    led = durable.make()
    n = GROUP + 50
    job = led.create_job({}, n).job_id
    for i in (0, 7, GROUP - 1, GROUP, n - 1):
        led.mark_block_done(job, i, {"w": 1})
    led.mark_grouped(job, range(0, GROUP))  # an incremental job inheriting a whole group
    store = led._store
    calls = {"list": [], "read": 0}
    real_list, real_read_many = store.list, store.read_many

    def counting_list(key):
        calls["list"].append(key)
        return real_list(key)

    def counting_read_many(keys):
        keys = list(keys)
        calls["read"] += len(keys)
        return real_read_many(keys)

    store.list, store.read_many = counting_list, counting_read_many
    try:
        assert led.done_count(job) == GROUP + 2
        assert not any("/blocks" in k for k in calls["list"])  # markers are never listed
        first = calls["read"]
        assert led.done_count(job, 0, GROUP) == GROUP and led.done_count(job, GROUP, n) == 2
        assert calls["read"] - first == 1  # the full group came from memory
        assert led.progress(job) == (GROUP + 2, n)
    finally:
        del store.list, store.read_many
    # a marker without its bit (killed in between): repaired on sight
    store.create(f"jobs/{job}/blocks/{GROUP + 5:08d}.done", b'{"index": 5}', f"jobs/{job}/.lock")
    assert led.done_count(job, GROUP, n) == 2
    assert led.is_done(job, GROUP + 5) and led.done_count(job, GROUP, n) == 3
    assert not led.is_done(job, GROUP + 6)


def test_supervisor_tick_and_idle_pool_poll_read_only_live_jobs(backend):
    """``live_jobs`` (what the manager supervises every tick) lists PENDING and RUNNING jobs and
    ``pending_jobs`` (what an idle pool worker polls) those of them with blocks left and no cancel
    requested, oldest first; once the ledger has seen a job end it never reads that job's state
    again, so a ledger full of finished jobs and cutouts costs one listing per tick or poll, not
    one read per job."""
    led = backend.make()
    ended = [led.create_job({}, 1).job_id for _ in range(12)]
    for i, job in enumerate(ended):
        led.set_state(job, RUNNING)
        led.set_state(job, (SUCCEEDED, FAILED, CANCELLED)[i % 3])
    live = led.create_job({"kind": "restore"}, 2).job_id
    cancelled = led.create_job({}, 1).job_id
    led.set_state(cancelled, RUNNING)
    led.request_cancel(cancelled)  # RUNNING with a cancel requested: live until the service ends it
    full = led.create_job({}, 1).job_id
    led.mark_block_done(full, 0)
    assert [r.job_id for r in led.pending_jobs()] == [live]
    assert [r.job_id for r in led.live_jobs()] == [live, cancelled, full]

    store = led._store
    read_keys: list[str] = []
    real_read_many = store.read_many

    def counting_read_many(keys):
        keys = list(keys)
        read_keys.extend(k for k in keys if k.endswith("state.json"))
        return real_read_many(keys)

    store.read_many = counting_read_many
    try:
        later = led.create_job({}, 1).job_id
        assert [r.job_id for r in led.pending_jobs()] == [live, later]
        assert [r.job_id for r in led.live_jobs()] == [live, cancelled, full, later]
        assert read_keys and not any(job in k for k in read_keys for job in ended), "ended jobs are not read again"
        led.set_state(live, RUNNING)
        led.set_state(live, SUCCEEDED)
        assert [r.job_id for r in led.pending_jobs()] == [later]
    finally:
        del store.read_many


# ----------------------------------------------------------------- events

def test_events_ordered_with_cursor(backend):
    led = backend.make()
    job = led.create_job({}, 1).job_id
    led.add_event(job, "block.done", "block 0 done", index=0, seconds=0.5)
    led.set_state(job, RUNNING, "go")
    evs, cursor = led.events(job)
    assert [e.kind for e in evs] == ["created", "block.done", "state"]
    assert evs[1].fields == {"index": 0, "seconds": 0.5}
    assert evs[2].fields == {"state": RUNNING, "previous": PENDING}
    assert cursor == evs[-1].id and [e.id for e in evs] == sorted(e.id for e in evs)

    assert led.events(job, after=cursor) == ([], cursor)
    for i in range(5):
        led.add_event(job, "log", f"line {i}")
    new, cursor2 = led.events(job, after=cursor)
    assert [e.message for e in new] == [f"line {i}" for i in range(5)]
    first2, c = led.events(job, after=cursor, limit=2)
    more, _ = led.events(job, after=c)
    assert [e.id for e in first2 + more] == [e.id for e in new]

    # another writer (a second service) appends after the cursor
    backend.make().add_event(job, "log", "from elsewhere")
    tail, _ = led.events(job, after=cursor2)
    assert [e.message for e in tail] == ["from elsewhere"]

    with pytest.raises(ValueError, match="kind"):
        led.add_event(job, "Bad Kind", "x")
    with pytest.raises(ValueError, match="JSON"):
        led.add_event(job, "log", "x", obj=object())
    with pytest.raises(ValueError, match="after"):
        led.events(job, after="../../x")


# ----------------------------------------------------------------- leases

def test_lease_lifecycle_and_expired_takeover(backend):
    clock = FakeClock()
    a, b = backend.make(clock=clock), backend.make(clock=clock)
    job = a.create_job({}, 3).job_id
    assert a.get_lease(job, 1) is None
    assert a.try_acquire_lease(job, 1, "worker-a", 10)
    assert not b.try_acquire_lease(job, 1, "worker-b", 10)
    assert a.try_acquire_lease(job, 1, "worker-a", 10)  # re-entrant for the holder
    lease = b.get_lease(job, 1)
    assert lease.owner == "worker-a" and lease.expires_at == clock.t + 10

    clock.t += 8
    assert a.renew_lease(job, 1, "worker-a", 10)
    assert not b.renew_lease(job, 1, "worker-b", 10)
    assert not b.release_lease(job, 1, "worker-b")
    clock.t += 9  # 17 s after acquisition, still inside the renewed lease
    assert not b.try_acquire_lease(job, 1, "worker-b", 10)

    clock.t += 5  # expired
    assert b.get_lease(job, 1).expired(clock.t)
    assert b.try_acquire_lease(job, 1, "worker-b", 10)
    assert not a.renew_lease(job, 1, "worker-a", 10)
    assert not a.release_lease(job, 1, "worker-a")
    assert a.get_lease(job, 1).owner == "worker-b"
    assert b.release_lease(job, 1, "worker-b")
    assert a.get_lease(job, 1) is None
    assert a.try_acquire_lease(job, 1, "worker-a", 10)
    assert a.get_lease(job, 0) is None  # other blocks untouched

    with pytest.raises(ValueError, match="owner"):
        a.try_acquire_lease(job, 0, "bad/owner", 10)
    for ttl in (0, -1, "5", L.MAX_TTL_S * 2):
        with pytest.raises(ValueError, match="ttl_s"):
            a.try_acquire_lease(job, 0, "w", ttl)
    with pytest.raises(ValueError, match="index"):
        a.try_acquire_lease(job, 3, "w", 10)


def _contend(url, storage_options, job_id, indices, owner, clock_offset, go, results):
    """One contender: try every index once (shuffled) and report which it won."""
    led = Ledger(url, storage_options=storage_options,
                 clock=lambda: time.time() + clock_offset)
    order = list(indices)
    random.Random(owner).shuffle(order)
    go.wait(60)
    won = [i for i in order if led.try_acquire_lease(job_id, i, owner, 600)]
    results.put((owner, won))


@pytest.mark.parametrize("takeover", [False, True], ids=["fresh", "expired"])
def test_lease_exclusive_under_contention(durable, takeover):
    """8 threads and 2 processes race for the same leases: one winner per block."""
    led = durable.make()
    indices = list(range(4))
    job = led.create_job({}, len(indices)).job_id
    offset = 0.0
    if takeover:  # stale leases from a dead worker; contenders' clocks are past expiry
        for i in indices:
            assert led.try_acquire_lease(job, i, "dead-worker", 60)
        offset = 3600.0

    ctx = mp.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(durable.proc_url, durable.proc_options, job,
                                                indices, f"proc-{k}", offset, go, results))
             for k in range(2)]
    threads = [threading.Thread(target=_contend, args=(durable.url, None, job,
                                                       indices, f"thread-{k}", offset, go, results))
               for k in range(8)]
    for p in procs:
        p.start()
    for t in threads:
        t.start()
    time.sleep(0.5)  # let the processes import and wait on the event
    go.set()
    got = [results.get(timeout=60) for _ in range(10)]
    for t in threads:
        t.join(60)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0

    winners = {i: [o for o, won in got if i in won] for i in indices}
    assert all(len(w) == 1 for w in winners.values()), winners
    for i, (w,) in winners.items():
        assert led.get_lease(job, i).owner == w


# ----------------------------------------------------------------- ids, restart, stores

BAD_IDS = ["../x", "", "a/b", "..", "/", "01ARZ3NDEKTSV4RRFFQ69G5FAV",
           "01arz3ndektsv4rrffq69g5fa/", "01arz3ndektsv4rrffq69g5fav/../../x",
           "81arz3ndektsv4rrffq69g5fav", "01arz3ndektsv4rrffq69g5fau", None, 7]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_invalid_job_ids_rejected(tmp_path, bad):
    root = tmp_path / "ledger"
    led = Ledger(str(root))
    calls = [
        lambda: led.get_job(bad),
        lambda: led.set_state(bad, RUNNING),
        lambda: led.request_cancel(bad),
        lambda: led.cancel_requested(bad),
        lambda: led.mark_block_done(bad, 0, {}),
        lambda: led.done_blocks(bad),
        lambda: led.progress(bad),
        lambda: led.try_acquire_lease(bad, 0, "w", 10),
        lambda: led.renew_lease(bad, 0, "w", 10),
        lambda: led.release_lease(bad, 0, "w"),
        lambda: led.add_event(bad, "log", "x"),
        lambda: led.events(bad),
    ]
    if bad is not None:  # None asks create_job for a new id
        calls.append(lambda: led.create_job({}, 1, job_id=bad))
    for call in calls:
        with pytest.raises(ValueError, match="job_id"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger"]
    assert not (root / "jobs").exists()


def test_restart_sees_everything(durable):
    clock = FakeClock()
    first = durable.make(clock=clock)
    job = first.create_job({"kind": "train", "steps": 10}, 5).job_id
    first.set_state(job, RUNNING, "training")
    first.mark_block_done(job, 2, {"worker": "w"})
    first.mark_block_done(job, 4, {"worker": "w"})
    assert first.try_acquire_lease(job, 0, "w", 30)
    first.add_event(job, "log", "step 5")
    first.request_cancel(job)
    before = first.get_job(job)
    evs_before, _ = first.events(job)
    del first

    second = durable.make(clock=clock)
    assert second.get_job(job) == before
    assert before.state == RUNNING and before.cancel_requested and before.blocks_done == 2
    assert second.done_blocks(job) == {2, 4}
    assert second.progress(job) == (2, 5)
    assert [e.id for e in second.events(job)[0]] == [e.id for e in evs_before]
    assert not second.try_acquire_lease(job, 0, "other", 30)
    assert second.get_lease(job, 0).owner == "w"
    assert [r.job_id for r in second.list_jobs()[0]] == [job]
    assert second.set_state(job, CANCELLED).state == CANCELLED


def test_local_layout_and_guarantee(tmp_path):
    led = Ledger(str(tmp_path))  # a plain path works like file://
    assert led.lease_guarantee == "local-lock"
    job = led.create_job({"a": 1}, 3).job_id
    led.mark_block_done(job, 1, {"w": 1})
    led.try_acquire_lease(job, 2, "w", 5)
    base = tmp_path / "jobs" / job
    assert json.loads((base / "spec.json").read_text()) == {"a": 1}
    assert json.loads((base / "state.json").read_text())["state"] == PENDING
    assert (base / "blocks" / "00000001.done").is_file()
    assert json.loads((base / "leases" / "00000002.json").read_text())["owner"] == "w"
    assert len(list((base / "events").glob("*.json"))) == 1
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_s3_conditional_writes_probed(s3_endpoint):
    b = _s3_backend(s3_endpoint)
    led = b.make()
    assert led.lease_guarantee == "s3-conditional"
    assert led._store._conditional_delete is True
    job = led.create_job({}, 1).job_id
    # the same objects through plain s3:// with explicit options
    assert Ledger(b.proc_url, storage_options=b.proc_options).get_job(job).job_id == job
    prefix = b.proc_url[len("s3://"):]
    keys = led._store.fs.find(prefix)
    assert f"{prefix}/jobs/{job}/spec.json" in keys
    assert not [k for k in keys if "/_probe/" in k]


def test_s3_best_effort_mode(s3_endpoint):
    """Without conditional writes: write, settle, read back; same single-caller behaviour."""
    clock = FakeClock()
    b = _s3_backend(s3_endpoint)
    a = b.make(clock=clock, conditional_writes=False, settle_s=0.01)
    other = b.make(clock=clock, conditional_writes=False, settle_s=0.01)
    assert a.lease_guarantee == "best-effort"
    job = a.create_job({}, 2).job_id
    assert a.try_acquire_lease(job, 0, "a", 10)
    assert not other.try_acquire_lease(job, 0, "b", 10)
    clock.t += 11
    assert other.try_acquire_lease(job, 0, "b", 10)
    assert not a.renew_lease(job, 0, "a", 10)
    assert other.release_lease(job, 0, "b")
    assert a.get_lease(job, 0) is None
    assert a.try_acquire_lease(job, 0, "a", 10)
    assert a.mark_block_done(job, 1, {}) and not other.mark_block_done(job, 1, {})
    assert a.set_state(job, RUNNING).state == RUNNING
    assert other.get_job(job).state == RUNNING
