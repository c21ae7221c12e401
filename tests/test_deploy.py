"""deploy/: render the kustomize overlays with ``kubectl kustomize`` and check what a cluster would get.

Rendering: ``kubectl kustomize`` (kustomize v5 built into kubectl); the tests that need it skip
when kubectl is not installed. Schemas: ``kubernetes_validate`` strict (unknown fields are errors)
against Kubernetes 1.33 (the oldest release the worker Jobs need: backoffLimitPerIndex GA) and 1.37
(the newest the pinned kubernetes-validate ships). The admission policy's CEL is checked for its
parameters and by the schema, not evaluated (no CEL engine here); the images are not built (no
Docker engine), only their Dockerfiles and hashed locks are checked.
"""

from __future__ import annotations

import argparse
import functools
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = ["dev", "gpu"]
K8S_VERSIONS = ("1.33", "1.37")

sys.path.insert(0, str(ROOT))
from service.jobs import kube  # noqa: E402
from service.jobs.kube import KubeConfig, build_job_manifest  # noqa: E402

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy",
                  "ValidatingAdmissionPolicyBinding", "PriorityClass", "StorageClass"}
#: flags of `emrestore serve` / `emrestore worker` that other branches of issue 10-12 add; until they
#: are merged the CLI of this branch does not know them, and the parse check leaves them out.
PENDING_FLAGS = {"serve": {"--allow-store": 1}, "worker": {"--pool": 0}}


@functools.lru_cache(maxsize=None)
def _rendered(directory: str) -> tuple:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlays are rendered with `kubectl kustomize`")
    out = subprocess.run([kubectl, "kustomize", directory], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def render(directory: Path) -> list[dict]:
    import copy

    return copy.deepcopy(list(_rendered(str(directory))))


def _key(doc: dict) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, dict[tuple[str, str, str], dict]]:
    docs = render(DEPLOY / "overlays" / request.param)
    by_key = {_key(d): d for d in docs}
    assert len(by_key) == len(docs), "duplicate objects"
    return request.param, by_key


def _one(objs: dict, kind: str, name: str | None = None) -> dict:
    hits = [d for (k, _, n), d in objs.items() if k == kind and (name is None or n == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, got {len(hits)}"
    return hits[0]


def _all(objs: dict, kind: str) -> list[dict]:
    return [d for (k, _, _), d in objs.items() if k == kind]


def _config(objs: dict) -> KubeConfig:
    data = _one(objs, "ConfigMap", "emrestore-config")["data"]
    return KubeConfig.from_env({**data, "EMRESTORE_KUBE_NAMESPACE": "emrestore"})


def _container(doc: dict, name: str) -> dict:
    spec = doc["spec"]["template"]["spec"] if doc["kind"] != "CronJob" else \
        doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == name)


def _selects(selector: dict, labels: dict) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        if expr["operator"] == "In" and value not in expr["values"]:
            return False
        if expr["operator"] == "NotIn" and value in expr["values"]:
            return False
        if expr["operator"] == "Exists" and value is None:
            return False
    return True


# --------------------------------------------------------------------------------------------------
# files, rendering and schemas


def _kustomization_files() -> tuple[set[Path], set[Path]]:
    resources, patches = set(), set()
    for kfile in DEPLOY.rglob("kustomization.yaml"):
        k = yaml.safe_load(kfile.read_text())
        for res in k.get("resources") or []:
            p = (kfile.parent / res).resolve()
            if p.is_file():
                resources.add(p)
        for entry in k.get("patches") or []:
            if "path" in entry:
                patches.add((kfile.parent / entry["path"]).resolve())
    return resources, patches


def test_every_yaml_file_is_a_resource_a_patch_or_an_example():
    resources, patches = _kustomization_files()
    for path in DEPLOY.rglob("*.y*ml"):
        if path.name == "kustomization.yaml" or path.parent.name == "examples":
            continue
        assert path.resolve() in resources | patches, f"{path} is used by no kustomization"


def test_every_manifest_file_validates_against_kubernetes_schemas():
    resources, _ = _kustomization_files()
    count = 0
    for path in sorted(resources) + sorted((DEPLOY / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc["apiVersion"].startswith(("keda.sh/", "monitoring.coreos.com/")):  # CRDs: checked below
                continue
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)
            count += 1
    assert count >= 20


def test_rendered_overlays_validate(overlay):
    name, objs = overlay
    kinds = {k for k, _, _ in objs}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service", "Ingress",
            "NetworkPolicy", "PodDisruptionBudget", "CronJob", "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding"} <= kinds
    for doc in objs.values():
        for version in K8S_VERSIONS:
            assert kubernetes_validate.validate(doc, version, strict=True) == version
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] == "emrestore"
    assert {n for (k, _, n) in objs if k == "Deployment"} == {"emrestore", "emrestore-pool", "emrestore-bridge"}


# --------------------------------------------------------------------------------------------------
# images: server/bridge on the server image, workers on the worker image


def test_images_are_separate_and_workers_run_the_worker_image(overlay):
    name, objs = overlay
    cfg = _config(objs)
    server = _container(_one(objs, "Deployment", "emrestore"), "server")["image"]
    bridge = _container(_one(objs, "Deployment", "emrestore-bridge"), "bridge")["image"]
    cron = _container(_one(objs, "CronJob"), "submit")["image"]
    pool = _container(_one(objs, "Deployment", "emrestore-pool"), "worker")["image"]
    assert server == bridge == cron and "emrestore-server:" in server
    assert cfg.image == pool and "emrestore-worker:" in pool, "Indexed Job workers run the pool's image"
    for image in (server, pool):
        assert image.rsplit(":", 1)[1] not in ("latest", ""), "images pinned by tag"


# --------------------------------------------------------------------------------------------------
# workers: Indexed Jobs from the ConfigMap, and the pool, alike


def test_configmap_gives_a_valid_worker_job(overlay):
    name, objs = overlay
    cfg = _config(objs)
    job = build_job_manifest("first-job", num_tasks=16, parallelism=64, config=cfg)
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)
    assert job["spec"]["parallelism"] == cfg.max_parallelism  # the per-job budget caps the parallelism
    pod = job["spec"]["template"]["spec"]
    limits = pod["containers"][0]["resources"].get("limits", {})
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert "nodeSelector" not in pod, "node selectors only from configuration; none by default"
    if name == "gpu":
        assert cfg.gpus_per_pod == 1 and limits["nvidia.com/gpu"] == "1" and env["EMRESTORE_DEVICE"] == "cuda"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    else:
        assert cfg.gpus_per_pod == 0 and "nvidia.com/gpu" not in limits and env["EMRESTORE_DEVICE"] == "cpu"
        assert "tolerations" not in pod
    # the workers' service account exists, has no binding and no token
    assert cfg.service_account in {d["metadata"]["name"] for d in _all(objs, "ServiceAccount")}
    bound = {s["name"] for rb in _all(objs, "RoleBinding") for s in rb["subjects"]}
    assert cfg.service_account not in bound and pod["automountServiceAccountToken"] is False


def test_pool_workers_match_indexed_job_workers(overlay):
    name, objs = overlay
    cfg = _config(objs)
    job_pod = build_job_manifest("j", 2, 2, cfg)["spec"]["template"]["spec"]
    pool_dep = _one(objs, "Deployment", "emrestore-pool")
    pool_pod = pool_dep["spec"]["template"]["spec"]
    jw, pw = job_pod["containers"][0], _container(pool_dep, "worker")
    assert pw["command"] + pw["args"] == ["emrestore", "worker", "--pool", "--ledger", "$(EMRESTORE_KUBE_LEDGER_URL)"]
    assert pw["image"] == jw["image"] and pw["resources"] == jw["resources"]
    env_j = {e["name"]: e for e in jw["env"]}
    env_p = {e["name"]: e for e in pw["env"]}
    for var in ("EMRESTORE_DEVICE", "CLOUD_VOLUME_DIR", "POD_NAME", "NODE_NAME", "OMP_NUM_THREADS"):
        assert env_p[var] == env_j[var], var
    assert "NVIDIA_VISIBLE_DEVICES" not in env_p
    assert pool_pod.get("tolerations") == job_pod.get("tolerations")
    assert pool_pod["serviceAccountName"] == job_pod["serviceAccountName"] and pool_pod["automountServiceAccountToken"] is False
    shm = lambda spec: next(v for v in spec["volumes"] if v["name"] == "dshm")["emptyDir"]  # noqa: E731
    assert shm(pool_pod) == shm(job_pod)
    assert pool_pod["initContainers"][0]["command"] == job_pod["initContainers"][0]["command"]
    assert pw["terminationMessagePolicy"] == "FallbackToLogsOnError"  # the CUDA error lands in the pod status
    # a rollout never holds more GPUs than replicas
    assert pool_dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    if name == "gpu":
        assert pool_dep["spec"]["replicas"] >= 1 and pw["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_gpu_budget_quota_and_autoscaler_agree():
    objs = {_key(d): d for d in render(DEPLOY / "overlays" / "gpu")}
    cfg = _config(objs)
    quota = _one(objs, "ResourceQuota", "emrestore-gpus")["spec"]["hard"]["requests.nvidia.com/gpu"]
    hpa = yaml.safe_load((DEPLOY / "examples" / "hpa-external-metric.yaml").read_text())
    keda = yaml.safe_load((DEPLOY / "examples" / "keda-scaledobject.yaml").read_text())
    assert keda["kind"] == "ScaledObject" and keda["spec"]["scaleTargetRef"]["name"] == "emrestore-pool"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "emrestore-pool"
    assert keda["spec"]["maxReplicaCount"] == hpa["spec"]["maxReplicas"]
    assert keda["spec"]["minReplicaCount"] >= 1 and hpa["spec"]["minReplicas"] >= 1, "at least one warm worker"
    assert "emrestore_queue_blocks" in keda["spec"]["triggers"][0]["metadata"]["query"]
    assert hpa["spec"]["metrics"][0]["external"]["metric"]["name"] == "emrestore_queue_blocks"
    pool = _one(objs, "Deployment", "emrestore-pool")["spec"]["replicas"]
    assert pool <= hpa["spec"]["maxReplicas"]
    assert int(quota) == hpa["spec"]["maxReplicas"] * cfg.gpus_per_pod + cfg.max_batch_gpus
    assert cfg.max_parallelism <= cfg.max_batch_gpus


# --------------------------------------------------------------------------------------------------
# security


def _pod_specs(objs: dict, worker: dict | None = None) -> list[tuple[str, dict]]:
    out = []
    for d in objs.values():
        if d["kind"] == "Deployment":
            out.append((d["metadata"]["name"], d["spec"]["template"]["spec"]))
        elif d["kind"] == "CronJob":
            out.append((d["metadata"]["name"], d["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    if worker is not None:
        out.append(("worker", worker["spec"]["template"]["spec"]))
    return out


def test_pods_meet_the_restricted_pod_security_standard(overlay):
    _, objs = overlay
    ns = _one(objs, "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    worker = build_job_manifest("j", 2, 2, _config(objs))
    for name, spec in _pod_specs(objs, worker):
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, name
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
        for v in spec.get("volumes", []):
            assert set(v) - {"name"} <= {"secret", "emptyDir", "configMap", "projected", "downwardAPI",
                                        "persistentVolumeClaim", "ephemeral", "csi"}, (name, v)
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, (name, c["name"])
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], (name, c["name"])
            assert not sc.get("privileged"), (name, c["name"])
        # only the server holds an API token
        if name != "emrestore":
            assert spec.get("automountServiceAccountToken") is False, name


def test_rbac_is_namespaced_and_exactly_what_the_executor_calls(overlay):
    _, objs = overlay
    assert not _all(objs, "ClusterRole") and not _all(objs, "ClusterRoleBinding")
    role = _one(objs, "Role")
    granted = {(res, verb) for r in role["rules"] for res in r["resources"] for verb in r["verbs"]}
    source = (ROOT / "service" / "jobs" / "kube" / "api.py").read_text()
    calls = set(re.findall(r"self\.(?:batch|core)\.(\w+)\(", source))
    verb_of = {"create_namespaced_job": ("jobs", "create"), "read_namespaced_job": ("jobs", "get"),
               "list_namespaced_job": ("jobs", "list"), "delete_namespaced_job": ("jobs", "delete"),
               "list_namespaced_pod": ("pods", "list")}
    assert calls <= set(verb_of), calls - set(verb_of)
    assert granted == {verb_of[c] for c in calls}, "the Role grants exactly what service/jobs/kube/api.py calls"
    for r in role["rules"]:
        assert "*" not in r["verbs"] + r["resources"] + r["apiGroups"]
    binding = _one(objs, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "emrestore", "namespace": "emrestore"}]
    assert _one(objs, "Deployment", "emrestore")["spec"]["template"]["spec"]["serviceAccountName"] == "emrestore"
    for sa in _all(objs, "ServiceAccount"):
        if sa["metadata"]["name"] != "emrestore":
            assert sa.get("automountServiceAccountToken") is False


def test_admission_policy_parameters_match_the_executor_settings(overlay):
    _, objs = overlay
    cfg = _config(objs)
    params = _one(objs, "ConfigMap", "emrestore-admission")["data"]
    policy = _one(objs, "ValidatingAdmissionPolicy")
    binding = _one(objs, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"] and policy["spec"]["failurePolicy"] == "Fail"
    assert binding["spec"]["paramRef"]["name"] == "emrestore-admission"
    assert binding["spec"]["paramRef"]["parameterNotFoundAction"] == "Deny"
    ns_labels = _one(objs, "Namespace")["metadata"]["labels"]
    assert binding["spec"]["matchResources"]["namespaceSelector"]["matchLabels"].items() <= ns_labels.items()
    assert params["serviceAccountName"] == "emrestore"
    assert params["workerServiceAccountName"] == cfg.service_account
    assert set(params["allowedSecrets"].split(",")) == {cfg.credentials_secret, cfg.env_secret}
    text = yaml.safe_dump(policy)
    for key in params:
        assert f"params.data.{key}" in text, key
    # what the executor builds passes the policy's rules (spelled out on the manifest side)
    pod = build_job_manifest("j", 2, 2, cfg)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == params["workerServiceAccountName"] and pod["automountServiceAccountToken"] is False
    allowed = set(params["allowedSecrets"].split(","))
    assert {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v} <= allowed
    for c in pod["containers"] + pod.get("initContainers", []):
        assert {e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e} <= allowed
        assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in c.get("env", []))


# --------------------------------------------------------------------------------------------------
# server, bridge, ingress, networking, PDB, CronJob


def test_server_runs_the_kubernetes_executor_with_grpc_probes_and_tokens(overlay):
    _, objs = overlay
    dep = _one(objs, "Deployment", "emrestore")
    c = _container(dep, "server")
    argv = c["command"] + c["args"]
    assert argv[:2] == ["emrestore", "serve"] and argv[argv.index("--executor") + 1] == "kubernetes"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert set(c[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe
        assert c[probe]["grpc"]["port"] == 50051
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 50051, "metrics": int(argv[argv.index("--metrics-port") + 1])}, \
        "the server serves gRPC and its metrics only; HTTP is the bridge's"
    token_file = argv[argv.index("--token-file") + 1]
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    mount = next(m for m in c["volumeMounts"] if token_file.startswith(m["mountPath"] + "/"))
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] == "emrestore-tokens" and not secret.get("optional")
    assert [i["path"] for i in secret["items"]] == [token_file.rsplit("/", 1)[1]]
    assert dep["spec"]["strategy"]["type"] == "Recreate" and dep["spec"]["replicas"] == 1


def test_bridge_behind_ingress_with_tls(overlay):
    _, objs = overlay
    dep = _one(objs, "Deployment", "emrestore-bridge")
    c = _container(dep, "bridge")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels["emrestore.io/client"] == "true", "the bridge is a client of the gRPC service"
    svc = _one(objs, "Service", "emrestore-bridge")
    assert svc["spec"]["selector"].items() <= labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] == "http" and c["ports"][0]["name"] == "http"
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/healthz"
    ing = _one(objs, "Ingress", "emrestore-bridge")
    hosts = {h for t in ing["spec"]["tls"] for h in t["hosts"]}
    assert all(t["secretName"] for t in ing["spec"]["tls"])
    for rule in ing["spec"]["rules"]:
        assert rule["host"] in hosts, "every host is served with TLS"
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == "emrestore-bridge" and backend["port"]["name"] == port["name"]
    env = {e["name"]: e for e in c["env"]}
    assert env["EMRESTORE_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "emrestore-tokens", "key": "client-token"}
    assert {"configMapRef": {"name": "emrestore-bridge"}} in c["envFrom"]


def _policies_for(objs: dict, labels: dict) -> list[dict]:
    return [p for p in _all(objs, "NetworkPolicy") if _selects(p["spec"]["podSelector"], labels)]


def test_network_policies(overlay):
    _, objs = overlay
    server_labels = _one(objs, "Deployment", "emrestore")["spec"]["template"]["metadata"]["labels"]
    bridge_labels = _one(objs, "Deployment", "emrestore-bridge")["spec"]["template"]["metadata"]["labels"]
    pool_labels = _one(objs, "Deployment", "emrestore-pool")["spec"]["template"]["metadata"]["labels"]
    cron_labels = _one(objs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    job_labels = build_job_manifest("j", 1, 1, KubeConfig(ledger_url="x"))["spec"]["template"]["metadata"]["labels"]
    for p in _all(objs, "NetworkPolicy"):
        assert set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        assert all(r.get("ports") for r in p["spec"]["egress"]), "no egress rule may allow every port"
        # DNS to any address: works with NodeLocal DNSCache (a hostNetwork cache on a link-local IP)
        dns = [r for r in p["spec"]["egress"] if {(q["protocol"], q["port"]) for q in r["ports"]} == {("UDP", 53), ("TCP", 53)}]
        assert dns and "to" not in dns[0], p["metadata"]["name"]
    (server,) = _policies_for(objs, server_labels)
    grpc_rule, metrics_rule = server["spec"]["ingress"]
    assert {p["port"] for p in grpc_rule["ports"]} == {50051}
    assert all(f["podSelector"]["matchLabels"] == {"emrestore.io/client": "true"} for f in grpc_rule["from"])
    # Prometheus, and only Prometheus, reaches the metrics port the PodMonitor example scrapes
    server_c = _container(_one(objs, "Deployment", "emrestore"), "server")
    metrics_port = {p["name"]: p["containerPort"] for p in server_c["ports"]}["metrics"]
    assert {p["port"] for p in metrics_rule["ports"]} == {metrics_port}
    (src,) = metrics_rule["from"]
    assert src["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert src["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    monitor = yaml.safe_load((DEPLOY / "examples" / "podmonitor.yaml").read_text())
    assert monitor["kind"] == "PodMonitor" and _selects(monitor["spec"]["selector"], server_labels)
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    (bridge,) = _policies_for(objs, bridge_labels)
    (rule,) = bridge["spec"]["ingress"]
    assert {p["port"] for p in rule["ports"]} == {_container(_one(objs, "Deployment", "emrestore-bridge"), "bridge")
                                                  ["ports"][0]["containerPort"]}
    assert rule["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "ingress-nginx"}
    for labels in (job_labels, pool_labels):  # both kinds of workers: no ingress at all
        (policy,) = _policies_for(objs, labels)
        assert policy["spec"]["ingress"] == []
    for labels, policy in ((cron_labels, _policies_for(objs, cron_labels)), (bridge_labels, [bridge])):
        (p,) = policy
        assert any(_selects(t["podSelector"], server_labels) and {q["port"] for q in r["ports"]} == {50051}
                   for r in p["spec"]["egress"] for t in r.get("to", []) if "podSelector" in t)


def test_disruption_budgets_allow_drains(overlay):
    _, objs = overlay
    deployments = {d["metadata"]["name"]: d for d in _all(objs, "Deployment")}
    for pdb in _all(objs, "PodDisruptionBudget"):
        targets = [d for d in deployments.values()
                   if _selects(pdb["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
        assert len(targets) == 1, pdb["metadata"]["name"]
        replicas = targets[0]["spec"]["replicas"]
        spec = pdb["spec"]
        assert ("minAvailable" in spec) != ("maxUnavailable" in spec)
        allowed = spec["maxUnavailable"] if "maxUnavailable" in spec else replicas - spec["minAvailable"]
        assert allowed >= 1, f"{pdb['metadata']['name']} would block node drains"


def test_cronjob_submits_incrementally_and_never_overlaps(overlay):
    name, objs = overlay
    cron = _one(objs, "CronJob", "emrestore-incremental")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    c = _container(cron, "submit")
    argv = c["command"] + c["args"]
    assert argv[:2] == ["emrestore", "submit"]
    for flag in ("--whole", "--incremental", "--reuse-active", "--wait"):
        assert flag in argv
    host, port = argv[argv.index("--server") + 1].split(":")
    assert int(port) in {p["port"] for p in _one(objs, "Service", host)["spec"]["ports"]}
    schedule = _one(objs, "ConfigMap", "emrestore-schedule")["data"]
    for var in re.findall(r"\$\((\w+)\)", " ".join(argv)):
        assert var in schedule
    assert spec.get("suspend", False) is (name == "dev")


# --------------------------------------------------------------------------------------------------
# the commands in the manifests are ones the emrestore CLI accepts


def _expand(argv: list[str], env: dict[str, str]) -> list[str]:
    def sub(m: re.Match) -> str:
        assert m.group(1) in env, f"$({m.group(1)}) is not defined"
        return env[m.group(1)]

    return [re.sub(r"\$\((\w+)\)", sub, a) for a in argv]


def _known_flags(command: str) -> set[str]:
    from service.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return set(sub._option_string_actions)


def _parse(argv: list[str]):
    from service.cli import build_parser

    assert argv[0] == "emrestore"
    parser = build_parser()
    known = _known_flags(argv[1])
    argv = list(argv)
    for flag, nargs in PENDING_FLAGS.get(argv[1], {}).items():
        while flag in argv and flag not in known:  # added by another branch of issue 10-12
            i = argv.index(flag)
            del argv[i:i + 1 + nargs]
    try:
        return parser.parse_args(argv[1:])
    except SystemExit as e:  # argparse error
        raise AssertionError(f"emrestore rejects {argv}: exit {e.code}") from None


def test_manifest_commands_parse_with_the_cli(overlay):
    _, objs = overlay
    config = _one(objs, "ConfigMap", "emrestore-config")["data"]
    c = _container(_one(objs, "Deployment", "emrestore"), "server")
    a = _parse(_expand(c["command"] + c["args"], config))
    assert a.func.__name__ == "cmd_serve" and a.executor == "kubernetes"
    assert a.host == "0.0.0.0" and a.port == 50051
    assert a.ledger == config["EMRESTORE_KUBE_LEDGER_URL"]  # the service's ledger is the workers'
    assert a.workers == int(config["EMRESTORE_KUBE_MAX_PARALLELISM"])

    c = _container(_one(objs, "Deployment", "emrestore-bridge"), "bridge")
    a = _parse(_expand(c["command"] + c["args"], _one(objs, "ConfigMap", "emrestore-bridge")["data"]))
    assert a.func.__name__ == "cmd_bridge" and a.host == "0.0.0.0" and a.port == 8080
    assert a.grpc == "emrestore:50051" and a.allow_origin

    schedule = _one(objs, "ConfigMap", "emrestore-schedule")["data"]
    c = _container(_one(objs, "CronJob"), "submit")
    a = _parse(_expand(c["command"] + c["args"], schedule))
    assert a.func.__name__ == "cmd_submit" and a.whole and a.incremental and a.wait and a.reuse_active
    assert a.source == schedule["EMRESTORE_SCHEDULE_SOURCE"] and a.server == "emrestore:50051"

    worker = build_job_manifest("job-7", 8, 4, _config(objs))["spec"]["template"]["spec"]
    a = _parse(worker["containers"][0]["command"])
    assert a.func.__name__ == "cmd_worker" and a.job == "job-7" and a.num_tasks == 8 and a.task_index is None

    c = _container(_one(objs, "Deployment", "emrestore-pool"), "worker")
    if "--pool" in _known_flags("worker"):  # the pool mode lands with issue 11 items 1-2
        a = _parse(_expand(c["command"] + c["args"], config))
        assert a.func.__name__ == "cmd_worker" and a.pool and a.ledger == config["EMRESTORE_KUBE_LEDGER_URL"]


def test_server_pool_and_workers_copy_credentials_the_same_way(overlay):
    _, objs = overlay
    data = _one(objs, "ConfigMap", "emrestore-config")["data"]
    worker = build_job_manifest("j", 1, 1, _config(objs))["spec"]["template"]["spec"]
    specs = [_one(objs, "Deployment", n)["spec"]["template"]["spec"] for n in ("emrestore", "emrestore-pool")]
    for spec in specs + [worker]:
        (init,) = spec["initContainers"]
        assert init["command"] == ["sh", "-c", kube.COPY_CREDENTIALS_SCRIPT, "copy-credentials",
                                   kube.CREDENTIALS_SOURCE, kube.CREDENTIALS_MOUNT]
        volumes = {v["name"]: v for v in spec["volumes"]}
        source = next(m for m in init["volumeMounts"] if m["mountPath"] == kube.CREDENTIALS_SOURCE)
        assert volumes[source["name"]]["secret"]["secretName"] == data["EMRESTORE_KUBE_CREDENTIALS_SECRET"]
        main = spec["containers"][0]
        env = {e["name"]: e.get("value") for e in main["env"]}
        assert env["CLOUD_VOLUME_DIR"] == kube.CREDENTIALS_DIR
        target = next(m for m in main["volumeMounts"] if m["mountPath"] == kube.CREDENTIALS_DIR)
        assert volumes[target["name"]]["emptyDir"]["medium"] == "Memory"
        assert init["image"] == main["image"]


# --------------------------------------------------------------------------------------------------
# images and locks


@pytest.mark.parametrize("role", ["server", "worker"])
def test_dockerfiles_are_pinned_by_digest_multistage_and_non_root(role):
    text = (DEPLOY / f"Dockerfile.{role}").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    args = dict(re.findall(r"^ARG (\w+)(?:=(\S*))?$", text, re.M))
    froms = [ln.split()[1] for ln in lines if ln.upper().startswith("FROM ")]
    assert len(froms) >= 2, "multi-stage build"
    for image in froms:
        assert image == "${PYTHON_IMAGE}@${PYTHON_DIGEST}", image
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", args["PYTHON_IMAGE"]) and not args["PYTHON_IMAGE"].endswith(":latest")
    assert args["PYTHON_DIGEST"] == "", "no default digest: an unpinned build must fail"
    assert "COPY --from=build" in text
    users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["emrestore"\]', text, re.M)
    assert "NVIDIA_VISIBLE_DEVICES" not in "\n".join(lines), "the device plugin sets it, per pod"
    installs = re.findall(r"pip install[^\n]*", text.replace("\\\n", " "))
    assert installs and all("--no-cache-dir" in i for i in installs)
    assert any("requirements.lock" in i and "--require-hashes" in i for i in installs)
    assert f"deploy/requirements-{role}.lock" in text
    ignore = (DEPLOY / f"Dockerfile.{role}.dockerignore").read_text().split()
    assert "*" in ignore and "!service/" in ignore and f"!deploy/requirements-{role}.lock" in ignore
    digest = (DEPLOY / "base-image.digest").read_text().strip()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), "the base image is pinned by a digest"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock(role: str) -> dict[str, str]:
    text = (DEPLOY / f"requirements-{role}.lock").read_text()
    entries = {}
    for block in re.split(r"\n(?=\S)", text):
        head = block.split("\\")[0].strip()
        if not head or head.startswith("#"):
            continue
        name, _, version = head.partition("==")
        assert version, f"not pinned: {head}"
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", block), f"no hash: {head}"
        entries[_norm(name)] = version.strip()
    return entries


@pytest.mark.parametrize("role", ["server", "worker"])
def test_hashed_locks_pin_every_dependency(role):
    lock = _lock(role)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = _norm(re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0])
        assert name in lock, f"{name} (pyproject.toml) is missing from deploy/requirements-{role}.lock: regenerate it"
    pin = re.search(r"TORCH \?= torch==([\w.]+)", (ROOT / "Makefile").read_text())
    cuda = any(n.startswith("nvidia-") for n in lock)
    if role == "worker":
        assert cuda and lock["torch"] == pin.group(1), "the workers' torch is the Makefile's pin, CUDA build"
    else:
        assert not cuda and lock["torch"] == pin.group(1) + "+cpu", "the server image carries no CUDA"


def test_readme_covers_install_security_and_gpus():
    text = (DEPLOY / "README.md").read_text()
    for needle in ("kubectl apply -k deploy/overlays/gpu", "emrestore-cloudvolume", "emrestore-tokens",
                   "create secret generic", "GPU budget", "580.65.06", "pin-base-image.sh", "--reuse-active",
                   "NodeLocal DNSCache", "ValidatingAdmissionPolicy", "user:token", "--allow-store", "Ingress",
                   "emrestore worker --pool --ledger", "## Measured throughput"):
        assert needle in text, needle
    assert re.search(r"not built or tested.*no\s+Docker engine", text, re.S), "say that the images are not built here"
