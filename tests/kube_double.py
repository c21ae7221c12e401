"""A test double of the Kubernetes API server: the subset the Kubernetes executor uses, as v1.33 serves it.

No cluster runs in CI, so tests point the *official* ``kubernetes`` Python client at this double
(``kubernetes.client.Configuration(host="http://127.0.0.1:PORT")``). It is a real HTTP/1.1 server
(``ThreadingHTTPServer`` on 127.0.0.1) that follows the paths, object shapes and error objects of
Kubernetes **v1.33** (batch/v1 Job, core/v1 Pod, meta/v1 Status and WatchEvent):

==========================================================  =====================================
``GET  /version``                                           version info (v1.33.1)
``POST /apis/batch/v1/namespaces/{ns}/jobs``                create (``dryRun=All`` supported)
``GET  /apis/batch/v1/namespaces/{ns}/jobs``                list / ``watch=true`` (labelSelector,
``GET  /apis/batch/v1/jobs``                                fieldSelector, resourceVersion,
                                                            timeoutSeconds)
``GET  /apis/batch/v1/namespaces/{ns}/jobs/{name}[/status]``  read
``DELETE /apis/batch/v1/namespaces/{ns}/jobs/{name}``       delete; propagationPolicy from the query
                                                            or DeleteOptions body; without one a
                                                            batch/v1 Job is deleted with *Orphan*
                                                            (the API's default), pods stay
``GET  /api/v1/namespaces/{ns}/pods``, ``/api/v1/pods``     list / watch
``GET  /api/v1/namespaces/{ns}/pods/{name}[/status]``       read
``GET  /api/v1/namespaces/{ns}/pods/{name}/log``            logs (tailLines)
``DELETE /api/v1/namespaces/{ns}/pods/{name}``              graceful delete (SIGTERM, then SIGKILL)
==========================================================  =====================================

Errors are ``Status`` objects as the real server sends them: 400 BadRequest (bad JSON, wrong kind or
namespace), 404 NotFound, 405 MethodNotAllowed, 409 AlreadyExists, 422 Invalid. A created Job is
validated against the official v1.33 OpenAPI schemas with ``kubernetes_validate`` (strict: unknown
fields are errors, as with ``fieldValidation=Strict``) and then with the checks of the API server's
Job validation that schemas cannot express (Indexed needs completions, backoffLimitPerIndex needs
Indexed, podFailurePolicy needs restartPolicy Never and podReplacementPolicy Failed, FailIndex needs
backoffLimitPerIndex, maxFailedIndexes <= completions, DNS names, label values, volume mounts,
requests <= limits, extended resources such as nvidia.com/gpu as integer limits, ...).

A simulated **Job controller, scheduler and kubelet** run in a background thread:

* Indexed Jobs only: pods ``{job}-{index}-{random}`` per index, at most ``parallelism`` non-terminal pods
  at once, lowest pending index first, with the labels, annotations, ownerReferences, finalizer and
  ``JOB_COMPLETION_INDEX`` env var the real controller adds; ``backoffLimitPerIndex`` /
  ``maxFailedIndexes`` / ``backoffLimit`` / ``podFailurePolicy`` (Ignore, FailIndex, FailJob, Count) /
  ``activeDeadlineSeconds`` / ``ttlSecondsAfterFinished``; status with ``completedIndexes``,
  ``failedIndexes``, ``ready``, ``terminating`` and the ``FailureTarget``/``SuccessCriteriaMet`` then
  ``Failed``/``Complete`` conditions (v1.31+ behaviour).
* A scheduler over simulated nodes (:class:`Node`: labels, taints, GPUs): nodeSelector, tolerations and
  ``nvidia.com/gpu`` capacity; pods that do not fit stay Pending with ``PodScheduled=False,
  reason Unschedulable`` and the scheduler's message (``0/2 nodes are available: 2 Insufficient
  nvidia.com/gpu. ...``).
* Two ways to run a pod:

  (a) ``mode="script"``: a :class:`PodScript` per index and attempt drives the pod: succeed, fail with
      an exit code, OOMKilled, evicted by the kubelet (DisruptionTarget), preempted, image pull errors,
      unschedulable, CreateContainerConfigError, or hang until deleted.
  (b) ``mode="process"``: the pod's container command runs as a LOCAL PROCESS with the pod's
      environment (``env``, ``envFrom``, ``fieldRef``s, ``$(VAR)`` expansion, ``JOB_COMPLETION_INDEX``),
      a working directory, and the volume mounts mapped to local directories: each pod gets a fake root
      directory where every ``mountPath`` is a link to a local directory (``mounts={path: dir}``, or a
      fresh one for emptyDir/secret volumes); absolute paths in env values, args and ``workingDir``
      that fall under (or contain) a mount path are rewritten into that root. The pod phase follows the
      process's exit code; deleting the pod sends SIGTERM, then SIGKILL after the grace period;
      ``FallbackToLogsOnError`` puts the log tail into the termination message.

What the double does not do: authentication, admission webhooks, NonIndexed Jobs, PATCH/PUT, real
networking (pod IPs are made-up strings), events. Node-pressure evictions and preemptions leave the
Failed pod in place (the real API server deletes preempted pods).
"""

from __future__ import annotations

import collections
import copy
import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs, unquote, urlsplit

K8S_VERSION = "1.33"
GIT_VERSION = "v1.33.1"

JOB_TRACKING_FINALIZER = "batch.kubernetes.io/job-tracking"
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
MAX_INT32 = 2**31 - 1

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # what the API server uses for generateName suffixes


# --------------------------------------------------------------------------------------------------
# small helpers


def now_str(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))


def index_ranges(indexes: Iterable[int]) -> str:
    """{0, 2, 3, 4} -> "0,2-4" (the format of Job status completedIndexes/failedIndexes)."""
    items, out, i = sorted(set(indexes)), [], 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(out)


_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$")
_SUFFIX = {None: 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50, "Ei": 2.0**60}


def parse_quantity(q: Any) -> float:
    """Kubernetes resource quantity ("500m", "16Gi", 2) -> float; ValueError when malformed."""
    if isinstance(q, bool):
        raise ValueError(f"quantities must match the regular expression: {q!r}")
    if isinstance(q, (int, float)):
        return float(q)
    m = _QUANTITY.match(str(q).strip())
    if not m:
        raise ValueError(f"quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def parse_selector(text: str | None) -> list[tuple[str, str, Any]]:
    """Label/field selector -> requirements [(key, op, value)]; op in =, !=, in, notin, exists, !exists."""
    reqs: list[tuple[str, str, Any]] = []
    for part in re.split(r",(?![^()]*\))", text or ""):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"([^\s!=()]+)\s+(in|notin)\s+\(([^)]*)\)", part)
        if m:
            reqs.append((m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}))
        elif part.startswith("!"):
            reqs.append((part[1:].strip(), "!exists", None))
        elif "!=" in part:
            k, v = part.split("!=", 1)
            reqs.append((k.strip(), "!=", v.strip()))
        elif "==" in part:
            k, v = part.split("==", 1)
            reqs.append((k.strip(), "=", v.strip()))
        elif "=" in part:
            k, v = part.split("=", 1)
            reqs.append((k.strip(), "=", v.strip()))
        else:
            reqs.append((part, "exists", None))
    return reqs


def selector_matches(reqs: list[tuple[str, str, Any]], get: Callable[[str], str | None]) -> bool:
    for key, op, value in reqs:
        actual = get(key)
        if op == "=" and actual != value:
            return False
        if op == "!=" and actual == value:
            return False
        if op == "in" and actual not in value:
            return False
        if op == "notin" and actual in value:
            return False
        if op == "exists" and actual is None:
            return False
        if op == "!exists" and actual is not None:
            return False
    return True


def _field_value(obj: dict, path: str) -> str | None:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return None if cur is None else str(cur)


class ApiError(Exception):
    """Becomes a meta/v1 Status response."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict:
        out = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason, "code": self.code}
        if self.details is not None:
            out["details"] = self.details
        return out


def _not_found(resource: str, group: str, name: str) -> ApiError:
    full = f"{resource}.{group}" if group else resource
    return ApiError(404, "NotFound", f'{full} "{name}" not found',
                    {"name": name, "group": group, "kind": resource} if group else {"name": name, "kind": resource})


# --------------------------------------------------------------------------------------------------
# simulation inputs


@dataclass
class Node:
    """A simulated node for the scheduler."""

    name: str
    gpus: int = 8
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[dict[str, str]] = field(default_factory=list)
    gpu_resource: str = "nvidia.com/gpu"

    def all_labels(self) -> dict[str, str]:
        base = {"kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}
        base.update(self.labels)
        return base


@dataclass
class PodScript:
    """What one pod (one attempt of one index) does in ``mode="script"``."""

    outcome: str = "succeed"
    exit_code: int | None = None
    run_s: float = 0.05
    log: str = ""
    message: str = ""

    OUTCOMES = ("succeed", "fail", "oom", "evict", "preempt", "image_pull", "unschedulable", "config_error", "hang")

    def __post_init__(self) -> None:
        if self.outcome not in self.OUTCOMES:
            raise ValueError(f"unknown outcome {self.outcome!r}; one of {self.OUTCOMES}")

    @classmethod
    def succeed(cls, run_s: float = 0.05, log: str = "done\n") -> "PodScript":
        return cls("succeed", 0, run_s, log)

    @classmethod
    def fail(cls, exit_code: int = 1, log: str = "", run_s: float = 0.05) -> "PodScript":
        return cls("fail", exit_code, run_s, log or f"worker failed with exit code {exit_code}\n")

    @classmethod
    def oom(cls, run_s: float = 0.05) -> "PodScript":
        return cls("oom", 137, run_s, "loading model\n")

    @classmethod
    def evict(cls, run_s: float = 0.05, message: str = "") -> "PodScript":
        return cls("evict", 137, run_s, "", message or
                   "The node was low on resource: memory. Threshold quantity: 100Mi, available: 51200Ki. ")

    @classmethod
    def preempt(cls, run_s: float = 0.05) -> "PodScript":
        return cls("preempt", 143, run_s, "", "default-scheduler: preempting to accommodate a higher priority pod")

    @classmethod
    def image_pull(cls, message: str = "") -> "PodScript":
        return cls("image_pull", None, 0.0, "", message)

    @classmethod
    def unschedulable(cls) -> "PodScript":
        return cls("unschedulable", None, 0.0)

    @classmethod
    def config_error(cls, message: str = 'secret "emrestore-cloudvolume" not found') -> "PodScript":
        return cls("config_error", None, 0.0, "", message)

    @classmethod
    def hang(cls) -> "PodScript":
        return cls("hang", None, 0.0)


ScriptSpec = Any  # None | PodScript | dict[int, PodScript | list[PodScript]] | Callable[[int, int], PodScript]


@dataclass
class _PodRuntime:
    key: tuple[str, str]
    job_key: tuple[str, str] | None
    index: int
    attempt: int
    script: PodScript | None
    stage: str = "unscheduled"  # unscheduled, starting, image_error, config_error, running, terminated
    since: float = field(default_factory=time.monotonic)
    node: str | None = None
    gpus: int = 0
    proc: subprocess.Popen | None = None
    root: str | None = None
    mapping: dict[str, str] | None = None
    logs: dict[str, str] = field(default_factory=dict)  # container name -> log file
    init_pos: int = 0
    tmpdirs: list[str] = field(default_factory=list)
    delete_deadline: float | None = None
    term_sent: bool = False
    started_at: str | None = None


@dataclass
class _JobState:
    key: tuple[str, str]
    uid: str
    started: float = field(default_factory=time.monotonic)
    counted: set[str] = field(default_factory=set)
    failures: collections.Counter = field(default_factory=collections.Counter)
    ignored: collections.Counter = field(default_factory=collections.Counter)
    attempts: collections.Counter = field(default_factory=collections.Counter)
    succeeded: set[int] = field(default_factory=set)
    failed_indexes: set[int] = field(default_factory=set)
    succeeded_pods: int = 0
    failed_pods: int = 0
    failure: tuple[str, str] | None = None
    success_met: bool = False
    finished_at: float | None = None
    max_active: int = 0
    foreground_delete: bool = False
    last_status: str = ""


# --------------------------------------------------------------------------------------------------
# the server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kube-apiserver-double/" + GIT_VERSION

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _go(self, method: str) -> None:
        self.server.double._handle(self, method)  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        self._go("GET")

    def do_POST(self) -> None:
        self._go("POST")

    def do_DELETE(self) -> None:
        self._go("DELETE")

    def do_PUT(self) -> None:
        self._go("PUT")

    def do_PATCH(self) -> None:
        self._go("PATCH")


class KubeDouble:
    """The double: ``with KubeDouble() as kd: api = kd.api_client()``.

    mode: ``"script"`` or ``"process"`` (see the module docstring).
    script: per-pod scripts for script mode: one :class:`PodScript` for all pods, ``{index: PodScript or
        [PodScript per attempt]}`` (the last one repeats; indexes not listed succeed), or
        ``callable(index, attempt) -> PodScript``. In process mode only the outcomes that happen before
        the container starts (unschedulable, image_pull, config_error) are used.
    nodes: simulated nodes (default: one node with 8 GPUs).
    bad_images: images whose pull fails (ErrImagePull, then ImagePullBackOff).
    env / inherit_env / cwd / mounts / rewrite_command: process mode: extra environment for every pod,
        whether the test's own environment is inherited, the working directory (default: the pod's fake
        root), ``{container path: local dir}`` for volume mounts, and a hook ``f(argv) -> argv``.
    secrets / configmaps: ``{name: {key: value}}`` for envFrom, secretKeyRef and secret volumes in process
        mode. None (default) means any Secret is accepted as empty.
    validate: check created Jobs against the v1.33 schemas (kubernetes_validate).
    """

    def __init__(
        self,
        mode: str = "script",
        script: ScriptSpec = None,
        nodes: list[Node] | None = None,
        bad_images: Iterable[str] = (),
        env: dict[str, str] | None = None,
        inherit_env: bool = True,
        cwd: str | os.PathLike | None = None,
        mounts: dict[str, str | os.PathLike] | None = None,
        rewrite_command: Callable[[list[str]], list[str]] | None = None,
        secrets: dict[str, dict[str, str | bytes]] | None = None,
        configmaps: dict[str, dict[str, str]] | None = None,
        log_dir: str | os.PathLike | None = None,
        validate: bool = True,
        version: str = K8S_VERSION,
        tick_s: float = 0.02,
        max_grace_s: float = 5.0,
        namespaces: Iterable[str] | None = None,
    ):
        if mode not in ("script", "process"):
            raise ValueError("mode must be 'script' or 'process'")
        self.mode = mode
        self.script = script
        self.nodes = list(nodes) if nodes is not None else [Node("node-0")]
        self.bad_images = set(bad_images)
        self.env = dict(env or {})
        self.inherit_env = inherit_env
        self.cwd = os.fspath(cwd) if cwd is not None else None
        self.mounts = {k: os.fspath(v) for k, v in (mounts or {}).items()}
        self.rewrite_command = rewrite_command
        self.secrets = secrets
        self.configmaps = configmaps or {}
        self.validate = validate
        self.version = version
        self.tick_s = tick_s
        self.max_grace_s = max_grace_s
        self.namespaces = set(namespaces) if namespaces is not None else None

        self._tmp = tempfile.mkdtemp(prefix="kube-double-")
        self.log_dir = os.fspath(log_dir) if log_dir is not None else os.path.join(self._tmp, "logs")
        os.makedirs(self.log_dir, exist_ok=True)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._rv = 1000
        self._objects: dict[str, dict[tuple[str, str], dict]] = {"jobs": {}, "pods": {}}
        self._events: dict[str, list[tuple[int, str, dict]]] = {"jobs": [], "pods": []}
        self._jobstate: dict[tuple[str, str], _JobState] = {}
        self._runtime: dict[tuple[str, str], _PodRuntime] = {}
        self._ip = 10
        self.requests: list[dict[str, Any]] = []
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self.controller_errors: list[str] = []

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> "KubeDouble":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.double = self  # type: ignore[attr-defined]
        t1 = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="kube-double-http", daemon=True)
        t2 = threading.Thread(target=self._control_loop, name="kube-double-controller", daemon=True)
        self._threads = [t1, t2]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for t in self._threads:
            t.join(timeout=5)
        with self._lock:
            for rt in self._runtime.values():
                self._kill(rt, signal.SIGKILL)
            for rt in self._runtime.values():
                if rt.proc is not None:
                    try:
                        rt.proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "KubeDouble":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return self._server.server_address[1]

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def configuration(self):
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.host
        return cfg

    def api_client(self):
        from kubernetes import client

        return client.ApiClient(self.configuration())

    def write_kubeconfig(self, path: str | os.PathLike, namespace: str = "default") -> str:
        """A kubeconfig file pointing at the double (for load_kube_config)."""
        import yaml

        data = {
            "apiVersion": "v1", "kind": "Config", "current-context": "double",
            "clusters": [{"name": "double", "cluster": {"server": self.host}}],
            "users": [{"name": "tester", "user": {"token": "test-token"}}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "tester", "namespace": namespace}}],
        }
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(data, f)
        return os.fspath(path)

    # -- inspection helpers for tests ------------------------------------------------------------------
    def job(self, name: str, namespace: str = "emrestore") -> dict | None:
        with self._lock:
            obj = self._objects["jobs"].get((namespace, name))
            return copy.deepcopy(obj) if obj else None

    def jobs(self, namespace: str | None = None) -> list[dict]:
        with self._lock:
            return [copy.deepcopy(o) for (ns, _), o in sorted(self._objects["jobs"].items())
                    if namespace is None or ns == namespace]

    def pods(self, namespace: str | None = None, job_name: str | None = None) -> list[dict]:
        with self._lock:
            out = []
            for (ns, _), o in sorted(self._objects["pods"].items()):
                if namespace is not None and ns != namespace:
                    continue
                if job_name is not None and o["metadata"].get("labels", {}).get("batch.kubernetes.io/job-name") != job_name:
                    continue
                out.append(copy.deepcopy(o))
            return out

    def max_active(self, name: str, namespace: str = "emrestore") -> int:
        """Most non-terminal pods the Job ever had at once (to check parallelism)."""
        with self._lock:
            for js in list(self._jobstate.values()):
                if js.key == (namespace, name):
                    return js.max_active
        return 0

    def processes(self) -> list[subprocess.Popen]:
        with self._lock:
            return [rt.proc for rt in self._runtime.values() if rt.proc is not None]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout}s")
            time.sleep(interval)

    def disrupt(self, pod_name: str, namespace: str = "emrestore", reason: str = "EvictionByEvictionAPI",
                message: str = "Eviction API: evicting") -> None:
        """Disrupt a running pod the way a drain/eviction does: DisruptionTarget condition, then killed."""
        with self._lock:
            key = (namespace, pod_name)
            pod, rt = self._objects["pods"].get(key), self._runtime.get(key)
            if pod is None or rt is None:
                raise KeyError(pod_name)
            self._set_condition(pod, "DisruptionTarget", "True", reason, message)
            self._kill(rt, signal.SIGKILL)
            self._finish_pod(pod, rt, 137, "Error", "", "Failed")

    # -- HTTP --------------------------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        body: Any = None
        record = {"method": method, "path": url.path, "query": query, "body": None}
        try:
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError as e:
                    raise ApiError(400, "BadRequest", f"the body of the request was in an unknown format: {e}")
                record["body"] = body
            with self._lock:
                self.requests.append(record)
            self._route(h, method, [unquote(p) for p in url.path.strip("/").split("/")], query, body)
        except ApiError as e:
            self._send_json(h, e.code, e.status())
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # noqa: BLE001 - an internal error of the double: a 500 Status
            self._send_json(h, 500, ApiError(500, "InternalError", f"kube double: {type(e).__name__}: {e}").status())

    @staticmethod
    def _send_json(h: BaseHTTPRequestHandler, code: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.send_header("Audit-Id", str(uuid.uuid4()))
        h.end_headers()
        h.wfile.write(data)

    @staticmethod
    def _send_text(h: BaseHTTPRequestHandler, code: int, text: str) -> None:
        data = text.encode()
        h.send_response(code)
        h.send_header("Content-Type", "text/plain")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _route(self, h: BaseHTTPRequestHandler, method: str, parts: list[str], q: dict, body: Any) -> None:
        allowed: tuple[str, ...]
        if parts == ["version"]:
            if method != "GET":
                raise self._method_not_allowed(method)
            major, minor = self.version.split(".")[:2]
            return self._send_json(h, 200, {
                "major": major, "minor": minor, "gitVersion": GIT_VERSION, "gitCommit": "0" * 40,
                "gitTreeState": "clean", "buildDate": "2025-05-15T00:00:00Z", "goVersion": "go1.24.2",
                "compiler": "gc", "platform": "linux/amd64"})
        if parts[:3] == ["apis", "batch", "v1"]:
            kind, rest, group = "jobs", parts[3:], "batch"
        elif parts[:2] == ["api", "v1"]:
            kind, rest, group = None, parts[2:], ""
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource", {})
        ns = None
        if len(rest) >= 2 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
            if self.namespaces is not None and ns not in self.namespaces:
                raise _not_found("namespaces", "", ns)
        if not rest:
            raise ApiError(404, "NotFound", "the server could not find the requested resource", {})
        resource = rest[0]
        if group == "batch" and resource != "jobs" or group == "" and resource != "pods":
            raise ApiError(404, "NotFound", "the server could not find the requested resource", {})
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if len(rest) > 3 or sub not in (None, "status", "log") or (sub == "log" and resource != "pods"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource", {})

        if name is None:  # collection
            allowed = ("GET", "POST") if resource == "jobs" and ns else ("GET",)
            if method not in allowed:
                raise self._method_not_allowed(method)
            if method == "POST":
                obj = self._create_job(ns, body, q)
                return self._send_json(h, 201, obj)
            if q.get("watch") in ("true", "1"):
                return self._watch(h, resource, ns, q)
            return self._send_json(h, 200, self._list(resource, ns, q))
        if ns is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource", {})
        if sub == "log":
            if method != "GET":
                raise self._method_not_allowed(method)
            return self._send_text(h, 200, self._log(ns, name, q))
        if method == "GET":
            with self._lock:
                obj = self._objects[resource].get((ns, name))
                if obj is None:
                    raise _not_found(resource, group, name)
                return self._send_json(h, 200, self._full(resource, obj))
        if method == "DELETE" and sub is None:
            code, obj = self._delete(resource, ns, name, q, body)
            return self._send_json(h, code, obj)
        raise self._method_not_allowed(method)

    @staticmethod
    def _method_not_allowed(method: str) -> ApiError:
        return ApiError(405, "MethodNotAllowed", f"the server does not allow this method on the requested resource ({method})", {})

    @staticmethod
    def _full(resource: str, obj: dict) -> dict:
        out = copy.deepcopy(obj)
        out["apiVersion"], out["kind"] = ("batch/v1", "Job") if resource == "jobs" else ("v1", "Pod")
        return out

    def _matching(self, resource: str, ns: str | None, q: dict) -> list[dict]:
        lsel, fsel = parse_selector(q.get("labelSelector")), parse_selector(q.get("fieldSelector"))
        out = []
        for (ons, _), obj in sorted(self._objects[resource].items()):
            if ns is not None and ons != ns:
                continue
            if self._selected(obj, lsel, fsel):
                out.append(obj)
        return out

    @staticmethod
    def _selected(obj: dict, lsel: list, fsel: list) -> bool:
        labels = obj["metadata"].get("labels") or {}
        return selector_matches(lsel, labels.get) and selector_matches(fsel, lambda p: _field_value(obj, p))

    def _list(self, resource: str, ns: str | None, q: dict) -> dict:
        with self._lock:
            items = [copy.deepcopy(o) for o in self._matching(resource, ns, q)]
            rv = str(self._rv)
        kind, api = ("JobList", "batch/v1") if resource == "jobs" else ("PodList", "v1")
        return {"kind": kind, "apiVersion": api, "metadata": {"resourceVersion": rv}, "items": items}

    def _watch(self, h: BaseHTTPRequestHandler, resource: str, ns: str | None, q: dict) -> None:
        lsel, fsel = parse_selector(q.get("labelSelector")), parse_selector(q.get("fieldSelector"))
        timeout = float(q.get("timeoutSeconds") or 300)
        deadline = time.monotonic() + timeout
        rv = q.get("resourceVersion")
        with self._lock:
            events = self._events[resource]
            if not rv or rv == "0":
                initial = [("ADDED", self._full(resource, o)) for o in self._matching(resource, ns, q)]
                pos = len(events)
            else:
                try:
                    start = int(rv)
                except ValueError:
                    raise ApiError(400, "BadRequest", f'invalid resource version "{rv}"')
                initial = []
                pos = next((i for i, e in enumerate(events) if e[0] > start), len(events))
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def send(etype: str, obj: dict) -> None:
            data = (json.dumps({"type": etype, "object": obj}) + "\n").encode()
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()

        for etype, obj in initial:
            send(etype, obj)
        while not self._stopping.is_set():
            with self._cond:
                while pos >= len(self._events[resource]) and not self._stopping.is_set():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(min(remaining, 0.25))
                new = self._events[resource][pos:]
                pos += len(new)
            for _, etype, obj in new:
                if ns is not None and obj["metadata"].get("namespace") != ns:
                    continue
                if self._selected(obj, lsel, fsel):
                    send(etype, obj)
            if time.monotonic() >= deadline:
                break
        h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()

    def _log(self, ns: str, name: str, q: dict) -> str:
        with self._lock:
            pod, rt = self._objects["pods"].get((ns, name)), self._runtime.get((ns, name))
            if pod is None:
                raise _not_found("pods", "", name)
            if rt is None or rt.stage in ("unscheduled", "starting", "image_error", "config_error") or (
                    rt.stage == "init" and not q.get("container")):
                container = pod["spec"]["containers"][0]["name"]
                raise ApiError(400, "BadRequest",
                               f'container "{container}" in pod "{name}" is waiting to start: ContainerCreating')
            container = q.get("container") or pod["spec"]["containers"][0]["name"]
            names = [c["name"] for c in (pod["spec"].get("initContainers") or []) + pod["spec"]["containers"]]
            if container not in names:
                raise ApiError(400, "BadRequest", f'container {container} is not valid for pod {name}')
            path = rt.logs.get(container)
        text = ""
        if path and os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        if q.get("tailLines"):
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-int(q["tailLines"]):])
        return text

    # -- storage -------------------------------------------------------------------------------------------
    def _emit(self, resource: str, obj: dict, etype: str) -> None:
        """Record a change of ``obj`` (already stored/removed by the caller): new resourceVersion, event."""
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._events[resource].append((self._rv, etype, self._full(resource, obj)))
        self._cond.notify_all()

    def _new_meta(self, meta: dict, ns: str) -> None:
        meta["namespace"] = ns
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_str()
        meta["generation"] = 1

    # -- Jobs: create ------------------------------------------------------------------------------------
    def _create_job(self, ns: str, body: Any, q: dict) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request was in an unknown format")
        if body.get("apiVersion") != "batch/v1" or body.get("kind") != "Job":
            raise ApiError(400, "BadRequest",
                           f"the API version in the data ({body.get('apiVersion')}) does not match the expected API "
                           f"version (batch/v1)" if body.get("apiVersion") != "batch/v1"
                           else f"kind {body.get('kind')!r} does not match the expected kind Job")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if meta.get("namespace") not in (None, ns):
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the namespace sent on the request")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(random.choice(_NAME_CHARS) for _ in range(5))
        name = meta.get("name") or ""
        causes: list[dict] = []
        if self.validate:
            causes += self._schema_causes(obj)
        causes += self._semantic_causes(obj)
        if causes:
            text = "; ".join(f"{c['field']}: {c['message']}" for c in causes)
            raise ApiError(422, "Invalid", f'Job.batch "{name}" is invalid: [{text}]' if len(causes) > 1
                           else f'Job.batch "{name}" is invalid: {text}',
                           {"name": name, "group": "batch", "kind": "Job", "causes": causes})
        with self._lock:
            if (ns, name) in self._objects["jobs"]:
                raise ApiError(409, "AlreadyExists", f'jobs.batch "{name}" already exists',
                               {"name": name, "group": "batch", "kind": "jobs"})
            self._default_job(obj, ns)
            if q.get("dryRun") == "All":
                return self._full("jobs", obj)
            self._objects["jobs"][(ns, name)] = obj
            self._jobstate[(ns, name)] = _JobState(key=(ns, name), uid=obj["metadata"]["uid"])
            self._emit("jobs", obj, "ADDED")
            return self._full("jobs", obj)

    def _schema_causes(self, obj: dict) -> list[dict]:
        import kubernetes_validate

        try:
            kubernetes_validate.validate(obj, self.version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "<root>"
            return [{"reason": "FieldValueInvalid", "message": f"Invalid value: {e.message}", "field": path}]
        return []

    def _semantic_causes(self, obj: dict) -> list[dict]:
        """What the API server's Job validation checks beyond the OpenAPI schema (a useful subset)."""
        causes: list[dict] = []

        def bad(fld: str, message: str, reason: str = "FieldValueInvalid") -> None:
            causes.append({"reason": reason, "message": message, "field": fld})

        meta = obj.get("metadata") or {}
        name = meta.get("name")
        if not name:
            bad("metadata.name", "Required value: name or generateName is required", "FieldValueRequired")
        elif len(name) > 63:
            bad("metadata.name", f'Invalid value: "{name}": must be no more than 63 characters')
        elif not _DNS_LABEL.match(name):
            bad("metadata.name", f'Invalid value: "{name}": a lowercase RFC 1123 label must consist of lower case '
                "alphanumeric characters or '-', and must start and end with an alphanumeric character")
        self._check_meta(meta, "metadata", bad)
        spec = obj.get("spec") or {}
        tmpl = spec.get("template") or {}
        self._check_meta(tmpl.get("metadata") or {}, "spec.template.metadata", bad)
        pod = tmpl.get("spec") or {}
        mode = spec.get("completionMode", "NonIndexed")
        if mode != "Indexed":
            bad("spec.completionMode", f'Unsupported value: "{mode}": the kube double runs Indexed Jobs only',
                "FieldValueNotSupported")
        completions = spec.get("completions")
        if mode == "Indexed":
            if completions is None:
                bad("spec.completions", "Required value: when completion mode is Indexed", "FieldValueRequired")
            elif completions > 100000:
                bad("spec.completions", "Invalid value: must be less than or equal to 100000 when completion mode is Indexed")
        for fld in ("parallelism", "completions", "backoffLimit", "backoffLimitPerIndex", "maxFailedIndexes",
                    "ttlSecondsAfterFinished"):
            if isinstance(spec.get(fld), int) and spec[fld] < 0:
                bad(f"spec.{fld}", f"Invalid value: {spec[fld]}: must be greater than or equal to 0")
        if isinstance(spec.get("activeDeadlineSeconds"), int) and spec["activeDeadlineSeconds"] <= 0:
            bad("spec.activeDeadlineSeconds", "Invalid value: must be greater than 0")
        if isinstance(spec.get("parallelism"), int) and spec["parallelism"] > 100000 and mode == "Indexed":
            bad("spec.parallelism", "Invalid value: must be less than or equal to 100000 when completion mode is Indexed")
        blpi = spec.get("backoffLimitPerIndex")
        if blpi is not None and mode != "Indexed":
            bad("spec.backoffLimitPerIndex", "Forbidden: requires indexed completion mode", "FieldValueForbidden")
        mfi = spec.get("maxFailedIndexes")
        if mfi is not None:
            if blpi is None:
                bad("spec.maxFailedIndexes", "Required value: when maxFailedIndexes is specified, backoffLimitPerIndex "
                    "must also be specified", "FieldValueRequired")
            if isinstance(completions, int) and mfi > completions:
                bad("spec.maxFailedIndexes", f"Invalid value: {mfi}: must be less than or equal to completions")
        if spec.get("selector") is not None and not spec.get("manualSelector"):
            bad("spec.selector", "Invalid value: `selector` will be auto-generated")
        restart = pod.get("restartPolicy")
        if restart not in ("Never", "OnFailure"):
            bad("spec.template.spec.restartPolicy", 'Required value: valid values: "OnFailure", "Never"',
                "FieldValueRequired" if restart is None else "FieldValueNotSupported")
        pfp = spec.get("podFailurePolicy")
        containers = [c.get("name") for c in pod.get("containers") or []]
        if pfp is not None:
            if restart != "Never":
                bad("spec.template.spec.restartPolicy",
                    f'Invalid value: "{restart}": only "Never" is supported when podFailurePolicy is specified')
            if spec.get("podReplacementPolicy", "Failed") != "Failed":
                bad("spec.podReplacementPolicy", f'Unsupported value: "{spec.get("podReplacementPolicy")}": supported '
                    'values: "Failed" (when podFailurePolicy is specified)', "FieldValueNotSupported")
            for i, rule in enumerate(pfp.get("rules") or []):
                where = f"spec.podFailurePolicy.rules[{i}]"
                action = rule.get("action")
                if action not in ("FailJob", "FailIndex", "Ignore", "Count"):
                    bad(f"{where}.action", f'Unsupported value: "{action}"', "FieldValueNotSupported")
                if action == "FailIndex" and blpi is None:
                    bad(f"{where}.action", "Forbidden: requires the backoffLimitPerIndex to be set", "FieldValueForbidden")
                has_codes, has_conds = rule.get("onExitCodes") is not None, bool(rule.get("onPodConditions"))
                if has_codes == has_conds:
                    bad(where, "Invalid value: specifying one of OnExitCodes and OnPodConditions is required")
                if has_codes:
                    codes = rule["onExitCodes"]
                    values = codes.get("values") or []
                    if codes.get("operator") not in ("In", "NotIn"):
                        bad(f"{where}.onExitCodes.operator", f'Unsupported value: "{codes.get("operator")}"',
                            "FieldValueNotSupported")
                    if codes.get("operator") == "In" and 0 in values:
                        bad(f"{where}.onExitCodes.values", "Invalid value: 0: must not be 0 for the In operator")
                    if values != sorted(set(values)):
                        bad(f"{where}.onExitCodes.values", "Invalid value: must be ordered and unique")
                    cname = codes.get("containerName")
                    if cname is not None and cname not in containers:
                        bad(f"{where}.onExitCodes.containerName", f'Invalid value: "{cname}": must be one of the container '
                            "or initContainer names in the pod template")
                for j, pc in enumerate(rule.get("onPodConditions") or []):
                    if pc.get("status", "True") not in ("True", "False", "Unknown"):
                        bad(f"{where}.onPodConditions[{j}].status", f'Unsupported value: "{pc.get("status")}"',
                            "FieldValueNotSupported")
        self._check_pod_spec(pod, "spec.template.spec", bad)
        return causes

    @staticmethod
    def _check_meta(meta: dict, where: str, bad: Callable) -> None:
        for key, value in (meta.get("labels") or {}).items():
            if not _valid_key(key):
                bad(f"{where}.labels", f'Invalid value: "{key}": name part must consist of alphanumeric characters, '
                    "'-', '_' or '.', and must start and end with an alphanumeric character")
            if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
                bad(f"{where}.labels", f'Invalid value: "{value}": a valid label must be an empty string or consist of '
                    "alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character "
                    "(at most 63 characters)")
        for key in (meta.get("annotations") or {}):
            if not _valid_key(key):
                bad(f"{where}.annotations", f'Invalid value: "{key}": name part must consist of alphanumeric characters')

    @staticmethod
    def _check_pod_spec(pod: dict, where: str, bad: Callable) -> None:
        volumes = pod.get("volumes") or []
        vnames = [v.get("name") for v in volumes]
        for i, n in enumerate(vnames):
            if not n or not _DNS_LABEL.match(n) or len(n) > 63:
                bad(f"{where}.volumes[{i}].name", f'Invalid value: "{n}": a lowercase RFC 1123 label must consist of '
                    "lower case alphanumeric characters or '-'")
            elif vnames.count(n) > 1:
                bad(f"{where}.volumes[{i}].name", f'Duplicate value: "{n}"', "FieldValueDuplicate")
        containers = pod.get("containers") or []
        if not containers:
            bad(f"{where}.containers", "Required value", "FieldValueRequired")
        cnames = [c.get("name") for c in containers] + [c.get("name") for c in pod.get("initContainers") or []]
        for i, c in enumerate(containers):
            cw = f"{where}.containers[{i}]"
            n = c.get("name")
            if not n or not _DNS_LABEL.match(n):
                bad(f"{cw}.name", f'Invalid value: "{n}": a lowercase RFC 1123 label must consist of lower case '
                    "alphanumeric characters or '-'")
            elif cnames.count(n) > 1:
                bad(f"{cw}.name", f'Duplicate value: "{n}"', "FieldValueDuplicate")
            if not c.get("image"):
                bad(f"{cw}.image", "Required value", "FieldValueRequired")
            paths = []
            for j, m in enumerate(c.get("volumeMounts") or []):
                if m.get("name") not in vnames:
                    bad(f"{cw}.volumeMounts[{j}].name", f'Not found: "{m.get("name")}"', "FieldValueNotFound")
                mp = m.get("mountPath") or ""
                if not mp:
                    bad(f"{cw}.volumeMounts[{j}].mountPath", "Required value", "FieldValueRequired")
                elif mp in paths:
                    bad(f"{cw}.volumeMounts[{j}].mountPath", f'Invalid value: "{mp}": must be unique')
                paths.append(mp)
            for j, e in enumerate(c.get("env") or []):
                if not _ENV_NAME.match(e.get("name") or ""):
                    bad(f"{cw}.env[{j}].name", f'Invalid value: "{e.get("name")}": a valid environment variable name '
                        "must consist of alphabetic characters, digits, '_', '-', or '.', and must not start with a digit")
                if "value" in e and "valueFrom" in e:
                    bad(f"{cw}.env[{j}].valueFrom", "Invalid value: may not be specified when `value` is not empty")
            res = c.get("resources") or {}
            limits, requests = res.get("limits") or {}, res.get("requests") or {}
            for kind, values in (("limits", limits), ("requests", requests)):
                for rname, q in values.items():
                    try:
                        parse_quantity(q)
                    except ValueError as e:
                        bad(f"{cw}.resources.{kind}[{rname}]", f'Invalid value: "{q}": {e}')
            for rname, q in requests.items():
                if rname in limits:
                    try:
                        if parse_quantity(q) > parse_quantity(limits[rname]):
                            bad(f"{cw}.resources.requests", f'Invalid value: "{q}": must be less than or equal to {rname} limit of {limits[rname]}')
                    except ValueError:
                        pass
            for rname in set(limits) | set(requests):
                if "/" in rname and not rname.startswith(("kubernetes.io/", "requests.")):  # extended resource
                    if rname not in limits:
                        bad(f"{cw}.resources.limits", f"Required value: Limit must be set for non overcommitable "
                            f"resources", "FieldValueRequired")
                    elif rname in requests and parse_quantity(requests[rname]) != parse_quantity(limits[rname]):
                        bad(f"{cw}.resources.requests[{rname}]", "Invalid value: must be equal to "
                            f"{rname} limit of {limits[rname]}")
                    for q in (limits.get(rname), requests.get(rname)):
                        if q is not None and parse_quantity(q) != int(parse_quantity(q)):
                            bad(f"{cw}.resources.limits[{rname}]", f'Invalid value: "{q}": must be an integer')
        for i, t in enumerate(pod.get("tolerations") or []):
            if t.get("operator") == "Exists" and t.get("value"):
                bad(f"{where}.tolerations[{i}].operator", "Invalid value: value must be empty when `operator` is 'Exists'")
            if t.get("effect") not in (None, "", "NoSchedule", "PreferNoSchedule", "NoExecute"):
                bad(f"{where}.tolerations[{i}].effect", f'Unsupported value: "{t.get("effect")}"', "FieldValueNotSupported")

    def _default_job(self, obj: dict, ns: str) -> None:
        meta = obj["metadata"]
        self._new_meta(meta, ns)
        uid = meta["uid"]
        spec = obj["spec"]
        spec.setdefault("parallelism", 1)
        spec.setdefault("suspend", False)
        spec.setdefault("backoffLimit", MAX_INT32 if spec.get("backoffLimitPerIndex") is not None else 6)
        spec.setdefault("podReplacementPolicy", "Failed" if spec.get("podFailurePolicy") else "TerminatingOrFailed")
        tmeta = spec["template"].setdefault("metadata", {})
        labels = tmeta.setdefault("labels", {})
        labels.update({"batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": meta["name"],
                       "controller-uid": uid, "job-name": meta["name"]})
        spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
        for rule in (spec.get("podFailurePolicy") or {}).get("rules") or []:
            for pc in rule.get("onPodConditions") or []:
                pc.setdefault("status", "True")
        pod = spec["template"]["spec"]
        pod.setdefault("dnsPolicy", "ClusterFirst")
        pod.setdefault("schedulerName", "default-scheduler")
        pod.setdefault("securityContext", {})
        pod.setdefault("terminationGracePeriodSeconds", 30)
        for c in (pod.get("containers") or []) + (pod.get("initContainers") or []):
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            c.setdefault("terminationMessagePolicy", "File")
            image = c.get("image", "")
            c.setdefault("imagePullPolicy", "Always" if image.endswith(":latest") or ":" not in image.rsplit("/", 1)[-1]
                         else "IfNotPresent")
            c.setdefault("resources", {})
        obj["status"] = {}

    # -- delete ------------------------------------------------------------------------------------------
    def _delete(self, resource: str, ns: str, name: str, q: dict, body: Any) -> tuple[int, dict]:
        opts = body if isinstance(body, dict) else {}
        policy = q.get("propagationPolicy") or opts.get("propagationPolicy")
        if opts.get("orphanDependents") is True and not policy:
            policy = "Orphan"
        if policy not in (None, "Orphan", "Background", "Foreground"):
            raise ApiError(422, "Invalid", f'DeleteOptions.meta.k8s.io "" is invalid: propagationPolicy: Unsupported '
                           f'value: "{policy}": supported values: "Foreground", "Background", "Orphan", "nil"', {})
        grace = q.get("gracePeriodSeconds", opts.get("gracePeriodSeconds"))
        group = "batch" if resource == "jobs" else ""
        with self._lock:
            key = (ns, name)
            obj = self._objects[resource].get(key)
            if obj is None:
                raise _not_found(resource, group, name)
            if resource == "pods":
                rt = self._runtime.get(key)
                pod_grace = obj["spec"].get("terminationGracePeriodSeconds", 30) if grace is None else int(grace)
                self._delete_pod(obj, rt, pod_grace)
                return 200, self._full("pods", obj)
            js = self._jobstate.get(key)
            policy = policy or "Orphan"  # batch/v1 Jobs: the REST default is to orphan the pods
            if policy == "Foreground":
                obj["metadata"]["deletionTimestamp"] = now_str()
                obj["metadata"]["deletionGracePeriodSeconds"] = 0
                obj["metadata"].setdefault("finalizers", []).append("foregroundDeletion")
                if js:
                    js.foreground_delete = True
                self._emit("jobs", obj, "MODIFIED")
                return 200, self._full("jobs", obj)
            if policy == "Orphan":
                for pod in list(self._objects["pods"].values()):
                    refs = pod["metadata"].get("ownerReferences") or []
                    if any(r.get("uid") == obj["metadata"]["uid"] for r in refs):
                        pod["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != obj["metadata"]["uid"]]
                        self._emit("pods", pod, "MODIFIED")
            del self._objects["jobs"][key]
            self._jobstate.pop(key, None)
            self._emit("jobs", obj, "DELETED")  # Background: the controller loop's GC removes the pods
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                         "details": {"name": name, "group": "batch", "kind": "jobs", "uid": obj["metadata"]["uid"]}}

    def _delete_pod(self, pod: dict, rt: _PodRuntime | None, grace: float) -> None:
        if pod["metadata"].get("deletionTimestamp"):
            return
        pod["metadata"]["deletionTimestamp"] = now_str(time.time() + grace)
        pod["metadata"]["deletionGracePeriodSeconds"] = int(grace)
        if rt is not None:
            rt.delete_deadline = time.monotonic() + min(float(grace), self.max_grace_s)
        self._emit("pods", pod, "MODIFIED")

    def _remove_pod(self, key: tuple[str, str]) -> None:
        pod = self._objects["pods"].pop(key, None)
        rt = self._runtime.pop(key, None)
        if rt is not None:
            self._kill(rt, signal.SIGKILL)
            for d in rt.tmpdirs:
                shutil.rmtree(d, ignore_errors=True)
        if pod is not None:
            pod["metadata"]["finalizers"] = []
            self._emit("pods", pod, "DELETED")

    # -- controller loop -----------------------------------------------------------------------------------
    def _control_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                with self._lock:
                    self._tick()
            except Exception as e:  # noqa: BLE001 - keep the double alive, let tests see it
                import traceback

                self.controller_errors.append(f"{e!r}\n{traceback.format_exc()}")
            self._stopping.wait(self.tick_s)

    def _tick(self) -> None:
        job_uids = {o["metadata"]["uid"]: key for key, o in self._objects["jobs"].items()}
        # garbage collector: pods whose controlling Job is gone (Background deletion, TTL)
        for key, pod in list(self._objects["pods"].items()):
            refs = pod["metadata"].get("ownerReferences") or []
            if refs and not any(r.get("uid") in job_uids for r in refs):
                self._delete_pod(pod, self._runtime.get(key), 0 if pod["status"].get("phase") in ("Succeeded", "Failed")
                                 else pod["spec"].get("terminationGracePeriodSeconds", 30))
        for key in list(self._objects["jobs"]):
            job, js = self._objects["jobs"].get(key), self._jobstate.get(key)
            if job is None or js is None:
                continue
            if js.foreground_delete:
                owned = self._owned_pods(job)
                for pod in owned:
                    self._delete_pod(pod, self._runtime.get((pod["metadata"]["namespace"], pod["metadata"]["name"])),
                                     pod["spec"].get("terminationGracePeriodSeconds", 30))
                if not owned:
                    del self._objects["jobs"][key]
                    self._jobstate.pop(key, None)
                    job["metadata"]["finalizers"] = []
                    self._emit("jobs", job, "DELETED")
                continue
            self._reconcile(job, js)
            ttl = job["spec"].get("ttlSecondsAfterFinished")
            if js.finished_at is not None and ttl is not None and time.monotonic() - js.finished_at >= ttl:
                del self._objects["jobs"][key]
                self._jobstate.pop(key, None)
                self._emit("jobs", job, "DELETED")
        for key in list(self._objects["pods"]):
            pod, rt = self._objects["pods"].get(key), self._runtime.get(key)
            if pod is not None and rt is not None:
                self._advance(pod, rt)

    def _owned_pods(self, job: dict) -> list[dict]:
        uid = job["metadata"]["uid"]
        return [p for p in self._objects["pods"].values()
                if any(r.get("uid") == uid for r in p["metadata"].get("ownerReferences") or [])]

    # -- Job controller ----------------------------------------------------------------------------------------
    def _failure_action(self, spec: dict, pod: dict) -> tuple[str, str]:
        """podFailurePolicy evaluation: (action, message) for a Failed pod; Count when nothing matches."""
        statuses = pod["status"].get("containerStatuses") or []
        conditions = pod["status"].get("conditions") or []
        for i, rule in enumerate((spec.get("podFailurePolicy") or {}).get("rules") or []):
            codes = rule.get("onExitCodes")
            if codes:
                for cs in statuses:
                    if codes.get("containerName") not in (None, cs["name"]):
                        continue
                    term = (cs.get("state") or {}).get("terminated")
                    if not term or term.get("exitCode", 0) == 0:
                        continue
                    hit = term["exitCode"] in codes["values"]
                    if hit == (codes["operator"] == "In"):
                        return rule["action"], (
                            f"Container {cs['name']} for pod {pod['metadata']['namespace']}/{pod['metadata']['name']} "
                            f"failed with exit code {term['exitCode']} matching {rule['action']} rule at index {i}")
            for pattern in rule.get("onPodConditions") or []:
                if any(c.get("type") == pattern["type"] and c.get("status") == pattern.get("status", "True")
                       for c in conditions):
                    return rule["action"], (
                        f"Pod {pod['metadata']['namespace']}/{pod['metadata']['name']} has condition {pattern['type']} "
                        f"matching {rule['action']} rule at index {i}")
        return "Count", ""

    def _reconcile(self, job: dict, js: _JobState) -> None:
        spec, status = job["spec"], job["status"]
        if js.finished_at is not None:
            return
        pods = self._owned_pods(job)
        blpi = spec.get("backoffLimitPerIndex")
        for pod in pods:
            uid, phase = pod["metadata"]["uid"], pod["status"].get("phase")
            if uid in js.counted or phase not in ("Succeeded", "Failed"):
                continue
            js.counted.add(uid)
            idx = int(pod["metadata"]["annotations"][INDEX_KEY])
            if phase == "Succeeded":
                js.succeeded_pods += 1
                if idx not in js.failed_indexes:
                    js.succeeded.add(idx)
            else:
                action, message = self._failure_action(spec, pod)
                if action == "Ignore":
                    js.ignored[idx] += 1
                else:
                    js.failed_pods += 1
                    if action == "FailJob":
                        js.failure = js.failure or ("PodFailurePolicy", message)
                    elif action == "FailIndex":
                        js.failed_indexes.add(idx)
                    else:
                        js.failures[idx] += 1
                        if blpi is not None:
                            if js.failures[idx] > blpi:
                                js.failed_indexes.add(idx)
                        elif js.failed_pods > spec.get("backoffLimit", 6):
                            js.failure = js.failure or ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
            fin = pod["metadata"].get("finalizers") or []
            if JOB_TRACKING_FINALIZER in fin:
                pod["metadata"]["finalizers"] = [f for f in fin if f != JOB_TRACKING_FINALIZER]
                self._emit("pods", pod, "MODIFIED")
        mfi = spec.get("maxFailedIndexes")
        if js.failure is None and mfi is not None and len(js.failed_indexes) > mfi:
            js.failure = ("MaxFailedIndexesExceeded", "Job has exceeded the specified maximal number of failed indexes")
        ads = spec.get("activeDeadlineSeconds")
        if js.failure is None and ads and time.monotonic() - js.started >= ads:
            js.failure = ("DeadlineExceeded", "Job was active longer than specified deadline")
        completions = spec["completions"]
        if js.failure is None and not js.success_met and (js.succeeded | js.failed_indexes) >= set(range(completions)):
            if js.failed_indexes:
                js.failure = ("FailedIndexes", "Job has failed indexes")
            else:
                js.success_met = True

        live = [p for p in pods if p["status"].get("phase") not in ("Succeeded", "Failed")]
        conditions = status.setdefault("conditions", []) if (js.failure or js.success_met) else status.get("conditions", [])
        if js.failure or js.success_met:
            for pod in live:
                key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
                self._delete_pod(pod, self._runtime.get(key), pod["spec"].get("terminationGracePeriodSeconds", 30))
            interim = ("FailureTarget", *js.failure) if js.failure else (
                "SuccessCriteriaMet", "CompletionsReached", "Reached expected number of succeeded pods")
            if not any(c["type"] == interim[0] for c in conditions):
                conditions.append(self._condition(*interim))
            if not live:
                final = ("Failed", *js.failure) if js.failure else (
                    "Complete", "CompletionsReached", "Reached expected number of succeeded pods")
                conditions.append(self._condition(*final))
                js.finished_at = time.monotonic()
                if not js.failure:
                    status["completionTime"] = now_str()
        elif not spec.get("suspend"):
            busy = {int(p["metadata"]["annotations"][INDEX_KEY]) for p in live}
            pending = sorted(set(range(completions)) - js.succeeded - js.failed_indexes - busy)
            room = spec.get("parallelism", 1) - len(live)
            for idx in pending[: max(room, 0)]:
                live.append(self._create_pod(job, js, idx))
        js.max_active = max(js.max_active, len(live))

        new = dict(status)
        new.setdefault("startTime", now_str())
        active = [p for p in live if not p["metadata"].get("deletionTimestamp")]
        for fld, value in (("active", len(active)), ("succeeded", js.succeeded_pods), ("failed", js.failed_pods)):
            if value:
                new[fld] = value
            else:
                new.pop(fld, None)
        new["ready"] = sum(1 for p in active if self._is_ready(p))
        new["terminating"] = sum(1 for p in live if p["metadata"].get("deletionTimestamp"))
        if js.succeeded:
            new["completedIndexes"] = index_ranges(js.succeeded)
        if blpi is not None:
            new["failedIndexes"] = index_ranges(js.failed_indexes)
        new["uncountedTerminatedPods"] = {}
        if conditions:
            new["conditions"] = conditions
        # timestamps aside, emit only real changes (a watch sees each status change once)
        fingerprint = json.dumps({k: v for k, v in new.items() if k != "startTime"}, sort_keys=True)
        job["status"] = new
        if fingerprint != js.last_status:
            js.last_status = fingerprint
            self._emit("jobs", job, "MODIFIED")

    @staticmethod
    def _condition(ctype: str, reason: str, message: str, status: str = "True") -> dict:
        t = now_str()
        return {"type": ctype, "status": status, "lastProbeTime": t, "lastTransitionTime": t,
                "reason": reason, "message": message}

    @staticmethod
    def _is_ready(pod: dict) -> bool:
        return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or [])

    def _script_for(self, index: int, attempt: int) -> PodScript:
        s = self.script
        if s is None:
            return PodScript.succeed()
        if isinstance(s, PodScript):
            return s
        if callable(s):
            return s(index, attempt) or PodScript.succeed()
        entry = s.get(index)
        if entry is None:
            return PodScript.succeed()
        if isinstance(entry, PodScript):
            return entry
        entry = list(entry)
        return entry[min(attempt, len(entry) - 1)]

    def _create_pod(self, job: dict, js: _JobState, idx: int) -> dict:
        ns, jname = job["metadata"]["namespace"], job["metadata"]["name"]
        tmpl = copy.deepcopy(job["spec"]["template"])
        meta = tmpl.get("metadata") or {}
        while True:
            name = f"{jname}-{idx}-" + "".join(random.choice(_NAME_CHARS) for _ in range(5))
            if (ns, name) not in self._objects["pods"]:
                break
        meta["name"], meta["generateName"] = name, f"{jname}-{idx}-"
        self._new_meta(meta, ns)
        meta.pop("generation", None)
        meta.setdefault("labels", {})[INDEX_KEY] = str(idx)
        ann = meta.setdefault("annotations", {})
        ann[INDEX_KEY] = str(idx)
        if job["spec"].get("backoffLimitPerIndex") is not None:
            ann["batch.kubernetes.io/job-index-failure-count"] = str(js.failures[idx])
            if js.ignored[idx]:
                ann["batch.kubernetes.io/job-index-ignored-failure-count"] = str(js.ignored[idx])
        meta["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": jname,
                                    "uid": job["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
        meta["finalizers"] = [JOB_TRACKING_FINALIZER]
        spec = tmpl["spec"]
        for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
            env = c.setdefault("env", [])
            if not any(e.get("name") == "JOB_COMPLETION_INDEX" for e in env):
                env.append({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
                    "apiVersion": "v1", "fieldPath": f"metadata.annotations['{INDEX_KEY}']"}}})
        spec.setdefault("serviceAccountName", "default")
        spec.setdefault("serviceAccount", spec["serviceAccountName"])
        spec.setdefault("enableServiceLinks", True)
        spec.setdefault("priority", 0)
        spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
        tol = spec.setdefault("tolerations", [])
        for taint in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
            if not any(t.get("key") == taint for t in tol):
                tol.append({"key": taint, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300})
        pod = {"metadata": meta, "spec": spec,
               "status": {"phase": "Pending", "qosClass": self._qos(spec)}}
        key = (ns, name)
        attempt = js.attempts[idx]
        js.attempts[idx] += 1
        self._objects["pods"][key] = pod
        self._runtime[key] = _PodRuntime(key=key, job_key=js.key, index=idx, attempt=attempt,
                                         script=self._script_for(idx, attempt))
        self._emit("pods", pod, "ADDED")
        return pod

    @staticmethod
    def _qos(spec: dict) -> str:
        any_set, guaranteed = False, True
        for c in spec.get("containers") or []:
            res = c.get("resources") or {}
            lim, req = res.get("limits") or {}, res.get("requests") or {}
            if lim or req:
                any_set = True
            for r in ("cpu", "memory"):
                if r not in lim or (r in req and str(req[r]) != str(lim[r])):
                    guaranteed = False
        if not any_set:
            return "BestEffort"
        return "Guaranteed" if guaranteed else "Burstable"

    # -- scheduler + kubelet ------------------------------------------------------------------------------------
    @staticmethod
    def _set_condition(pod: dict, ctype: str, status: str, reason: str | None = None, message: str | None = None) -> None:
        conds = pod["status"].setdefault("conditions", [])
        for c in conds:
            if c["type"] == ctype:
                if c["status"] != status:
                    c["lastTransitionTime"] = now_str()
                c["status"] = status
                for k, v in (("reason", reason), ("message", message)):
                    if v:
                        c[k] = v
                    else:
                        c.pop(k, None)
                return
        c = {"type": ctype, "status": status, "lastProbeTime": None, "lastTransitionTime": now_str()}
        if reason:
            c["reason"] = reason
        if message:
            c["message"] = message
        conds.append(c)

    def _gpus_requested(self, pod: dict, resource: str) -> int:
        total = 0
        for c in pod["spec"].get("containers") or []:
            lim = (c.get("resources") or {}).get("limits") or {}
            total += int(parse_quantity(lim.get(resource, 0)))
        return total

    def _free_gpus(self, node: Node) -> int:
        used = sum(rt.gpus for rt in self._runtime.values() if rt.node == node.name and rt.stage != "terminated")
        return node.gpus - used

    @staticmethod
    def _tolerates(tolerations: list[dict], taint: dict) -> bool:
        for t in tolerations:
            if t.get("effect") and t["effect"] != taint.get("effect"):
                continue
            if t.get("operator", "Equal") == "Exists":
                if not t.get("key") or t["key"] == taint.get("key"):
                    return True
            elif t.get("key") == taint.get("key") and t.get("value", "") == taint.get("value", ""):
                return True
        return False

    def _schedule(self, pod: dict, rt: _PodRuntime) -> None:
        spec = pod["spec"]
        reasons: collections.Counter = collections.Counter()
        chosen = None
        force = rt.script is not None and rt.script.outcome == "unschedulable"
        for node in self.nodes:
            need = self._gpus_requested(pod, node.gpu_resource)
            labels = node.all_labels()
            if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
                reasons["node(s) didn't match Pod's node affinity/selector"] += 1
                continue
            bad = next((t for t in node.taints if t.get("effect") in ("NoSchedule", "NoExecute")
                        and not self._tolerates(spec.get("tolerations") or [], t)), None)
            if bad is not None:
                reasons[f"node(s) had untolerated taint {{{bad.get('key')}: {bad.get('value', '')}}}"] += 1
                continue
            if force or self._free_gpus(node) < need:
                reasons[f"Insufficient {node.gpu_resource}"] += 1
                continue
            chosen = node
            rt.gpus = need
            break
        if chosen is None:
            n = len(self.nodes)
            detail = ", ".join(f"{count} {why}" for why, count in sorted(reasons.items()))
            message = (f"0/{n} nodes are available: {detail}. preemption: 0/{n} nodes are available: "
                       f"{n} Preemption is not helpful for scheduling.")
            old = next((c for c in pod["status"].get("conditions") or [] if c["type"] == "PodScheduled"), None)
            if old is None or old.get("message") != message:
                self._set_condition(pod, "PodScheduled", "False", "Unschedulable", message)
                self._emit("pods", pod, "MODIFIED")
            return
        rt.node = chosen.name
        spec["nodeName"] = chosen.name
        self._ip += 1
        st = pod["status"]
        st["hostIP"] = "192.0.2.10"
        st["hostIPs"] = [{"ip": "192.0.2.10"}]
        st["podIP"] = f"10.244.0.{self._ip % 250 + 2}"
        st["podIPs"] = [{"ip": st["podIP"]}]
        st["startTime"] = now_str()
        self._set_condition(pod, "PodScheduled", "True")
        self._set_condition(pod, "PodReadyToStartContainers", "True")
        self._set_condition(pod, "Initialized", "True")
        self._set_condition(pod, "Ready", "False", "ContainersNotReady", "containers with unready status: [%s]"
                            % " ".join(c["name"] for c in spec["containers"]))
        self._set_condition(pod, "ContainersReady", "False", "ContainersNotReady", "containers with unready status: [%s]"
                            % " ".join(c["name"] for c in spec["containers"]))
        st["containerStatuses"] = [self._cstatus(c, {"waiting": {"reason": "ContainerCreating"}}) for c in spec["containers"]]
        rt.stage, rt.since = "starting", time.monotonic()
        self._emit("pods", pod, "MODIFIED")

    @staticmethod
    def _cstatus(c: dict, state: dict, ready: bool = False, last: dict | None = None, started: bool = False) -> dict:
        running = "running" in state or "terminated" in state
        return {"name": c["name"], "image": c["image"],
                "imageID": f"docker.io/library/{c['name']}@sha256:{'0' * 64}" if running else "",
                "containerID": f"containerd://{uuid.uuid4().hex}{uuid.uuid4().hex}" if running else None,
                "ready": ready, "restartCount": 0, "started": started, "state": state, "lastState": last or {}}

    def _advance(self, pod: dict, rt: _PodRuntime) -> None:
        deleting = bool(pod["metadata"].get("deletionTimestamp"))
        if rt.stage == "terminated":
            if deleting:
                self._remove_pod(rt.key)
            return
        if deleting and rt.stage != "running":
            self._remove_pod(rt.key)
            return
        script = rt.script
        if rt.stage == "unscheduled":
            self._schedule(pod, rt)
            return
        if rt.stage == "starting":
            spec = pod["spec"]
            inits = spec.get("initContainers") or []
            first = (inits or spec["containers"])[0]
            if script and script.outcome == "image_pull" or first["image"] in self.bad_images:
                msg = (script.message if script and script.message else
                       f'failed to pull and unpack image "{first["image"]}": failed to resolve reference '
                       f'"{first["image"]}": {first["image"]}: not found')
                waiting = {"waiting": {"reason": "ErrImagePull", "message": f"rpc error: code = NotFound desc = {msg}"}}
                if inits:
                    pod["status"]["initContainerStatuses"] = [self._cstatus(x, copy.deepcopy(waiting) if i == 0 else
                                                                            {"waiting": {"reason": "PodInitializing"}})
                                                              for i, x in enumerate(inits)]
                    pod["status"]["containerStatuses"] = [self._cstatus(x, {"waiting": {"reason": "PodInitializing"}})
                                                          for x in spec["containers"]]
                else:
                    pod["status"]["containerStatuses"] = [self._cstatus(x, copy.deepcopy(waiting)) for x in spec["containers"]]
                rt.stage, rt.since = "image_error", time.monotonic()
                self._emit("pods", pod, "MODIFIED")
                return
            if script and script.outcome == "config_error":
                pod["status"]["containerStatuses"] = [self._cstatus(x, {"waiting": {
                    "reason": "CreateContainerConfigError", "message": script.message}}) for x in spec["containers"]]
                rt.stage = "config_error"
                self._emit("pods", pod, "MODIFIED")
                return
            if inits and self.mode == "process":
                self._set_condition(pod, "Initialized", "False", "ContainersNotInitialized",
                                    "containers with incomplete status: [%s]" % " ".join(x["name"] for x in inits))
                pod["status"]["containerStatuses"] = [self._cstatus(x, {"waiting": {"reason": "PodInitializing"}})
                                                      for x in spec["containers"]]
                rt.stage, rt.init_pos = "init", 0
                self._start_init(pod, rt)
                return
            if inits:  # script mode: init containers complete at once
                t = now_str()
                pod["status"]["initContainerStatuses"] = [self._cstatus(x, {"terminated": {
                    "exitCode": 0, "reason": "Completed", "startedAt": t, "finishedAt": t}}) for x in inits]
            self._start_main(pod, rt)
            return
        if rt.stage == "init":
            self._advance_init(pod, rt)
            return
        if rt.stage == "image_error":
            if time.monotonic() - rt.since > 0.1:
                changed = False
                for x in (pod["status"].get("initContainerStatuses") or []) + pod["status"]["containerStatuses"]:
                    if x["state"].get("waiting", {}).get("reason") == "ErrImagePull":
                        x["state"] = {"waiting": {"reason": "ImagePullBackOff",
                                                  "message": f'Back-off pulling image "{x["image"]}"'}}
                        changed = True
                if changed:
                    self._emit("pods", pod, "MODIFIED")
            return
        if rt.stage != "running":
            return
        # running
        if deleting:
            if rt.proc is None:
                self._finish_pod(pod, rt, 143, "Error", "", "Failed")
                self._remove_pod(rt.key)
                return
            if not rt.term_sent:
                self._kill(rt, signal.SIGTERM)
                rt.term_sent = True
            elif rt.delete_deadline is not None and time.monotonic() > rt.delete_deadline:
                self._kill(rt, signal.SIGKILL)
        if rt.proc is not None:
            rc = rt.proc.poll()
            if rc is None:
                return
            code = rc if rc >= 0 else 128 - rc
            self._finish_pod(pod, rt, code, "Completed" if code == 0 else "Error",
                             self._termination_message(pod, rt, code), "Succeeded" if code == 0 else "Failed")
            if deleting:
                self._remove_pod(rt.key)
            return
        if script is None or script.outcome == "hang" or time.monotonic() - rt.since < script.run_s:
            return
        out = script.outcome
        if out == "succeed":
            self._finish_pod(pod, rt, 0, "Completed", "", "Succeeded")
        elif out == "fail":
            self._finish_pod(pod, rt, script.exit_code or 1, "Error", self._termination_message(pod, rt, script.exit_code or 1), "Failed")
        elif out == "oom":
            self._finish_pod(pod, rt, 137, "OOMKilled", "", "Failed")
        elif out == "evict":
            self._set_condition(pod, "DisruptionTarget", "True", "TerminationByKubelet", script.message)
            pod["status"]["reason"], pod["status"]["message"] = "Evicted", script.message
            self._finish_pod(pod, rt, 137, "Error", "", "Failed")
        elif out == "preempt":
            self._set_condition(pod, "DisruptionTarget", "True", "PreemptionByScheduler", script.message)
            self._finish_pod(pod, rt, 143, "Error", "", "Failed")

    def _start_main(self, pod: dict, rt: _PodRuntime) -> None:
        spec, script = pod["spec"], rt.script
        c = spec["containers"][0]
        if self.mode == "process":
            try:
                self._spawn(pod, rt, c)
            except _StartError as e:
                pod["status"]["containerStatuses"] = [self._cstatus(x, {"waiting": {
                    "reason": e.reason, "message": e.message}}) for x in spec["containers"]]
                rt.stage = "config_error"
                self._emit("pods", pod, "MODIFIED")
                return
        else:
            rt.logs[c["name"]] = os.path.join(self.log_dir, f"{rt.key[0]}_{rt.key[1]}.log")
            with open(rt.logs[c["name"]], "w", encoding="utf-8") as f:
                f.write(script.log if script else "")
        rt.started_at = now_str()
        pod["status"]["phase"] = "Running"
        pod["status"]["containerStatuses"] = [self._cstatus(x, {"running": {"startedAt": rt.started_at}},
                                                            ready=True, started=True) for x in spec["containers"]]
        self._set_condition(pod, "Initialized", "True")
        self._set_condition(pod, "Ready", "True")
        self._set_condition(pod, "ContainersReady", "True")
        rt.stage, rt.since = "running", time.monotonic()
        self._emit("pods", pod, "MODIFIED")

    def _start_init(self, pod: dict, rt: _PodRuntime) -> None:
        inits = pod["spec"]["initContainers"]
        c = inits[rt.init_pos]
        try:
            self._spawn(pod, rt, c)
        except _StartError as e:
            pod["status"]["initContainerStatuses"] = [
                self._cstatus(x, {"waiting": {"reason": e.reason, "message": e.message}} if i == rt.init_pos else
                              {"waiting": {"reason": "PodInitializing"}}) for i, x in enumerate(inits)]
            rt.stage = "config_error"
            self._emit("pods", pod, "MODIFIED")
            return
        rt.started_at = now_str()
        statuses = pod["status"].get("initContainerStatuses") or [
            self._cstatus(x, {"waiting": {"reason": "PodInitializing"}}) for x in inits]
        statuses[rt.init_pos] = self._cstatus(c, {"running": {"startedAt": rt.started_at}}, started=True)
        pod["status"]["initContainerStatuses"] = statuses
        self._emit("pods", pod, "MODIFIED")

    def _advance_init(self, pod: dict, rt: _PodRuntime) -> None:
        inits = pod["spec"]["initContainers"]
        c = inits[rt.init_pos]
        rc = rt.proc.poll() if rt.proc is not None else 1
        if rc is None:
            return
        code = rc if rc >= 0 else 128 - rc
        term = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                "startedAt": rt.started_at or now_str(), "finishedAt": now_str(),
                "containerID": f"containerd://{uuid.uuid4().hex}"}
        message = self._termination_message(pod, rt, code, c)
        if message:
            term["message"] = message
        pod["status"]["initContainerStatuses"][rt.init_pos] = self._cstatus(c, {"terminated": term})
        rt.proc = None
        if code != 0:  # restartPolicy Never: the pod fails
            pod["status"]["phase"] = "Failed"
            self._set_condition(pod, "Ready", "False", "PodFailed")
            self._set_condition(pod, "ContainersReady", "False", "PodFailed")
            rt.stage = "terminated"
            self._emit("pods", pod, "MODIFIED")
            return
        rt.init_pos += 1
        if rt.init_pos < len(inits):
            self._start_init(pod, rt)
        else:
            self._start_main(pod, rt)

    def _finish_pod(self, pod: dict, rt: _PodRuntime, code: int, reason: str, message: str, phase: str) -> None:
        term = {"exitCode": code, "reason": reason, "startedAt": rt.started_at or now_str(), "finishedAt": now_str(),
                "containerID": f"containerd://{uuid.uuid4().hex}"}
        if message:
            term["message"] = message
        pod["status"]["phase"] = phase
        pod["status"]["containerStatuses"] = [self._cstatus(x, {"terminated": dict(term)}, started=False)
                                              for x in pod["spec"]["containers"]]
        why = "PodCompleted" if phase == "Succeeded" else "PodFailed"
        self._set_condition(pod, "Ready", "False", why)
        self._set_condition(pod, "ContainersReady", "False", why)
        self._set_condition(pod, "PodReadyToStartContainers", "False")
        rt.stage = "terminated"
        self._emit("pods", pod, "MODIFIED")

    def _termination_message(self, pod: dict, rt: _PodRuntime, code: int, c: dict | None = None) -> str:
        c = c or pod["spec"]["containers"][0]
        log_path = rt.logs.get(c["name"])
        if rt.root:  # a message the container wrote to its terminationMessagePath wins
            path = os.path.join(rt.root, c.get("terminationMessagePath", "/dev/termination-log").lstrip("/"))
            if os.path.isfile(path) and os.path.getsize(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    return f.read(4096)
        if code == 0 or c.get("terminationMessagePolicy") != "FallbackToLogsOnError" or not log_path:
            return ""
        try:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()[-80:]
        except OSError:
            return ""
        text = "\n".join(lines)
        return text[-2048:]

    @staticmethod
    def _kill(rt: _PodRuntime, sig: int) -> None:
        if rt.proc is None or rt.proc.poll() is not None:
            return
        try:
            os.killpg(rt.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    # -- process mode --------------------------------------------------------------------------------------------
    def _prepare_fs(self, pod: dict, rt: _PodRuntime) -> None:
        """The pod's fake root: every mountPath of every container links to a local directory."""
        spec = pod["spec"]
        root = tempfile.mkdtemp(prefix=f"pod-{pod['metadata']['name']}-", dir=self._tmp)
        rt.root = root
        rt.tmpdirs.append(root)
        volume_dirs: dict[str, str] = {}
        for vol in spec.get("volumes") or []:
            local = tempfile.mkdtemp(prefix=f"vol-{vol['name']}-", dir=self._tmp)
            rt.tmpdirs.append(local)
            volume_dirs[vol["name"]] = local
            if "secret" in vol:
                data = self._secret_data(vol["secret"].get("secretName"), vol["secret"].get("optional", False))
                for k, v in (data or {}).items():
                    with open(os.path.join(local, k), "wb") as f:
                        f.write(v.encode() if isinstance(v, str) else v)
            elif "configMap" in vol:
                cm = self.configmaps.get(vol["configMap"].get("name"))
                if cm is None and not vol["configMap"].get("optional"):
                    raise _StartError("CreateContainerConfigError", f'configmap "{vol["configMap"].get("name")}" not found')
                for k, v in (cm or {}).items():
                    with open(os.path.join(local, k), "w", encoding="utf-8") as f:
                        f.write(v)
        mapping: dict[str, str] = {}
        for c in (spec.get("initContainers") or []) + spec["containers"]:
            for m in c.get("volumeMounts") or []:
                mp = m["mountPath"]
                mapping.setdefault(mp, self.mounts.get(mp) or volume_dirs[m["name"]])
        for mp, local in self.mounts.items():
            mapping.setdefault(mp, local)
        for mp, local in sorted(mapping.items(), key=lambda kv: len(kv[0])):
            target = os.path.join(root, mp.strip("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.lexists(target):
                if os.path.isdir(target) and not os.path.islink(target) and not os.listdir(target):
                    os.rmdir(target)
                else:
                    continue
            os.symlink(os.path.abspath(local), target)
        os.makedirs(os.path.join(root, "dev"), exist_ok=True)
        rt.mapping = mapping

    def _spawn(self, pod: dict, rt: _PodRuntime, c: dict) -> None:
        """Start container ``c`` of the pod as a local process (its command, env, cwd, mounts)."""
        if rt.mapping is None:
            self._prepare_fs(pod, rt)
        root, mounted = rt.root, sorted(rt.mapping or {}, key=len, reverse=True)
        assert root is not None

        def remap(value: str) -> str:
            if not value.startswith("/"):
                return value
            for mp in mounted:
                norm = mp.rstrip("/") or "/"
                if value == norm or value.startswith(norm + "/") or norm.startswith(value.rstrip("/") + "/"):
                    return os.path.join(root, value.lstrip("/"))
            return value

        env = self._container_env(pod, c)
        container_env = env.pop("__container__")
        argv = [_expand(a, container_env) for a in (c.get("command") or []) + (c.get("args") or [])]
        if not argv:
            raise _StartError("RunContainerError", "the kube double needs an explicit container command")
        argv = [remap(a) for a in argv]
        for k in container_env:
            env[k] = remap(env[k])
        if self.rewrite_command is not None:
            argv = list(self.rewrite_command(argv))
        cwd = c.get("workingDir")
        cwd = remap(cwd) if cwd else (self.cwd or root)
        os.makedirs(cwd, exist_ok=True)
        main = c["name"] == pod["spec"]["containers"][0]["name"]
        log_path = os.path.join(self.log_dir, f"{rt.key[0]}_{rt.key[1]}" + ("" if main else f"_{c['name']}") + ".log")
        rt.logs[c["name"]] = log_path
        with open(log_path, "wb") as log:
            try:
                rt.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as e:
                raise _StartError("RunContainerError", f"failed to start container {c['name']!r}: {e}")

    def _secret_data(self, name: str | None, optional: bool) -> dict | None:
        if self.secrets is None:
            return {}
        data = self.secrets.get(name or "")
        if data is None and not optional:
            raise _StartError("CreateContainerConfigError", f'secret "{name}" not found')
        return data

    def _container_env(self, pod: dict, c: dict) -> dict[str, str]:
        env = dict(os.environ) if self.inherit_env else {}
        env.update(self.env)
        own: dict[str, str] = {}
        for ef in c.get("envFrom") or []:
            prefix = ef.get("prefix", "")
            if "configMapRef" in ef:
                ref = ef["configMapRef"]
                data = self.configmaps.get(ref.get("name"))
                if data is None and not ref.get("optional"):
                    raise _StartError("CreateContainerConfigError", f'configmap "{ref.get("name")}" not found')
            else:
                ref = ef.get("secretRef") or {}
                data = self._secret_data(ref.get("name"), ref.get("optional", False))
            for k, v in (data or {}).items():
                own[prefix + k] = v.decode() if isinstance(v, bytes) else str(v)
        for e in c.get("env") or []:
            name = e["name"]
            if "valueFrom" not in e:
                own[name] = _expand(e.get("value", ""), own)
                continue
            vf = e["valueFrom"]
            if "fieldRef" in vf:
                own[name] = self._field_ref(pod, vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                res = vf["resourceFieldRef"]["resource"]
                kind, rname = res.split(".", 1)
                q = ((c.get("resources") or {}).get(kind) or {}).get(rname, 0)
                own[name] = str(int(parse_quantity(q) / parse_quantity(vf["resourceFieldRef"].get("divisor", 1)) + 0.999999))
            elif "secretKeyRef" in vf or "configMapKeyRef" in vf:
                is_secret = "secretKeyRef" in vf
                ref = vf["secretKeyRef" if is_secret else "configMapKeyRef"]
                data = self._secret_data(ref.get("name"), ref.get("optional", False)) if is_secret \
                    else self.configmaps.get(ref.get("name"))
                if self.secrets is None and is_secret:
                    data = {ref["key"]: ""}
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    what = "secret" if is_secret else "configmap"
                    raise _StartError("CreateContainerConfigError",
                                      f'couldn\'t find key {ref["key"]} in {what.capitalize()} '
                                      f'{pod["metadata"]["namespace"]}/{ref.get("name")}')
                v = data[ref["key"]]
                own[name] = v.decode() if isinstance(v, bytes) else str(v)
        env.update(own)
        env["__container__"] = own  # type: ignore[assignment]
        return env

    @staticmethod
    def _field_ref(pod: dict, path: str) -> str:
        meta, spec, st = pod["metadata"], pod["spec"], pod["status"]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if m:
            return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
        simple = {
            "metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
            "metadata.uid": meta.get("uid"), "spec.nodeName": spec.get("nodeName"),
            "spec.serviceAccountName": spec.get("serviceAccountName"), "status.hostIP": st.get("hostIP"),
            "status.podIP": st.get("podIP"),
        }
        if path not in simple:
            raise _StartError("CreateContainerConfigError", f"unsupported fieldPath {path!r}")
        return str(simple[path] or "")


class _StartError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: known variables are replaced, $$ escapes, unknown ones stay."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, text)


def _valid_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_QUALIFIED_NAME.match(name))
