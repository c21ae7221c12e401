"""A small static file server with CORS, for ``file://`` Precomputed layers.

Neuroglancer (and other browser viewers) cannot read ``file://``; this server publishes layer
directories over ``http://127.0.0.1:PORT/<name>/…`` with ``Access-Control-Allow-Origin`` so a
viewer page served from another origin can fetch them. cloud-volume stores chunks gzip-compressed
as ``<chunk>.gz``: a request for ``<chunk>`` is answered from ``<chunk>.gz`` with
``Content-Encoding: gzip`` (what Neuroglancer expects from a web server). Responses are not cached
(``Cache-Control: no-store``) so blocks written by a running job show up on reload.
"""

from __future__ import annotations

import mimetypes
import os
import posixpath
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["StaticFileServer"]


class _Handler(BaseHTTPRequestHandler):
    server_version = "emrestore-static/1"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet
        pass

    # -------------------------------------------------------------- helpers
    def _cors(self) -> None:
        origin = self.headers.get("Origin")
        allowed = self.server.allow_origin  # type: ignore[attr-defined]
        if allowed == "*" or not origin:
            self.send_header("Access-Control-Allow-Origin", "*")
        elif origin in allowed:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Range, Content-Type")
        self.send_header("Access-Control-Expose-Headers", "Content-Length, Content-Range, Content-Encoding")

    def _resolve(self) -> tuple[str | None, bool]:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        parts = [p for p in posixpath.normpath(path).split("/") if p and p not in (".", "..")]
        if not parts:
            return None, False
        mounts = self.server.mounts  # type: ignore[attr-defined]
        root = mounts.get(parts[0])
        if root is None:
            return None, False
        full = os.path.realpath(os.path.join(root, *parts[1:]))
        if not (full == root or full.startswith(root + os.sep)):
            return None, False
        if os.path.isfile(full):
            return full, False
        if os.path.isfile(full + ".gz"):
            return full + ".gz", True
        return None, False

    def _send_error(self, code: int, text: str) -> None:
        body = text.encode()
        self.send_response(code)
        self._cors()
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # -------------------------------------------------------------- verbs
    def do_OPTIONS(self):  # noqa: N802
        self.send_response(HTTPStatus.NO_CONTENT)
        self._cors()
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):  # noqa: N802
        full, gz = self._resolve()
        if full is None:
            self._send_error(404, "not found")
            return
        try:
            with open(full, "rb") as f:
                data = f.read()
        except OSError:
            self._send_error(404, "not found")
            return
        rng = self._range(len(data)) if not gz else None
        if rng == "bad":
            self._send_error(416, "range not satisfiable")
            return
        self.send_response(206 if rng else 200)
        self._cors()
        if rng:  # sharded layers: Neuroglancer reads shard indexes and chunks by byte range
            self.send_header("Content-Range", f"bytes {rng[0]}-{rng[1] - 1}/{len(data)}")
            data = data[rng[0]:rng[1]]
        name = full[:-3] if gz else full
        ctype = "application/json" if os.path.basename(name) in ("info", "provenance") else (
            mimetypes.guess_type(name)[0] or "application/octet-stream")
        self.send_header("Content-Type", ctype)
        if gz:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_HEAD = do_GET  # noqa: N815

    def _range(self, size: int):
        """(start, stop) of a single ``Range: bytes=a-b`` (or ``bytes=-n``), None without one,
        "bad" when it lies outside the file."""
        h = self.headers.get("Range", "")
        if not h.startswith("bytes=") or "," in h:
            return None
        a, _, b = h[6:].strip().partition("-")
        try:
            if a == "":
                start, stop = max(0, size - int(b)), size
            else:
                start, stop = int(a), (int(b) + 1 if b else size)
        except ValueError:
            return None
        stop = min(stop, size)
        return (start, stop) if 0 <= start < stop else "bad"


class StaticFileServer:
    """Serve directories under names: ``srv.add("src", "/data/src")`` → ``http://127.0.0.1:PORT/src/``.

    ``allow_origin``: ``"*"`` or a list of origins. Runs in a daemon thread until :meth:`close`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, allow_origin="*"):
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.mounts = {}  # type: ignore[attr-defined]
        self._httpd.allow_origin = allow_origin if allow_origin == "*" else set(allow_origin)  # type: ignore[attr-defined]
        self.host = host
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True, name="emrestore-static")
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def add(self, name: str, directory: str) -> str:
        """Publish ``directory`` as ``/<name>/``; returns its http URL."""
        name = name.strip("/")
        if not name or "/" in name:
            raise ValueError(f"mount name {name!r} must be one path segment")
        self._httpd.mounts[name] = os.path.realpath(directory)  # type: ignore[attr-defined]
        return f"{self.base_url}/{name}"

    def url_for_path(self, path: str) -> str | None:
        """The http URL of a local path below a published directory (None if not published)."""
        real = os.path.realpath(path)
        for name, root in self._httpd.mounts.items():  # type: ignore[attr-defined]
            if real == root or real.startswith(root + os.sep):
                rel = os.path.relpath(real, root)
                return f"{self.base_url}/{name}" + ("" if rel == "." else "/" + rel.replace(os.sep, "/"))
        return None

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "StaticFileServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
