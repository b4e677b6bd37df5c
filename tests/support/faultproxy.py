"""A fault-injecting HTTP proxy for an S3 endpoint on loopback (tests only).

`FaultProxy(upstream)` listens on 127.0.0.1 and forwards every request to `upstream` (the
moto server), but a seeded schedule makes some requests fail the way S3 and networks do:

- `error500`   500 InternalError with an S3 XML error body; the request never reaches S3
- `slowdown`   503 SlowDown (S3's throttling reply), not forwarded
- `reset`      forwarded, then the connection is reset: a response with a body is cut off
               mid-body (half the bytes, then RST); a bodyless one is never answered, so
               the client cannot know whether its PUT landed
- `delay`      forwarded after a pause (`delay_s`)
- `part_fail`  an UploadPart request (multipart) answered 500, not forwarded

The schedule is a `random.Random(seed)` drawn once per request, in arrival order. It is
bounded: at most `max_faults` faults in all, and never more than `max_consecutive` faults
in a row for the same request (method, path, part number), so a client that retries a few
times always gets through. `counts` tallies the faults injected by kind.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

KINDS = ("error500", "slowdown", "reset", "delay", "part_fail")
UPSTREAM_TIMEOUT_S = 30.0
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te",
                "trailer", "upgrade"}
_ERROR_BODIES = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}


def s3_error_xml(code: str, message: str, resource: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{resource}</Resource><RequestId>FAULTPROXY</RequestId></Error>"
    ).encode()


class FaultProxy:
    """A threaded loopback proxy in front of `upstream` that injects seeded faults.

    `rates` maps fault kind -> probability per request (`part_fail` applies to UploadPart
    requests only, the others to every request). Use as a context manager or call
    `start()` / `stop()`; `url` is the endpoint to give clients.
    """

    def __init__(self, upstream: str, *, rates: Mapping[str, float] | None = None,
                 seed: int = 0, max_faults: int = 10_000, max_consecutive: int = 2,
                 delay_s: float = 0.05) -> None:
        unknown = set(rates or {}) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {KINDS}")
        parts = urlsplit(upstream)
        if parts.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError("the fault proxy only forwards to loopback")
        self.upstream = (parts.hostname, parts.port or 80)
        self.rates = {k: float(v) for k, v in (rates or {}).items()}
        self.max_faults = max_faults
        self.max_consecutive = max_consecutive
        self.delay_s = delay_s
        self.counts: Counter[str] = Counter()
        self.requests = 0
        self._rng = random.Random(seed)
        self._streak: Counter[tuple[str, str, str]] = Counter()
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def faults(self) -> int:
        return sum(v for k, v in self.counts.items() if k != "delay")

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def decide(self, method: str, path: str) -> str | None:
        """The fault for this request (or None), from the seeded schedule."""
        query = parse_qs(urlsplit(path).query)
        is_part = method == "PUT" and "partNumber" in query and "uploadId" in query
        ident = (method, urlsplit(path).path, query.get("partNumber", [""])[0])
        with self._lock:
            self.requests += 1
            draws = {kind: self._rng.random() for kind in KINDS}  # fixed draws per request
            chosen = None
            for kind in KINDS:
                if kind == "part_fail" and not is_part:
                    continue
                if draws[kind] < self.rates.get(kind, 0.0):
                    chosen = kind
                    break
            if chosen is not None and chosen != "delay" and (
                    self.faults >= self.max_faults
                    or self._streak[ident] >= self.max_consecutive):
                chosen = None
            if chosen is None or chosen == "delay":
                self._streak.pop(ident, None)
            else:
                self._streak[ident] += 1
            if chosen is not None:
                self.counts[chosen] += 1
            return chosen


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hanging up on a reset connection are expected here


def _make_handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as boto3 expects

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # quiet: the counts tell the story

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reset(self) -> None:
            # SO_LINGER 0: close sends RST, as a dropped connection does.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

        def _error(self, status: int) -> None:
            code, message = _ERROR_BODIES[status]
            body = s3_error_xml(code, message, urlsplit(self.path).path)
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=UPSTREAM_TIMEOUT_S)
            try:
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in _HOP_HEADERS}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                # A HEAD answer's Content-Length is the object's size (there is no body).
                drop = _HOP_HEADERS | ({"content-length"} if self.command != "HEAD" else set())
                return resp.status, [(k, v) for k, v in resp.getheaders()
                                     if k.lower() not in drop], data
            finally:
                conn.close()

        def _handle(self) -> None:
            body = self._read_body()
            fault = proxy.decide(self.command, self.path)
            if fault in ("error500", "part_fail"):
                self._error(500)
                return
            if fault == "slowdown":
                self._error(503)
                return
            if fault == "delay":
                time.sleep(proxy.delay_s)
            status, headers, data = self._forward(body)
            if fault == "reset" and (not data or self.command == "HEAD"):
                self._reset()  # the request landed; the client never hears so
                return
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if fault == "reset":
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self._reset()
                return
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler


def record_figures(name: str, **figures: object) -> None:
    """Append one JSON line of figures to $WHAM_RELIABILITY_FIGURES, when set.

    The reliability tests call this with what they injected and what survived;
    `benchmarks/reliability_report.py` runs them with the variable set and prints the table.
    """
    import json
    import os

    path = os.environ.get("WHAM_RELIABILITY_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"test": name, **figures}, sort_keys=True) + "\n")
