"""``emrestore serve``: builds the job manager, its executor and completion hooks, and runs the
gRPC server. This is the composition root of the service: the only place that plugs in the
connectors' registration hook (imported here, lazily, when targets are configured).
"""

from __future__ import annotations

import os
import sys

from ..commandline import Command
from ..errors import EmrestoreError


def cmd_serve(a):
    import logging

    from ..jobs.manager import JobManager
    from .auth import load_tokens
    from .server import serve
    if not 0 <= a.port <= 65535:
        raise EmrestoreError("--port", f"must be in [0, 65535], got {a.port}")
    if a.workers < 1:
        raise EmrestoreError("--workers", f"must be ≥ 1, got {a.workers}")
    if a.pool_workers < 0 or a.pool_size < 0:
        raise EmrestoreError("--pool-workers/--pool-size", "must be ≥ 0")
    if a.max_batch_gpus is not None and a.max_batch_gpus < 0:
        raise EmrestoreError("--max-batch-gpus", f"must be ≥ 0, got {a.max_batch_gpus}")
    if a.metrics_port is not None and not 0 <= a.metrics_port <= 65535:
        raise EmrestoreError("--metrics-port", f"must be in [0, 65535], got {a.metrics_port}")
    if a.cutout_timeout <= 0:
        raise EmrestoreError("--cutout-timeout", f"must be > 0 seconds, got {a.cutout_timeout}")
    if (a.tls_cert is None) != (a.tls_key is None):
        raise EmrestoreError("--tls-cert/--tls-key", "give both or neither")
    from ..volume.stores import register_from_env
    register_from_env()  # S3-compatible aliases named in $EMRESTORE_S3_ENDPOINTS
    data = os.path.abspath(a.data_dir)
    ledger = a.ledger or "file://" + os.path.join(data, "ledger")
    models = a.models or os.environ.get("EMRESTORE_MODELS") or os.path.join(data, "models")
    if ledger.startswith("file://"):
        os.makedirs(ledger[len("file://"):], exist_ok=True)
    elif "://" not in ledger:
        ledger = "file://" + os.path.abspath(ledger)
        os.makedirs(ledger[len("file://"):], exist_ok=True)
    if "://" not in models:
        models = os.path.abspath(models)
        os.makedirs(models, exist_ok=True)
    tokens = load_tokens(token_file=a.token_file) if a.token_file else load_tokens()  # ValueError: one line
    from ..volume.policy import StorePolicy
    # stores the service may touch: the data and model directories, plus --allow-store prefixes
    policy = StorePolicy([data, models] + list(a.allow_store or []))
    for name in ("max_job_voxels", "max_sample_steps", "max_jobs_per_user", "max_concurrent_cutouts"):
        if getattr(a, name) < 1:
            raise EmrestoreError(f"--{name.replace('_', '-')}", f"must be ≥ 1, got {getattr(a, name)}")
    if a.executor == "local":
        from ..jobs.executors import LocalExecutor
        executor = LocalExecutor(ledger, default_parallelism=a.workers, log_dir=os.path.join(data, "logs"),
                                 env=policy.env())
        from ..jobs.processes import warm_up
        warm_up()  # the workers' template imports torch while the server starts
    else:
        from dataclasses import replace

        from ..jobs.kube import KubeConfig, KubernetesExecutor
        cfg = KubeConfig.from_env()
        if not cfg.ledger_url:
            cfg = replace(cfg, ledger_url=ledger)
        # worker pods re-check their plan against the same store policy as local workers
        cfg = replace(cfg, env={**cfg.env, **policy.env()})
        if a.max_batch_gpus is not None:  # the batch share of the GPU budget (the pool's on top)
            cfg = replace(cfg, max_batch_gpus=a.max_batch_gpus)
        if cfg.ledger_url.startswith("file://"):
            print("emrestore: warning: worker pods need a shared ledger (gs://, s3://); "
                  f"{cfg.ledger_url} is local", file=sys.stderr)
        try:
            executor = KubernetesExecutor(cfg)
        except Exception as e:  # noqa: BLE001 - no cluster, bad kubeconfig, bad settings
            raise EmrestoreError("--executor", f"kubernetes: {e}", "FAILED_PRECONDITION") from None
    pool_size = a.pool_size + a.pool_workers
    local_pool = None
    if pool_size:
        from ..jobs.pool_executor import ExecutionRouter, LocalPool, PoolExecutor
        if a.pool_workers:
            local_pool = LocalPool(ledger, a.pool_workers, log_dir=os.path.join(data, "logs")).start()
        executor = ExecutionRouter(ledger, PoolExecutor(ledger, size=pool_size), executor, local_pool)
    # the GPU budget: the pool's workers + what Indexed Jobs may add (kube executor's setting)
    batch_config = getattr(getattr(executor, "batch", executor), "config", None)
    max_batch = getattr(batch_config, "max_batch_gpus", None)
    metrics = None
    if a.metrics_port is not None:
        from ..jobs.pool_executor import serve_metrics
        metrics = serve_metrics(ledger, a.host, a.metrics_port, pool_size, max_batch)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    def xyz(text, name):
        try:
            v = tuple(int(t) for t in text.split(","))
            assert len(v) == 3 and min(v) >= 0
            return v
        except (ValueError, AssertionError):
            raise EmrestoreError(name, f"expected X,Y,Z non-negative integers, got {text!r}") from None
    block = xyz(a.block_size, "--block-size")
    chunk = xyz(a.output_chunk, "--output-chunk") if a.output_chunk else None
    if chunk is not None and min(chunk) < 1:
        raise EmrestoreError("--output-chunk", f"sizes must be ≥ 1, got {a.output_chunk}")
    hooks = []
    if a.targets:
        # registration is a plug-in (entry point group emrestore.completion_hooks, provided by the
        # connector package): the service never imports the connectors
        from importlib.metadata import entry_points
        plugins = list(entry_points(group="emrestore.completion_hooks"))
        if not plugins:
            raise EmrestoreError("--targets", "no registration plug-in is installed (entry point group "
                                              "emrestore.completion_hooks)", "FAILED_PRECONDITION")
        hooks.extend(ep.load()(a.targets) for ep in plugins)
    from ..jobs.manager import WorkLimits
    limits = WorkLimits(max_job_voxels=a.max_job_voxels, max_sample_steps=a.max_sample_steps,
                        max_jobs_per_user=a.max_jobs_per_user)
    manager = JobManager(ledger, executor, models_dir=models, max_cutout_voxels=a.max_cutout_voxels,
                         store_policy=policy, limits=limits, allow_foreign_overwrite=a.allow_foreign_overwrite,
                         block_size_xyz=block, output_chunk_xyz=chunk, completion_hooks=hooks,
                         interactive_max_blocks=a.interactive_max_blocks, cutout_timeout_s=a.cutout_timeout)

    def ready(port):
        scheme = "TLS" if a.tls_cert else "plaintext"
        print(f"emrestore: serving on {a.host}:{port} ({scheme}, auth {'on' if tokens else 'off'}; "
              f"ledger {ledger}; models {models}; {a.executor} executor"
              + (f"; worker pool of {pool_size}" if pool_size else "")
              + (f"; metrics on {a.host}:{metrics.server_address[1]}/metrics" if metrics else "") + ")",
              file=sys.stderr, flush=True)

    serve(manager, a.host, a.port, token=tokens or None, tls_cert=a.tls_cert, tls_key=a.tls_key,
          admins=a.admin or (), max_concurrent_cutouts=a.max_concurrent_cutouts, cutout_queue=a.cutout_queue,
          max_workers=a.rpc_threads, grace_s=a.grace, on_ready=ready)
    if metrics is not None:
        metrics.shutdown()
    print("emrestore: server stopped", file=sys.stderr)


def serve_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=50051, help="port (0: any free port; default %(default)s)")
    p.add_argument("--data-dir", default=os.environ.get("EMRESTORE_DATA", "emrestore-data"),
                   help="directory for the default ledger, models and worker logs (default %(default)s)")
    p.add_argument("--ledger", help="job ledger URL (default file://DATA_DIR/ledger)")
    p.add_argument("--models", help="model directory URL (default $EMRESTORE_MODELS or DATA_DIR/models)")
    p.add_argument("--workers", type=int, default=1,
                   help="default parallelism of a job: worker processes (local) or pods (kubernetes)")
    p.add_argument("--executor", choices=["local", "kubernetes"], default="local",
                   help="where workers run (kubernetes: settings from $EMRESTORE_KUBE_*)")
    p.add_argument("--token-file", help="bearer tokens, one per line (default $EMRESTORE_TOKEN; none: no auth)")
    p.add_argument("--tls-cert", help="server certificate chain (PEM); with --tls-key")
    p.add_argument("--tls-key", help="server private key (PEM); with --tls-cert")
    p.add_argument("--rpc-threads", type=int, default=16, help="threads serving calls (default %(default)s)")
    p.add_argument("--allow-store", action="append", metavar="PREFIX",
                   help="URL prefix the service may read or write (repeatable; e.g. file:///data/em/, "
                        "s3://lab-em/, lab://bucket/); the data and model directories are always allowed")
    p.add_argument("--admin", action="append", metavar="USER",
                   help="a user (token file line user:token) who may cancel any job (repeatable)")
    p.add_argument("--max-job-voxels", type=int, default=2 ** 36, help="output voxels per job (default %(default)s)")
    p.add_argument("--max-sample-steps", type=int, default=4000,
                   help="samples × steps per request (default %(default)s)")
    p.add_argument("--max-jobs-per-user", type=int, default=16, help="live jobs per user (default %(default)s)")
    p.add_argument("--max-concurrent-cutouts", type=int, default=2,
                   help="cutouts running at once (default %(default)s; more wait in a queue)")
    p.add_argument("--cutout-queue", type=int, default=4,
                   help="cutouts waiting; beyond: RESOURCE_EXHAUSTED (default %(default)s)")
    p.add_argument("--allow-foreign-overwrite", action="store_true",
                   help="let requests with overwrite replace layers without emrestore provenance")
    p.add_argument("--max-cutout-voxels", type=int, default=4_194_304,
                   help="largest Cutout in output voxels (default %(default)s)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds running calls get at shutdown")
    p.add_argument("--block-size", default="256,256,0",
                   help="write block X,Y,Z in output voxels, rounded up to the chunk grid (Z 0: one chunk)")
    p.add_argument("--output-chunk", help="output chunk X,Y,Z (Z a multiple of the factor; default: the "
                                          "source chunk laterally, about 16 sections in z)")
    p.add_argument("--targets", help="registration targets (JSON/YAML file, read by the connectors): "
                                     "requests name them in register_in")
    p.add_argument("--pool-workers", type=int, default=0,
                   help="start N local pool worker processes (emrestore worker --pool) for interactive work")
    p.add_argument("--pool-size", type=int, default=0,
                   help="an external warm pool of N workers leases from the same ledger (the pool "
                        "Deployment): interactive jobs and cutouts go to it")
    p.add_argument("--max-batch-gpus", type=int, default=None,
                   help="GPUs all Indexed Jobs together may add to the pool's (default "
                        "$EMRESTORE_KUBE_MAX_BATCH_GPUS)")
    p.add_argument("--interactive-max-blocks", type=int, default=16,
                   help="a region job of at most this many blocks is interactive (pool, leased first)")
    p.add_argument("--cutout-timeout", type=float, default=120.0,
                   help="seconds a Cutout waits for a pool worker (default %(default)s)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve the queue depth at http://HOST:PORT/metrics (Prometheus text; 0: any port)")


SERVE = Command("serve", "run the gRPC restoration service", cmd_serve, serve_arguments)

