"""The narrow slice of the Kubernetes API the executor uses, and its implementation on the official client.

Five calls, all in one namespace, all on plain JSON objects (camelCase keys, as ``kubectl get -o
json`` prints them): create/read/delete a ``batch/v1`` Job, list Jobs and list Pods by label
selector. Anything that speaks these five calls can stand in for a cluster (tests/kube_double.py).
deploy/base/rbac.yaml grants exactly these verbs and nothing else.
"""

from __future__ import annotations

import json
from typing import Any, Protocol


class KubernetesExecutorError(RuntimeError):
    """The cluster refused or failed an operation; the message says why in plain words."""


class ApiError(Exception):
    """The API server refused a call: HTTP ``status``, the Status ``reason`` and its message."""

    def __init__(self, status: int, reason: str = "", message: str = ""):
        self.status, self.reason, self.message = status, reason, message
        super().__init__(f"{status} {reason}: {message}".strip())


class KubeApi(Protocol):
    """What the executor calls (verbs: jobs create/get/list/delete, pods list)."""

    def create_job(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST the Job; ApiError 409 AlreadyExists when the name is taken, 422 Invalid, 403 Forbidden."""

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Job, or None when there is none (404)."""

    def delete_job(self, namespace: str, name: str, propagation: str) -> bool:
        """Delete the Job with ``propagationPolicy``; False when there was none (404)."""

    def list_jobs(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """The Jobs matching the selector."""

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """The Pods matching the selector."""


def load_api_client(kubeconfig: str | None = None, context: str | None = None, prefer_incluster: bool = True):
    """An official ``ApiClient`` from the in-cluster service account, else a kubeconfig file."""
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


def _api_error(exc: Exception) -> ApiError:
    body = getattr(exc, "body", None)
    try:
        data = json.loads(body) if body else {}
    except (TypeError, ValueError):
        data = {}
    status = int(getattr(exc, "status", 0) or 0)
    if isinstance(data, dict) and data.get("message"):
        return ApiError(status, str(data.get("reason") or ""), str(data["message"]))
    return ApiError(status, str(getattr(exc, "reason", "") or ""), str(exc))


class ClientApi:
    """:class:`KubeApi` on the official ``kubernetes`` client (BatchV1Api, CoreV1Api)."""

    def __init__(self, api_client=None):
        from kubernetes import client

        self.api_client = api_client if api_client is not None else load_api_client()
        self.batch = client.BatchV1Api(self.api_client)
        self.core = client.CoreV1Api(self.api_client)

    def _plain(self, obj) -> Any:
        return self.api_client.sanitize_for_serialization(obj)

    def create_job(self, namespace, body):
        from kubernetes.client.rest import ApiException

        try:
            return self._plain(self.batch.create_namespaced_job(namespace, body))
        except ApiException as e:
            raise _api_error(e) from e

    def read_job(self, namespace, name):
        from kubernetes.client.rest import ApiException

        try:
            return self._plain(self.batch.read_namespaced_job(name, namespace))
        except ApiException as e:
            if e.status == 404:
                return None
            raise _api_error(e) from e

    def delete_job(self, namespace, name, propagation):
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy=propagation,
                                             body=client.V1DeleteOptions(propagation_policy=propagation))
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise _api_error(e) from e

    def list_jobs(self, namespace, label_selector):
        from kubernetes.client.rest import ApiException

        try:
            return self._plain(self.batch.list_namespaced_job(namespace, label_selector=label_selector).items)
        except ApiException as e:
            raise _api_error(e) from e

    def list_pods(self, namespace, label_selector):
        from kubernetes.client.rest import ApiException

        try:
            return self._plain(self.core.list_namespaced_pod(namespace, label_selector=label_selector).items)
        except ApiException as e:
            raise _api_error(e) from e
