"""What the HTTP doubles of the platforms share (tests/webknossos_double.py,
tests/catmaid_double.py): a threaded HTTP server on 127.0.0.1 (ephemeral port) that records every
request, and a JSON request handler that always answers (500 with the reason if the double itself
fails)."""

from __future__ import annotations

import json
import threading
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class DoubleServer:
    handler_class: type

    def __init__(self):
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(self.handler_class):  # type: ignore[misc, name-defined]
            double = owner

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def record(self, method: str, path: str, headers: dict, body) -> None:
        with self._lock:
            self.requests.append({"method": method, "path": path, "headers": headers, "body": body})

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class JSONHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    double: DoubleServer

    def log_message(self, fmt, *args):
        pass

    def send_json(self, status: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        return raw

    def _dispatch(self, method: str) -> None:
        raw = self.read_body() if method in ("POST", "PUT", "PATCH") else b""
        path = urllib.parse.urlsplit(self.path).path
        self.double.record(method, self.path, dict(self.headers), raw.decode("utf-8", "replace"))
        try:
            self.handle_request(method, path, raw)
        except Exception as e:  # noqa: BLE001 - a double must answer, never hang
            self.send_json(500, {"error": f"double crashed: {type(e).__name__}: {e}"})

    def do_GET(self):  # noqa: N802
        self._dispatch("GET")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def handle_request(self, method: str, path: str, raw: bytes) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


def fetch_json(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - test double, loopback only
        return json.loads(r.read().decode())
