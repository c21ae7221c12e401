"""The model registry: resolves model names inside the server's model directory and caches
loaded models (the cutout path keeps one copy per model in memory)."""

from __future__ import annotations

import threading

from ..engine.model import RestorationModel, list_models, read_metadata
from ..errors import RequestError


class ModelRegistry:
    def __init__(self, models_dir: str | None = None):
        self.models_dir = models_dir
        self._models: dict[str, RestorationModel] = {}
        self._lock = threading.Lock()

    def resolve(self, name_or_url: str, field: str = "model") -> str:
        """The URL of a model given by URL or by name (a directory below the model directory)."""
        if "://" in name_or_url or name_or_url.startswith("/"):
            return name_or_url
        if self.models_dir is None:
            raise RequestError(field, f"{name_or_url[:200]!r} is not a URL and the server has no model directory")
        return self.models_dir.rstrip("/") + "/" + name_or_url

    def list(self) -> list[dict]:
        return list_models(self.models_dir) if self.models_dir else []

    def describe(self, name_or_url: str) -> dict:
        url = self.resolve(name_or_url)
        meta = read_metadata(url)
        meta["url"] = url
        return meta

    def metadata(self, url: str) -> dict:
        return read_metadata(url)

    def load(self, url: str) -> RestorationModel:
        with self._lock:
            if url not in self._models:
                self._models[url] = RestorationModel.load(url)
            return self._models[url]
