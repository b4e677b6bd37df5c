"""A scripted HTTP server on 127.0.0.1 for endpoint clients: it answers every GET and POST
with what its state says and records what it was sent."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def scripted_server(**answer: object) -> Iterator[dict]:
    """Yields the server's state: `status`, `body` (bytes) and `location` (a Location
    header when set) say how it answers and may be changed between requests; `seen` lists
    each request's (method, path, Authorization header); `url` is its /score URL."""
    state: dict = {"status": 200, "body": b"", "location": None, **answer, "seen": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            state["seen"].append((self.command, self.path, self.headers.get("Authorization")))
            self.send_response(state["status"])
            if state["location"]:
                self.send_header("Location", state["location"])
            self.send_header("Content-Length", str(len(state["body"])))
            self.end_headers()
            self.wfile.write(state["body"])

        do_POST = do_GET = _answer  # noqa: N815 - a followed redirect arrives as a GET

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/score"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
