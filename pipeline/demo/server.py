"""A loopback HTTP server for the demo corpus: real sockets, real status codes, no internet.

The download stage then meets what it meets on the web (404s, 500s, HTML where an image was
expected, truncated bodies) without the demo depending on anything outside the machine.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".html": "text/html; charset=utf-8",
}
ERROR_PREFIX = "/status/500/"  # every path under here answers 500, as a failing origin would


class _Handler(BaseHTTPRequestHandler):
    """Serves plain files under ``root``; no listings, nothing outside root."""

    def __init__(self, *args, root: Path, **kwargs):
        self.root = root
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        self._respond(body=True)

    def do_HEAD(self) -> None:
        self._respond(body=False)

    def _respond(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        if path.startswith(ERROR_PREFIX):
            return self._send(500, b"internal server error\n", "text/plain", body)
        target = (self.root / path.lstrip("/")).resolve()
        # resolve() folds "..", so anything that escapes root, or is not a file, is a 404.
        if not target.is_relative_to(self.root) or not target.is_file():
            return self._send(404, b"not found\n", "text/plain", body)
        content_type = CONTENT_TYPES.get(target.suffix.lower(), "application/octet-stream")
        self._send(200, target.read_bytes(), content_type, body)

    def _send(self, status: int, data: bytes, content_type: str, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass  # one stderr line per request would drown the job's own logs


class _Server(ThreadingHTTPServer):
    # The default backlog of 5 drops connections when 16+ download threads fetch at once.
    request_queue_size = 128
    daemon_threads = True


@contextlib.contextmanager
def serve_demo(www_dir: str | Path) -> Iterator[str]:
    """Serve ``www_dir`` on 127.0.0.1 at an ephemeral port; yields ``http://127.0.0.1:PORT``."""
    root = Path(www_dir).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"demo www directory not found: {root}")
    server = _Server(("127.0.0.1", 0), partial(_Handler, root=root))
    thread = threading.Thread(target=server.serve_forever, name="demo-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
