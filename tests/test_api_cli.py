"""The service commands of the ``emrestore`` CLI against a real server.

Client commands run in-process (``service.cli.main``) against a server in this process whose
real JobManager runs the real LocalExecutor (``emrestore worker`` subprocesses); ``serve`` and
``worker`` also run as subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from service.api.client import EmrestoreClient
from service.cli import main
from service.jobs.executors import LocalExecutor
from service.jobs.manager import JobManager
from tests.test_api import make_model, make_source, start_server

pytestmark = pytest.mark.timeout(120)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(capsys, *argv):
    """(exit code, stdout, stderr) of ``emrestore argv`` run in this process."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("emrestore: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    src, vol = make_source(str(root))
    models = str(root / "models")
    make_model(models, "iso3", vol)
    broken = os.path.join(models, "broken")  # model.json without weights: fails in the worker
    shutil.copytree(os.path.join(models, "iso3"), broken)
    os.remove(os.path.join(broken, "weights.pt"))
    ledger = f"file://{root}/ledger"
    mgr = JobManager(ledger, LocalExecutor(ledger, default_parallelism=1, log_dir=str(root / "logs")),
                     models_dir=models, poll_interval_s=0.2, max_cutout_voxels=50_000)
    mgr.start()
    server, port = start_server(mgr)
    authed, aport = start_server(mgr, token="cli-token")
    yield {"root": root, "src": src, "server": f"127.0.0.1:{port}", "authed": f"127.0.0.1:{aport}",
           "mgr": mgr, "ledger": ledger}
    server.stop(0).wait()
    authed.stop(0).wait()
    mgr.close()


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    for var in ("EMRESTORE_TOKEN", "EMRESTORE_SERVER", "EMRESTORE_TLS_CA"):
        monkeypatch.delenv(var, raising=False)


def test_submit_wait_then_jobs_commands(srv, capsys):
    out_url = f"file://{srv['root']}/out-wait"
    rc, out, err = run(capsys, "submit", srv["src"], "--region", "0,0,0:64,64,8", "--model", "iso3",
                       "--output", out_url, "--steps", "1", "--wait", "--server", srv["server"])
    assert rc in (0, None), err
    job_id = out.splitlines()[0].strip()
    assert re.fullmatch(r"[0-9a-z]{26}", job_id)
    assert f"job {job_id} SUCCEEDED" in out and out_url in out
    assert "blocks" in err and "vox/s" in err  # the progress bar

    rc, out, err = run(capsys, "jobs", "ls", "--server", srv["server"])
    assert rc in (0, None) and job_id in out and "SUCCEEDED" in out
    rc, out, _ = run(capsys, "jobs", "ls", "--state", "succeeded", "--json", "--server", srv["server"])
    listed = json.loads(out)
    assert job_id in [j["job_id"] for j in listed] and {j["state"] for j in listed} == {"SUCCEEDED"}
    rc, out, _ = run(capsys, "jobs", "get", job_id, "--server", srv["server"])
    assert rc in (0, None) and "state:       SUCCEEDED" in out and out_url in out
    rc, out, _ = run(capsys, "jobs", "get", job_id, "--json", "--server", srv["server"])
    got = json.loads(out)
    assert got["state"] == "SUCCEEDED" and got["blocks_done"] == got["blocks_total"] >= 1
    rc, out, _ = run(capsys, "jobs", "watch", job_id, "--quiet", "--server", srv["server"])
    assert rc in (0, None) and "SUCCEEDED" in out

    # cancel a running job; watching it then fails (exit 1); cancelling again is bad input (exit 2)
    rc, out, err = run(capsys, "submit", srv["src"], "--whole", "--model", "iso3", "--output",
                       f"file://{srv['root']}/out-cancel", "--steps", "60", "--server", srv["server"])
    victim = out.strip()
    rc, out, err = run(capsys, "jobs", "cancel", victim, "--server", srv["server"])
    assert rc in (0, None) and f"job {victim} CANCELLED" in out
    rc, out, err = run(capsys, "jobs", "watch", victim, "--quiet", "--server", srv["server"])
    assert rc == 1 and error_line(err).startswith("emrestore: error: CANCELLED:")
    rc, out, err = run(capsys, "jobs", "cancel", victim, "--server", srv["server"])
    assert rc == 2 and error_line(err).startswith("emrestore: error: FAILED_PRECONDITION: job_id:")


def test_submit_wait_exits_nonzero_when_the_job_fails(srv, capsys):
    rc, out, err = run(capsys, "submit", srv["src"], "--whole", "--model", "broken", "--output",
                       f"file://{srv['root']}/out-broken", "--steps", "1", "--wait", "--quiet",
                       "--server", srv["server"])
    assert rc == 1, (out, err)
    assert error_line(err).startswith("emrestore: error: FAILED:")


def test_cutout_and_remote_models(srv, capsys, tmp_path):
    from service.volume.tiff import read_stack, read_voxel_size
    out, unc = tmp_path / "cut.tif", tmp_path / "cut-std.tif"
    rc, stdout, err = run(capsys, "cutout", srv["src"], "--region", "8,8,2:40,24,5", "--model", "iso3",
                          "--out", out, "--uncertainty", unc, "--samples", "2", "--steps", "1",
                          "--server", srv["server"])
    assert rc in (0, None), err
    assert read_stack(out).shape == (7, 16, 32) and read_stack(unc).shape == (7, 16, 32)
    assert read_voxel_size(out) == pytest.approx((8, 8, 8))
    assert "output start (x,y,z) [8, 8, 7]" in stdout
    rc, stdout, err = run(capsys, "cutout", srv["src"], "--region", "0,0,0:64,64,8", "--model", "iso3",
                          "--out", tmp_path / "big.tif", "--server", srv["server"])
    assert rc == 2 and "RESOURCE_EXHAUSTED: region:" in error_line(err) and "50000" in err
    rc, stdout, err = run(capsys, "remote-models", "--server", srv["server"])
    assert rc in (0, None) and re.search(r"^iso3\s+isotropic\s+3\s+tiny", stdout, re.MULTILINE)
    rc, stdout, err = run(capsys, "remote-models", "--json", "--server", srv["server"])
    assert {m["url"].rsplit("/", 1)[-1] for m in json.loads(stdout)} == {"iso3", "broken"}


@pytest.mark.parametrize("argv,code,text", [
    (["submit", "SRC", "--region", "1,2:3,4", "--model", "iso3", "--output", "file:///tmp/o"],
     "INVALID_ARGUMENT", "--region: expected X0,Y0,Z0:X1,Y1,Z1"),
    (["submit", "SRC", "--region", "5,0,0:5,8,8", "--model", "iso3", "--output", "file:///tmp/o"],
     "INVALID_ARGUMENT", "--region: start [5, 0, 0] must be < stop"),
    (["submit", "SRC", "--whole", "--model", "iso3", "--output", "file:///tmp/o", "--steps", "-1"],
     "INVALID_ARGUMENT", "--steps"),
    (["submit", "SRC", "--whole", "--model", "iso3", "--output", "file:///tmp/o", "--uncertainty", "file:///u"],
     "INVALID_ARGUMENT", "--uncertainty: needs samples"),
    (["submit", "SRC", "--whole", "--model", "nope", "--output", "file:///tmp/o"], "NOT_FOUND", "model:"),
    (["submit", "SRC", "--whole", "--model", "iso3", "--output", "file:///tmp/o", "--sampler", "euler"],
     "INVALID_ARGUMENT", "sampler:"),
    (["jobs", "get", "01" + "0" * 24], "NOT_FOUND", "job_id:"),
    (["jobs", "get", "garbage"], "INVALID_ARGUMENT", "job_id:"),
    (["cutout", "SRC", "--region", "0,0,0:8,8,2", "--model", "iso3", "--out", "x.png"], "INVALID_ARGUMENT", "--out"),
])
def test_bad_input_exits_2_with_one_line(srv, capsys, argv, code, text):
    argv = [srv["src"] if a == "SRC" else a for a in argv] + ["--server", srv["server"]]
    rc, out, err = run(capsys, *argv)
    assert rc == 2, (out, err)
    line = error_line(err)
    assert line.startswith(f"emrestore: error: {code}: ") and text in line, line


def test_unreachable_server_exits_1(capsys, tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    rc, out, err = run(capsys, "jobs", "ls", "--server", f"127.0.0.1:{port}", "--timeout", "3")
    assert rc == 1 and error_line(err).startswith("emrestore: error: UNAVAILABLE: ")


def test_token_from_file_and_env(srv, capsys, tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text("# the CLI token\ncli-token\n")
    rc, out, err = run(capsys, "remote-models", "--server", srv["authed"])
    assert rc == 2 and "UNAUTHENTICATED: authorization: missing bearer token" in error_line(err)
    rc, out, err = run(capsys, "remote-models", "--server", srv["authed"], "--token-file", token_file)
    assert rc in (0, None) and "iso3" in out
    monkeypatch.setenv("EMRESTORE_TOKEN", "wrong")
    rc, out, err = run(capsys, "remote-models", "--server", srv["authed"])
    assert rc == 2 and "invalid bearer token" in err
    monkeypatch.setenv("EMRESTORE_TOKEN", "cli-token")
    monkeypatch.setenv("EMRESTORE_SERVER", srv["authed"])
    rc, out, err = run(capsys, "jobs", "ls")
    assert rc in (0, None), err
    rc, out, err = run(capsys, "remote-models", "--token-file", tmp_path / "missing")
    assert rc == 2 and "--token-file" in error_line(err)


def _env_for_subprocess(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMRESTORE_")}
    env.update(extra)
    return env


def test_serve_subprocess_with_token_and_sigterm(tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text("serve-token\n")
    data = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", "0", "--data-dir", data,
                             "--token-file", token_file], cwd=ROOT,
                            # no job runs here: no torch-warm worker template (processes.warm_up)
                            env=_env_for_subprocess(EMRESTORE_WORKER_START="exec"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        deadline = time.time() + 60
        lines = []
        while time.time() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            m = re.match(r"emrestore: serving on 127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "".join(lines)
        assert "auth on" in lines[-1] and str(data) in lines[-1]
        with EmrestoreClient(f"127.0.0.1:{port}", token="serve-token") as c:
            assert c.health() == "SERVING"
            assert c.models() == [] and list(c.list_jobs()) == []
        r = subprocess.run([sys.executable, "-m", "service.cli", "remote-models", "--server", f"127.0.0.1:{port}"],
                           cwd=ROOT, env=_env_for_subprocess(EMRESTORE_TOKEN="serve-token"),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "no models" in r.stdout, r.stderr
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20)
        assert rc == 0 and "server stopped" in proc.stderr.read()
        assert (data / "ledger").is_dir() and (data / "models").is_dir()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_worker_command_errors(srv, capsys, monkeypatch):
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    rc, out, err = run(capsys, "worker", "--ledger", srv["ledger"], "--job", "01" + "0" * 24)
    assert rc == 2 and "--task-index" in error_line(err)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    rc, out, err = run(capsys, "worker", "--ledger", srv["ledger"], "--job", "01" + "0" * 24)
    assert rc == 2 and error_line(err).startswith("emrestore: error: NOT_FOUND: ")
    rc, out, err = run(capsys, "worker", "--ledger", srv["ledger"], "--job", "x", "--num-tasks", "0")
    assert rc == 2 and "--num-tasks" in error_line(err)


def test_submit_reuse_active_attaches_to_the_running_job(srv, capsys):
    """The CronJob's `submit --incremental --reuse-active` never starts a second job for the same output."""
    out_url = f"file://{srv['root']}/out-reuse"
    argv = ["submit", srv["src"], "--whole", "--incremental", "--model", "iso3", "--output", out_url,
            "--steps", "60", "--server", srv["server"]]
    rc, out, err = run(capsys, *argv)
    first = out.strip()
    try:
        rc, out, err = run(capsys, *argv, "--reuse-active")
        assert rc in (0, None) and out.strip() == first, err
        assert f"reusing active restore job {first}" in err
        other_url = f"file://{srv['root']}/out-reuse-other"
        rc, out, err = run(capsys, *[other_url if a == out_url else a for a in argv], "--reuse-active")
        other = out.strip()
        assert other != first and "reusing" not in err  # another output: a job of its own
        run(capsys, "jobs", "cancel", other, "--server", srv["server"])
    finally:
        run(capsys, "jobs", "cancel", first, "--server", srv["server"])
