"""deploy/: render the kustomize overlays and validate every manifest against Kubernetes 1.33.

Rendering: kustomize itself is not a Python package (PyPI has only wrappers and templates), but
``kubectl kustomize`` (kustomize v5 built into kubectl) is on the project's machine image. This file
has a small renderer of its own (resources, namespace, images, patches — strategic merge and JSON
6902 — and replacements: exactly what deploy/ uses; anything else is an error) so the tests run
everywhere, and when kubectl is installed it renders with ``kubectl kustomize`` too and checks that
both give the same objects.

Schemas: ``kubernetes_validate`` with the official OpenAPI schemas of Kubernetes 1.33, strict (unknown
fields are errors). 1.33 is pinned because it is the first release where every Job feature the
executor relies on is GA (backoffLimitPerIndex: 1.33; podFailurePolicy: 1.31; Indexed Jobs, gRPC
probes, CronJob timeZone earlier) and it is what managed clusters commonly run; the schemas ship with
kubernetes-validate, so the result does not change when a newer release appears.
"""

from __future__ import annotations

import copy
import json
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
K8S_VERSION = "1.33"

sys.path.insert(0, str(ROOT))
from service.jobs.kube import KubeConfig, build_job_manifest  # noqa: E402

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PriorityClass", "StorageClass", "PersistentVolume", "ValidatingWebhookConfiguration",
                  "MutatingWebhookConfiguration"}


# --------------------------------------------------------------------------------------------------
# a minimal kustomize


_MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
               "volumeMounts": "mountPath", "imagePullSecrets": "name"}


def _strategic_merge(base: dict, patch: dict) -> None:
    for key, value in patch.items():
        if key.startswith("$"):
            raise NotImplementedError(f"strategic merge directive {key} is not supported by this renderer")
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            _strategic_merge(base[key], value)
        elif isinstance(value, list) and key in _MERGE_KEYS and isinstance(base.get(key), list):
            mk = _MERGE_KEYS[key]
            for item in value:
                match = next((b for b in base[key] if b.get(mk) == item.get(mk)), None)
                if match is None:
                    base[key].append(copy.deepcopy(item))
                else:
                    _strategic_merge(match, item)
        else:
            base[key] = copy.deepcopy(value)


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def _json6902(doc: dict, ops: list[dict]) -> None:
    for op in ops:
        parts = _pointer(op["path"])
        parent: object = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        if op["op"] in ("add", "replace"):
            if isinstance(parent, list):
                if last == "-":
                    parent.append(copy.deepcopy(op["value"]))
                elif op["op"] == "add":
                    parent.insert(int(last), copy.deepcopy(op["value"]))
                else:
                    parent[int(last)] = copy.deepcopy(op["value"])
            else:
                if op["op"] == "replace" and last not in parent:
                    raise KeyError(f"replace of missing {op['path']}")
                parent[last] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            else:
                del parent[last]
        else:
            raise NotImplementedError(f"JSON patch op {op['op']}")


def _selected(doc: dict, target: dict) -> bool:
    if target.get("kind") and doc["kind"] != target["kind"]:
        return False
    if target.get("name") and doc["metadata"]["name"] != target["name"]:
        return False
    if target.get("namespace") and doc["metadata"].get("namespace") != target["namespace"]:
        return False
    unsupported = set(target) - {"kind", "name", "namespace", "group", "version"}
    if unsupported:
        raise NotImplementedError(f"patch target fields {unsupported}")
    return True


def _walk_containers(node: object):
    if isinstance(node, dict):
        for key in ("containers", "initContainers"):
            if isinstance(node.get(key), list):
                yield from node[key]
        for value in node.values():
            yield from _walk_containers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_containers(value)


def _split_image(image: str) -> tuple[str, str]:
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    head, _, last = image.rpartition("/")
    if ":" in last:
        last, tag = last.split(":", 1)
        return (head + "/" if head else "") + last, ":" + tag
    return image, ""


def _field_segments(path: str) -> list[str]:
    return re.findall(r"\[[^\]]*\]|[^.\[\]]+", path)


def _get_field(doc: dict, path: str) -> object:
    cur: object = doc
    for seg in _field_segments(path):
        if seg.startswith("["):
            k, v = seg[1:-1].split("=", 1)
            cur = next(item for item in cur if item.get(k) == v)  # type: ignore[union-attr]
        else:
            cur = cur[seg]  # type: ignore[index]
    return cur


def _set_field(doc: dict, path: str, value: object) -> None:
    segs = _field_segments(path)
    parent = _get_field(doc, ".".join(segs[:-1])) if len(segs) > 1 else doc
    parent[segs[-1]] = value  # type: ignore[index]


_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "images", "patches", "replacements"}


def render(directory: Path) -> list[dict]:
    """Build a kustomization directory (the subset of kustomize v5 deploy/ uses)."""
    kfile = directory / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    unknown = set(k) - _KUSTOMIZATION_KEYS
    if unknown:
        raise NotImplementedError(f"{kfile}: fields {sorted(unknown)} are not supported by the test renderer")
    docs: list[dict] = []
    for res in k.get("resources") or []:
        path = (directory / res).resolve()
        if path.is_dir():
            docs.extend(render(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for entry in k.get("patches") or []:
        text = (directory / entry["path"]).read_text() if "path" in entry else entry["patch"]
        patches = [p for p in yaml.safe_load_all(text) if p]
        target = entry.get("target")
        for patch in patches:
            if isinstance(patch, list):
                hits = [d for d in docs if _selected(d, target)]
                assert hits, f"patch target {target} matches nothing"
                for d in hits:
                    _json6902(d, patch)
            else:
                sel = target or {"kind": patch["kind"], "name": patch["metadata"]["name"]}
                hits = [d for d in docs if _selected(d, sel)]
                assert hits, f"patch for {sel} matches nothing"
                for d in hits:
                    _strategic_merge(d, patch)
    if k.get("namespace"):
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d["metadata"]["namespace"] = k["namespace"]
    for img in k.get("images") or []:
        for c in _walk_containers(docs):
            name, ref = _split_image(c["image"])
            if name != img["name"]:
                continue
            new_name = img.get("newName", name)
            if img.get("digest"):
                ref = "@" + img["digest"]
            elif "newTag" in img:
                ref = ":" + str(img["newTag"])
            c["image"] = new_name + ref
    for rep in k.get("replacements") or []:
        src = rep["source"]
        source_doc = next(d for d in docs if _selected(d, {"kind": src["kind"], "name": src["name"]}))
        value = _get_field(source_doc, src["fieldPath"])
        for tgt in rep["targets"]:
            for d in docs:
                if _selected(d, tgt["select"]):
                    for fp in tgt["fieldPaths"]:
                        _set_field(d, fp, value)
    return docs


def kubectl_render(directory: Path) -> list[dict] | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


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


# --------------------------------------------------------------------------------------------------
# rendering and schemas


def test_renderer_matches_kubectl_kustomize():
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed: only the built-in renderer is used")
    for target in [DEPLOY / "base"] + [DEPLOY / "overlays" / o for o in OVERLAYS]:
        ours = {_key(d): d for d in render(target)}
        theirs = {_key(d): d for d in kubectl_render(target)}
        assert sorted(ours) == sorted(theirs), target
        for key in ours:
            assert json.loads(json.dumps(ours[key])) == json.loads(json.dumps(theirs[key])), (target, key)


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


def test_every_yaml_file_is_a_resource_or_a_patch():
    resources, patches = _kustomization_files()
    for path in DEPLOY.rglob("*.y*ml"):
        if path.name == "kustomization.yaml":
            continue
        assert path.resolve() in resources | patches, f"{path} is used by no kustomization"


def test_every_manifest_file_validates_against_kubernetes_schemas():
    resources, _ = _kustomization_files()
    assert resources
    count = 0
    for path in sorted(resources):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
                count += 1
    assert count >= 12


def test_rendered_overlay_validates(overlay):
    name, objs = overlay
    kinds = {k for k, _, _ in objs}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service",
            "NetworkPolicy", "PodDisruptionBudget", "CronJob"} <= kinds
    for doc in objs.values():
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == K8S_VERSION
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] == "emrestore"


# --------------------------------------------------------------------------------------------------
# the executor's settings -> worker Job


def test_configmap_gives_a_valid_worker_job(overlay):
    name, objs = overlay
    data = _one(objs, "ConfigMap", "emrestore-config")["data"]
    cfg = KubeConfig.from_env({**data, "EMRESTORE_KUBE_NAMESPACE": "emrestore"})
    deployment = _one(objs, "Deployment", "emrestore")
    server = deployment["spec"]["template"]["spec"]["containers"][0]
    assert cfg.image == server["image"], "workers must run the service's image"
    assert cfg.image.split("/")[-1].split(":")[1] not in ("latest", ""), "image must be pinned by tag"
    job = build_job_manifest("first-job", num_tasks=16, parallelism=64, config=cfg)
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    assert job["spec"]["parallelism"] == cfg.max_parallelism  # the GPU budget caps the parallelism
    limits = job["spec"]["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    if name == "gpu":
        assert cfg.gpus_per_pod == 1 and limits["nvidia.com/gpu"] == "1"
        assert job["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert job["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    else:
        assert cfg.gpus_per_pod == 0 and "nvidia.com/gpu" not in limits
    # the workers' service account exists and has no binding
    assert cfg.service_account in {d["metadata"]["name"] for d in _all(objs, "ServiceAccount")}
    bound = {s["name"] for rb in _all(objs, "RoleBinding") for s in rb["subjects"]}
    assert cfg.service_account not in bound


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
    data = _one(objs, "ConfigMap", "emrestore-config")["data"]
    worker = build_job_manifest("j", 2, 2, KubeConfig.from_env({**data, "EMRESTORE_KUBE_NAMESPACE": "emrestore"}))
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


# --------------------------------------------------------------------------------------------------
# RBAC


def test_rbac_is_namespaced_and_least_privilege(overlay):
    _, objs = overlay
    assert not _all(objs, "ClusterRole") and not _all(objs, "ClusterRoleBinding")
    role = _one(objs, "Role")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role["rules"]}
    assert rules == {
        (("batch",), ("jobs",)): {"create", "get", "list", "watch", "delete"},
        (("",), ("pods",)): {"get", "list", "watch"},
        (("",), ("pods/log",)): {"get"},
    }
    for r in role["rules"]:
        assert "*" not in r["verbs"] + r["resources"] + r["apiGroups"]
        assert "resourceNames" not in r or r["resourceNames"]
    binding = _one(objs, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "emrestore", "namespace": "emrestore"}]
    deployment = _one(objs, "Deployment", "emrestore")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "emrestore"
    # nobody else gets a token
    for sa in _all(objs, "ServiceAccount"):
        if sa["metadata"]["name"] != "emrestore":
            assert sa.get("automountServiceAccountToken") is False


def test_role_covers_what_the_executor_calls():
    """Every API call in service/jobs/kube.py is allowed by the Role."""
    source = (ROOT / "service" / "jobs" / "kube.py").read_text()
    calls = set(re.findall(r"self\.(?:batch|core)\.(\w+)\(", source)) | {
        m for m in re.findall(r"self\.core\.(\w+)\b", source)}
    verb_of = {"create_namespaced_job": ("jobs", "create"), "read_namespaced_job": ("jobs", "get"),
               "list_namespaced_job": ("jobs", "list"), "delete_namespaced_job": ("jobs", "delete"),
               "list_namespaced_pod": ("pods", "list"), "read_namespaced_pod": ("pods", "get"),
               "read_namespaced_pod_log": ("pods/log", "get")}
    needed = {verb_of[c] for c in calls}
    if "k8s_watch" in source:
        needed.add(("pods", "watch"))
    role = next(d for d in yaml.safe_load_all((DEPLOY / "base" / "rbac.yaml").read_text()) if d["kind"] == "Role")
    granted = {(res, verb) for r in role["rules"] for res in r["resources"] for verb in r["verbs"]}
    assert needed <= granted, needed - granted


# --------------------------------------------------------------------------------------------------
# service, probes, networking, PDB, CronJob


def test_deployment_runs_the_kubernetes_executor_with_grpc_probes(overlay):
    _, objs = overlay
    dep = _one(objs, "Deployment", "emrestore")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    argv = c.get("command", []) + c.get("args", [])
    assert argv[:2] == ["emrestore", "serve"] and argv[argv.index("--executor") + 1] == "kubernetes"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert set(c[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe
        assert c[probe]["grpc"]["port"] == 50051
    assert {p["containerPort"] for p in c["ports"]} == {50051, 8080}
    env = {e["name"]: e for e in c["env"]}
    assert env["EMRESTORE_KUBE_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert {"configMapRef": {"name": "emrestore-config"}} in c["envFrom"]


def test_service_selects_the_server(overlay):
    _, objs = overlay
    svc = _one(objs, "Service", "emrestore")
    assert {(p["name"], p["port"]) for p in svc["spec"]["ports"]} == {("grpc", 50051), ("http", 8080)}
    labels = _one(objs, "Deployment", "emrestore")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    pdb = _one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert ("minAvailable" in pdb["spec"]) != ("maxUnavailable" in pdb["spec"])


def test_network_policies(overlay):
    _, objs = overlay
    policies = {p["metadata"]["name"]: p for p in _all(objs, "NetworkPolicy")}
    server_labels = _one(objs, "Deployment", "emrestore")["spec"]["template"]["metadata"]["labels"]
    server = next(p for p in policies.values()
                  if p["spec"]["podSelector"]["matchLabels"].items() <= server_labels.items())
    assert set(server["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    (rule,) = server["spec"]["ingress"]
    assert {p["port"] for p in rule["ports"]} == {50051, 8080}
    assert all(f["podSelector"]["matchLabels"] == {"emrestore.io/client": "true"} for f in rule["from"])
    # every policy allows DNS egress and limits egress to known ports
    for p in policies.values():
        assert set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        ports = {(q.get("protocol", "TCP"), q["port"]) for r in p["spec"]["egress"] for q in r.get("ports", [])}
        assert ("UDP", 53) in ports, p["metadata"]["name"]
        assert all(r.get("ports") for r in p["spec"]["egress"]), "no egress rule may allow every port"
    # the worker pods built by kube.py are covered by a policy without ingress
    worker_labels = build_job_manifest("j", 1, 1, KubeConfig(ledger_url="x"))["spec"]["template"]["metadata"]["labels"]
    worker = [p for p in policies.values() if p["spec"]["podSelector"]["matchLabels"].items() <= worker_labels.items()]
    assert len(worker) == 1 and worker[0]["spec"]["ingress"] == []
    # the CronJob's pods are clients of the server and may reach it
    cron_labels = _one(objs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    assert cron_labels["emrestore.io/client"] == "true"
    cron_policy = [p for p in policies.values() if p["spec"]["podSelector"]["matchLabels"].items() <= cron_labels.items()]
    assert len(cron_policy) == 1
    assert any(t.get("podSelector", {}).get("matchLabels", {}).items() <= server_labels.items() and "podSelector" in t
               for r in cron_policy[0]["spec"]["egress"] for t in r.get("to", []))


def test_cronjob_submits_incrementally(overlay):
    name, objs = overlay
    cron = _one(objs, "CronJob", "emrestore-incremental")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    argv = c.get("command", []) + c.get("args", [])
    assert argv[:2] == ["emrestore", "submit"]
    for flag in ("--whole", "--incremental", "--wait"):
        assert flag in argv
    for flag in ("--model", "--output", "--server"):
        assert argv.index(flag) + 1 < len(argv)
    server = argv[argv.index("--server") + 1]
    host, port = server.split(":")
    svc = _one(objs, "Service", host)
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
    # $(VAR)s come from the schedule ConfigMap
    schedule = _one(objs, "ConfigMap", "emrestore-schedule")["data"]
    for var in re.findall(r"\$\((\w+)\)", " ".join(argv)):
        assert var in schedule
    assert {"configMapRef": {"name": "emrestore-schedule"}} in c["envFrom"]
    assert spec.get("suspend", False) is (name == "dev")


# --------------------------------------------------------------------------------------------------
# image


def test_dockerfile_is_pinned_multistage_and_non_root():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    froms = [ln.split()[1] for ln in lines if ln.upper().startswith("FROM ")]
    assert len(froms) >= 2, "multi-stage build"
    for image in froms:
        image = args.get(image.strip("${}"), image)
        assert re.fullmatch(r"[\w./-]+:[\w.-]+(@sha256:[0-9a-f]{64})?", image), image
        assert not image.endswith(":latest")
    assert "COPY --from=build" in text
    users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["emrestore"\]', text, re.M)
    for ln in lines:
        if "pip install" in ln:
            assert "--no-cache-dir" in ln, ln
    assert "requirements.lock" in text
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert "*" in ignore and "!service/" in ignore, "the build context is an allow-list"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_requirements_lock_pins_every_dependency():
    lock = {}
    for line in (DEPLOY / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line}"
            lock[_norm(name)] = version
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = _norm(re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0])
        assert name in lock, f"{name} (pyproject.toml) is missing from deploy/requirements.lock: regenerate it"
    makefile = (ROOT / "Makefile").read_text()
    pin = re.search(r"TORCH \?= torch==([\w.]+)", makefile)
    if pin:
        assert lock["torch"] == pin.group(1), "the image's torch must be the Makefile's pin"
    assert any(n.startswith("nvidia-") for n in lock), "the image's torch is a CUDA build"


def test_readme_covers_install_and_has_the_throughput_placeholder():
    text = (DEPLOY / "README.md").read_text()
    for needle in ("kubectl apply -k deploy/overlays/gpu", "emrestore-cloudvolume", "## Measured throughput",
                   "GPU budget", "create secret generic"):
        assert needle in text, needle
    assert re.search(r"not built or tested.*no\s+Docker engine", text, re.S), "say that the image is not built here"


# --------------------------------------------------------------------------------------------------
# the commands in the manifests are ones the emrestore CLI accepts


def _expand(argv: list[str], env: dict[str, str]) -> list[str]:
    def sub(m: re.Match) -> str:
        assert m.group(1) in env, f"$({m.group(1)}) is not defined"
        return env[m.group(1)]

    return [re.sub(r"\$\((\w+)\)", sub, a) for a in argv]


def _parse(argv: list[str]):
    from service.cli import build_parser

    assert argv[0] == "emrestore"
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as e:  # argparse error
        raise AssertionError(f"emrestore rejects {argv}: exit {e.code}") from None


def test_manifest_commands_parse_with_the_cli(overlay):
    _, objs = overlay
    config = _one(objs, "ConfigMap", "emrestore-config")["data"]
    schedule = _one(objs, "ConfigMap", "emrestore-schedule")["data"]

    c = _one(objs, "Deployment", "emrestore")["spec"]["template"]["spec"]["containers"][0]
    a = _parse(_expand(c["command"] + c["args"], config))
    assert a.func.__name__ == "cmd_serve" and a.executor == "kubernetes"
    assert a.host == "0.0.0.0" and a.port == 50051  # reachable by probes and the Service
    assert a.ledger == config["EMRESTORE_KUBE_LEDGER_URL"]  # the service's ledger is the workers'
    assert a.workers == int(config["EMRESTORE_KUBE_MAX_PARALLELISM"])

    c = _one(objs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    a = _parse(_expand(c["command"] + c["args"], schedule))
    assert a.func.__name__ == "cmd_submit" and a.whole and a.incremental and a.wait
    assert a.source == schedule["EMRESTORE_SCHEDULE_SOURCE"] and a.server == "emrestore:50051"

    cfg = KubeConfig.from_env({**config, "EMRESTORE_KUBE_NAMESPACE": "emrestore"})
    worker = build_job_manifest("job-7", 8, 4, cfg)["spec"]["template"]["spec"]
    a = _parse(worker["containers"][0]["command"])
    assert a.func.__name__ == "cmd_worker" and a.job == "job-7" and a.num_tasks == 8 and a.task_index is None


def test_server_and_workers_copy_credentials_the_same_way(overlay):
    from service.jobs import kube

    _, objs = overlay
    server = _one(objs, "Deployment", "emrestore")["spec"]["template"]["spec"]
    data = _one(objs, "ConfigMap", "emrestore-config")["data"]
    worker = build_job_manifest("j", 1, 1, KubeConfig.from_env({**data, "EMRESTORE_KUBE_NAMESPACE": "x"}))
    worker = worker["spec"]["template"]["spec"]
    for spec in (server, worker):
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
