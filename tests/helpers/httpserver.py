"""httpserver module: a real HTTP server on loopback for tests, serving files only to requests that carry the
right query parameters and headers (a pre-signed URL's token, an Authorization header), with byte ranges.

    with FileServer({"/models/w.pth": data}, query={"X-Amz-Security-Token": "t"}) as server:
        url = server.url("/models/w.pth")  # without the token: 403
"""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class FileServer:
    """Serves `files` (path -> bytes); GET and HEAD, `Range: bytes=a-b`; 403 unless every required query parameter
    and header is present with its value. `requests` records (method, path, status) of every request."""

    def __init__(self, files: dict[str, bytes], *, query: dict[str, str] | None = None,
                 headers: dict[str, str] | None = None):
        self.files, self.query, self.headers = files, dict(query or {}), dict(headers or {})
        self.requests: list[tuple[str, str, int]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_port}{path}"

    def __enter__(self) -> "FileServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _handler(server: FileServer):
    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self._answer(body=False)

        def do_GET(self):
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            parts = urlsplit(self.path)
            given = {k: v[0] for k, v in parse_qs(parts.query).items()}
            data = server.files.get(parts.path)
            if data is None:
                status = 404
            elif any(given.get(k) != v for k, v in server.query.items()) or \
                    any(self.headers.get(k) != v for k, v in server.headers.items()):
                status = 403
            else:
                status = 200
            server.requests.append((self.command, parts.path, status))
            if status != 200:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = 0, len(data) - 1
            if (rng := self.headers.get("Range", "")).startswith("bytes="):
                a, _, b = rng[len("bytes="):].partition("-")
                start, end = int(a or 0), min(int(b) if b else end, end)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            if body:
                self.wfile.write(data[start:end + 1])

        def log_message(self, *args) -> None:  # the request lines hold the token: never on the console
            pass

    return Handler
