"""Client commands of the ``emrestore`` CLI: submit, jobs, cutout, remote-models (``COMMANDS``,
listed in the command tree of service/cli.py with ``serve`` from serving.py and ``worker`` from
service/jobs/worker_main.py).

Client commands talk to ``--server`` (default ``$EMRESTORE_SERVER`` or 127.0.0.1:50051) with
the bearer token from ``--token-file`` or ``$EMRESTORE_TOKEN`` (and ``--tls-ca`` /
``$EMRESTORE_TLS_CA`` for TLS). A request's fields are checked here by the same code as on the
server (service/jobs/spec.py, fields renamed to the options: ``CLI_NAMES``) before anything is
sent. Errors print one line ``emrestore: error: <CODE>: <message>`` and exit 2 for bad input
(INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, …) or 1 for server and job failures
(UNAVAILABLE, INTERNAL, a FAILED or CANCELLED job): service/commandline.py.

Module import stays light (no grpc/torch).
"""

from __future__ import annotations

import json
import os
import sys
import time

from ..commandline import EXIT_FAILURE, Command, error_line
from ..errors import EmrestoreError

DEFAULT_SERVER = "127.0.0.1:50051"
#: request field → option of the client commands (how errors of the request checks name them)
CLI_NAMES = {"region": "--region", "uncertainty_output": "--uncertainty", "model": "--model",
             "output": "--output", "sampler": "--sampler", "steps": "--steps", "samples": "--samples",
             "seed": "--seed", "mip": "--mip", "estimate": "--estimate", "parallelism": "--parallelism",
             "execution": "--execution", "register_in": "--register-in", "output_encoding": "--output-encoding",
             "jpeg_quality": "--jpeg-quality", "output_sharding": "--output-sharding", "dry_run": "--dry-run"}


# ----------------------------------------------------------------------------- parsing helpers
def parse_region(text: str, name: str = "--region") -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``X0,Y0,Z0:X1,Y1,Z1`` → ((x0, y0, z0), (x1, y1, z1)); start inclusive, stop exclusive (the
    values are checked with the request: service/jobs/spec.py)."""
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, stop = (tuple(int(v) for v in p.split(",")) for p in parts)
        if len(start) != 3 or len(stop) != 3:
            raise ValueError
    except ValueError:
        raise EmrestoreError(name, f"expected X0,Y0,Z0:X1,Y1,Z1 (source voxels, stop exclusive), got {text!r}") from None
    return start, stop  # type: ignore[return-value]


def _checked(request, **fields):
    """``request(**fields)`` of service/jobs/spec.py: the server's own checks, run before sending;
    errors name the options (``CLI_NAMES``)."""
    try:
        return request(**fields)
    except EmrestoreError as e:
        raise e.renamed(CLI_NAMES) from None


def _read_token(a) -> str | None:
    if getattr(a, "token_file", None):
        from .auth import read_token_file
        return read_token_file(a.token_file)[0]  # ValueError naming --token-file: one line
    return os.environ.get("EMRESTORE_TOKEN") or None


def _client(a):
    from .client import EmrestoreClient
    tls = a.tls_ca or os.environ.get("EMRESTORE_TLS_CA") or None
    return EmrestoreClient(a.server, token=_read_token(a), tls_ca=tls, timeout=a.timeout)


def _add_client_args(p) -> None:
    g = p.add_argument_group("server connection")
    g.add_argument("--server", default=os.environ.get("EMRESTORE_SERVER", DEFAULT_SERVER),
                   help="HOST:PORT of the emrestore server (default $EMRESTORE_SERVER or %(default)s)")
    g.add_argument("--token-file", help="file holding the bearer token (default: $EMRESTORE_TOKEN)")
    g.add_argument("--tls-ca", help="CA certificate (PEM) of a TLS server (default: $EMRESTORE_TLS_CA)")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per call (default %(default)s)")


def _add_sampling_args(p) -> None:
    p.add_argument("--sampler", default="", help="dpmpp2m (default), ddim or ddpm")
    p.add_argument("--steps", type=int, default=0, help="sampler steps (0: server default, 10)")
    p.add_argument("--samples", type=int, default=0, help="samples per image (0: 1); ≥ 2 adds their spread to an uncertainty "
                                                           "layer, and gives a cutout's uncertainty")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mip", type=int, default=0, help="source scale (0: full resolution)")
    p.add_argument("--estimate", default="", metavar="ESTIMATE",
                   help="mean (the default: posterior mean), sample (one sharp realisation) or "
                        "sample-mean (mean of --samples realisations); checked by the server")


def _sampling(a) -> dict:
    return dict(sampler=a.sampler, steps=a.steps, samples=a.samples, seed=a.seed, mip=a.mip, estimate=a.estimate)


# ----------------------------------------------------------------------------- formatting
def _rate(vps: float) -> str:
    if vps <= 0:
        return "- vox/s"
    for unit, div in (("Gvox/s", 1e9), ("Mvox/s", 1e6), ("kvox/s", 1e3)):
        if vps >= div:
            return f"{vps / div:.1f} {unit}"
    return f"{vps:.0f} vox/s"


def _eta(s: float) -> str:
    if s <= 0:
        return "-"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _job_dict(j) -> dict:
    from dataclasses import asdict
    return asdict(j)


def _print_job(j) -> None:
    print(f"job_id:      {j.job_id}")
    print(f"kind:        {j.kind}")
    print(f"state:       {j.state}")
    print(f"message:     {j.message}")
    print(f"progress:    {j.blocks_done}/{j.blocks_total} blocks, {_rate(j.voxels_per_second)}, "
          f"ETA {_eta(j.eta_seconds)}")
    print(f"created:     {_when(j.created)}")
    print(f"updated:     {_when(j.updated)}")
    for k, v in sorted(j.outputs.items()):
        print(f"{k + ':':12} {v}")
    spec = {k: v for k, v in j.spec.items() if k != "plan"}
    if spec:
        print("spec:        " + json.dumps(spec, sort_keys=True))
    if j.events:
        print("events:")
        for e in j.events:
            print(f"  {e}")


class _Progress:
    """Progress of job updates on stderr (a bar on a terminal, a line now and then in a log:
    service/progress.py): blocks, voxels/s and the server's ETA."""

    def __init__(self, job_id: str, quiet: bool = False):
        self.quiet = quiet
        self.bar = None
        self.job_id = job_id
        if not quiet:
            from ..progress import progress_bar
            self.bar = progress_bar(unit="block", desc=job_id[-8:],
                                    bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} blocks "
                                               "[{elapsed}{postfix}]")

    def __call__(self, u) -> None:
        if self.bar is None:
            return
        if u.blocks_total and self.bar.total != u.blocks_total:
            self.bar.total = u.blocks_total
        self.bar.n = u.blocks_done
        self.bar.set_postfix_str(f"{u.state}, {_rate(u.voxels_per_second)}, ETA {_eta(u.eta_seconds)}",
                                 refresh=False)
        self.bar.refresh()
        for e in u.new_events:
            self.bar.write(f"  {e}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _wait(c, job_id: str, quiet: bool, timeout: float | None = None) -> int:
    bar = _Progress(job_id, quiet)
    try:
        final = c.wait(job_id, progress=bar, timeout=timeout)
    finally:
        bar.close()
    line = f"job {final.job_id} {final.state}" + (f": {final.message}" if final.message else "")
    if final.state == "SUCCEEDED":
        print(line)
        for k, v in sorted(final.outputs.items()):
            print(f"  {k}: {v}")
        return 0
    error_line(line, final.state)
    return EXIT_FAILURE


# ----------------------------------------------------------------------------- commands
def cmd_submit(a):
    region = parse_region(a.region) if a.region else None
    from ..jobs.spec import restore_request
    _checked(restore_request, source=a.source, model=a.model, output=a.output, region=region, whole=region is None,
             uncertainty_output=a.uncertainty or "", parallelism=a.parallelism, execution=a.execution,
             register_in=a.register_in or [], output_encoding=a.output_encoding, jpeg_quality=a.jpeg_quality,
             output_sharding=a.output_sharding, dry_run=a.dry_run, **_sampling(a))
    kw = dict(uncertainty=a.uncertainty, mip=a.mip, incremental=a.incremental, sampler=a.sampler,
              steps=a.steps, samples=a.samples, seed=a.seed, parallelism=a.parallelism,
              register_in=a.register_in or [], overwrite=a.overwrite, estimate=a.estimate,
              execution=a.execution, output_encoding=a.output_encoding, jpeg_quality=a.jpeg_quality,
              output_sharding=a.output_sharding, dry_run=a.dry_run)
    with _client(a) as c:
        if getattr(a, "reuse_active", False):
            active = _active_job_for(c, a.source, a.output, region)
            if active is not None:  # e.g. the CronJob's retry while last night's run still goes
                print(active.job_id, flush=True)
                print(f"reusing active restore job {active.job_id} for {a.output} ({active.state}, "
                      f"{active.blocks_done}/{active.blocks_total} blocks) instead of starting another",
                      file=sys.stderr, flush=True)
                return _wait(c, active.job_id, a.quiet) if a.wait else 0
        if region is not None:
            job = c.restore_region(a.source, a.model, a.output, region[0], region[1], **kw)
        else:
            job = c.restore_dataset(a.source, a.model, a.output, **kw)
        if job.dry_run is not None:  # nothing was written: print what the job would do
            from ..jobs.estimate import format_estimate
            print(format_estimate(job.dry_run), flush=True)
            return 0
        print(job.job_id, flush=True)
        print(f"submitted restore job {job.job_id}: {job.blocks_total} block(s), {job.state}"
              + (f" ({job.message})" if job.message else ""), file=sys.stderr, flush=True)
        if a.wait:
            return _wait(c, job.job_id, a.quiet)
    return 0


def _active_job_for(c, source: str, output: str, region):
    """The newest PENDING or RUNNING restore job with the same source, output and region, if any."""
    want_region = None if region is None else [list(region[0]), list(region[1])]
    for state in ("RUNNING", "PENDING"):
        for j in c.list_jobs(state=state, page_size=100):
            spec = j.spec or {}
            got = spec.get("region_start_xyz")
            got_region = None if got is None else [list(got), list(spec.get("region_stop_xyz") or [])]
            if (j.kind in ("restore", "") and spec.get("source") == source and spec.get("output") == output
                    and got_region == want_region):
                return j
    return None


def cmd_jobs_ls(a):
    if a.limit < 0:
        raise EmrestoreError("--limit", f"must be ≥ 0, got {a.limit}")
    with _client(a) as c:
        jobs = []
        for j in c.list_jobs(state=a.state, page_size=min(max(a.limit, 1), 1000) if a.limit else 100):
            jobs.append(j)
            if a.limit and len(jobs) >= a.limit:
                break
    if a.json:
        print(json.dumps([_job_dict(j) for j in jobs], indent=2))
        return 0
    if not jobs:
        print("no jobs" + (f" in state {a.state.upper()}" if a.state else ""))
        return 0
    print(f"{'job_id':26}  {'kind':7} {'state':9} {'blocks':>13}  {'created':19}  message")
    for j in jobs:
        print(f"{j.job_id:26}  {j.kind:7} {j.state:9} {f'{j.blocks_done}/{j.blocks_total}':>13}  "
              f"{_when(j.created):19}  {j.message[:60]}")
    return 0


def cmd_jobs_get(a):
    with _client(a) as c:
        j = c.get_job(a.job_id)
    if a.json:
        print(json.dumps(_job_dict(j), indent=2))
    else:
        _print_job(j)
    return 0


def cmd_jobs_watch(a):
    with _client(a) as c:
        return _wait(c, a.job_id, a.quiet)


def cmd_jobs_cancel(a):
    with _client(a) as c:
        j = c.cancel(a.job_id)
    print(f"job {j.job_id} {j.state}" + (f": {j.message}" if j.message else ""))
    return 0


def cmd_cutout(a):
    start, stop = parse_region(a.region)
    from ..jobs.spec import cutout_request
    _checked(cutout_request, source=a.source, model=a.model, region=(start, stop), **_sampling(a))
    if a.uncertainty and a.samples < 2:
        raise EmrestoreError("--uncertainty", "needs --samples of at least 2")
    for name, path in (("--out", a.out), ("--uncertainty", a.uncertainty)):
        if path and not path.lower().endswith((".tif", ".tiff")):
            raise EmrestoreError(name, f"{path!r} must be a .tif file")
    from ..volume.tiff import write_stack
    with _client(a) as c:
        mean, std, meta = c.cutout(a.source, a.model, start, stop, mip=a.mip, sampler=a.sampler,
                                   steps=a.steps, samples=a.samples, seed=a.seed, estimate=a.estimate)
    write_stack(a.out, mean, voxel_size_nm=meta["resolution_nm_xyz"])
    msg = (f"wrote {a.out}: {mean.shape[0]} sections of {mean.shape[1]}×{mean.shape[2]} {meta['dtype']}, "
           f"output start (x,y,z) {list(meta['output_start_xyz'])}, voxel size "
           f"{'×'.join(f'{r:g}' for r in meta['resolution_nm_xyz'])} nm")
    if a.uncertainty:
        if std is None:
            raise EmrestoreError("--uncertainty", "the server returned no uncertainty", "INTERNAL")
        write_stack(a.uncertainty, std.astype("float32"), voxel_size_nm=meta["resolution_nm_xyz"])
        msg += f"; uncertainty {a.uncertainty}"
    if meta.get("message"):
        msg += f" ({meta['message']})"
    print(msg)
    return 0


def cmd_remote_models(a):
    with _client(a) as c:
        models = c.models()
    if a.json:
        print(json.dumps(models, indent=2, default=str))
        return 0
    if not models:
        print(f"no models on {a.server}")
        return 0
    print(f"{'name':24} {'task':10} {'factor':>6} {'preset':8} {'steps':>7}  url")
    for m in models:
        steps = (m.get("training") or {}).get("steps", "-")
        print(f"{m['name'][:24]:24} {m['task']:10} {m['factor']:>6} {m['preset']:8} {steps!s:>7}  {m['url']}")
    return 0


# ----------------------------------------------------------------------------- the commands
def submit_arguments(p) -> None:
    p.add_argument("source", help="source precomputed layer URL")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--region", help="X0,Y0,Z0:X1,Y1,Z1 absolute source voxels (stop exclusive)")
    g.add_argument("--whole", action="store_true", help="the whole dataset")
    p.add_argument("--incremental", action="store_true", help="only blocks whose output is missing")
    p.add_argument("--reuse-active", action="store_true",
                   help="if a restore job with the same source, output and region is pending or running, "
                        "attach to it instead of starting another (scheduled incremental runs)")
    p.add_argument("--model", required=True, help="model name on the server, or model URL")
    p.add_argument("--output", required=True, help="output layer URL")
    p.add_argument("--uncertainty", help="uncertainty layer URL (the model's error head; with --samples ≥ 2 "
                                         "also the samples' spread)")
    _add_sampling_args(p)
    p.add_argument("--parallelism", type=int, default=0, help="workers at once (0: server default)")
    p.add_argument("--execution", default="", metavar="WHERE",
                   help="pool (the server's warm workers), batch (a batch task per job: local worker "
                        "processes or a Kubernetes Indexed Job) or auto (default: pool for small regions)")
    p.add_argument("--register-in", action="append", metavar="TARGET",
                   help="a registration target configured on the server (repeatable)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output written by emrestore for another job")
    p.add_argument("--output-encoding", default="", metavar="ENC",
                   help="raw, png or jpeg (uint8); default: as the existing output, else as the source")
    p.add_argument("--jpeg-quality", type=int, default=0, metavar="Q",
                   help="jpeg quality 1-100 (default: the existing output's, the source's, else 90)")
    p.add_argument("--output-sharding", default="", metavar="HOW",
                   help="sharded, unsharded or auto (default: as the existing output, else as the source)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what the job would do (tasks, objects, bytes, GPU-hours) and write nothing")
    p.add_argument("--wait", action="store_true", help="show progress until the job finishes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_client_args(p)


def _jobs_ls_arguments(q) -> None:
    from ..jobs.records import STATES
    q.add_argument("--state", type=str.upper, choices=list(STATES))
    q.add_argument("--limit", type=int, default=50, help="at most this many (0: all; default %(default)s)")
    q.add_argument("--json", action="store_true")
    _add_client_args(q)


def _job_arguments(*flags: str):
    def arguments(q) -> None:
        q.add_argument("job_id")
        if "--json" in flags:
            q.add_argument("--json", action="store_true")
        if "--quiet" in flags:
            q.add_argument("--quiet", action="store_true")
        _add_client_args(q)
    return arguments


def cutout_arguments(p) -> None:
    p.add_argument("source", help="source precomputed layer URL")
    p.add_argument("--region", required=True, help="X0,Y0,Z0:X1,Y1,Z1 absolute source voxels (stop exclusive)")
    p.add_argument("--model", required=True, help="model name on the server, or model URL")
    p.add_argument("--out", required=True, help="restored region (.tif, (z, y, x))")
    p.add_argument("--uncertainty", help="standard deviation of the samples (.tif; needs --samples ≥ 2)")
    _add_sampling_args(p)
    _add_client_args(p)


def _remote_models_arguments(p) -> None:
    p.add_argument("--json", action="store_true")
    _add_client_args(p)


COMMANDS = (
    Command("submit", "submit a restoration job to the server", cmd_submit, submit_arguments),
    Command("jobs", "list, inspect, watch or cancel jobs on the server", subcommands=(
        Command("ls", "list jobs, newest first", cmd_jobs_ls, _jobs_ls_arguments),
        Command("get", "one job's status", cmd_jobs_get, _job_arguments("--json")),
        Command("watch", "progress bar until the job finishes (exit 1 if it fails)", cmd_jobs_watch,
                _job_arguments("--quiet")),
        Command("cancel", "cancel a job", cmd_jobs_cancel, _job_arguments()),
    )),
    Command("cutout", "restore a small region on the server into a TIFF", cmd_cutout, cutout_arguments),
    Command("remote-models", "list the models of the server", cmd_remote_models, _remote_models_arguments),
)
