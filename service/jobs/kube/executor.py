"""``KubernetesExecutor``: the Executor protocol (service/jobs/executors.py) on Indexed Jobs.

It knows job ids, task counts, parallelism and its :class:`KubeConfig`; nothing of the ledger or
the manager. ``launch`` creates the Job (idempotent), ``status`` reads the Job and its pods and
hands them to the pure :func:`diagnose`, ``cancel`` deletes the Job with its pods.

The GPU budget: a Job never runs more than ``max_parallelism`` pods; with ``max_batch_gpus`` the
executor also lowers a new Job's parallelism to the GPUs that the unfinished Jobs of the service
leave (at least one pod, which then waits for the namespace's ResourceQuota to admit it).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..executors import ExecutorStatus
from .api import ApiError, ClientApi, KubeApi, KubernetesExecutorError
from .config import KubeConfig
from .diagnose import diagnose, finished_condition, index_of
from .manifest import ANNOTATION_JOB_ID, LABEL_JOB_ID, MANAGED_BY, build_job_manifest, job_label_value, job_name

log = logging.getLogger(__name__)


def _why(e: ApiError) -> str:
    return f"{e.reason or e.status}: {e.message}" if e.message else str(e)


class KubernetesExecutor:
    """Executor protocol (launch/status/known/cancel/shutdown) on Kubernetes Indexed Jobs."""

    name = "kubernetes"

    def __init__(self, config: KubeConfig | None = None, api: KubeApi | None = None, api_client=None):
        self.config = config if config is not None else KubeConfig.from_env()
        self.api: KubeApi = api if api is not None else ClientApi(api_client)

    @property
    def default_parallelism(self) -> int:
        return self.config.max_parallelism or 1

    @property
    def namespace(self) -> str:
        return self.config.namespace

    def job_name(self, job_id: str) -> str:
        return job_name(job_id, self.config.job_name_prefix)

    def manifest(self, job_id: str, num_tasks: int, parallelism: int) -> dict[str, Any]:
        return build_job_manifest(job_id, num_tasks, parallelism, self.config)

    # -- reading -----------------------------------------------------------------------------------
    def _read_job(self, job_id: str) -> dict[str, Any] | None:
        name = self.job_name(job_id)
        try:
            job = self.api.read_job(self.namespace, name)
        except ApiError as e:
            raise KubernetesExecutorError(f"cannot read Job {self.namespace}/{name}: {_why(e)}") from e
        if job is None:
            return None
        owner = (job.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_JOB_ID)
        if owner is not None and owner != job_id:
            raise KubernetesExecutorError(
                f"Job {self.namespace}/{name} belongs to emrestore job {owner!r}, not {job_id!r}")
        return job

    def pods(self, job_id: str) -> list[dict[str, Any]]:
        try:
            pods = self.api.list_pods(self.namespace, f"{LABEL_JOB_ID}={job_label_value(job_id)}")
        except ApiError as e:
            raise KubernetesExecutorError(f"cannot list pods of job {job_id!r}: {_why(e)}") from e
        return sorted(pods, key=lambda p: (index_of(p) if index_of(p) is not None else -1,
                                           p.get("metadata", {}).get("name", "")))

    def _service_jobs(self) -> list[dict[str, Any]]:
        try:
            return self.api.list_jobs(self.namespace, f"app.kubernetes.io/managed-by={MANAGED_BY}")
        except ApiError as e:
            raise KubernetesExecutorError(f"cannot list Jobs in {self.namespace}: {_why(e)}") from e

    def list_jobs(self) -> list[str]:
        """Ids of the emrestore jobs that have a Kubernetes Job in the namespace."""
        return sorted((j["metadata"].get("annotations") or {}).get(ANNOTATION_JOB_ID, j["metadata"]["name"])
                      for j in self._service_jobs())

    def batch_gpus_in_use(self, exclude: str | None = None) -> int:
        """GPUs the unfinished worker Jobs may hold at once (their parallelism × GPUs per pod)."""
        total = 0
        for j in self._service_jobs():
            if j["metadata"].get("name") == exclude or finished_condition(j) is not None:
                continue
            if j["metadata"].get("deletionTimestamp"):
                continue
            containers = j["spec"]["template"]["spec"].get("containers") or []
            gpus = sum(int((c.get("resources", {}).get("limits") or {}).get(self.config.gpu_resource, 0))
                       for c in containers)
            total += (j["spec"].get("parallelism") or 0) * gpus
        return total

    def _parallelism(self, name: str, num_tasks: int, parallelism: int) -> int:
        cfg = self.config
        wanted = max(1, min(parallelism or self.default_parallelism, num_tasks, cfg.max_parallelism or parallelism))
        if cfg.max_batch_gpus is None or cfg.gpus_per_pod < 1:
            return wanted
        free = (cfg.max_batch_gpus - self.batch_gpus_in_use(exclude=name)) // cfg.gpus_per_pod
        if free < wanted:
            log.info("GPU budget: %d of %d batch GPUs in use; Job %s runs %d pod(s) at once instead of %d",
                     cfg.max_batch_gpus - max(free, 0) * cfg.gpus_per_pod, cfg.max_batch_gpus, name,
                     max(1, free), wanted)
        return max(1, min(wanted, free))

    # -- protocol ----------------------------------------------------------------------------------
    def launch(self, job_id: str, num_tasks: int, parallelism: int) -> None:
        """Create the Indexed Job. Idempotent: a running Job of the same id is left alone; a
        finished one is replaced (the ledger skips the blocks that are already done)."""
        name = self.job_name(job_id)
        body = self.manifest(job_id, num_tasks, self._parallelism(name, num_tasks, parallelism))
        for attempt in range(3):
            try:
                self.api.create_job(self.namespace, body)
                log.info("launched Job %s/%s: %d tasks, parallelism %d",
                         self.namespace, name, num_tasks, body["spec"]["parallelism"])
                return
            except ApiError as e:
                if e.status != 409:
                    raise KubernetesExecutorError(
                        f"Kubernetes refused Job {self.namespace}/{name} for job {job_id!r}: {_why(e)}") from e
            existing = self._read_job(job_id)
            if existing is None:
                continue  # deleted meanwhile: create again
            if finished_condition(existing) is None and not existing["metadata"].get("deletionTimestamp"):
                log.info("Job %s/%s is already running; not launching it again", self.namespace, name)
                return
            if attempt == 2:
                break
            log.info("replacing finished Job %s/%s", self.namespace, name)
            self._delete(name)
            self._wait_gone(name, timeout_s=60.0)
        raise KubernetesExecutorError(f"Job {self.namespace}/{name} exists and could not be replaced")

    def status(self, job_id: str) -> ExecutorStatus:
        job = self._read_job(job_id)
        if job is None:
            return ExecutorStatus(finished=True, messages=[
                f"Kubernetes Job {self.namespace}/{self.job_name(job_id)} for job {job_id!r} not found: "
                "never launched, cancelled, or removed after it finished (ttlSecondsAfterFinished)"])
        return diagnose(job, self.pods(job_id))

    def known(self, job_id: str) -> bool:
        return self._read_job(job_id) is not None

    def cancel(self, job_id: str, wait: bool = False, timeout_s: float = 60.0) -> None:
        """Delete the Job and, through the propagation policy, its pods (running workers get SIGTERM)."""
        name = self.job_name(job_id)
        self._delete(name)
        if wait:
            self._wait_gone(name, timeout_s, job_id=job_id)

    def shutdown(self) -> None:
        """Nothing to stop: the Jobs run on without the service, which finds them again on restart."""

    # -- internals ---------------------------------------------------------------------------------
    def _delete(self, name: str) -> None:
        policy = self.config.delete_propagation
        try:
            if self.api.delete_job(self.namespace, name, policy):
                log.info("deleted Job %s/%s (propagationPolicy=%s)", self.namespace, name, policy)
        except ApiError as e:
            raise KubernetesExecutorError(f"cannot delete Job {self.namespace}/{name}: {_why(e)}") from e

    def _wait_gone(self, name: str, timeout_s: float, job_id: str | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                gone = self.api.read_job(self.namespace, name) is None
            except ApiError as e:
                raise KubernetesExecutorError(f"cannot read Job {self.namespace}/{name}: {_why(e)}") from e
            if gone and job_id is not None:
                gone = not self.pods(job_id)
            if gone:
                return
            time.sleep(0.2)
        raise KubernetesExecutorError(f"Job {self.namespace}/{name} still exists after {timeout_s:.0f}s")
