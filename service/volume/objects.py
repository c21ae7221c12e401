"""Atomic object stores under the ledger: create-if-absent and read-modify-write of small
objects, over local files, memory://, S3 (conditional writes), GCS (generation preconditions)
or any fsspec store. Which class serves a URL is decided by its backend in stores.py
(``stores.open_store``).

Every back-end implements the same interface (``read``, ``read_many``, ``list``, ``create``,
``update``, ``guarantee``) and is tested by one contract test run over all of them.

Concurrency guarantees depend on the store (see ``Ledger.lease_guarantee``):

* local files (``file://`` or a plain path): new objects are published with
  ``os.link`` of a complete temp file (atomic exclusive create); every
  read-modify-write (state changes, lease takeover/renew/release) runs under an
  ``fcntl.flock`` on ``jobs/{job_id}/.lock`` and replaces files with
  write-temp + ``os.replace``. Exact between threads and processes on one host
  and on network filesystems whose locks work (NFSv4).
* S3 and S3-compatible stores: conditional PUT (``If-None-Match: *`` to
  create, ``If-Match: <etag>`` to replace) and conditional DELETE, probed once
  per ledger. Exact when the server enforces the conditions.
* GCS: ``ifGenerationMatch`` on upload (0 to create, the read generation to replace) and on
  delete, probed once per ledger like S3's. Exact when the server enforces them (GCS does).
* S3 or GCS without conditional writes, and other fsspec stores: write, wait
  ``settle_s``, read back and confirm. Two writers can both win when one reads
  before the other's write and writes after the other's read-back; use it only
  where a duplicated block is acceptable (blocks are idempotent).
* ``memory://``: read-modify-write under a process-wide lock (exact in one
  process; the store is process-local anyway).

Lease expiry compares wall-clock times written by different hosts, so clocks
must be roughly in sync (well under the lease TTL).
"""
from __future__ import annotations

import contextlib
import errno
import os
import random
import threading
import time
import uuid
from typing import Callable, Iterable, Protocol

import fsspec.asyn


__all__ = ["AtomicStore", "KEEP", "DELETE"]


class AtomicStore(Protocol):
    """What the ledger needs from a store (keys are '/'-separated relative paths)."""
    guarantee: str

    def read(self, key: str) -> bytes | None: ...
    def read_many(self, keys: Iterable[str]) -> dict[str, bytes]: ...
    def list(self, dir_key: str) -> list[str]: ...
    def create(self, key: str, data: bytes, lock_key: str) -> bool: ...
    def update(self, key: str, fn: Callable, lock_key: str) -> bool: ...



KEEP = object()     # update(): leave the object as it is
DELETE = object()   # update(): remove the object


class _FsStore:
    """Generic fsspec store: weak read-modify-write (write, settle, read back)."""

    guarantee = "best-effort"
    _locks: dict = {}
    _locks_guard = threading.Lock()

    def __init__(self, fs, root: str, settle_s: float):
        self.fs = fs
        self.root = root.rstrip("/")
        self.settle_s = settle_s
        with self._locks_guard:  # one lock per store root shared by ledgers of this process
            self._lock = self._locks.setdefault((type(fs).__name__, self.root), threading.RLock())

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def read(self, key: str) -> bytes | None:
        try:
            data = self.fs.cat_file(self.path(key))
        except FileNotFoundError:
            return None
        return data or None   # an empty object is a deleted one (tombstone)

    def read_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        keys = list(keys)
        if not keys:
            return {}
        paths = {self.path(k): k for k in keys}
        got = self.fs.cat(list(paths), on_error="omit")
        out = {}
        for p, data in got.items():
            k = paths.get(p) or paths.get(self.fs._strip_protocol(p))
            if k is not None and isinstance(data, bytes) and data:
                out[k] = data
        return out

    def list(self, dir_key: str) -> list[str]:
        path = self.path(dir_key)
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]

    def _put(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self.path(key), data)

    def create(self, key: str, data: bytes, lock_key: str) -> bool:
        with self._lock:
            if self.read(key) is not None:
                return False
            self._put(key, data)
            return self._confirm(key, data)

    def update(self, key: str, fn: Callable, lock_key: str) -> bool:
        with self._lock:
            for _ in range(20):
                old = self.read(key)
                new = fn(old)
                if new is KEEP:
                    return False
                if new is DELETE:
                    if old is not None:
                        self._put(key, b"")
                    return True
                self._put(key, new)
                if self._confirm(key, new):
                    return True
            raise TimeoutError(f"ledger object {key} kept changing under concurrent writers")

    def _confirm(self, key: str, data: bytes) -> bool:
        if self.settle_s:
            time.sleep(self.settle_s)
        return self.read(key) == data


class _MemoryStore(_FsStore):
    """memory:// store: exact under a process-wide lock."""

    guarantee = "process-lock"

    def _confirm(self, key: str, data: bytes) -> bool:
        return True


class _LocalStore:
    """Local files: atomic exclusive create (link), flock'd read-modify-write."""

    guarantee = "local-lock"

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)

    def path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/"))

    def read(self, key: str) -> bytes | None:
        try:
            with open(self.path(key), "rb") as f:
                return f.read() or None
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        out = {}
        for k in keys:
            data = self.read(k)
            if data is not None:
                out[k] = data
        return out

    def list(self, dir_key: str) -> list[str]:
        try:
            return [n for n in os.listdir(self.path(dir_key)) if not n.startswith(".")]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _temp(self, final: str, data: bytes) -> str:
        d, name = os.path.split(final)
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".{name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _write(self, key: str, data: bytes) -> None:
        final = self.path(key)
        tmp = self._temp(final, data)
        try:
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _flock(self, lock_key: str):
        import fcntl
        path = self.path(lock_key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor drops the lock

    def create(self, key: str, data: bytes, lock_key: str) -> bool:
        final = self.path(key)
        tmp = self._temp(final, data)
        try:
            os.link(tmp, final)  # fails if final exists; readers never see a partial file
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP,
                                 errno.EMLINK, errno.EXDEV):
                raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        # No hard links here: exclusive create under the lock, so locked
        # readers never see the file half-written.
        with self._flock(lock_key):
            try:
                fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True

    def update(self, key: str, fn: Callable, lock_key: str) -> bool:
        with self._flock(lock_key):
            old = self.read(key)
            new = fn(old)
            if new is KEEP:
                return False
            if new is DELETE:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path(key))
                return True
            self._write(key, new)
            return True


def _s3_conflict(exc: BaseException) -> bool:
    """True when an S3 error means a failed condition (someone else wrote first)."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    resp = getattr(cause, "response", None) or {}
    code = (resp.get("Error") or {}).get("Code")
    status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
        return True
    if code is None and status is None:
        return isinstance(exc, FileExistsError)
    return status in (409, 412)


class _ConditionalStore(_FsStore):
    """An object store whose atomic create/replace uses the server's preconditions when it
    enforces them (probed once, on first use; ``conditional`` given: no probe), else the
    lock-file protocol of _FsStore. Subclasses name ``GUARANTEE`` and implement ``_probe`` (whether
    conditional writes are refused on a wrong precondition; it sets ``_conditional_delete``)."""

    GUARANTEE = ""

    def __init__(self, fs, root: str, settle_s: float, conditional: bool | None):
        super().__init__(fs, root, settle_s)
        self._conditional = conditional
        self._conditional_delete = conditional
        self._probe_lock = threading.Lock()

    @property
    def guarantee(self) -> str:  # type: ignore[override]
        return self.GUARANTEE if self._cond() else "best-effort"

    def _cond(self) -> bool:
        if self._conditional is None:
            with self._probe_lock:
                if self._conditional is None:
                    self._conditional = self._probe()
        return bool(self._conditional)

    def _probe(self) -> bool:
        raise NotImplementedError


class _S3Store(_ConditionalStore):
    """S3 through s3fs: conditional PUT/DELETE when the server enforces them."""

    GUARANTEE = "s3-conditional"

    def _bk(self, key: str) -> tuple[str, str]:
        bucket, k, _ = self.fs.split_path(self.path(key))
        return bucket, k

    def _call(self, method: str, key: str, **kw):
        bucket, k = self._bk(key)
        return self.fs.call_s3(method, Bucket=bucket, Key=k, **kw)

    def list(self, dir_key: str) -> list[str]:
        try:
            entries = self.fs.ls(self.path(dir_key), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]

    def _get(self, key: str) -> tuple[bytes | None, str | None]:
        """(data, etag); data None when missing or a tombstone."""
        bucket, k = self._bk(key)
        fs = self.fs

        async def go():
            try:
                resp = await fs._call_s3("get_object", Bucket=bucket, Key=k)
            except FileNotFoundError:
                return None, None
            try:
                body = await resp["Body"].read()
            finally:
                resp["Body"].close()
            return body, resp.get("ETag")

        data, etag = fsspec.asyn.sync(fs.loop, go)
        return (data or None), etag

    def _probe(self) -> bool:
        """Check once whether the server enforces If-None-Match / If-Match."""
        key = f"_probe/{uuid.uuid4().hex}"
        wrong = '"00000000000000000000000000000000"'

        def refused(method: str, **kw) -> bool:
            try:
                self._call(method, key, **kw)
            except Exception as exc:  # noqa: BLE001 - any refusal counts
                return _s3_conflict(exc)
            return False

        self._call("put_object", key, Body=b"probe")
        try:
            create_ok = refused("put_object", Body=b"x", IfNoneMatch="*")
            replace_ok = refused("put_object", Body=b"x", IfMatch=wrong)
            delete_ok = refused("delete_object", IfMatch=wrong)
        finally:
            with contextlib.suppress(Exception):
                self._call("delete_object", key)
        self._conditional_delete = create_ok and replace_ok and delete_ok
        return create_ok and replace_ok

    def create(self, key: str, data: bytes, lock_key: str) -> bool:
        if not self._cond():
            return super().create(key, data, lock_key)
        try:
            self._call("put_object", key, Body=data, IfNoneMatch="*")
            return True
        except Exception as exc:  # noqa: BLE001
            if not _s3_conflict(exc):
                raise
            # a retried PUT may have hit its own first write
            old, _ = self._get(key)
            if old == data:
                return True
            if old is not None:
                return False
        # a tombstone is there: replace it conditionally
        return self.update(key, lambda old: data if old is None else KEEP, lock_key)

    def update(self, key: str, fn: Callable, lock_key: str) -> bool:
        if not self._cond():
            return super().update(key, fn, lock_key)
        for attempt in range(50):
            old, etag = self._get(key)
            new = fn(old)
            if new is KEEP:
                return False
            try:
                if new is DELETE:
                    if old is None:
                        return True
                    if self._conditional_delete:
                        self._call("delete_object", key, IfMatch=etag)
                    else:
                        self._call("put_object", key, Body=b"", IfMatch=etag)
                elif etag is None:
                    self._call("put_object", key, Body=new, IfNoneMatch="*")
                else:
                    self._call("put_object", key, Body=new, IfMatch=etag)
                self.fs.invalidate_cache(self.path(key))
                return True
            except Exception as exc:  # noqa: BLE001
                if not _s3_conflict(exc):
                    raise
            time.sleep(random.uniform(0, min(0.5, 0.01 * 2 ** attempt)))
        raise TimeoutError(f"ledger object {key} kept changing under concurrent writers")
