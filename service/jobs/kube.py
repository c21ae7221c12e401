"""Kubernetes executor: one Indexed Job per emrestore job.

Every emrestore job becomes ONE ``batch/v1`` Job with ``completionMode: Indexed`` and
``completions = num_tasks``; pod *i* runs the worker contract of ``docs/CONTRACTS.md``::

    emrestore worker --ledger LEDGER_URL --job JOB_ID --num-tasks T

and takes its task index from ``$JOB_COMPLETION_INDEX``, which the Job controller sets in every pod
of an Indexed Job. ``parallelism`` is the GPU budget: at most that many pods (one GPU each by default)
run at once, and Kubernetes starts the next index whenever one finishes.

Failure handling is left to the Job controller (Kubernetes >= 1.33, where backoffLimitPerIndex is
GA; podFailurePolicy is GA since 1.31):

* ``backoffLimitPerIndex``: each task is retried on its own; a task that keeps failing does not use up
  the retries of the others, and the Job still runs every other index.
* ``podFailurePolicy``: a pod with the ``DisruptionTarget`` condition (preemption, API eviction, node
  drain, node-pressure eviction) is ``Ignore``d: replaced without counting as a failure, which is safe
  because re-running a block writes the same bytes. Exit code 2 (bad input) fails the index at once
  (``FailIndex``): retrying cannot help.
* ``ttlSecondsAfterFinished`` removes finished Jobs (and their pods) after a while.

``KubernetesExecutor.status`` reads the Job *and* its pods and turns the usual problems into plain
messages: pods pending for lack of GPUs, image pull errors, OOMKilled workers, evictions and
disruptions, bad input, retries.

Configuration is a :class:`KubeConfig`, loadable from a dict, YAML, or ``EMRESTORE_KUBE_*``
environment variables (what ``deploy/base/configmap.yaml`` sets for the service).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import yaml

try:  # the Executor protocol's status type (service/jobs/executors.py)
    from service.jobs.executors import ExecutorStatus
except ImportError:  # executors.py not written yet, or a circular import while it loads

    @dataclass
    class ExecutorStatus:  # type: ignore[no-redef]
        """Fallback with the fields of the Executor protocol's status (see docs/CONTRACTS.md)."""

        active: int = 0
        succeeded: int = 0
        failed: int = 0
        finished: bool = False
        messages: list[str] = field(default_factory=list)


log = logging.getLogger(__name__)

__all__ = [
    "KubeConfig",
    "KubernetesExecutor",
    "KubernetesExecutorError",
    "ExecutorStatus",
    "build_job_manifest",
    "job_name",
    "job_label_value",
    "load_api_client",
    "parse_index_ranges",
]

WORKER_CONTAINER = "worker"
#: CLOUD_VOLUME_DIR in worker pods. cloud-volume/cloud-files read their credentials from
#: ``$CLOUD_VOLUME_DIR/secrets/<name>-secret.json``. The directory is a small memory-backed emptyDir
#: (writable: service/volume/stores.py writes ``<alias>-secret.json`` there for EMRESTORE_S3_ENDPOINTS)
#: that an init container fills with the credentials Secret's files, mounted read-only elsewhere.
CREDENTIALS_DIR = "/secrets/cloudvolume"
CREDENTIALS_MOUNT = CREDENTIALS_DIR + "/secrets"
CREDENTIALS_SOURCE = "/secrets/credentials"
#: copies the Secret's files (not the ..data bookkeeping entries) into $CLOUD_VOLUME_DIR/secrets
COPY_CREDENTIALS_SCRIPT = (
    'mkdir -p "$2" && for f in "$1"/*; do if [ -f "$f" ]; then cp -L "$f" "$2"/ || exit 1; fi; done'
)
SHM_DIR = "/dev/shm"
#: exit status of ``emrestore worker`` for bad input: the index fails at once, without retries.
EXIT_BAD_INPUT = 2
#: user/group of the image (deploy/Dockerfile); fsGroup makes the 0440 Secret files readable.
IMAGE_UID = 10001

LABEL_JOB_ID = "emrestore.io/job-id"
ANNOTATION_JOB_ID = "emrestore.io/job-id"
ANNOTATION_NUM_TASKS = "emrestore.io/num-tasks"
ANNOTATION_LEDGER = "emrestore.io/ledger"
COMPLETION_INDEX_KEY = "batch.kubernetes.io/job-completion-index"
MAX_JOB_NAME = 52  # leaves room for the "-<index>" of pod hostnames within 63 characters

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_PROPAGATION = ("Foreground", "Background")


class KubernetesExecutorError(RuntimeError):
    """The cluster refused or failed an operation; the message says why in plain words."""


# --------------------------------------------------------------------------------------------------
# configuration


@dataclass
class KubeConfig:
    """Settings of the worker Jobs (one field per ``EMRESTORE_KUBE_<FIELD>`` variable)."""

    namespace: str = "emrestore"
    image: str = "emrestore:latest"
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: list[str] = field(default_factory=list)
    gpus_per_pod: int = 1
    gpu_resource: str = "nvidia.com/gpu"
    cpu_request: str = "4"
    cpu_limit: str | None = None
    memory_request: str = "16Gi"
    memory_limit: str | None = "32Gi"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    #: Secret with cloud-volume credential files (google-secret.json, aws-secret.json, ...); they
    #: appear in /secrets/cloudvolume/secrets with CLOUD_VOLUME_DIR=/secrets/cloudvolume.
    credentials_secret: str | None = "emrestore-cloudvolume"
    #: optional Secret whose keys become environment variables (e.g. AWS_ACCESS_KEY_ID for s3fs).
    env_secret: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    #: size of the memory-backed emptyDir at /dev/shm (counts against the memory limit).
    shm_size: str | None = "8Gi"
    service_account: str | None = "emrestore-worker"
    priority_class_name: str | None = None
    ttl_seconds_after_finished: int | None = 86400
    backoff_limit_per_index: int = 3
    #: None: every index gets its chance (= num_tasks); a number fails the Job sooner.
    max_failed_indexes: int | None = None
    #: the GPU budget: launch() never runs more pods at once (None: whatever the caller asks).
    max_parallelism: int | None = None
    active_deadline_seconds: int | None = None
    termination_grace_period_seconds: int = 60
    ledger_url: str = ""
    worker_command: list[str] = field(default_factory=lambda: ["emrestore", "worker"])
    job_name_prefix: str = "emrestore"
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    #: how cancel() deletes the Job: its pods go too with either (never the API's Orphan default).
    delete_propagation: str = "Background"

    def __post_init__(self) -> None:
        problems = []
        if not _DNS_LABEL.match(self.namespace or ""):
            problems.append(f"namespace {self.namespace!r} is not a DNS-1123 label")
        if not self.image:
            problems.append("image is empty")
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            problems.append(f"image_pull_policy {self.image_pull_policy!r} is not Always, IfNotPresent or Never")
        if self.gpus_per_pod < 0:
            problems.append("gpus_per_pod must be >= 0")
        if self.backoff_limit_per_index < 0:
            problems.append("backoff_limit_per_index must be >= 0")
        if self.max_failed_indexes is not None and self.max_failed_indexes < 0:
            problems.append("max_failed_indexes must be >= 0")
        if self.max_parallelism is not None and self.max_parallelism < 1:
            problems.append("max_parallelism must be >= 1")
        if self.delete_propagation not in _PROPAGATION:
            problems.append(f"delete_propagation must be one of {_PROPAGATION}")
        if not self.worker_command:
            problems.append("worker_command is empty")
        prefix = self.job_name_prefix
        if not _DNS_LABEL.match(prefix or "") or len(prefix) > 20:
            problems.append(f"job_name_prefix {prefix!r} must be a DNS-1123 label of at most 20 characters")
        for t in self.tolerations:
            if not isinstance(t, Mapping):
                problems.append(f"toleration {t!r} is not a mapping")
        if problems:
            raise ValueError("invalid KubeConfig: " + "; ".join(problems))

    # -- loaders ------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "KubeConfig":
        """Build from a mapping of field names (dashes allowed for underscores); unknown keys raise."""
        data = dict(data or {})
        names = set(cls.field_names())
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in names:
                unknown.append(str(key))
                continue
            kwargs[name] = _coerce(name, value)
        if unknown:
            raise ValueError(f"unknown KubeConfig keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, source: str | os.PathLike[str]) -> "KubeConfig":
        """Build from a YAML file path or YAML text (a mapping of field names)."""
        text = str(source)
        if isinstance(source, os.PathLike) or ("\n" not in text and os.path.isfile(text)):
            with open(source, encoding="utf-8") as f:
                text = f.read()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, Mapping):
            raise ValueError("KubeConfig YAML must be a mapping of settings")
        return cls.from_dict(data)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, prefix: str = "EMRESTORE_KUBE_") -> "KubeConfig":
        """Build from ``EMRESTORE_KUBE_<FIELD>`` variables over an optional ``EMRESTORE_KUBE_CONFIG`` YAML.

        Lists and mappings are JSON or YAML (``EMRESTORE_KUBE_NODE_SELECTOR='{"gpu": "a100"}'``);
        mappings also take ``k=v,k2=v2``. An empty value means None for optional fields. Without a
        namespace anywhere, the in-cluster service account's namespace is used when there is one.
        """
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        path = env.get(prefix + "CONFIG")
        if path:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
            if not isinstance(loaded, Mapping):
                raise ValueError(f"{path}: KubeConfig YAML must be a mapping")
            data.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
        for name in cls.field_names():
            raw = env.get(prefix + name.upper())
            if raw is not None:
                data[name] = _parse_env_value(name, raw)
        if "namespace" not in data:
            sa_ns = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
            if os.path.isfile(sa_ns):
                with open(sa_ns, encoding="utf-8") as f:
                    data["namespace"] = f.read().strip()
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_kind(name: str) -> str:
    hint = typing.get_type_hints(KubeConfig)[name]
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args and origin is not list and origin is not dict else hint
    base_origin = typing.get_origin(base) or base
    kind = {int: "int", str: "str", bool: "bool", list: "list", dict: "dict"}.get(base_origin, "str")
    return kind + ("?" if optional else "")


def _coerce(name: str, value: Any) -> Any:
    kind = _field_kind(name)
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None:
        if optional:
            return None
        raise ValueError(f"KubeConfig.{name} may not be null")
    if kind == "int":
        if isinstance(value, bool):
            raise ValueError(f"KubeConfig.{name} must be an integer")
        return int(value)
    if kind == "str":
        return str(value)
    if kind == "list":
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ValueError(f"KubeConfig.{name} must be a list")
        return list(value)
    if kind == "dict":
        if not isinstance(value, Mapping):
            raise ValueError(f"KubeConfig.{name} must be a mapping")
        return {str(k): ("" if v is None else str(v)) for k, v in value.items()}
    return value


def _parse_env_value(name: str, raw: str) -> Any:
    kind = _field_kind(name)
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    text = raw.strip()
    if text == "" and (optional or kind in ("list", "dict")):
        return None if optional else ([] if kind == "list" else {})
    if kind in ("list", "dict"):
        if kind == "dict" and not text.startswith("{") and "=" in text and ":" not in text:
            return dict(part.split("=", 1) for part in text.split(",") if part.strip())
        value = yaml.safe_load(text)
        if kind == "list" and isinstance(value, str):  # a single word: worker_command=emrestore
            value = value.split()
        return value
    return text


# --------------------------------------------------------------------------------------------------
# names and manifest


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def job_name(job_id: str, prefix: str = "emrestore") -> str:
    """DNS-1123 label (at most 52 characters) for the Job of ``job_id``; deterministic.

    Ids that are not already lower-case DNS-safe, or are too long, get a hash of the original id
    appended, so two different ids never share a Job.
    """
    if not job_id:
        raise ValueError("empty job id")
    slug = re.sub(r"[^a-z0-9-]+", "-", job_id.lower())
    slug = re.sub(r"-{2,}", "-", slug).strip("-")
    name = f"{prefix}-{slug}" if slug else prefix
    if slug != job_id or len(name) > MAX_JOB_NAME:
        name = name[: MAX_JOB_NAME - 9].rstrip("-") + "-" + _short_hash(job_id)
    return name


def job_label_value(job_id: str) -> str:
    """Value of the ``emrestore.io/job-id`` label: the id itself when it is a valid label value."""
    if len(job_id) <= 63 and _LABEL_VALUE.match(job_id):
        return job_id
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", job_id).strip("-._")
    return (slug[:54].rstrip("-._") + "-" if slug else "") + _short_hash(job_id)


def _worker_labels(config: KubeConfig, name: str, job_id: str) -> dict[str, str]:
    labels = dict(config.labels)
    labels.update(
        {
            "app.kubernetes.io/name": "emrestore",
            "app.kubernetes.io/component": "worker",
            "app.kubernetes.io/instance": name,
            "app.kubernetes.io/part-of": "emrestore",
            "app.kubernetes.io/managed-by": "emrestore-service",
            LABEL_JOB_ID: job_label_value(job_id),
        }
    )
    return labels


def build_job_manifest(job_id: str, num_tasks: int, parallelism: int, config: KubeConfig) -> dict[str, Any]:
    """The Indexed Job (a plain dict, ready for the API) that runs ``num_tasks`` worker tasks."""
    if num_tasks < 1:
        raise ValueError("num_tasks must be >= 1")
    if parallelism < 1:
        raise ValueError("parallelism must be >= 1")
    if not config.ledger_url:
        raise ValueError("KubeConfig.ledger_url is not set: workers need the ledger URL")
    name = job_name(job_id, config.job_name_prefix)
    parallel = min(parallelism, num_tasks, config.max_parallelism or parallelism)
    labels = _worker_labels(config, name, job_id)
    annotations = dict(config.annotations)
    annotations.update(
        {
            ANNOTATION_JOB_ID: job_id,
            ANNOTATION_NUM_TASKS: str(num_tasks),
            ANNOTATION_LEDGER: config.ledger_url,
        }
    )
    pod_annotations = dict(annotations)
    pod_annotations["kubectl.kubernetes.io/default-container"] = WORKER_CONTAINER

    command = list(config.worker_command) + [
        "--ledger", config.ledger_url, "--job", job_id, "--num-tasks", str(num_tasks),
    ]  # the task index comes from $JOB_COMPLETION_INDEX
    env: list[dict[str, Any]] = [
        {"name": "EMRESTORE_JOB_ID", "value": job_id},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    init_containers: list[dict[str, Any]] = []
    container_security = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    if config.credentials_secret:
        env.append({"name": "CLOUD_VOLUME_DIR", "value": CREDENTIALS_DIR})
        env.append({"name": "CLOUD_FILES_DIR", "value": CREDENTIALS_DIR})
        volumes.append(
            {
                "name": "credentials",
                # optional: a worker without credentials still starts and says what it cannot read
                "secret": {"secretName": config.credentials_secret, "defaultMode": 0o440, "optional": True},
            }
        )
        volumes.append({"name": "cloudvolume", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}})
        mounts.append({"name": "cloudvolume", "mountPath": CREDENTIALS_DIR})
        init_containers.append(
            {
                "name": "copy-credentials",
                "image": config.image,
                "imagePullPolicy": config.image_pull_policy,
                "command": ["sh", "-c", COPY_CREDENTIALS_SCRIPT, "copy-credentials",
                            CREDENTIALS_SOURCE, CREDENTIALS_MOUNT],
                "volumeMounts": [
                    {"name": "credentials", "mountPath": CREDENTIALS_SOURCE, "readOnly": True},
                    {"name": "cloudvolume", "mountPath": CREDENTIALS_DIR},
                ],
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": dict(container_security),
            }
        )
    if config.shm_size:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": config.shm_size}})
        mounts.append({"name": "dshm", "mountPath": SHM_DIR})
    if "OMP_NUM_THREADS" not in config.env:  # torch threads = the CPUs requested, not the node's
        env.append({"name": "OMP_NUM_THREADS", "valueFrom": {"resourceFieldRef": {
            "containerName": WORKER_CONTAINER, "resource": "requests.cpu", "divisor": "1"}}})
    known = {e["name"] for e in env}
    env.extend({"name": k, "value": str(v)} for k, v in sorted(config.env.items()) if k not in known)

    requests = {"cpu": config.cpu_request, "memory": config.memory_request}
    limits: dict[str, Any] = {}
    if config.cpu_limit:
        limits["cpu"] = config.cpu_limit
    if config.memory_limit:
        limits["memory"] = config.memory_limit
    if config.gpus_per_pod:
        limits[config.gpu_resource] = str(config.gpus_per_pod)  # requests default to the limit

    container: dict[str, Any] = {
        "name": WORKER_CONTAINER,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": command,
        "env": env,
        "resources": {"requests": requests, "limits": limits} if limits else {"requests": requests},
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",  # the log tail ends up in the pod status
        "securityContext": dict(container_security),
    }
    if config.env_secret:
        container["envFrom"] = [{"secretRef": {"name": config.env_secret, "optional": True}}]

    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        **({"initContainers": init_containers} if init_containers else {}),
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": config.termination_grace_period_seconds,
        "automountServiceAccountToken": False,  # workers never talk to the API server
        "securityContext": {
            "runAsNonRoot": True,
            "fsGroup": IMAGE_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if config.service_account:
        pod_spec["serviceAccountName"] = config.service_account
    if config.node_selector:
        pod_spec["nodeSelector"] = dict(config.node_selector)
    if config.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in config.tolerations]
    if config.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in config.image_pull_secrets]
    if config.priority_class_name:
        pod_spec["priorityClassName"] = config.priority_class_name

    max_failed = num_tasks if config.max_failed_indexes is None else min(config.max_failed_indexes, num_tasks)
    spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": num_tasks,
        "parallelism": parallel,
        "backoffLimitPerIndex": config.backoff_limit_per_index,
        "maxFailedIndexes": max_failed,
        "podReplacementPolicy": "Failed",  # required with podFailurePolicy; no overlapping retries
        "podFailurePolicy": {
            "rules": [
                {  # node drain, preemption, eviction: not the worker's fault; blocks are idempotent
                    "action": "Ignore",
                    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                },
                {  # bad input: retrying cannot help
                    "action": "FailIndex",
                    "onExitCodes": {
                        "containerName": WORKER_CONTAINER,
                        "operator": "In",
                        "values": [EXIT_BAD_INPUT],
                    },
                },
            ]
        },
        "template": {
            "metadata": {"labels": dict(labels), "annotations": pod_annotations},
            "spec": pod_spec,
        },
    }
    if config.ttl_seconds_after_finished is not None:
        spec["ttlSecondsAfterFinished"] = config.ttl_seconds_after_finished
    if config.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = config.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": config.namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": spec,
    }


def parse_index_ranges(text: str | None) -> set[int]:
    """``"0,2-4"`` (Job status completedIndexes/failedIndexes) -> {0, 2, 3, 4}."""
    out: set[int] = set()
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.update(range(int(lo), int(hi) + 1))
        else:
            out.add(int(part))
    return out


# --------------------------------------------------------------------------------------------------
# API client


def load_api_client(
    kubeconfig: str | None = None, context: str | None = None, prefer_incluster: bool = True
):
    """An ApiClient from the in-cluster service account, falling back to a kubeconfig file.

    ``kubeconfig``/``context`` select the file and context ($KUBECONFIG or ~/.kube/config by default).
    """
    from kubernetes import client, config

    configuration = client.Configuration()
    if prefer_incluster and kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=configuration)
            return client.ApiClient(configuration)
        except config.ConfigException:
            pass
    try:
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    except (config.ConfigException, FileNotFoundError, TypeError) as e:
        raise KubernetesExecutorError(
            "no Kubernetes configuration: not running in a cluster and no usable kubeconfig "
            f"({e}); set KUBECONFIG or pass api_client"
        ) from e
    return client.ApiClient(configuration)


def _api_error_text(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    try:
        data = json.loads(body) if body else {}
    except (TypeError, ValueError):
        data = {}
    if isinstance(data, dict) and data.get("message"):
        return f"{data.get('reason') or getattr(exc, 'status', '')}: {data['message']}"
    return f"{getattr(exc, 'status', '')} {getattr(exc, 'reason', '') or exc}".strip()


def _status_cls():
    try:  # resolved at call time: executors.py may have been written, or finished loading, since
        from service.jobs.executors import ExecutorStatus as cls

        return cls
    except ImportError:
        return ExecutorStatus


def _make_status(active: int, succeeded: int, failed: int, finished: bool, messages: list[str]):
    return _status_cls()(active=active, succeeded=succeeded, failed=failed, finished=finished, messages=messages)


def _index_of(pod) -> int | None:
    meta = pod.metadata
    for source in (meta.annotations or {}, meta.labels or {}):
        value = source.get(COMPLETION_INDEX_KEY)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _tail(text: str | None, limit: int = 300) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    last = lines[-1]
    return last if len(last) <= limit else "..." + last[-limit:]


_IMAGE_ERRORS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "RegistryUnavailable")
_START_ERRORS = ("CreateContainerConfigError", "CreateContainerError", "RunContainerError", "PreCreateHookError")
_DISRUPTION_HINT = "Kubernetes replaces the pod without counting a failure (podFailurePolicy Ignore)"

_JOB_FAILURE_TEXT = {
    "BackoffLimitExceeded": "too many pod failures",
    "FailedIndexes": "some tasks failed for good",
    "MaxFailedIndexesExceeded": "more tasks failed than maxFailedIndexes allows",
    "DeadlineExceeded": "the Job ran longer than activeDeadlineSeconds",
    "PodFailurePolicy": "a pod failure matched a FailJob rule",
}


# --------------------------------------------------------------------------------------------------
# executor


class KubernetesExecutor:
    """Executor protocol (launch/status/cancel) on Kubernetes Indexed Jobs."""

    name = "kubernetes"

    def __init__(self, config: KubeConfig | None = None, api_client=None):
        from kubernetes import client

        self.config = config if config is not None else KubeConfig.from_env()
        self.api_client = api_client if api_client is not None else load_api_client()
        self.batch = client.BatchV1Api(self.api_client)
        self.core = client.CoreV1Api(self.api_client)

    # -- helpers -----------------------------------------------------------------------------------
    @property
    def namespace(self) -> str:
        return self.config.namespace

    def job_name(self, job_id: str) -> str:
        return job_name(job_id, self.config.job_name_prefix)

    def manifest(self, job_id: str, num_tasks: int, parallelism: int) -> dict[str, Any]:
        return build_job_manifest(job_id, num_tasks, parallelism, self.config)

    def _read_job(self, job_id: str):
        from kubernetes.client.rest import ApiException

        try:
            job = self.batch.read_namespaced_job(self.job_name(job_id), self.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise KubernetesExecutorError(
                f"cannot read Job {self.namespace}/{self.job_name(job_id)}: {_api_error_text(e)}"
            ) from e
        owner = (job.metadata.annotations or {}).get(ANNOTATION_JOB_ID)
        if owner is not None and owner != job_id:
            raise KubernetesExecutorError(
                f"Job {self.namespace}/{job.metadata.name} belongs to emrestore job {owner!r}, not {job_id!r}"
            )
        return job

    def pods(self, job_id: str, job=None) -> list:
        """The pods of the job's Kubernetes Job (this incarnation of it when ``job`` is given)."""
        from kubernetes.client.rest import ApiException

        selector = f"{LABEL_JOB_ID}={job_label_value(job_id)}"
        try:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        except ApiException as e:
            raise KubernetesExecutorError(f"cannot list pods of job {job_id!r}: {_api_error_text(e)}") from e
        if job is not None and job.metadata.uid:
            uid = job.metadata.uid
            pods = [
                p for p in pods
                if not p.metadata.owner_references or any(o.uid == uid for o in p.metadata.owner_references)
            ]
        return sorted(pods, key=lambda p: (_index_of(p) if _index_of(p) is not None else -1, p.metadata.name))

    def list_jobs(self) -> list[str]:
        """Ids of the emrestore jobs that have a Kubernetes Job in the namespace."""
        jobs = self.batch.list_namespaced_job(
            self.namespace, label_selector="app.kubernetes.io/managed-by=emrestore-service"
        ).items
        return sorted((j.metadata.annotations or {}).get(ANNOTATION_JOB_ID, j.metadata.name) for j in jobs)

    @staticmethod
    def _finished(job) -> tuple[bool, Any]:
        for cond in (job.status.conditions or []) if job.status else []:
            if cond.type in ("Complete", "Failed") and cond.status == "True":
                return True, cond
        return False, None

    # -- protocol ----------------------------------------------------------------------------------
    def launch(self, job_id: str, num_tasks: int, parallelism: int) -> None:
        """Create the Indexed Job. Idempotent: a running Job of the same id is left alone; a
        finished one is replaced (the ledger skips the blocks that are already done)."""
        from kubernetes.client.rest import ApiException

        body = self.manifest(job_id, num_tasks, parallelism)
        name = body["metadata"]["name"]
        for attempt in range(3):
            try:
                self.batch.create_namespaced_job(self.namespace, body)
                log.info("launched Job %s/%s: %d tasks, parallelism %d",
                         self.namespace, name, num_tasks, body["spec"]["parallelism"])
                return
            except ApiException as e:
                if e.status != 409:
                    raise KubernetesExecutorError(
                        f"Kubernetes refused Job {self.namespace}/{name} for job {job_id!r}: {_api_error_text(e)}"
                    ) from e
            existing = self._read_job(job_id)
            if existing is None:
                continue  # deleted meanwhile: create again
            done, _ = self._finished(existing)
            if not done and existing.metadata.deletion_timestamp is None:
                log.info("Job %s/%s is already running; not launching it again", self.namespace, name)
                return
            if attempt == 2:
                break
            log.info("replacing finished Job %s/%s", self.namespace, name)
            self._delete(name)
            self._wait_gone(name, timeout_s=60.0)
        raise KubernetesExecutorError(f"Job {self.namespace}/{name} exists and could not be replaced")

    def status(self, job_id: str):
        job = self._read_job(job_id)
        if job is None:
            return _make_status(0, 0, 0, True, [
                f"Kubernetes Job {self.namespace}/{self.job_name(job_id)} for job {job_id!r} not found: "
                "never launched, cancelled, or removed after it finished (ttlSecondsAfterFinished)"
            ])
        pods = self.pods(job_id, job)
        return self._summarize(job, pods)

    def cancel(self, job_id: str, wait: bool = False, timeout_s: float = 60.0) -> None:
        """Delete the Job and, through the propagation policy, its pods (running workers get SIGTERM)."""
        name = self.job_name(job_id)
        self._delete(name)
        if wait:
            self._wait_gone(name, timeout_s, job_id=job_id)

    def watch(self, job_id: str, timeout_s: float | None = None, window_s: float = 5.0) -> Iterator[Any]:
        """Yield the job's status each time it changes, until it is finished or ``timeout_s`` passes.

        Pod changes come from the watch API (pods of the job); the Job itself is re-read on every
        event and at least every ``window_s`` seconds.
        """
        from kubernetes import watch as k8s_watch
        from kubernetes.client.rest import ApiException

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        selector = f"{LABEL_JOB_ID}={job_label_value(job_id)}"
        last = None

        def changed(st) -> bool:
            nonlocal last
            key = (st.active, st.succeeded, st.failed, st.finished, tuple(st.messages))
            if key == last:
                return False
            last = key
            return True

        st = self.status(job_id)
        if changed(st):
            yield st
        if st.finished:
            return
        rv = self.core.list_namespaced_pod(self.namespace, label_selector=selector).metadata.resource_version
        w = k8s_watch.Watch()
        while deadline is None or time.monotonic() < deadline:
            remaining = window_s if deadline is None else min(window_s, deadline - time.monotonic())
            try:
                for _event in w.stream(self.core.list_namespaced_pod, self.namespace, label_selector=selector,
                                       resource_version=rv, timeout_seconds=max(1, int(round(remaining)))):
                    rv = w.resource_version or rv
                    st = self.status(job_id)
                    if changed(st):
                        yield st
                    if st.finished:
                        w.stop()
                        return
            except ApiException as e:
                if e.status != 410:  # 410 Gone: our resourceVersion is too old; list again
                    raise
                rv = self.core.list_namespaced_pod(self.namespace, label_selector=selector).metadata.resource_version
            rv = w.resource_version or rv
            st = self.status(job_id)
            if changed(st):
                yield st
            if st.finished:
                return

    # -- internals ---------------------------------------------------------------------------------
    def _delete(self, name: str) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        policy = self.config.delete_propagation
        try:
            self.batch.delete_namespaced_job(
                name, self.namespace, propagation_policy=policy,
                body=client.V1DeleteOptions(propagation_policy=policy),
            )
            log.info("deleted Job %s/%s (propagationPolicy=%s)", self.namespace, name, policy)
        except ApiException as e:
            if e.status != 404:
                raise KubernetesExecutorError(f"cannot delete Job {self.namespace}/{name}: {_api_error_text(e)}") from e

    def _wait_gone(self, name: str, timeout_s: float, job_id: str | None = None) -> None:
        from kubernetes.client.rest import ApiException

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.batch.read_namespaced_job(name, self.namespace)
                gone = False
            except ApiException as e:
                if e.status != 404:
                    raise
                gone = True
            if gone and job_id is not None:
                gone = not self.pods(job_id)
            if gone:
                return
            time.sleep(0.2)
        raise KubernetesExecutorError(f"Job {self.namespace}/{name} still exists after {timeout_s:.0f}s")

    def _summarize(self, job, pods: list):
        spec, st = job.spec, job.status
        completions = spec.completions or 0
        done, final = self._finished(job)
        succeeded_idx = parse_index_ranges(st.completed_indexes) if st else set()
        failed_idx = parse_index_ranges(getattr(st, "failed_indexes", None)) if st else set()
        succeeded = len(succeeded_idx) if succeeded_idx or not (st and st.succeeded) else st.succeeded
        if done and final.type == "Failed":  # tasks that did not succeed never will in this Job
            failed = max(completions - succeeded, len(failed_idx))
        else:
            failed = len(failed_idx)
        active = (st.active or 0) if st else 0
        if done:
            active = 0

        messages: list[str] = []
        name = f"{job.metadata.namespace}/{job.metadata.name}"
        for cond in (st.conditions or []) if st else []:
            if cond.status != "True":
                continue
            if cond.type == "Failed":
                why = _JOB_FAILURE_TEXT.get(cond.reason or "", "")
                text = f"Job {name} failed ({cond.reason}{': ' + why if why else ''})"
                if failed_idx:
                    text += f"; failed tasks: {_ranges(failed_idx)}"
                if cond.message:
                    text += f": {cond.message}"
                messages.append(text)
            elif cond.type == "FailureTarget" and not done:
                messages.append(f"Job {name} is failing ({cond.reason}): {cond.message or ''}; stopping its pods".rstrip())
            elif cond.type == "Suspended":
                messages.append(f"Job {name} is suspended")
        if failed_idx and not done:
            messages.append(f"tasks {_ranges(failed_idx)} failed for good; the other tasks go on")

        pod_msgs: list[tuple[int, str]] = []
        for pod in pods:
            index = _index_of(pod)
            for text in self._pod_messages(pod, index):
                pod_msgs.append((index if index is not None else -1, text))
        seen = set(messages)
        for _, text in sorted(pod_msgs, key=lambda x: x[0]):
            if text not in seen:
                seen.add(text)
                messages.append(text)
        limit = 25
        if len(messages) > limit:
            messages = messages[:limit] + [f"... and {len(messages) - limit} more"]
        return _make_status(active, succeeded, failed, done, messages)

    def _pod_messages(self, pod, index: int | None) -> list[str]:
        cfg = self.config
        who = f"task {index} (pod {pod.metadata.name})" if index is not None else f"pod {pod.metadata.name}"
        base_who = who
        status = pod.status
        if status is None:
            return []
        out: list[str] = []
        conditions = {c.type: c for c in status.conditions or []}
        disruption = conditions.get("DisruptionTarget")
        disrupted = disruption is not None and disruption.status == "True"
        if status.reason == "Evicted":
            text = f"{who} was evicted from node {pod.spec.node_name or '?'}: {status.message or 'no message'}"
            out.append(text + (f"; {_DISRUPTION_HINT}" if disrupted else "; this counts as a failed attempt"))
        elif disrupted:
            out.append(f"{who} was disrupted ({disruption.reason}: {disruption.message or 'no message'}); {_DISRUPTION_HINT}")

        if status.phase == "Pending":
            sched = conditions.get("PodScheduled")
            if sched is not None and sched.status == "False" and sched.reason == "Unschedulable":
                msg = sched.message or ""
                if f"Insufficient {cfg.gpu_resource}" in msg:
                    out.append(
                        f"{who} is waiting for a GPU: no node has {cfg.gpus_per_pod} free {cfg.gpu_resource} "
                        f"({msg.strip()}); the Job runs fewer pods until GPUs free up: lower the parallelism "
                        "(the GPU budget) or add GPU nodes"
                    )
                else:
                    out.append(f"{who} cannot be scheduled: {msg.strip() or 'Unschedulable'}")

        statuses = list(status.init_container_statuses or []) + list(status.container_statuses or [])
        for cs in statuses:
            if cs.name != WORKER_CONTAINER:
                who = f"{base_who}: container {cs.name}"
            else:
                who = base_who
            state = cs.state
            waiting = state.waiting if state else None
            if waiting is not None and waiting.reason in _IMAGE_ERRORS:
                out.append(f"{who} cannot pull image {cs.image}: {waiting.reason}: {waiting.message or 'no message'}")
            elif waiting is not None and waiting.reason in _START_ERRORS:
                out.append(f"{who} cannot start its container: {waiting.reason}: {waiting.message or 'no message'}")
            term = (state.terminated if state else None) or (cs.last_state.terminated if cs.last_state else None)
            if term is None or (term.exit_code == 0 and term.reason != "OOMKilled"):
                continue
            tail = _tail(term.message)
            detail = f": {tail}" if tail else ""
            if term.reason == "OOMKilled":
                out.append(
                    f"{who} was OOMKilled (exit code {term.exit_code}): the worker used more than its memory limit "
                    f"{cfg.memory_limit or '(none set; the node ran out)'}; raise memory_limit (the /dev/shm emptyDir "
                    "counts against it too) or lower the batch size"
                )
            elif disrupted:
                continue  # already explained; the exit code is the kill signal
            elif term.exit_code == EXIT_BAD_INPUT and cs.name == WORKER_CONTAINER:
                out.append(f"{who} failed with exit code {EXIT_BAD_INPUT} (bad input): the task fails without retries{detail}")
            else:
                what = "worker" if cs.name == WORKER_CONTAINER else "it"
                out.append(f"{who} failed: {what} exited with code {term.exit_code} ({term.reason or 'Error'}){detail}")
        return out


def _ranges(indexes: set[int]) -> str:
    out, items = [], sorted(indexes)
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(out)
