"""The worker Job: names, labels and the ``batch/v1`` Indexed Job manifest (plain dicts, no API calls).

Every emrestore job becomes ONE Job with ``completionMode: Indexed`` and ``completions = num_tasks``;
pod *i* runs the worker contract of ``docs/CONTRACTS.md``::

    emrestore worker --ledger LEDGER_URL --job JOB_ID --num-tasks T

and takes its task index from ``$JOB_COMPLETION_INDEX``. Failure handling is the Job controller's
(Kubernetes >= 1.33, where backoffLimitPerIndex is GA; podFailurePolicy is GA since 1.31):

* ``backoffLimitPerIndex``: each task is retried on its own;
* ``podFailurePolicy``: ``DisruptionTarget`` (preemption, eviction, drain) is ``Ignore``d, which is
  safe because re-running a block writes the same bytes; exit code 2 (bad input) fails the index at
  once (``FailIndex``);
* ``ttlSecondsAfterFinished`` removes finished Jobs and their pods.

GPU workers request ``nvidia.com/gpu``, tolerate the usual GPU taints, use node selectors only when
configured, and run with ``EMRESTORE_DEVICE=cuda``: the worker stops at start with exit code 3 and a
clear message when CUDA is unusable (service/jobs/device.py), instead of running on the CPU.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from .config import KubeConfig

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
#: exit status of ``emrestore worker`` when the required device (CUDA) is unusable on its node
#: (service/jobs/device.py); counted as a failure, so the index is retried, possibly elsewhere.
EXIT_DEVICE_UNAVAILABLE = 3
#: user/group of the images (deploy/Dockerfile.*); fsGroup makes the 0440 Secret files readable.
IMAGE_UID = 10001

LABEL_JOB_ID = "emrestore.io/job-id"
ANNOTATION_JOB_ID = "emrestore.io/job-id"
ANNOTATION_NUM_TASKS = "emrestore.io/num-tasks"
ANNOTATION_LEDGER = "emrestore.io/ledger"
COMPLETION_INDEX_KEY = "batch.kubernetes.io/job-completion-index"
MANAGED_BY = "emrestore-service"
MAX_JOB_NAME = 52  # leaves room for the "-<index>" of pod hostnames within 63 characters

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


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
            "app.kubernetes.io/managed-by": MANAGED_BY,
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
        # cuda: required, the worker stops at start when CUDA is unusable (never a silent CPU run)
        {"name": "EMRESTORE_DEVICE", "value": config.worker_device},
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
    tolerations = config.worker_tolerations
    if tolerations:
        pod_spec["tolerations"] = tolerations
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
