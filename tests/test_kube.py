"""The Kubernetes executor (service/jobs/kube.py) against the API-server double (tests/kube_double.py).

The executor always goes through the official ``kubernetes`` client pointed at the double over HTTP.
Manifests are validated with kubernetes_validate against the Kubernetes **1.33** schemas: 1.33 is the
first release where everything the Job relies on is GA (backoffLimitPerIndex GA in 1.33,
podFailurePolicy GA in 1.31), and the schemas ship with kubernetes-validate, so the check is stable.
"""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.jobs import kube  # noqa: E402
from service.jobs.kube import (  # noqa: E402
    KubeConfig,
    KubernetesExecutor,
    KubernetesExecutorError,
    build_job_manifest,
    job_label_value,
    job_name,
    load_api_client,
    parse_index_ranges,
)
from tests.kube_double import KubeDouble, Node, PodScript, index_ranges  # noqa: E402

K8S_VERSION = "1.33"
NS = "emrestore"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def config(**kw) -> KubeConfig:
    base = dict(namespace=NS, image="registry.example.com/emrestore:0.1.0", ledger_url="s3://bucket/ledger")
    base.update(kw)
    return KubeConfig(**base)


@pytest.fixture
def double_factory():
    made: list[KubeDouble] = []

    def make(**kw) -> KubeDouble:
        kd = KubeDouble(**kw).start()
        made.append(kd)
        return kd

    yield make
    for kd in made:
        assert not kd.controller_errors, kd.controller_errors
        kd.stop()


def executor(kd: KubeDouble, **kw) -> KubernetesExecutor:
    return KubernetesExecutor(config(**kw), api_client=kd.api_client())


def wait_status(ex: KubernetesExecutor, job_id: str, predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        st = ex.status(job_id)
        if predicate(st):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"status never matched: {st}")
        time.sleep(0.03)


def finished(ex: KubernetesExecutor, job_id: str, timeout: float = 20.0):
    return wait_status(ex, job_id, lambda s: s.finished, timeout)


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


def test_manifest_validates_against_kubernetes_1_33_schemas():
    m = build_job_manifest("2024-06-01/Run_A", 40, 8, full_config())
    assert kubernetes_validate.validate(m, K8S_VERSION, strict=True) == K8S_VERSION
    # and the official client's models accept it
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


def test_index_ranges_round_trip():
    for s in [set(), {0}, {0, 1, 2, 5, 7, 8}, set(range(100))]:
        assert parse_index_ranges(index_ranges(s)) == s
    assert kube._ranges({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"


# --------------------------------------------------------------------------------------------------
# API client loading


def test_api_client_from_kubeconfig(double_factory, tmp_path):
    kd = double_factory()
    path = kd.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS)
    api = load_api_client(kubeconfig=path)
    assert api.configuration.host == kd.host
    ex = KubernetesExecutor(config(), api_client=api)
    ex.launch("kc", 2, 2)
    assert finished(ex, "kc").succeeded == 2
    # the double saw the kubeconfig's credentials
    assert kd.requests and kd.requests[0]["path"].startswith("/apis/batch/v1/namespaces/emrestore/jobs")


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
    assert api.configuration.ssl_ca_cert == str(ca)


def test_api_client_without_any_configuration(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(KubernetesExecutorError, match="no Kubernetes configuration"):
        load_api_client()


# --------------------------------------------------------------------------------------------------
# the double's API behaves like the API server


def test_double_speaks_the_kubernetes_api(double_factory):
    kd = double_factory()
    api = kd.api_client()
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    assert client.VersionApi(api).get_code().git_version == "v1.33.1"
    body = build_job_manifest("api", 2, 1, config())
    created = batch.create_namespaced_job(NS, body)
    assert created.metadata.uid and created.metadata.resource_version
    assert created.spec.selector.match_labels == {"batch.kubernetes.io/controller-uid": created.metadata.uid}
    assert created.spec.backoff_limit == 2**31 - 1

    with pytest.raises(ApiException) as e:  # 409 AlreadyExists
        batch.create_namespaced_job(NS, body)
    status = json.loads(e.value.body)
    assert e.value.status == 409 and status["kind"] == "Status" and status["reason"] == "AlreadyExists"
    assert status["message"] == 'jobs.batch "emrestore-api" already exists'

    with pytest.raises(ApiException) as e:  # 404 NotFound
        batch.read_namespaced_job("nope", NS)
    status = json.loads(e.value.body)
    assert e.value.status == 404 and status["reason"] == "NotFound" and status["details"]["kind"] == "jobs"

    bad = build_job_manifest("bad", 2, 1, config())
    del bad["spec"]["completions"]  # Indexed without completions: schema-valid, API-invalid
    with pytest.raises(ApiException) as e:
        batch.create_namespaced_job(NS, bad)
    status = json.loads(e.value.body)
    assert e.value.status == 422 and status["reason"] == "Invalid" and status["details"]["kind"] == "Job"
    assert {"field": "spec.completions", "reason": "FieldValueRequired"}.items() <= status["details"]["causes"][0].items()

    bad = build_job_manifest("bad", 2, 1, config())
    bad["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "lots"
    with pytest.raises(ApiException) as e:  # what the schema cannot say: quantities
        batch.create_namespaced_job(NS, bad)
    assert e.value.status == 422 and "quantities must match" in json.loads(e.value.body)["message"]

    # the official client refuses unknown fields itself, so send those raw: strict schema validation
    bad = build_job_manifest("bad", 2, 1, config())
    bad["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    request = urllib.request.Request(f"{kd.host}/apis/batch/v1/namespaces/{NS}/jobs", data=json.dumps(bad).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    status = json.loads(e.value.read())
    assert e.value.code == 422 and status["reason"] == "Invalid" and "resourcez" in status["message"]
    request = urllib.request.Request(f"{kd.host}/apis/batch/v1/namespaces/{NS}/jobs", data=b"{not json",
                                     headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    assert e.value.code == 400 and json.loads(e.value.read())["reason"] == "BadRequest"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{kd.host}/apis/apps/v1/namespaces/{NS}/deployments", timeout=10)
    assert e.value.code == 404

    bad = build_job_manifest("bad", 2, 1, config(namespace="elsewhere"))
    with pytest.raises(ApiException) as e:
        batch.create_namespaced_job(NS, bad)
    assert e.value.status == 400 and json.loads(e.value.body)["reason"] == "BadRequest"

    kd.wait_for(lambda: (kd.job("emrestore-api") or {}).get("status", {}).get("succeeded") == 2)
    pods = core.list_namespaced_pod(NS, label_selector="emrestore.io/job-id=api").items
    assert len(pods) == 2
    for pod in pods:
        assert pod.status.phase == "Succeeded"
        assert pod.metadata.owner_references[0].uid == created.metadata.uid
        index = pod.metadata.annotations["batch.kubernetes.io/job-completion-index"]
        assert pod.metadata.name.startswith(f"emrestore-api-{index}-")
        env = {e.name: e for e in pod.spec.containers[0].env}
        assert env["JOB_COMPLETION_INDEX"].value_from.field_ref.field_path == (
            "metadata.annotations['batch.kubernetes.io/job-completion-index']")
        assert core.read_namespaced_pod(pod.metadata.name, NS).metadata.uid == pod.metadata.uid
    assert core.list_namespaced_pod(NS, label_selector="emrestore.io/job-id in (other,x)").items == []
    assert len(core.list_pod_for_all_namespaces(field_selector="status.phase=Succeeded").items) == 2
    job = batch.read_namespaced_job("emrestore-api", NS)
    assert job.status.completed_indexes == "0-1" and job.status.failed_indexes == ""
    assert [c.type for c in job.status.conditions] == ["SuccessCriteriaMet", "Complete"]
    assert job.status.completion_time is not None

    # deleting a batch/v1 Job without a propagation policy orphans its pods (the API's default)
    batch.delete_namespaced_job("emrestore-api", NS)
    time.sleep(0.2)
    assert len(core.list_namespaced_pod(NS, label_selector="emrestore.io/job-id=api").items) == 2


# --------------------------------------------------------------------------------------------------
# launch / status / cancel / watch (scripted pods)


def test_launch_runs_all_tasks_within_parallelism(double_factory):
    kd = double_factory(script=PodScript.succeed(run_s=0.1))
    ex = executor(kd)
    ex.launch("job-ok", num_tasks=6, parallelism=2)
    st = finished(ex, "job-ok")
    assert (st.active, st.succeeded, st.failed, st.finished) == (0, 6, 0, True)
    assert not any("failed" in m for m in st.messages)
    assert kd.max_active("emrestore-job-ok") == 2
    assert len(kd.pods(NS, "emrestore-job-ok")) == 6
    assert ex.list_jobs() == ["job-ok"]
    posted = [r for r in kd.requests if r["method"] == "POST"]
    assert len(posted) == 1 and posted[0]["body"]["spec"]["completions"] == 6


def test_launch_is_idempotent_and_replaces_finished_jobs(double_factory):
    kd = double_factory(script=PodScript.hang())
    ex = executor(kd)
    ex.launch("again", 2, 2)
    uid = kd.job("emrestore-again")["metadata"]["uid"]
    ex.launch("again", 2, 2)  # still running: left alone
    assert kd.job("emrestore-again")["metadata"]["uid"] == uid
    kd.script = PodScript.succeed()
    ex.cancel("again", wait=True)
    ex.launch("again", 2, 2)
    finished(ex, "again")
    uid2 = kd.job("emrestore-again")["metadata"]["uid"]
    assert uid2 != uid
    ex.launch("again", 3, 2)  # finished: replaced by a new Job (the ledger skips done blocks)
    st = finished(ex, "again")
    assert kd.job("emrestore-again")["metadata"]["uid"] != uid2 and st.succeeded == 3


def test_launch_reports_api_rejections(double_factory):
    kd = double_factory()
    ex = executor(kd, cpu_request="lots")
    with pytest.raises(KubernetesExecutorError, match=r"Invalid.*cpu"):
        ex.launch("bad-cpu", 2, 1)
    ex = executor(kd, gpu_resource="example.com/fpga", gpus_per_pod=1, memory_request="64Gi", memory_limit="32Gi")
    with pytest.raises(KubernetesExecutorError, match="must be less than or equal to memory limit"):
        ex.launch("bad-mem", 2, 1)


def test_status_and_cancel_of_unknown_job(double_factory):
    kd = double_factory()
    ex = executor(kd)
    st = ex.status("never-launched")
    assert st.finished and st.active == 0 and has(st, "not found")
    ex.cancel("never-launched")  # no error


@pytest.mark.parametrize("policy", ["Background", "Foreground"])
def test_cancel_deletes_job_and_pods(double_factory, policy):
    kd = double_factory(script=PodScript.hang())
    ex = executor(kd, delete_propagation=policy)
    ex.launch("to-cancel", num_tasks=5, parallelism=3)
    st = wait_status(ex, "to-cancel", lambda s: s.active == 3)
    kd.wait_for(lambda: len(kd.pods(NS)) == 3 and all(p["status"]["phase"] == "Running" for p in kd.pods(NS)))
    ex.cancel("to-cancel", wait=True, timeout_s=10)
    assert kd.job("emrestore-to-cancel") is None and kd.pods(NS) == []
    (req,) = [r for r in kd.requests if r["method"] == "DELETE"]
    assert req["query"].get("propagationPolicy") == policy or req["body"]["propagationPolicy"] == policy
    st = ex.status("to-cancel")
    assert st.finished and st.active == 0


def test_watch_yields_changes_until_finished(double_factory):
    kd = double_factory(script=PodScript.succeed(run_s=0.15))
    ex = executor(kd)
    ex.launch("watched", 4, 2)
    seen = list(ex.watch("watched", timeout_s=20, window_s=1))
    assert seen[-1].finished and seen[-1].succeeded == 4
    assert [s.succeeded for s in seen] == sorted(s.succeeded for s in seen)
    assert len(seen) >= 3
    assert list(ex.watch("watched", timeout_s=5))[-1].finished  # already finished: one status


def test_watch_times_out(double_factory):
    kd = double_factory(script=PodScript.hang())
    ex = executor(kd)
    ex.launch("slow", 1, 1)
    t0 = time.monotonic()
    seen = list(ex.watch("slow", timeout_s=2, window_s=1))
    assert 1.5 < time.monotonic() - t0 < 8
    assert seen and not seen[-1].finished and seen[-1].active == 1


# --------------------------------------------------------------------------------------------------
# failure modes and their messages


def test_pending_for_lack_of_gpus(double_factory):
    kd = double_factory(script=PodScript.hang(), nodes=[Node("gpu-0", gpus=1), Node("gpu-1", gpus=1)])
    ex = executor(kd)
    ex.launch("gpu-short", num_tasks=4, parallelism=4)
    st = wait_status(ex, "gpu-short", lambda s: has(s, "waiting for a GPU") and s.active == 4)
    assert has(st, "Insufficient nvidia.com/gpu") and has(st, "0/2 nodes are available")
    assert has(st, "lower the parallelism")
    assert st.active == 4 and not st.finished  # pending pods are active in Job status
    running = [p for p in kd.pods(NS) if p["status"]["phase"] == "Running"]
    assert len(running) == 2  # the two GPUs are used


def test_gpu_shortage_clears_as_pods_finish(double_factory):
    kd = double_factory(script=PodScript.succeed(run_s=0.2), nodes=[Node("gpu-0", gpus=1)])
    ex = executor(kd)
    ex.launch("queue", num_tasks=3, parallelism=3)
    wait_status(ex, "queue", lambda s: has(s, "waiting for a GPU"))
    st = finished(ex, "queue")
    assert st.succeeded == 3 and not has(st, "waiting for a GPU")


def test_unschedulable_for_other_reasons(double_factory):
    kd = double_factory(script=PodScript.hang(),
                        nodes=[Node("t4", labels={"pool": "t4"}), Node("tainted", taints=[
                            {"key": "dedicated", "value": "other", "effect": "NoSchedule"}])])
    ex = executor(kd, node_selector={"pool": "a100"})
    ex.launch("nowhere", 1, 1)
    st = wait_status(ex, "nowhere", lambda s: has(s, "cannot be scheduled"))
    assert has(st, "didn't match Pod's node affinity/selector")
    ex2 = executor(kd, node_selector={}, gpus_per_pod=0)
    kd.nodes = [kd.nodes[1]]
    ex2.launch("tainted", 1, 1)
    assert has(wait_status(ex2, "tainted", lambda s: has(s, "untolerated taint")), "dedicated")
    ex3 = executor(kd, tolerations=[{"key": "dedicated", "operator": "Equal", "value": "other", "effect": "NoSchedule"}])
    ex3.launch("tolerated", 1, 1)
    kd.wait_for(lambda: any(p["status"]["phase"] == "Running" for p in kd.pods(NS, "emrestore-tolerated")))


def test_image_pull_errors(double_factory):
    cfg_image = "registry.example.com/emrestore:typo"
    kd = double_factory(bad_images={cfg_image})
    ex = executor(kd, image=cfg_image)
    ex.launch("pull", 2, 2)
    st = wait_status(ex, "pull", lambda s: has(s, "ImagePullBackOff"))
    assert has(st, "cannot pull image registry.example.com/emrestore:typo")
    assert not st.finished and st.active == 2
    first = wait_status(ex, "pull", lambda s: True)
    assert any("ErrImagePull" in m or "ImagePullBackOff" in m for m in first.messages)


def test_oomkilled_worker_is_retried(double_factory):
    kd = double_factory(script={1: [PodScript.oom(), PodScript.succeed()]})
    ex = executor(kd, memory_limit="32Gi")
    ex.launch("oom", 3, 3)
    st = finished(ex, "oom")
    assert (st.succeeded, st.failed) == (3, 0)
    assert has(st, "task 1", "OOMKilled", "32Gi", "raise memory_limit")
    pods = [p for p in kd.pods(NS, "emrestore-oom")
            if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1"]
    assert len(pods) == 2
    counts = sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-index-failure-count"] for p in pods)
    assert counts == ["0", "1"]


def test_bad_input_fails_the_index_without_retries(double_factory):
    kd = double_factory(script={2: PodScript.fail(2, log="reading section 17\nbad input: section 17 is empty\n")})
    ex = executor(kd, backoff_limit_per_index=3)
    ex.launch("bad-input", 4, 2)
    st = finished(ex, "bad-input")
    assert (st.active, st.succeeded, st.failed, st.finished) == (0, 3, 1, True)
    assert has(st, "task 2", "exit code 2 (bad input)", "without retries", "section 17 is empty")
    assert has(st, "failed (FailedIndexes", "failed tasks: 2")
    index2 = [p for p in kd.pods(NS) if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "2"]
    assert len(index2) == 1


def test_retries_are_per_index(double_factory):
    kd = double_factory(script={0: PodScript.fail(1, log="Traceback ...\nRuntimeError: CUDA error\n")})
    ex = executor(kd, backoff_limit_per_index=2)
    ex.launch("flaky", 3, 3)
    st = finished(ex, "flaky")
    assert (st.succeeded, st.failed) == (2, 1)
    assert has(st, "task 0", "worker exited with code 1", "RuntimeError: CUDA error")
    index0 = [p for p in kd.pods(NS) if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0"]
    assert len(index0) == 3  # 1 + backoffLimitPerIndex
    job = kd.job("emrestore-flaky")
    assert job["status"]["failedIndexes"] == "0" and job["status"]["completedIndexes"] == "1-2"
    assert job["status"]["failed"] == 3


def test_max_failed_indexes_stops_the_job(double_factory):
    kd = double_factory(script=lambda index, attempt: PodScript.fail(2) if index == 0 else PodScript.hang())
    ex = executor(kd, max_failed_indexes=0)
    ex.launch("fail-fast", 4, 4)
    st = finished(ex, "fail-fast")
    assert st.finished and has(st, "MaxFailedIndexesExceeded")
    assert st.failed == 4 - st.succeeded
    assert kd.pods(NS, "emrestore-fail-fast") == [p for p in kd.pods(NS, "emrestore-fail-fast")
                                                   if p["status"]["phase"] == "Failed"]
    conditions = [c["type"] for c in kd.job("emrestore-fail-fast")["status"]["conditions"]]
    assert conditions == ["FailureTarget", "Failed"]


@pytest.mark.parametrize("disruption,needle", [
    (PodScript.evict(), "was evicted"),
    (PodScript.preempt(), "disrupted (PreemptionByScheduler"),
])
def test_disruptions_are_replaced_without_counting(double_factory, disruption, needle):
    kd = double_factory(script={0: [disruption, disruption, disruption, disruption, PodScript.succeed()]})
    ex = executor(kd, backoff_limit_per_index=1)  # 4 disruptions > 1 retry: still fine
    ex.launch("disrupted", 2, 2)
    st = finished(ex, "disrupted")
    assert (st.succeeded, st.failed) == (2, 0)
    assert has(st, needle, "without counting a failure")
    job = kd.job("emrestore-disrupted")
    assert job["status"].get("failed", 0) == 0
    last = [p for p in kd.pods(NS) if p["status"]["phase"] == "Succeeded"
            and p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0"][0]
    assert last["metadata"]["annotations"]["batch.kubernetes.io/job-index-ignored-failure-count"] == "4"


def test_container_config_errors(double_factory):
    kd = double_factory(script=PodScript.config_error('secret "emrestore-cloudvolume" not found'))
    ex = executor(kd)
    ex.launch("cfg", 1, 1)
    st = wait_status(ex, "cfg", lambda s: s.messages)
    assert has(st, "cannot start its container", "CreateContainerConfigError", "emrestore-cloudvolume")


def test_status_messages_are_bounded(double_factory):
    kd = double_factory(script=PodScript.fail(3))
    ex = executor(kd, backoff_limit_per_index=1)
    ex.launch("many", 40, 40)
    st = finished(ex, "many", timeout=30)
    assert st.failed == 40 and len(st.messages) <= 26 and "more" in st.messages[-1]


# --------------------------------------------------------------------------------------------------
# local-process mode


PROBE = r"""
import json, os, pathlib, sys
i = os.environ["JOB_COMPLETION_INDEX"]
cv = os.environ["CLOUD_VOLUME_DIR"]
pathlib.Path(f"task-{i}.json").write_text(json.dumps({
    "argv": sys.argv[1:], "pod": os.environ["POD_NAME"], "node": os.environ["NODE_NAME"],
    "job": os.environ["EMRESTORE_JOB_ID"], "extra": os.environ.get("EXTRA"),
    "secrets": sorted(os.listdir(os.path.join(cv, "secrets"))),
    "shm_writable": os.access(os.environ["SHM"], os.W_OK),
    "threads": os.environ["OMP_NUM_THREADS"],
}))
# like stores.register_s3_endpoint: the secrets directory must be writable
(pathlib.Path(cv) / "secrets" / f"alias{i}-secret.json").write_text("{}")
out = pathlib.Path(os.environ["DATA_DIR"]) / f"out-{i}.txt"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(i)
"""


def test_process_mode_runs_every_index(double_factory, tmp_path):
    work, data = tmp_path / "work", tmp_path / "data"
    work.mkdir()
    data.mkdir()
    kd = double_factory(mode="process", cwd=work, mounts={"/data": data}, env={"EXTRA": "from-double"},
                        secrets={"emrestore-cloudvolume": {"google-secret.json": '{"project_id": "p"}'}})
    ex = executor(kd, worker_command=[sys.executable, "-c", PROBE], env={"DATA_DIR": "/data/run", "SHM": "/dev/shm"},
                  ledger_url=str(tmp_path / "ledger"))
    ex.launch("local", num_tasks=5, parallelism=2)
    st = finished(ex, "local", timeout=60)
    assert (st.active, st.succeeded, st.failed) == (0, 5, 0), st
    assert kd.max_active("emrestore-local") <= 2
    for i in range(5):
        info = json.loads((work / f"task-{i}.json").read_text())
        assert info["argv"] == ["--ledger", str(tmp_path / "ledger"), "--job", "local", "--num-tasks", "5"]
        assert info["pod"].startswith(f"emrestore-local-{i}-") and info["node"] == "node-0"
        assert info["job"] == "local" and info["extra"] == "from-double"
        assert info["secrets"] == ["google-secret.json"] and info["shm_writable"]
        assert info["threads"] == "4"  # requests.cpu of the default KubeConfig
        assert (data / "run" / f"out-{i}.txt").read_text() == str(i)
    logs = client.CoreV1Api(kd.api_client()).read_namespaced_pod_log(
        kd.pods(NS, "emrestore-local")[0]["metadata"]["name"], NS)
    assert logs == ""


def test_process_mode_failures_and_logs(double_factory, tmp_path):
    code = ("import os, sys; i = int(os.environ['JOB_COMPLETION_INDEX']); "
            "print('task', i, 'starting'); "
            "sys.exit(0 if i != 1 else (print('bad input: no such layer', flush=True) or 2))")
    kd = double_factory(mode="process", cwd=tmp_path)
    ex = executor(kd, worker_command=[sys.executable, "-c", code], credentials_secret=None)
    ex.launch("local-bad", 3, 3)
    st = finished(ex, "local-bad", timeout=60)
    assert (st.succeeded, st.failed) == (2, 1)
    assert has(st, "task 1", "exit code 2 (bad input)", "bad input: no such layer")
    pod = [p for p in kd.pods(NS) if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1"][0]
    log = client.CoreV1Api(kd.api_client()).read_namespaced_pod_log(pod["metadata"]["name"], NS, tail_lines=1)
    assert log.strip() == "bad input: no such layer"


def test_process_mode_init_container_failure(double_factory, tmp_path):
    def rewrite(argv):  # make the credentials copy fail the way a broken image would
        if argv[:2] == ["sh", "-c"]:
            return ["sh", "-c", "echo 'cp: cannot create regular file: Read-only file system' >&2; exit 3"]
        return argv

    kd = double_factory(mode="process", cwd=tmp_path, rewrite_command=rewrite)
    ex = executor(kd, worker_command=[sys.executable, "-c", "open('ran', 'w')"])
    ex.launch("local-init", 1, 1)
    st = wait_status(ex, "local-init", lambda s: has(s, "copy-credentials"), timeout=30)
    assert has(st, "container copy-credentials failed: it exited with code 3", "Read-only file system")
    assert not (tmp_path / "ran").exists()  # the worker never started
    # the index may already be retried by a fresh pod whose init container has not run yet:
    # the failed attempt's pod log holds the message
    api = client.CoreV1Api(kd.api_client())

    def init_log(pod_name):
        try:
            return api.read_namespaced_pod_log(pod_name, NS, container="copy-credentials")
        except client.ApiException:  # 400 while that pod's containers wait to start, as in Kubernetes
            return ""

    logs = [init_log(p["metadata"]["name"]) for p in kd.pods(NS)]
    assert any("Read-only file system" in log for log in logs), logs
    ex.cancel("local-init", wait=True)


def test_process_mode_cancel_stops_processes(double_factory, tmp_path):
    kd = double_factory(mode="process", cwd=tmp_path)
    ex = executor(kd, worker_command=[sys.executable, "-c", "import time; time.sleep(120)"], credentials_secret=None)
    ex.launch("local-long", 3, 3)
    kd.wait_for(lambda: len(kd.processes()) == 3, timeout=30)
    procs = kd.processes()
    t0 = time.monotonic()
    ex.cancel("local-long", wait=True, timeout_s=20)
    assert time.monotonic() - t0 < 10
    assert all(p.poll() is not None for p in procs)
    assert kd.pods(NS) == [] and kd.job("emrestore-local-long") is None


def test_process_mode_disruption_is_replaced(double_factory, tmp_path):
    code = ("import os, pathlib, time; p = pathlib.Path('attempts-' + os.environ['JOB_COMPLETION_INDEX']); "
            "n = int(p.read_text()) if p.exists() else 0; p.write_text(str(n + 1)); "
            "time.sleep(60 if n == 0 else 0)")
    kd = double_factory(mode="process", cwd=tmp_path)
    ex = executor(kd, worker_command=[sys.executable, "-c", code], credentials_secret=None, backoff_limit_per_index=0)
    ex.launch("local-drain", 1, 1)
    kd.wait_for(lambda: (tmp_path / "attempts-0").exists() and kd.processes(), timeout=30)
    pod = kd.pods(NS)[0]["metadata"]["name"]
    kd.disrupt(pod, NS, reason="EvictionByEvictionAPI", message="Eviction API: evicting")
    st = finished(ex, "local-drain", timeout=60)
    assert (st.succeeded, st.failed) == (1, 0)  # backoffLimitPerIndex 0, yet the disruption did not count
    assert (tmp_path / "attempts-0").read_text() == "2"
    assert has(st, "disrupted (EvictionByEvictionAPI", "without counting a failure")


# --------------------------------------------------------------------------------------------------
# the real worker through the double


@pytest.mark.slow
def test_real_workers_through_the_double_match_local_workers(double_factory, phantom_layer, tiny_iso_model,
                                                             tmp_path, monkeypatch):
    """JobManager + KubernetesExecutor + the double running ``emrestore worker`` pods as local processes
    writes the same bytes as JobManager + LocalExecutor."""
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
        if name == "local":
            ex = LocalExecutor(ledger, default_parallelism=2, log_dir=str(tmp_path / "logs"))
        else:
            kd = double_factory(mode="process", cwd=root, env={"OMP_NUM_THREADS": "1"})
            ex = executor(kd, ledger_url=ledger, gpus_per_pod=0, credentials_secret=None,
                          worker_command=[sys.executable, "-m", "service.cli", "worker"],
                          env={"OMP_NUM_THREADS": "1"})
        mgr = JobManager(ledger, ex, models_dir=None, poll_interval_s=0.2, block_size_xyz=(64, 64, 0))
        mgr.start()
        try:
            out = f"file://{tmp_path}/out-{name}"
            st = mgr.submit(RestoreSpec(source=src, model=model_url, output=out, steps=2, parallelism=2))
            deadline = time.monotonic() + 240
            while mgr.get(st.job_id).state not in ("SUCCEEDED", "FAILED", "CANCELLED"):
                assert time.monotonic() < deadline, mgr.get(st.job_id)
                time.sleep(0.3)
            final = mgr.get(st.job_id)
            assert final.state == "SUCCEEDED", (final.message, final.events)
        finally:
            mgr.close()
        info = pc.open_layer(out)
        outputs[name] = pc.read_zyx(out, info.start_zyx, info.stop_zyx)
        if name == "kube":  # the ledger may say done while the last pod is still exiting
            kst = finished(ex, st.job_id, timeout=60)
            assert (kst.succeeded, kst.failed) == (2, 0), kst
            pods = kd.pods(NS)
            assert sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods) == ["0", "1"]
            assert all(p["status"]["phase"] == "Succeeded" for p in pods)
    np.testing.assert_array_equal(outputs["local"], outputs["kube"])


def test_ttl_and_deadline(double_factory):
    kd = double_factory(script=PodScript.succeed())
    ex = executor(kd, ttl_seconds_after_finished=0)
    ex.launch("short-lived", 2, 2)
    kd.wait_for(lambda: kd.job("emrestore-short-lived") is None and not kd.pods(NS))  # TTL controller + GC
    st = ex.status("short-lived")
    assert st.finished and has(st, "not found", "ttlSecondsAfterFinished")

    kd.script = PodScript.hang()
    ex = executor(kd, active_deadline_seconds=1)
    ex.launch("too-slow", 3, 2)
    st = finished(ex, "too-slow")
    assert (st.succeeded, st.failed) == (0, 3)
    assert has(st, "failed (DeadlineExceeded: the Job ran longer than activeDeadlineSeconds)")
    assert kd.pods(NS, "emrestore-too-slow") == []  # running pods were stopped
