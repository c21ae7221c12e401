"""The model registry: resolves model names inside the server's model directory and caches
loaded models (the cutout path keeps one copy per model in memory)."""

from __future__ import annotations

import re
import threading

from ..engine.model import ModelError, RestorationModel, list_models, read_metadata
from ..errors import EmrestoreError, quote
from ..volume.stores import translate_store_error

#: A model name: one directory below the model directory (no '/', no '..').
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ModelRegistry:
    def __init__(self, models_dir: str | None = None):
        self.models_dir = models_dir
        self._models: dict[str, RestorationModel] = {}
        self._lock = threading.Lock()

    def resolve(self, name_or_url: str, field: str = "model") -> str:
        """The URL of a model given by URL or by name (a directory right below the model
        directory; names never escape it). URLs are checked against the store policy by the
        manager."""
        if not isinstance(name_or_url, str) or not name_or_url.strip():
            raise EmrestoreError(field, "required: a model name or URL")
        if "://" in name_or_url or name_or_url.startswith("/"):
            return name_or_url
        if not _NAME_RE.match(name_or_url) or ".." in name_or_url:
            raise EmrestoreError(field, f"{quote(name_or_url)} is not a model name (letters, digits and '_.-', "
                                      "at most 128, no '/' or '..') nor a URL")
        if self.models_dir is None:
            raise EmrestoreError(field, f"{quote(name_or_url)} is not a URL and the server has no model directory")
        return self.models_dir.rstrip("/") + "/" + name_or_url

    def list(self) -> list[dict]:
        return list_models(self.models_dir) if self.models_dir else []

    def describe(self, name_or_url: str) -> dict:
        url = self.resolve(name_or_url)
        meta = self.metadata(url)
        meta["url"] = url
        return meta

    def metadata(self, url: str, field: str = "model") -> dict:
        """model.json of the model at ``url``; store failures as UNAVAILABLE / PERMISSION_DENIED /
        NOT_FOUND naming ``field`` (never INTERNAL)."""
        return _translated(read_metadata, url, field)

    def load(self, url: str) -> RestorationModel:
        with self._lock:
            if url not in self._models:
                self._models[url] = _translated(RestorationModel.load, url, "model")
            return self._models[url]


def _translated(fn, url: str, field: str):
    try:
        return fn(url)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - store errors get their status, the rest propagates
        known = translate_store_error(e, quote(url), field)
        if known is None:
            raise
        raise known from None
