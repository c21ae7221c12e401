"""Kubernetes executor: one Indexed Job per emrestore job, in four parts that data flows through.

- :mod:`.config`   — :class:`KubeConfig`, the settings (``EMRESTORE_KUBE_*``, YAML, dicts);
- :mod:`.manifest` — names, labels and the ``batch/v1`` Indexed Job (plain dicts, no API calls);
- :mod:`.diagnose` — the pure ``diagnose(job, pods) -> ExecutorStatus`` with plain messages;
- :mod:`.api`      — the narrow :class:`KubeApi` (five calls) and its official-client implementation;
- :mod:`.executor` — :class:`KubernetesExecutor`, the Executor protocol on top of them.

The CUDA-required check that GPU workers run at start-up is ``service/jobs/device.py``.
"""

from __future__ import annotations

from .api import ApiError, ClientApi, KubeApi, KubernetesExecutorError, load_api_client
from .config import GPU_TOLERATIONS, KubeConfig
from .diagnose import diagnose, pod_messages, ranges
from .executor import KubernetesExecutor
from .manifest import (
    ANNOTATION_JOB_ID,
    COMPLETION_INDEX_KEY,
    COPY_CREDENTIALS_SCRIPT,
    CREDENTIALS_DIR,
    CREDENTIALS_MOUNT,
    CREDENTIALS_SOURCE,
    EXIT_BAD_INPUT,
    EXIT_DEVICE_UNAVAILABLE,
    IMAGE_UID,
    LABEL_JOB_ID,
    WORKER_CONTAINER,
    build_job_manifest,
    job_label_value,
    job_name,
    parse_index_ranges,
)

__all__ = [
    "ANNOTATION_JOB_ID", "COMPLETION_INDEX_KEY", "COPY_CREDENTIALS_SCRIPT", "CREDENTIALS_DIR",
    "CREDENTIALS_MOUNT", "CREDENTIALS_SOURCE", "EXIT_BAD_INPUT", "EXIT_DEVICE_UNAVAILABLE", "GPU_TOLERATIONS",
    "IMAGE_UID", "LABEL_JOB_ID", "WORKER_CONTAINER", "ApiError", "ClientApi", "KubeApi", "KubeConfig",
    "KubernetesExecutor", "KubernetesExecutorError", "build_job_manifest", "diagnose", "job_label_value",
    "job_name", "load_api_client", "parse_index_ranges", "pod_messages", "ranges",
]
