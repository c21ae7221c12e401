"""The Kubernetes executor (service/jobs/kube/): settings, manifest, diagnose, executor, device check.

- Manifests are validated with kubernetes_validate against the schemas of Kubernetes 1.33 (the
  oldest release the Jobs need: backoffLimitPerIndex GA) and 1.37 (the newest kubernetes-validate
  ships); the schemas come with the pinned package, so the check is stable.
- ``diagnose`` is pure and is tested on Job/Pod objects in the states Kubernetes documents
  (tests/data/kube_states.yaml).
- The executor runs against a small fake of its five-call API (tests/kube_double.py); one
  end-to-end test lets the fake run real ``emrestore worker`` processes for the Job's indexes and
  compares the output with the local executor's, byte for byte.
- ``ClientApi`` (the official client behind that API) is checked against canned API-server
  responses on 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import kubernetes_validate
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.jobs import kube  # noqa: E402
from service.jobs.device import DeviceUnavailable, require_device  # noqa: E402
from service.jobs.executors import ExecutorStatus  # noqa: E402
from service.jobs.kube import (  # noqa: E402
    ApiError,
    ClientApi,
    KubeConfig,
    KubernetesExecutor,
    KubernetesExecutorError,
    build_job_manifest,
    diagnose,
    job_label_value,
    job_name,
    load_api_client,
    parse_index_ranges,
)
from tests.kube_double import FakeKubeApi  # noqa: E402

K8S_VERSIONS = ("1.33", "1.37")
K8S_VERSION = K8S_VERSIONS[0]
NS = "emrestore"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
STATES = yaml.safe_load((Path(__file__).parent / "data" / "kube_states.yaml").read_text())["cases"]


def config(**kw) -> KubeConfig:
    base = dict(namespace=NS, image="registry.example.com/emrestore-worker:0.1.0", ledger_url="s3://bucket/ledger")
    base.update(kw)
    return KubeConfig(**base)


def has(st, *needles: str) -> bool:
    return any(all(n in m for n in needles) for m in st.messages)


# --------------------------------------------------------------------------------------------------
# manifest


def full_config() -> KubeConfig:
    return config(
        node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        labels={"team": "connectomics"}, annotations={"owner": "em-lab"},
        env={"EMRESTORE_LOG_LEVEL": "info"}, env_secret="emrestore-env", image_pull_secrets=["regcred"],
        priority_class_name="batch-low", active_deadline_seconds=86400, cpu_limit="16",
    )


def test_manifest_validates_against_kubernetes_schemas():
    m = build_job_manifest("2024-06-01/Run_A", 40, 8, full_config())
    for version in K8S_VERSIONS:
        assert kubernetes_validate.validate(m, version, strict=True) == version
    # and the official client's models accept it
    from kubernetes import client  # imported where used: ~1.6 s, for two tests
    job = client.ApiClient()._ApiClient__deserialize(m, "V1Job")
    assert job.spec.completion_mode == "Indexed"


def test_manifest_is_one_indexed_job_with_failure_policy():
    cfg = full_config()
    m = build_job_manifest("job-42", num_tasks=40, parallelism=8, config=cfg)
    spec = m["spec"]
    assert m["apiVersion"] == "batch/v1" and m["kind"] == "Job"
    assert m["metadata"]["name"] == "emrestore-job-42" and m["metadata"]["namespace"] == NS
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == 40 and spec["parallelism"] == 8
    assert spec["backoffLimitPerIndex"] == cfg.backoff_limit_per_index
    assert spec["maxFailedIndexes"] == 40
    assert spec["podReplacementPolicy"] == "Failed"
    assert spec["ttlSecondsAfterFinished"] == cfg.ttl_seconds_after_finished
    assert "backoffLimit" not in spec  # with backoffLimitPerIndex the API defaults it to MaxInt32
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[1] == {"action": "FailIndex", "onExitCodes": {"containerName": "worker", "operator": "In", "values": [2]}}

    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    assert c["command"] == ["emrestore", "worker", "--ledger", "s3://bucket/ledger", "--job", "job-42",
                            "--num-tasks", "40"]
    assert "--task-index" not in c["command"]  # from $JOB_COMPLETION_INDEX
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["resources"]["requests"] == {"cpu": cfg.cpu_request, "memory": cfg.memory_request}
    assert c["resources"]["limits"]["memory"] == cfg.memory_limit
    assert pod["nodeSelector"] == cfg.node_selector and pod["tolerations"] == cfg.tolerations
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CLOUD_VOLUME_DIR"] == "/secrets/cloudvolume" and env["EMRESTORE_LOG_LEVEL"] == "info"
    assert env["OMP_NUM_THREADS"] is None  # from requests.cpu (resourceFieldRef)
    mounts = {v["mountPath"]: v["name"] for v in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # $CLOUD_VOLUME_DIR is writable (stores.py writes alias secrets there), filled from the Secret
    assert volumes[mounts["/secrets/cloudvolume"]]["emptyDir"]["medium"] == "Memory"
    (init,) = pod["initContainers"]
    assert init["image"] == cfg.image and init["command"][:2] == ["sh", "-c"]
    assert init["command"][-2:] == ["/secrets/credentials", "/secrets/cloudvolume/secrets"]
    init_mounts = {v["mountPath"]: v for v in init["volumeMounts"]}
    assert init_mounts["/secrets/credentials"]["readOnly"] is True
    cred = volumes[init_mounts["/secrets/credentials"]["name"]]
    assert cred["secret"]["secretName"] == "emrestore-cloudvolume"
    assert init_mounts["/secrets/cloudvolume"]["name"] == mounts["/secrets/cloudvolume"]
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": cfg.shm_size}
    assert c["envFrom"] == [{"secretRef": {"name": "emrestore-env", "optional": True}}]
    assert pod["serviceAccountName"] == "emrestore-worker" and pod["automountServiceAccountToken"] is False
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"

    for meta in (m["metadata"], spec["template"]["metadata"]):
        labels = meta["labels"]
        assert labels["app.kubernetes.io/name"] == "emrestore"
        assert labels["app.kubernetes.io/component"] == "worker"
        assert labels["app.kubernetes.io/instance"] == "emrestore-job-42"
        assert labels["emrestore.io/job-id"] == "job-42" and labels["team"] == "connectomics"
        assert meta["annotations"]["emrestore.io/job-id"] == "job-42"
        assert meta["annotations"]["emrestore.io/num-tasks"] == "40"
        assert meta["annotations"]["owner"] == "em-lab"


def test_parallelism_is_capped_by_tasks_and_gpu_budget():
    assert build_job_manifest("a", 3, 10, config())["spec"]["parallelism"] == 3
    assert build_job_manifest("a", 30, 10, config(max_parallelism=4))["spec"]["parallelism"] == 4
    assert build_job_manifest("a", 30, 2, config(max_parallelism=4))["spec"]["parallelism"] == 2
    assert build_job_manifest("a", 30, 2, config(max_failed_indexes=50))["spec"]["maxFailedIndexes"] == 30
    cpu = build_job_manifest("a", 2, 2, config(gpus_per_pod=0, memory_limit=None, shm_size=None, credentials_secret=None))
    c = cpu["spec"]["template"]["spec"]["containers"][0]
    assert "limits" not in c["resources"] and c["volumeMounts"] == [] and cpu["spec"]["template"]["spec"]["volumes"] == []
    assert "initContainers" not in cpu["spec"]["template"]["spec"]
    kubernetes_validate.validate(cpu, K8S_VERSION, strict=True)
    with pytest.raises(ValueError):
        build_job_manifest("a", 0, 1, config())
    with pytest.raises(ValueError, match="ledger"):
        build_job_manifest("a", 1, 1, config(ledger_url=""))


@pytest.mark.parametrize("job_id", ["job-1", "Job_01/ABC", "x" * 200, "---", "ümlaut job", "2024.06.01", "a" * 43])
def test_job_names_are_dns_safe(job_id):
    name = job_name(job_id)
    assert DNS_LABEL.match(name) and len(name) <= 52
    assert name == job_name(job_id)  # deterministic
    label = job_label_value(job_id)
    assert len(label) <= 63 and re.match(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$", label)
    kubernetes_validate.validate(build_job_manifest(job_id, 2, 1, config()), K8S_VERSION, strict=True)


def test_job_names_do_not_collide():
    ids = ["job-a", "Job-A", "job_a", "job a", "job-a-", "JOB_A", "x" * 100, "x" * 101]
    assert len({job_name(i) for i in ids}) == len(ids)
    assert len({job_label_value(i) for i in ids}) == len(ids)
    assert job_name("plain-id") == "emrestore-plain-id" and job_label_value("Plain_ID.1") == "Plain_ID.1"


def test_kubeconfig_loaders(tmp_path, monkeypatch):
    d = {"namespace": "em", "image": "r/e:1", "gpus-per-pod": "2", "node_selector": {"pool": "a100"},
         "tolerations": [{"key": "k", "operator": "Exists"}], "ledger_url": "s3://b/l", "memory_limit": None}
    cfg = KubeConfig.from_dict(d)
    assert cfg.gpus_per_pod == 2 and cfg.memory_limit is None and cfg.node_selector == {"pool": "a100"}
    assert KubeConfig.from_yaml(yaml.safe_dump(d)) == cfg
    path = tmp_path / "kube.yaml"
    path.write_text(yaml.safe_dump(d))
    assert KubeConfig.from_yaml(path) == cfg and KubeConfig.from_yaml(str(path)) == cfg
    assert KubeConfig.from_dict(cfg.to_dict()) == cfg
    env = {
        "EMRESTORE_KUBE_CONFIG": str(path),
        "EMRESTORE_KUBE_GPUS_PER_POD": "4",
        "EMRESTORE_KUBE_NODE_SELECTOR": "pool=h100,zone=b",
        "EMRESTORE_KUBE_TOLERATIONS": json.dumps([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]),
        "EMRESTORE_KUBE_CREDENTIALS_SECRET": "",
        "EMRESTORE_KUBE_WORKER_COMMAND": '["python", "-m", "service.cli", "worker"]',
        "EMRESTORE_KUBE_LABELS": '{"team": "em"}',
    }
    e = KubeConfig.from_env(env)
    assert e.namespace == "em" and e.gpus_per_pod == 4 and e.node_selector == {"pool": "h100", "zone": "b"}
    assert e.tolerations[0]["key"] == "nvidia.com/gpu" and e.credentials_secret is None
    assert e.worker_command == ["python", "-m", "service.cli", "worker"] and e.labels == {"team": "em"}
    # no namespace anywhere: the in-cluster service account's namespace, else the default
    assert KubeConfig.from_env({}).namespace == KubeConfig().namespace
    with pytest.raises(ValueError, match="unknown KubeConfig keys"):
        KubeConfig.from_dict({"gpus": 1})
    with pytest.raises(ValueError, match="image_pull_policy"):
        KubeConfig(image_pull_policy="Sometimes")
    with pytest.raises(ValueError, match="delete_propagation"):
        KubeConfig(delete_propagation="Orphan")
    with pytest.raises(ValueError):
        KubeConfig.from_env({"EMRESTORE_KUBE_GPUS_PER_POD": "many"})


def test_gpu_workers_schedule_on_stock_clusters_and_require_cuda():
    m = build_job_manifest("g", 2, 2, config())  # defaults: one GPU, no node selector
    pod = m["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nodeSelector" not in pod  # nvidia.com/gpu.present is set only by GPU feature discovery
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["EMRESTORE_DEVICE"] == "cuda" and "NVIDIA_VISIBLE_DEVICES" not in env
    # node selectors and extra tolerations only from configuration, the GPU taint toleration kept
    aks = {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}
    pod = build_job_manifest("g", 2, 2, config(node_selector={"pool": "h100"}, tolerations=[aks]))["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "h100"} and pod["tolerations"][0] == aks and len(pod["tolerations"]) == 2
    pod = build_job_manifest("g", 2, 2, config(gpu_tolerations=False))["spec"]["template"]["spec"]
    assert "tolerations" not in pod
    # CPU workers: no GPU, no GPU toleration, device cpu
    pod = build_job_manifest("c", 2, 2, config(gpus_per_pod=0))["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert "tolerations" not in pod and env["EMRESTORE_DEVICE"] == "cpu"
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"].get("limits", {})
    assert KubeConfig.from_env({"EMRESTORE_KUBE_GPU_TOLERATIONS": "false"}).gpu_tolerations is False
    with pytest.raises(ValueError, match="needs gpus_per_pod"):
        config(gpus_per_pod=0, device="cuda")
    with pytest.raises(ValueError, match="device"):
        config(device="tpu")
    with pytest.raises(ValueError, match="gpu_tolerations"):
        KubeConfig.from_env({"EMRESTORE_KUBE_GPU_TOLERATIONS": "perhaps"})


def test_index_ranges_round_trip():
    for s in [set(), {0}, {0, 1, 2, 5, 7, 8}, set(range(100))]:
        assert parse_index_ranges(kube.ranges(s)) == s
    assert kube.ranges({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"


# --------------------------------------------------------------------------------------------------
# the device check GPU workers run at start-up


class _FakeCuda:
    """torch.cuda as torch 2.13 behaves on a node whose driver is too old (is_available False, init raises)."""

    def __init__(self, available: bool, count: int = 0, error: str = ""):
        self._available, self._count, self._error = available, count, error

    def is_available(self):
        return self._available

    def device_count(self):
        return self._count

    def init(self):
        if self._error:
            raise RuntimeError(self._error)


class _FakeTorch:
    def __init__(self, cuda: _FakeCuda, version_cuda: str | None = "13.0"):
        self.cuda = cuda
        self.__version__ = "2.13.0+cu130" if version_cuda else "2.13.0+cpu"
        self.version = type("v", (), {"cuda": version_cuda})()


def test_require_device():
    old_driver = _FakeTorch(_FakeCuda(False, error="The NVIDIA driver on your system is too old (found version 12020). "
                                                    "Please update your GPU driver"))
    with pytest.raises(DeviceUnavailable) as e:
        require_device("cuda", torch_module=old_driver)
    text = str(e.value)
    assert "EMRESTORE_DEVICE=cuda: CUDA is required but unavailable" in text
    assert "driver on your system is too old" in text and "NVIDIA driver >= 580.65.06" in text
    no_gpu = _FakeTorch(_FakeCuda(False))
    with pytest.raises(DeviceUnavailable, match="no GPU visible"):
        require_device("cuda", torch_module=no_gpu)
    assert require_device("auto", torch_module=no_gpu) == "cpu"  # auto still falls back
    assert require_device("cpu", torch_module=None) == "cpu"  # never imports torch
    one = _FakeTorch(_FakeCuda(True, count=1))
    assert require_device("cuda", torch_module=one) == "cuda" and require_device("auto", torch_module=one) == "cuda"
    assert require_device("cuda:0", torch_module=one) == "cuda:0"
    with pytest.raises(DeviceUnavailable, match=r"sees 1 CUDA device\(s\)"):
        require_device("cuda:1", torch_module=one)
    with pytest.raises(DeviceUnavailable, match="CPU-only build"):
        require_device("cuda", torch_module=_FakeTorch(_FakeCuda(False, error="Torch not compiled with CUDA enabled"),
                                                       version_cuda=None))
    with pytest.raises(ValueError, match="EMRESTORE_DEVICE"):
        require_device("gpu please")


def test_require_device_or_exit_prints_one_line_and_exits_3(tmp_path):
    import subprocess

    code = ("import torch; torch.cuda.is_available = lambda: False\n"
            "from service.jobs.device import require_device_or_exit\nrequire_device_or_exit('cuda')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == kube.EXIT_DEVICE_UNAVAILABLE == 3
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("emrestore: error: EMRESTORE_DEVICE=cuda: CUDA is required")


# --------------------------------------------------------------------------------------------------
# diagnose(job, pods) on recorded states


def state(name: str) -> tuple[dict | None, list[dict]]:
    case = STATES[name]
    return case["job"], case["pods"]


def test_recorded_states_are_valid_objects():
    for name, case in STATES.items():
        objs = ([case["job"]] if case["job"] else []) + [
            {"apiVersion": "v1", "kind": "Pod", **p} for p in case["pods"]]
        for obj in objs:
            kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("name,counts,needles", [
    ("succeeded", (0, 4, 0, True), []),
    ("image_pull_backoff", (2, 0, 0, False),
     ["task 0 (pod emrestore-j1-0-qwert) cannot pull image registry.example.com/emrestore-worker:typo: ImagePullBackOff"]),
    ("unschedulable_gpu", (2, 0, 0, False),
     ["task 1", "waiting for a GPU", "1 free nvidia.com/gpu", "3 Insufficient nvidia.com/gpu", "lower the parallelism"]),
    ("unschedulable_taint", (1, 0, 0, False),
     ["cannot be scheduled", "untolerated taint {sku: gpu}", "EMRESTORE_KUBE_TOLERATIONS"]),
    ("oomkilled", (2, 0, 0, False), ["task 2", "OOMKilled (exit code 137)", "memory limit 64Gi", "raise memory_limit"]),
    ("failed_indexes", (0, 3, 1, True), ["Job emrestore/emrestore-j1 failed (FailedIndexes: some tasks failed for good)",
                                         "failed tasks: 1"]),
    ("failed_indexes_running", (2, 1, 1, False), ["tasks 3 failed for good; the other tasks go on"]),
    ("evicted_disruption", (2, 0, 0, False), ["task 0", "disrupted (EvictionByEvictionAPI: Eviction API: evicting)",
                                              "without counting a failure"]),
    ("node_pressure_evicted", (2, 0, 0, False), ["task 3", "evicted from node gpu-node-1", "low on resource: memory",
                                                 "without counting a failure"]),
    ("config_error", (1, 0, 0, False), ["cannot start its container: CreateContainerConfigError",
                                        'secret "emrestore-env" not found']),
    ("deadline_exceeded", (0, 0, 4, True), ["failed (DeadlineExceeded: the Job ran longer than activeDeadlineSeconds)"]),
    ("max_failed_indexes", (0, 1, 3, True), ["MaxFailedIndexesExceeded", "failed tasks: 0-1"]),
    ("suspended", (0, 0, 0, False), ["Job emrestore/emrestore-j1 is suspended"]),
])
def test_diagnose_recorded_states(name, counts, needles):
    job, pods = state(name)
    st = diagnose(job, pods)
    assert isinstance(st, ExecutorStatus)
    assert (st.active, st.succeeded, st.failed, st.finished) == counts, st
    assert has(st, *needles) if needles else st.messages == [], st.messages


def test_diagnose_bad_input_names_the_task_and_the_last_log_line():
    st = diagnose(*state("failed_indexes"))
    assert has(st, "task 1 (pod emrestore-j1-1-bad01) failed with exit code 2 (bad input)", "without retries",
               "emrestore: error: source: section 17 is empty")
    assert not has(st, "reading section 17")  # only the last line


def test_diagnose_crash_looping_pool_worker_without_cuda():
    _, pods = state("crashloop_pool_cuda")
    st = diagnose({"metadata": {"name": "emrestore-pool", "namespace": NS}, "spec": {}, "status": {}}, pods)
    assert has(st, "pod emrestore-pool-7d9f8c6b5-x2x9q could not use its GPU on node gpu-node-old (exit code 3)",
               "CrashLoopBackOff, 4 restarts", "driver on your system is too old", "NVIDIA driver >= 580")
    assert kube.pod_messages(pods[0]) == st.messages


def test_diagnose_ignores_pods_of_a_replaced_job_and_bounds_messages():
    assert diagnose(*state("stale_pod_of_replaced_job")).messages == []
    job, pods = state("oomkilled")
    many = []
    for i in range(40):
        p = json.loads(json.dumps(pods[0]))
        p["metadata"]["name"] = f"p{i}"
        p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] = str(i)
        many.append(p)
    st = diagnose(job, many)
    assert len(st.messages) == 26 and st.messages[-1] == "... and 15 more"


# --------------------------------------------------------------------------------------------------
# the executor against the fake API


@pytest.fixture
def fake():
    api = FakeKubeApi()
    yield api
    api.close()


def executor(api, **kw) -> KubernetesExecutor:
    return KubernetesExecutor(config(**kw), api=api)


def test_executor_protocol(fake):
    ex = executor(fake, max_parallelism=4)
    assert ex.name == "kubernetes" and ex.default_parallelism == 4
    for method in ("launch", "status", "known", "cancel", "shutdown"):
        assert callable(getattr(ex, method))
    assert not ex.known("j1")
    ex.launch("j1", num_tasks=6, parallelism=0)  # 0: the default, the GPU budget
    job = fake.jobs[(NS, "emrestore-j1")]
    assert job["spec"]["parallelism"] == 4 and job["spec"]["completions"] == 6
    assert ex.known("j1") and ex.list_jobs() == ["j1"]
    st = ex.status("j1")
    assert (st.active, st.succeeded, st.failed, st.finished) == (0, 0, 0, False)
    ex.shutdown()
    assert (NS, "emrestore-j1") in fake.jobs  # Jobs outlive the service


def test_status_reads_the_job_and_its_pods(fake):
    ex = executor(fake)
    ex.launch("j1", 4, 2)
    job, pods = state("failed_indexes")
    fake.put_status(NS, "emrestore-j1", job["status"])
    uid = fake.jobs[(NS, "emrestore-j1")]["metadata"]["uid"]
    for p in pods:
        p = json.loads(json.dumps(p))
        p["metadata"]["labels"] = {"emrestore.io/job-id": "j1"}
        p["metadata"]["ownerReferences"][0]["uid"] = uid
        fake.add_pod(NS, p)
    st = ex.status("j1")
    assert (st.succeeded, st.failed, st.finished) == (3, 1, True)
    assert has(st, "exit code 2 (bad input)") and has(st, "failed tasks: 1")
    assert ("list_pods", NS, "emrestore.io/job-id=j1") in fake.calls


def test_launch_is_idempotent_and_replaces_finished_jobs(fake):
    ex = executor(fake)
    ex.launch("again", 2, 2)
    uid = fake.jobs[(NS, "emrestore-again")]["metadata"]["uid"]
    ex.launch("again", 2, 2)  # still running: left alone
    assert fake.jobs[(NS, "emrestore-again")]["metadata"]["uid"] == uid
    fake.put_status(NS, "emrestore-again", STATES["succeeded"]["job"]["status"])
    ex.launch("again", 3, 2)  # finished: replaced (the ledger skips the blocks already done)
    job = fake.jobs[(NS, "emrestore-again")]
    assert job["metadata"]["uid"] != uid and job["spec"]["completions"] == 3
    assert [c[0] for c in fake.calls].count("delete_job") == 1


def test_launch_reports_api_rejections(fake):
    with pytest.raises(KubernetesExecutorError, match=r"Kubernetes refused Job emrestore/emrestore-bad-cpu.*Invalid"):
        executor(fake, cpu_request="lots").launch("bad-cpu", 2, 1)

    class Forbidden(FakeKubeApi):
        def create_job(self, namespace, body):
            raise ApiError(403, "Forbidden", 'jobs.batch is forbidden: ValidatingAdmissionPolicy '
                                             '"emrestore-worker-jobs" denied request: workers run as emrestore-worker')

    with pytest.raises(KubernetesExecutorError, match="Forbidden: .*emrestore-worker-jobs"):
        executor(Forbidden()).launch("x", 1, 1)
    other = executor(fake)
    other.launch("mine", 1, 1)
    fake.jobs[(NS, "emrestore-mine")]["metadata"]["annotations"]["emrestore.io/job-id"] = "someone-else"
    with pytest.raises(KubernetesExecutorError, match="belongs to emrestore job 'someone-else'"):
        other.status("mine")


def test_status_and_cancel_of_unknown_job(fake):
    ex = executor(fake)
    st = ex.status("never-launched")
    assert st.finished and st.active == 0 and has(st, "not found", "ttlSecondsAfterFinished")
    ex.cancel("never-launched")  # no error


@pytest.mark.parametrize("policy", ["Background", "Foreground"])
def test_cancel_deletes_job_with_its_pods(fake, policy):
    ex = executor(fake, delete_propagation=policy)
    ex.launch("to-cancel", 3, 3)
    ex.cancel("to-cancel", wait=True, timeout_s=5)
    assert (NS, "emrestore-to-cancel") not in fake.jobs
    assert ("delete_job", NS, "emrestore-to-cancel", policy) in fake.calls


def test_batch_gpu_budget_across_jobs(fake):
    ex = executor(fake, max_parallelism=8, max_batch_gpus=10)
    ex.launch("a", 100, 8)
    ex.launch("b", 100, 8)  # 8 of 10 GPUs taken by a
    ex.launch("c", 100, 8)  # none left: one pod, which waits for the ResourceQuota
    par = {n: fake.jobs[(NS, f"emrestore-{n}")]["spec"]["parallelism"] for n in "abc"}
    assert par == {"a": 8, "b": 2, "c": 1}
    fake.put_status(NS, "emrestore-a", STATES["succeeded"]["job"]["status"])  # a finished: its GPUs are free
    ex.launch("d", 100, 8)
    assert fake.jobs[(NS, "emrestore-d")]["spec"]["parallelism"] == 7  # 10 - b's 2 - c's 1
    cpu = executor(FakeKubeApi(), gpus_per_pod=0, max_batch_gpus=0)
    cpu.launch("e", 4, 4)  # CPU workers hold no GPUs
    assert cpu.api.jobs[(NS, "emrestore-e")]["spec"]["parallelism"] == 4


# --------------------------------------------------------------------------------------------------
# ClientApi: the official client behind the narrow API, against canned API-server answers


class _Canned(BaseHTTPRequestHandler):
    seen: list = []

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self):
        url = urlparse(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.seen.append((self.command, url.path, parse_qs(url.query), body))
        jobs = f"/apis/batch/v1/namespaces/{NS}/jobs"
        if self.command == "POST" and url.path == jobs:
            if body["metadata"]["name"] == "emrestore-taken":
                return self._send(409, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 409,
                                        "reason": "AlreadyExists", "message": 'jobs.batch "emrestore-taken" already exists'})
            return self._send(201, {**body, "status": {}})
        if self.command == "GET" and url.path == jobs + "/emrestore-j1":
            return self._send(200, STATES["succeeded"]["job"])
        if self.command in ("GET", "DELETE") and url.path.startswith(jobs + "/"):
            if url.path.endswith("/emrestore-j1"):
                return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
            return self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                                    "reason": "NotFound", "message": 'jobs.batch "x" not found'})
        if self.command == "GET" and url.path == jobs:
            return self._send(200, {"kind": "JobList", "apiVersion": "batch/v1", "metadata": {},
                                    "items": [STATES["succeeded"]["job"]]})
        if self.command == "GET" and url.path == f"/api/v1/namespaces/{NS}/pods":
            pods = [{"apiVersion": "v1", "kind": "Pod", **p} for p in STATES["oomkilled"]["pods"]]
            return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": pods})
        return self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound", "message": "no route"})

    do_GET = do_POST = do_DELETE = _handle


def test_client_api_speaks_the_kubernetes_api():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    from kubernetes import client
    try:
        conf = client.Configuration()
        conf.host = f"http://127.0.0.1:{server.server_address[1]}"
        api = ClientApi(client.ApiClient(conf))
        body = build_job_manifest("j1", 4, 2, config())
        created = api.create_job(NS, body)
        assert created["spec"]["completionMode"] == "Indexed"  # camelCase plain JSON back
        with pytest.raises(ApiError) as e:
            api.create_job(NS, build_job_manifest("taken", 1, 1, config()))
        assert (e.value.status, e.value.reason) == (409, "AlreadyExists")
        job = api.read_job(NS, "emrestore-j1")
        assert diagnose(job).finished and diagnose(job).succeeded == 4
        assert api.read_job(NS, "emrestore-none") is None
        assert api.delete_job(NS, "emrestore-j1", "Background") is True
        assert api.delete_job(NS, "emrestore-none", "Background") is False
        assert [j["metadata"]["name"] for j in api.list_jobs(NS, "app.kubernetes.io/managed-by=emrestore-service")] == [
            "emrestore-j1"]
        pods = api.list_pods(NS, "emrestore.io/job-id=j1")
        assert has(diagnose(STATES["oomkilled"]["job"], pods), "OOMKilled")
        seen = {(m, p): (q, b) for m, p, q, b in _Canned.seen}
        q, b = seen[("DELETE", f"/apis/batch/v1/namespaces/{NS}/jobs/emrestore-j1")]
        assert q.get("propagationPolicy") == ["Background"] or b["propagationPolicy"] == "Background"
        q, _ = seen[("GET", f"/api/v1/namespaces/{NS}/pods")]
        assert q["labelSelector"] == ["emrestore.io/job-id=j1"]
    finally:
        server.shutdown()


def test_api_client_prefers_in_cluster_config(monkeypatch, tmp_path):
    from kubernetes.config import incluster_config

    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("sa-token")
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    api = load_api_client()  # nothing is sent: only the configuration is checked
    assert api.configuration.host == "https://127.0.0.1:6443"
    assert api.configuration.api_key["BearerToken"] == "bearer sa-token"


def test_api_client_without_any_configuration(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(KubernetesExecutorError, match="no Kubernetes configuration"):
        load_api_client()


# --------------------------------------------------------------------------------------------------
# an Indexed Job of real worker processes


def _wait(ex, job_id, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        st = ex.status(job_id)
        if st.finished:
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.1)


def test_fake_runs_indexes_with_retries_and_fail_index(tmp_path):
    code = ("import os, pathlib, sys; i = int(os.environ['JOB_COMPLETION_INDEX']); "
            "p = pathlib.Path(f'a{i}'); n = int(p.read_text()) if p.exists() else 0; p.write_text(str(n + 1)); "
            "print('task', i, 'attempt', n); "
            "sys.exit(2 if i == 2 else (1 if i == 1 and n == 0 else 0))")
    api = FakeKubeApi(run_workers=True, cwd=str(tmp_path))
    try:
        ex = executor(api, worker_command=[sys.executable, "-c", code], credentials_secret=None, gpus_per_pod=0)
        ex.launch("procs", 4, 2)
        st = _wait(ex, "procs")
        assert (st.succeeded, st.failed, st.finished) == (3, 1, True)
        assert [(tmp_path / f"a{i}").read_text() for i in range(4)] == ["1", "2", "1", "1"]  # 1 retried, 2 not
        assert api.max_running["emrestore-procs"] <= 2
        assert has(st, "task 2", "exit code 2 (bad input)", "task 2 attempt 0")
    finally:
        api.close()


@pytest.mark.slow
def test_indexed_job_of_real_workers_matches_local_workers(phantom_layer, tiny_iso_model, tmp_path, monkeypatch):
    """JobManager + KubernetesExecutor, whose fake API runs ``emrestore worker`` processes for the Job's
    indexes, writes the same bytes as JobManager + LocalExecutor."""
    import numpy as np

    from service.jobs.executors import LocalExecutor
    from service.jobs.manager import JobManager
    from service.jobs.spec import RestoreSpec
    from service.volume import precomputed as pc

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    src, _ = phantom_layer
    model_url, _ = tiny_iso_model
    root = Path(__file__).resolve().parents[1]
    outputs = {}
    for name in ("local", "kube"):
        ledger = f"file://{tmp_path}/ledger-{name}"
        api = None
        if name == "local":  # one process: the bytes must not depend on how blocks are split
            ex = LocalExecutor(ledger, default_parallelism=1, log_dir=str(tmp_path / "logs"))
        else:
            api = FakeKubeApi(run_workers=True, cwd=str(root), env={"OMP_NUM_THREADS": "1"})
            ex = executor(api, ledger_url=ledger, gpus_per_pod=0, credentials_secret=None,
                          worker_command=[sys.executable, "-m", "service.cli", "worker"])
        mgr = JobManager(ledger, ex, models_dir=None, poll_interval_s=0.2, block_size_xyz=(64, 64, 0))
        mgr.start()
        try:
            out = f"file://{tmp_path}/out-{name}"
            # a region of 2 × 1 × 2 blocks (x, y, z): enough for two indexes, half the whole layer
            st = mgr.submit(RestoreSpec(source=src, model=model_url, output=out, steps=2,
                                        region_start_xyz=(0, 0, 0), region_stop_xyz=(96, 48, 9),
                                        parallelism=1 if name == "local" else 2))
            deadline = time.monotonic() + 240
            while mgr.get(st.job_id).state not in ("SUCCEEDED", "FAILED", "CANCELLED"):
                assert time.monotonic() < deadline, mgr.get(st.job_id)
                time.sleep(0.3)
            final = mgr.get(st.job_id)
            assert final.state == "SUCCEEDED", (final.message, final.events)
            if api is not None:  # the ledger may say done while the last pod is still exiting
                kst = _wait(ex, st.job_id)
                assert (kst.succeeded, kst.failed) == (2, 0), kst
                pods = api.list_pods(NS, f"emrestore.io/job-id={job_label_value(st.job_id)}")
                assert sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
                              for p in pods) == ["0", "1"]
                assert all(p["status"]["phase"] == "Succeeded" for p in pods)
        finally:
            mgr.close()
            if api is not None:
                api.close()
        info = pc.open_layer(out)
        outputs[name] = pc.read_zyx(out, info.start_zyx, info.stop_zyx, fill_missing=True)
    assert outputs["local"].any()
    np.testing.assert_array_equal(outputs["local"], outputs["kube"])
