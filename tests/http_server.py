"""A local HTTP file server for download tests (127.0.0.1, a daemon thread, bounded by a context manager).

``serve(files)`` serves ``{path: bytes}``; it honours ``Range: bytes=N-`` requests (HTTP 206, or 416 when
nothing is left) unless ``server.ignore_range`` is set, records every ``(path, Range header)`` in
``server.requests``, and cuts the next response of a path listed in ``server.cut`` after that many body
bytes (with the full ``Content-Length``: a truncated transfer). ``closed_port_url()`` is a URL nothing
listens on (an offline server).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["serve", "closed_port_url"]


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server API)
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        data = server.files.get(self.path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        header = self.headers.get("Range")
        if header and not server.ignore_range:
            start = int(header.removeprefix("bytes=").rstrip("-"))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = server.cut.pop(self.path, None)
        self.wfile.write(body if cut is None else body[:cut])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):  # keep pytest output quiet
        pass


@contextlib.contextmanager
def serve(files: Mapping[str, bytes]) -> Iterator[ThreadingHTTPServer]:
    """Serve ``files`` on a free port of 127.0.0.1; yields the server (``url``, ``requests``, ``cut``, ``ignore_range``)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.files, server.requests, server.cut, server.ignore_range = dict(files), [], {}, False
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def closed_port_url(name: str = "file.bin") -> str:
    """``http://127.0.0.1:<port>/<name>`` for a port that was free a moment ago (nothing listens there)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"
