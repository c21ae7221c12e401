"""A small in-memory fake of the executor's narrow Kubernetes API (service/jobs/kube/api.py ``KubeApi``).

It follows the ``batch/v1`` Job and ``v1`` Pod objects of Kubernetes **1.33**
(``staging/src/k8s.io/api/batch/v1/types.go``, ``core/v1/types.go``) and only as much of the
API server and Job controller as the executor can observe through its five calls:

- ``create_job``: strict schema validation with kubernetes-validate 1.33 (422 ``Invalid``), the
  namespace check (400 ``BadRequest``), 409 ``AlreadyExists`` (``pkg/registry/batch/job``); it
  sets ``uid``, ``creationTimestamp``, the ``controller-uid`` selector and an empty status.
- ``delete_job``: removes the Job, and its pods unless ``propagationPolicy`` is ``Orphan``.
- ``list_jobs``/``list_pods``: equality label selectors (``k=v,k2=v2``).

Tests put Job/Pod states in with :meth:`FakeKubeApi.put_status` and :meth:`FakeKubeApi.add_pod`.
With ``run_workers=True`` a created Job runs: a thread plays the Indexed Job controller
(``pkg/controller/job/job_controller.go``, ``indexed_job_utils.go``) for the parts the worker
contract needs — every index's container command runs as a local process with
``JOB_COMPLETION_INDEX`` set (``python -m service.cli ...`` forked from the warm template of
service/jobs/processes.py, as the local executor starts workers; other commands as subprocesses), at most ``parallelism`` at once, retried up to
``backoffLimitPerIndex`` times, exit code 2 failing the index at once (the manifest's
``FailIndex`` rule); the Job ends with ``SuccessCriteriaMet``/``Complete`` or
``FailureTarget``/``Failed`` (``FailedIndexes``), and pods carry the terminated state with the
log tail as message (``FallbackToLogsOnError``). No scheduler, kubelet or image pulls: those
states are recorded objects in tests/data/kube_states.yaml, read by the pure ``diagnose``.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import kubernetes_validate

from service.jobs.kube import COMPLETION_INDEX_KEY, ApiError, ranges
from service.jobs.processes import start_worker

K8S_VERSION = "1.33"
#: apimachinery's resource.Quantity syntax, as the API server's validation message quotes it
QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _matches(labels: dict, selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class FakeKubeApi:
    def __init__(self, run_workers: bool = False, cwd: str | None = None, env: dict[str, str] | None = None):
        self.jobs: dict[tuple[str, str], dict] = {}
        self.pods: dict[tuple[str, str], dict] = {}
        self.calls: list[tuple[str, ...]] = []
        self.run_workers = run_workers
        self.cwd = cwd
        self.env = dict(env or {})
        self.max_running: dict[str, int] = {}
        self._procs: dict[str, list] = {}  # Popen or processes.WorkerProcess
        self._stop: dict[str, threading.Event] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.RLock()

    # -- KubeApi -----------------------------------------------------------------------------------
    def create_job(self, namespace: str, body: dict) -> dict:
        self.calls.append(("create_job", namespace, body["metadata"]["name"]))
        if body["metadata"].get("namespace", namespace) != namespace:
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the namespace "
                                              "sent on the request")
        try:
            kubernetes_validate.validate(body, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise ApiError(422, "Invalid", f'Job.batch "{body["metadata"]["name"]}" is invalid: {e}') from None
        name = body["metadata"]["name"]
        pod_spec = body["spec"]["template"]["spec"]
        for i, c in enumerate(pod_spec.get("containers", [])):
            for kind in ("requests", "limits"):
                for res, q in (c.get("resources", {}).get(kind) or {}).items():
                    if not QUANTITY.match(str(q)):
                        raise ApiError(422, "Invalid", f'Job.batch "{name}" is invalid: spec.template.spec.containers[{i}]'
                                       f'.resources.{kind}[{res}]: Invalid value: "{q}": quantities must match the '
                                       f"regular expression '{QUANTITY.pattern}'")
        with self._lock:
            if (namespace, name) in self.jobs:
                raise ApiError(409, "AlreadyExists", f'jobs.batch "{name}" already exists')
            job = copy.deepcopy(body)
            uid = str(uuid.uuid4())
            job["metadata"].update(uid=uid, namespace=namespace, creationTimestamp=_now(), resourceVersion="1")
            job["spec"]["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
            job["status"] = {}
            self.jobs[(namespace, name)] = job
        if self.run_workers:
            stop = threading.Event()
            self._stop[uid] = stop
            t = threading.Thread(target=self._control, args=(namespace, name, uid, stop), daemon=True)
            self._threads.append(t)
            t.start()
        return copy.deepcopy(job)

    def read_job(self, namespace: str, name: str) -> dict | None:
        self.calls.append(("read_job", namespace, name))
        with self._lock:
            job = self.jobs.get((namespace, name))
            return copy.deepcopy(job) if job is not None else None

    def delete_job(self, namespace: str, name: str, propagation: str) -> bool:
        self.calls.append(("delete_job", namespace, name, propagation))
        with self._lock:
            job = self.jobs.pop((namespace, name), None)
            if job is None:
                return False
            uid = job["metadata"]["uid"]
            if uid in self._stop:
                self._stop[uid].set()
            for proc in self._procs.get(uid, []):
                if proc.poll() is None:
                    proc.terminate()  # SIGTERM, as the kubelet does on pod deletion
            if propagation != "Orphan":
                for key, pod in list(self.pods.items()):
                    if any(o.get("uid") == uid for o in pod["metadata"].get("ownerReferences", [])):
                        del self.pods[key]
            return True

    def list_jobs(self, namespace: str, label_selector: str) -> list[dict]:
        self.calls.append(("list_jobs", namespace, label_selector))
        with self._lock:
            return [copy.deepcopy(j) for (ns, _), j in self.jobs.items()
                    if ns == namespace and _matches(j["metadata"].get("labels") or {}, label_selector)]

    def list_pods(self, namespace: str, label_selector: str) -> list[dict]:
        self.calls.append(("list_pods", namespace, label_selector))
        with self._lock:
            return [copy.deepcopy(p) for (ns, _), p in self.pods.items()
                    if ns == namespace and _matches(p["metadata"].get("labels") or {}, label_selector)]

    # -- test helpers --------------------------------------------------------------------------------
    def put_status(self, namespace: str, name: str, status: dict) -> None:
        with self._lock:
            self.jobs[(namespace, name)]["status"] = copy.deepcopy(status)

    def add_pod(self, namespace: str, pod: dict) -> None:
        with self._lock:
            self.pods[(namespace, pod["metadata"]["name"])] = copy.deepcopy(pod)

    def close(self) -> None:
        for stop in self._stop.values():
            stop.set()
        for procs in self._procs.values():
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for t in self._threads:
            t.join(timeout=10)

    # -- the Indexed Job controller, for run_workers ---------------------------------------------------
    def _pod(self, job: dict, index: int, attempt: int) -> dict:
        template = copy.deepcopy(job["spec"]["template"])
        meta = template["metadata"]
        name = f"{job['metadata']['name']}-{index}-{uuid.uuid4().hex[:5]}"
        meta.update(name=name, namespace=job["metadata"]["namespace"], uid=str(uuid.uuid4()),
                    ownerReferences=[{"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"],
                                      "uid": job["metadata"]["uid"], "controller": True}])
        meta.setdefault("labels", {})[COMPLETION_INDEX_KEY] = str(index)
        meta.setdefault("annotations", {})[COMPLETION_INDEX_KEY] = str(index)
        meta["annotations"]["batch.kubernetes.io/job-index-failure-count"] = str(attempt)
        template["status"] = {"phase": "Running", "startTime": _now()}
        return template

    def _env(self, pod: dict, index: int) -> dict[str, str]:
        env = dict(os.environ)
        container = pod["spec"]["containers"][0]
        for e in container.get("env", []):
            if "value" in e:
                env[e["name"]] = e["value"]
            elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
                env[e["name"]] = pod["metadata"]["name"]
        env.update(self.env)
        env["JOB_COMPLETION_INDEX"] = str(index)
        return env

    def _control(self, namespace: str, name: str, uid: str, stop: threading.Event) -> None:
        with self._lock:
            job = copy.deepcopy(self.jobs[(namespace, name)])
        spec = job["spec"]
        completions, parallelism = spec["completions"], spec["parallelism"]
        retries = spec.get("backoffLimitPerIndex", 0)
        queue = list(range(completions))
        attempts = {i: 0 for i in queue}
        running: dict[int, tuple[subprocess.Popen, str, Any]] = {}
        done, failed = set(), set()
        failures = 0
        self.max_running[name] = 0
        while (queue or running) and not stop.is_set():
            while queue and len(running) < parallelism:
                i = queue.pop(0)
                pod = self._pod(job, i, attempts[i])
                log = open(os.path.join(self.cwd or ".", f".{pod['metadata']['name']}.log"), "w+b")
                command = pod["spec"]["containers"][0]["command"]
                if command[:3] == [sys.executable, "-m", "service.cli"]:
                    # the emrestore image's entry point: forked warm, as the local executor's workers
                    proc = start_worker(command[3:], self._env(pod, i), log.name)
                else:
                    proc = subprocess.Popen(command, cwd=self.cwd, env=self._env(pod, i), stdout=log,
                                            stderr=subprocess.STDOUT)
                self._procs.setdefault(uid, []).append(proc)
                running[i] = (proc, pod["metadata"]["name"], log)
                self.add_pod(namespace, pod)
            self.max_running[name] = max(self.max_running[name], len(running))
            self._update(namespace, name, uid, len(running), done, failed, failures, None)
            time.sleep(0.05)
            for i, (proc, pod_name, log) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[i]
                log.seek(0)
                tail = log.read().decode(errors="replace")[-4096:]
                log.close()
                os.unlink(log.name)
                phase = "Succeeded" if code == 0 else "Failed"
                with self._lock:
                    pod = self.pods.get((namespace, pod_name))
                    if pod is not None:
                        pod["status"]["phase"] = phase
                        pod["status"]["containerStatuses"] = [{
                            "name": pod["spec"]["containers"][0]["name"], "image": pod["spec"]["containers"][0]["image"],
                            "ready": False, "restartCount": 0,
                            "state": {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                                     **({"message": tail} if code else {})}}}]
                if code == 0:
                    done.add(i)
                    continue
                failures += 1
                attempts[i] += 1
                if code == 2 or attempts[i] > retries:
                    failed.add(i)
                else:
                    queue.append(i)
        if stop.is_set():
            return
        if failed:
            final = [{"type": "FailureTarget", "status": "True", "reason": "FailedIndexes",
                      "message": "Job has failed indexes"},
                     {"type": "Failed", "status": "True", "reason": "FailedIndexes", "message": "Job has failed indexes"}]
        else:
            final = [{"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached",
                      "message": "Reached expected number of succeeded pods"},
                     {"type": "Complete", "status": "True", "reason": "CompletionsReached",
                      "message": "Reached expected number of succeeded pods"}]
        self._update(namespace, name, uid, 0, done, failed, failures, final)

    def _update(self, namespace, name, uid, active, done, failed, failures, conditions) -> None:
        with self._lock:
            job = self.jobs.get((namespace, name))
            if job is None or job["metadata"]["uid"] != uid:
                return
            status = {"active": active, "succeeded": len(done), "failed": failures,
                      "completedIndexes": ranges(done), "failedIndexes": ranges(failed)}
            if conditions:
                status["conditions"] = conditions
                status["completionTime" if not failed else "startTime"] = _now()
            job["status"] = status
