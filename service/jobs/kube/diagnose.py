"""``diagnose(job, pods)``: what a worker Job and its pods say, as an :class:`ExecutorStatus`.

Pure: it reads a ``batch/v1`` Job and ``v1`` Pods as plain JSON objects (what ``kubectl get -o
json`` prints, camelCase keys) and calls nothing. It counts tasks from the Job's
``completedIndexes``/``failedIndexes`` and conditions, and turns the usual problems into plain
messages: pods pending for lack of GPUs or for selectors/taints, image pull errors, container
config errors, OOMKilled workers, crash loops, evictions and disruptions, bad input (exit 2), an
unusable GPU (exit 3), other failures with the last log line, and why a Job failed.

The same function reads pool-worker pods (a Deployment's, ``restartPolicy: Always``): their
problems show as CrashLoopBackOff with the last termination in ``lastState``.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from ..executors import ExecutorStatus
from .manifest import (
    COMPLETION_INDEX_KEY,
    EXIT_BAD_INPUT,
    EXIT_DEVICE_UNAVAILABLE,
    WORKER_CONTAINER,
    parse_index_ranges,
)

#: at most this many messages (then "... and N more")
MESSAGE_LIMIT = 25
#: the NVIDIA driver the workers' image needs (torch 2.13 CUDA 13 wheels; deploy/README.md)
MIN_DRIVER_TEXT = "NVIDIA driver >= 580"

IMAGE_ERRORS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "RegistryUnavailable")
START_ERRORS = ("CreateContainerConfigError", "CreateContainerError", "RunContainerError", "PreCreateHookError")
DISRUPTION_HINT = "Kubernetes replaces the pod without counting a failure (podFailurePolicy Ignore)"
JOB_FAILURE_TEXT = {
    "BackoffLimitExceeded": "too many pod failures",
    "FailedIndexes": "some tasks failed for good",
    "MaxFailedIndexesExceeded": "more tasks failed than maxFailedIndexes allows",
    "DeadlineExceeded": "the Job ran longer than activeDeadlineSeconds",
    "PodFailurePolicy": "a pod failure matched a FailJob rule",
}
_NOT_GPU = ("cpu", "memory", "ephemeral-storage", "pods")


def _get(obj: Any, *path: str, default: Any = None) -> Any:
    for key in path:
        if not isinstance(obj, Mapping):
            return default
        obj = obj.get(key)
        if obj is None:
            return default
    return obj


def ranges(indexes: Iterable[int]) -> str:
    """{0, 1, 2, 5} -> "0-2,5" (the Job status' own notation)."""
    out, items = [], sorted(indexes)
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(out)


def index_of(pod: Mapping) -> int | None:
    """The completion index of an Indexed Job's pod (annotation, or label since 1.28)."""
    for source in (_get(pod, "metadata", "annotations", default={}), _get(pod, "metadata", "labels", default={})):
        value = source.get(COMPLETION_INDEX_KEY)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def finished_condition(job: Mapping) -> Mapping | None:
    """The Job's true ``Complete`` or ``Failed`` condition, or None while it runs."""
    for cond in _get(job, "status", "conditions", default=[]):
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return cond
    return None


def _tail(text: str | None, limit: int = 300) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    last = lines[-1]
    return last if len(last) <= limit else "..." + last[-limit:]


def _container_specs(pod: Mapping) -> dict[str, Mapping]:
    spec = _get(pod, "spec", default={})
    return {c.get("name"): c for c in list(spec.get("initContainers") or []) + list(spec.get("containers") or [])}


def _gpu_request(container: Mapping | None) -> tuple[str, str] | None:
    limits = _get(container, "resources", "limits", default={}) or {}
    for key, value in limits.items():
        if key not in _NOT_GPU and not key.startswith("hugepages-") and "gpu" in key:
            return key, str(value)
    return None


def pod_messages(pod: Mapping) -> list[str]:
    """Plain messages for one pod (empty when nothing is wrong)."""
    name = _get(pod, "metadata", "name", default="?")
    index = index_of(pod)
    base_who = f"task {index} (pod {name})" if index is not None else f"pod {name}"
    status = pod.get("status") or {}
    specs = _container_specs(pod)
    worker_spec = specs.get(WORKER_CONTAINER) or next(iter(specs.values()), None)
    out: list[str] = []
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    disruption = conditions.get("DisruptionTarget")
    disrupted = disruption is not None and disruption.get("status") == "True"
    if status.get("reason") == "Evicted":
        text = (f"{base_who} was evicted from node {_get(pod, 'spec', 'nodeName') or '?'}: "
                f"{status.get('message') or 'no message'}")
        out.append(text + (f"; {DISRUPTION_HINT}" if disrupted else "; this counts as a failed attempt"))
    elif disrupted:
        out.append(f"{base_who} was disrupted ({disruption.get('reason')}: "
                   f"{disruption.get('message') or 'no message'}); {DISRUPTION_HINT}")

    if status.get("phase") == "Pending":
        sched = conditions.get("PodScheduled")
        if sched is not None and sched.get("status") == "False" and sched.get("reason") == "Unschedulable":
            msg = (sched.get("message") or "").strip()
            gpu = _gpu_request(worker_spec)
            if gpu is not None and f"Insufficient {gpu[0]}" in msg:
                out.append(
                    f"{base_who} is waiting for a GPU: no node has {gpu[1]} free {gpu[0]} ({msg}); the Job "
                    "runs fewer pods until GPUs free up: lower the parallelism (the GPU budget) or add GPU nodes"
                )
            elif "untolerated taint" in msg or "didn't match Pod's node affinity/selector" in msg:
                out.append(f"{base_who} cannot be scheduled: {msg}; check EMRESTORE_KUBE_NODE_SELECTOR and "
                           "EMRESTORE_KUBE_TOLERATIONS against your nodes' labels and taints")
            else:
                out.append(f"{base_who} cannot be scheduled: {msg or 'Unschedulable'}")

    statuses = list(status.get("initContainerStatuses") or []) + list(status.get("containerStatuses") or [])
    for cs in statuses:
        cname = cs.get("name")
        who = base_who if cname == WORKER_CONTAINER or len(specs) <= 1 else f"{base_who}: container {cname}"
        is_worker = cname == WORKER_CONTAINER or (cname in specs and len(specs) == 1)
        waiting = _get(cs, "state", "waiting")
        reason = (waiting or {}).get("reason")
        if reason in IMAGE_ERRORS:
            out.append(f"{who} cannot pull image {cs.get('image')}: {reason}: {waiting.get('message') or 'no message'}")
        elif reason in START_ERRORS:
            out.append(f"{who} cannot start its container: {reason}: {waiting.get('message') or 'no message'}")
        term = _get(cs, "state", "terminated") or _get(cs, "lastState", "terminated")
        crashloop = reason == "CrashLoopBackOff"
        if term is None:
            if crashloop:
                out.append(f"{who} keeps crashing (CrashLoopBackOff, {cs.get('restartCount', 0)} restarts)")
            continue
        code = term.get("exitCode")
        if code == 0 and term.get("reason") != "OOMKilled":
            continue
        tail = _tail(term.get("message"))
        detail = f": {tail}" if tail else ""
        loop = f" and keeps crashing (CrashLoopBackOff, {cs.get('restartCount', 0)} restarts)" if crashloop else ""
        if term.get("reason") == "OOMKilled":
            limit = _get(specs.get(cname), "resources", "limits", "memory")
            out.append(
                f"{who} was OOMKilled (exit code {code}){loop}: the worker used more than its memory limit "
                f"{limit or '(none set; the node ran out)'}; raise memory_limit (the /dev/shm emptyDir "
                "counts against it too) or lower the batch size"
            )
        elif disrupted:
            continue  # already explained; the exit code is the kill signal
        elif code == EXIT_BAD_INPUT and is_worker:
            out.append(f"{who} failed with exit code {EXIT_BAD_INPUT} (bad input){loop}: the task fails without "
                       f"retries{detail}")
        elif code == EXIT_DEVICE_UNAVAILABLE and is_worker:
            node = _get(pod, "spec", "nodeName") or "?"
            out.append(f"{who} could not use its GPU on node {node} (exit code {EXIT_DEVICE_UNAVAILABLE}){loop}"
                       f"{detail}; the image needs {MIN_DRIVER_TEXT} and the NVIDIA device plugin on the node")
        else:
            what = "worker" if is_worker else "it"
            out.append(f"{who} failed{loop}: {what} exited with code {code} ({term.get('reason') or 'Error'}){detail}")
    return out


def diagnose(job: Mapping, pods: Sequence[Mapping] = ()) -> ExecutorStatus:
    """The status of an Indexed worker Job from the Job and its pods (plain JSON objects)."""
    spec, st = job.get("spec") or {}, job.get("status") or {}
    completions = spec.get("completions") or 0
    final = finished_condition(job)
    done = final is not None
    succeeded_idx = parse_index_ranges(st.get("completedIndexes"))
    failed_idx = parse_index_ranges(st.get("failedIndexes"))
    succeeded = len(succeeded_idx) if succeeded_idx or not st.get("succeeded") else st["succeeded"]
    if done and final.get("type") == "Failed":  # tasks that did not succeed never will in this Job
        failed = max(completions - succeeded, len(failed_idx))
    else:
        failed = len(failed_idx)
    active = 0 if done else (st.get("active") or 0)

    messages: list[str] = []
    name = f"{_get(job, 'metadata', 'namespace', default='?')}/{_get(job, 'metadata', 'name', default='?')}"
    for cond in st.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        ctype, reason = cond.get("type"), cond.get("reason") or ""
        if ctype == "Failed":
            why = JOB_FAILURE_TEXT.get(reason, "")
            text = f"Job {name} failed ({reason}{': ' + why if why else ''})"
            if failed_idx:
                text += f"; failed tasks: {ranges(failed_idx)}"
            if cond.get("message"):
                text += f": {cond['message']}"
            messages.append(text)
        elif ctype == "FailureTarget" and not done:
            messages.append(f"Job {name} is failing ({reason}): {cond.get('message') or ''}; stopping its pods".rstrip())
        elif ctype == "Suspended":
            messages.append(f"Job {name} is suspended")
    if failed_idx and not done:
        messages.append(f"tasks {ranges(failed_idx)} failed for good; the other tasks go on")

    uid = _get(job, "metadata", "uid")
    pod_msgs: list[tuple[int, str]] = []
    for pod in pods:
        owners = _get(pod, "metadata", "ownerReferences", default=[])
        if uid and owners and not any(o.get("uid") == uid for o in owners):
            continue  # a pod of an earlier Job of the same name
        index = index_of(pod)
        for text in pod_messages(pod):
            pod_msgs.append((index if index is not None else -1, text))
    seen = set(messages)
    for _, text in sorted(pod_msgs, key=lambda x: x[0]):
        if text not in seen:
            seen.add(text)
            messages.append(text)
    if len(messages) > MESSAGE_LIMIT:
        messages = messages[:MESSAGE_LIMIT] + [f"... and {len(messages) - MESSAGE_LIMIT} more"]
    return ExecutorStatus(active=active, succeeded=succeeded, failed=failed, finished=done, messages=messages)
