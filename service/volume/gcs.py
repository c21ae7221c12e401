"""gs:// for models and the ledger: a small fsspec filesystem over google-cloud-storage, and the
ledger's atomic store over it (generation preconditions: exact leases).

Precomputed layers on gs:// go through cloud-volume and cloud-files, which use the same client
library; this module serves what fsspec served before (model directories, ledger objects,
probes) without gcsfs. Only single-object JSON API calls are made — GET (whole or a byte range),
upload, DELETE, object metadata, listing with a delimiter — never the batch endpoint
(``/batch/storage/v1``), which emulators such as fake-gcs-server do not speak (cloud-files'
``exists`` batches its requests: that was the "Bad response: not multi-part" at submission).

Credentials: with ``$STORAGE_EMULATOR_HOST`` set (an emulator) none; else cloud-volume's
``secrets/google-secret.json`` when present (the same account cloud-volume uses), else the
application default credentials.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import threading
import time
import uuid
from typing import Callable

import fsspec

from .objects import DELETE, KEEP, _ConditionalStore

__all__ = ["GCSFileSystem", "GCSStore", "PreconditionFailed"]


class PreconditionFailed(Exception):
    """A conditional write or delete found another generation (someone else wrote first)."""


_CLIENT = None
_CLIENT_LOCK = threading.Lock()
_CLIENT_KEY = None


def _client():
    """One client per process (a forked worker makes its own) and per emulator address."""
    global _CLIENT, _CLIENT_KEY
    from google.cloud import storage

    key = (os.getpid(), os.environ.get("STORAGE_EMULATOR_HOST"))
    with _CLIENT_LOCK:
        if _CLIENT is None or _CLIENT_KEY != key:
            if key[1]:
                _CLIENT = storage.Client(project="emrestore")  # anonymous against an emulator
            else:
                from cloudfiles.secrets import secretpath
                path = secretpath("google-secret.json")
                if os.path.exists(path):
                    _CLIENT = storage.Client.from_service_account_json(path)
                else:
                    _CLIENT = storage.Client()
            _CLIENT_KEY = key
        return _CLIENT


class _WriteBuffer(io.BytesIO):
    def __init__(self, fs: "GCSFileSystem", path: str):
        super().__init__()
        self._fs, self._path = fs, path

    def close(self):
        if not self.closed:
            self._fs.pipe_file(self._path, self.getvalue())
        super().close()


class GCSFileSystem(fsspec.AbstractFileSystem):
    """``gs://bucket/key`` as an fsspec filesystem (paths are ``bucket/key``)."""

    protocol = ("gs", "gcs")
    root_marker = ""
    cachable = False

    def __init__(self, fail_fast: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.fail_fast = fail_fast

    @property
    def _opts(self) -> dict:
        if not self.fail_fast:
            return {}
        return {"timeout": (3, 10), "retry": None}

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for p in ("gs://", "gcs://"):
            if path.startswith(p):
                path = path[len(p):]
        return path.rstrip("/")

    def _blob(self, path: str):
        bucket, _, key = self._strip_protocol(path).partition("/")
        return _client().bucket(bucket).blob(key)

    # -- reading
    def cat_file(self, path, start=None, end=None, **kwargs) -> bytes:
        from google.api_core.exceptions import NotFound
        blob = self._blob(path)
        try:
            return blob.download_as_bytes(start=start, end=None if end is None else end - 1, checksum=None,
                                          **self._opts)
        except NotFound:
            raise FileNotFoundError(path) from None

    def read_generation(self, path) -> tuple[bytes | None, int | None]:
        """(data, generation) of an object, (None, None) when it does not exist."""
        from google.api_core.exceptions import NotFound
        blob = self._blob(path)
        try:
            data = blob.download_as_bytes(checksum=None, **self._opts)
        except NotFound:
            return None, None
        return data, blob.generation

    def info(self, path, **kwargs) -> dict:
        path = self._strip_protocol(path)
        bucket, _, key = path.partition("/")
        blob = _client().bucket(bucket).get_blob(key, **self._opts) if key else None
        if blob is not None:
            return {"name": path, "size": blob.size, "type": "file", "generation": blob.generation}
        prefix = f"{key}/" if key else ""
        it = _client().list_blobs(bucket, prefix=prefix, max_results=1, **self._opts)
        if next(iter(it), None) is not None:
            return {"name": path, "size": 0, "type": "directory"}
        raise FileNotFoundError(path)

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        bucket, _, key = path.partition("/")
        prefix = f"{key}/" if key else ""
        it = _client().list_blobs(bucket, prefix=prefix, delimiter="/", **self._opts)
        out = [{"name": f"{bucket}/{b.name}", "size": b.size, "type": "file"} for b in it if b.name != prefix]
        out += [{"name": f"{bucket}/{p.rstrip('/')}", "size": 0, "type": "directory"} for p in sorted(it.prefixes)]
        if not out and not key:
            return []
        if not out:
            raise FileNotFoundError(path)
        return out if detail else [e["name"] for e in out]

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode:
            return io.BytesIO(self.cat_file(path))
        return _WriteBuffer(self, self._strip_protocol(path))

    # -- writing
    def pipe_file(self, path, value, **kwargs) -> None:
        self._blob(path).upload_from_string(bytes(value), content_type="application/octet-stream", **self._opts)

    def write_if_generation(self, path, data: bytes, generation: int) -> None:
        """Upload only when the object's generation is ``generation`` (0: only when absent);
        PreconditionFailed otherwise."""
        from google.api_core.exceptions import PreconditionFailed as _Failed
        try:
            self._blob(path).upload_from_string(bytes(data), content_type="application/octet-stream",
                                                if_generation_match=int(generation))
        except _Failed as exc:
            raise PreconditionFailed(path) from exc

    def delete_if_generation(self, path, generation: int) -> None:
        from google.api_core.exceptions import NotFound
        from google.api_core.exceptions import PreconditionFailed as _Failed
        try:
            self._blob(path).delete(if_generation_match=int(generation))
        except (_Failed, NotFound) as exc:
            raise PreconditionFailed(path) from exc

    def rm_file(self, path) -> None:
        from google.api_core.exceptions import NotFound
        try:
            self._blob(path).delete()
        except NotFound:
            raise FileNotFoundError(path) from None

    def _rm(self, path):
        self.rm_file(path)

    def mkdir(self, path, create_parents=True, **kwargs):
        pass  # object stores have no directories

    def makedirs(self, path, exist_ok=False):
        pass

    def invalidate_cache(self, path=None):
        pass


class GCSStore(_ConditionalStore):
    """GCS through gcs.GCSFileSystem: generation preconditions when the server enforces them."""

    GUARANTEE = "gcs-conditional"

    def _probe(self) -> bool:
        """Check once whether the server refuses writes (and deletes) on a wrong generation;
        where only deletes are not checked (fake-gcs-server), deletions write tombstones."""
        path = self.path(f"_probe/{uuid.uuid4().hex}")
        self.fs.pipe_file(path, b"probe")
        _, gen = self.fs.read_generation(path)

        def refused(fn) -> bool:
            try:
                fn()
            except PreconditionFailed:
                return True
            return False

        writes = (refused(lambda: self.fs.write_if_generation(path, b"x", 0))
                  and refused(lambda: self.fs.write_if_generation(path, b"x", int(gen) + 12345)))
        self._conditional_delete = writes and refused(lambda: self.fs.delete_if_generation(path, int(gen) + 12345))
        with contextlib.suppress(Exception):
            self.fs.rm_file(path)
        return writes

    def read(self, key: str) -> bytes | None:
        return self.fs.read_generation(self.path(key))[0] or None

    def create(self, key: str, data: bytes, lock_key: str) -> bool:
        if not self._cond():
            return super().create(key, data, lock_key)
        try:
            self.fs.write_if_generation(self.path(key), data, 0)
            return True
        except PreconditionFailed:
            old = self.read(key)
            if old is not None:
                return old == data  # a retried upload may have hit its own first write
        # a tombstone is there: replace it conditionally
        return self.update(key, lambda old: data if old is None else KEEP, lock_key)

    def update(self, key: str, fn: Callable, lock_key: str) -> bool:
        if not self._cond():
            return super().update(key, fn, lock_key)
        for attempt in range(50):
            old, gen = self.fs.read_generation(self.path(key))
            old = old or None
            new = fn(old)
            if new is KEEP:
                return False
            try:
                if new is DELETE:
                    if old is None:
                        return True
                    if self._conditional_delete:
                        self.fs.delete_if_generation(self.path(key), gen)
                    else:  # a tombstone (an empty object), written on the generation read
                        self.fs.write_if_generation(self.path(key), b"", gen)
                    return True
                self.fs.write_if_generation(self.path(key), new, gen or 0)
                return True
            except PreconditionFailed:
                time.sleep(random.uniform(0, min(0.5, 0.01 * 2 ** attempt)))
        raise TimeoutError(f"ledger object {key} kept changing under concurrent writers")
