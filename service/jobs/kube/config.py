"""Settings of the worker Jobs: :class:`KubeConfig`, from a dict, YAML or ``EMRESTORE_KUBE_*`` variables.

``deploy/base/configmap.yaml`` sets the variables for the service; every ``EMRESTORE_KUBE_<FIELD>``
key is one field below. Nothing here talks to a cluster.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import yaml

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_PROPAGATION = ("Foreground", "Background")
#: what ``EMRESTORE_DEVICE`` may say in a worker pod (service/jobs/device.py checks it at start-up)
_DEVICE = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")

#: the taints GPU node pools carry: the NVIDIA GPU operator / device plugin docs and EKS use
#: ``nvidia.com/gpu:NoSchedule``, GKE ``nvidia.com/gpu=present:NoSchedule``; ``Exists`` covers both.
GPU_TOLERATIONS: tuple[dict[str, str], ...] = (
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
)


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
    #: node labels a worker needs; empty by default: the GPU request alone picks GPU nodes (no label
    #: such as nvidia.com/gpu.present, which only GPU feature discovery sets, is assumed).
    node_selector: dict[str, str] = field(default_factory=dict)
    #: extra tolerations; GPU workers also get GPU_TOLERATIONS unless gpu_tolerations is false.
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    gpu_tolerations: bool = True
    #: EMRESTORE_DEVICE of the workers; None: ``cuda`` when gpus_per_pod > 0 (required: the worker
    #: stops at start when CUDA is unusable), else ``cpu``.
    device: str | None = None
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
    #: GPUs that all of the service's Indexed Jobs together may hold (the pool's GPUs come on top);
    #: launch() lowers a Job's parallelism to what is left. None: no cap beyond max_parallelism.
    #: A ResourceQuota on requests.nvidia.com/gpu (deploy/overlays/gpu) enforces the total.
    max_batch_gpus: int | None = None
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
        if self.max_batch_gpus is not None and self.max_batch_gpus < 0:
            problems.append("max_batch_gpus must be >= 0")
        if self.device is not None and not _DEVICE.match(self.device):
            problems.append(f"device {self.device!r} is not auto, cpu, cuda or cuda:N")
        if self.device is not None and self.device.startswith("cuda") and self.gpus_per_pod < 1:
            problems.append(f"device {self.device!r} needs gpus_per_pod >= 1")
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

    @property
    def worker_device(self) -> str:
        """EMRESTORE_DEVICE of the workers: the configured device, else cuda with GPUs, cpu without."""
        if self.device is not None:
            return self.device
        return "cuda" if self.gpus_per_pod > 0 else "cpu"

    @property
    def worker_tolerations(self) -> list[dict[str, Any]]:
        out = [dict(t) for t in self.tolerations]
        if self.gpus_per_pod > 0 and self.gpu_tolerations:
            out += [dict(t) for t in GPU_TOLERATIONS if t not in out]
        return out


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
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"KubeConfig.{name} must be true or false, got {value!r}")
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
