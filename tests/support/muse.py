"""Test helpers for the Muse protocol: a `wham-batch serve` child process and a faulty stub.

`ServeProcess` starts `wham-batch serve` on a free loopback port in its own session (its
own Ray instance in a private RAY_TMPDIR) and stops it by its pid, then kills whatever of
its session is left; nothing is found by name.

`MuseStub` is a threaded HTTP server on 127.0.0.1 standing in for a hosted endpoint. It
forwards requests to a real server (adding the key the real server wants) but first answers
with faults: per distinct request body a seeded number of faults (fewer than the client's
tries) drawn from 429, 500, garbage (200 with a body that is not JSON) and hang (no answer
until after the client's timeout); requests carrying a poisoned seed always get 500, and
`forced` faults (also "400") answer the next requests whatever the plan.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from support.procs import free_port, session_pids

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 60.0
FAULTS = ("429", "500", "garbage", "hang")
#: The key of the tests' server (tests/serve/conftest.py `muse_server`).
SERVER_KEY = "test-serve-key-4f1c2a9b7e"


class ServeProcess:
    """`wham-batch serve ARGS` as a child process on 127.0.0.1:<free port>."""

    def __init__(self, args: list[str], *, key: str | None, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="wsrv-"))  # short: socket path limits
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.pop("WHAM_API_KEY", None)
        env.update(RAY_TMPDIR=str(self.ray_tmp), RAY_USAGE_STATS_ENABLED="0",
                   RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
        if key is not None:
            env["WHAM_API_KEY"] = key
        command = [str(Path(sys.executable).with_name("wham-batch")), "serve", *args,
                   "--port", str(self.port)]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.metrics_url: str | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "serving at" not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"wham-batch serve did not start:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        match = re.search(r"metrics: (\S+)", self.log())
        self.metrics_url = match.group(1) if match else None

    def stop(self) -> int | None:
        """SIGTERM the server (it takes its Ray instance down), wait, then kill whatever is
        left of its session."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        for pid in session_pids(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if code is None:
            self.proc.wait(timeout=10)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return code


@contextlib.contextmanager
def running_server(args: list[str], *, key: str | None, log_dir: Path) -> Iterator[ServeProcess]:
    """`wham-batch serve ARGS`, ready, for the duration of the block."""
    server = ServeProcess(args, key=key, log_path=log_dir / "serve.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


class MuseStub:
    """A faulty stand-in for a hosted endpoint, forwarding to `upstream` with `key`."""

    def __init__(self, upstream: str, *, key: str | None, seed: int = 0, max_faults: int = 2,
                 hang_s: float = 3.0, poisoned_seeds: set[int] = frozenset()) -> None:
        parts = urlsplit(upstream)
        if parts.hostname != "127.0.0.1":
            raise ValueError("the stub only forwards to loopback")
        self.upstream = (parts.hostname, parts.port, parts.path or "/")
        self.key = key
        self.seed, self.max_faults, self.hang_s = seed, max_faults, hang_s
        self.poisoned_seeds = set(poisoned_seeds)
        self.healthy = False  # True: forward everything, no faults
        self.forced: deque[str] = deque()  # faults for the next requests, before any plan
        self.retry_after = "0"  # the Retry-After of a 429
        self.arrivals: list[float] = []  # time.monotonic() of every request
        self.counts: Counter[str] = Counter()
        self._seen: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/score"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> MuseStub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def decide(self, body: bytes) -> str | None:
        """The fault for this request, or None to forward it."""
        with self._lock:
            self.arrivals.append(time.monotonic())
            if self.forced:
                fault = self.forced.popleft()
                self.counts[fault] += 1
                return fault
        if self.healthy:
            return None
        try:
            seed = json.loads(body)["input_data"]["parameters"]["seed"]
        except (ValueError, KeyError, TypeError):
            seed = None
        digest = hashlib.sha256(body).hexdigest()
        with self._lock:
            if seed in self.poisoned_seeds:
                self.counts["poisoned"] += 1
                return "500"
            tries = self._seen[digest]
            self._seen[digest] += 1
            plan = random.Random(f"{self.seed}:{digest}")
            faults = [plan.choice(FAULTS) for _ in range(plan.randint(0, self.max_faults))]
            if tries < len(faults):
                self.counts[faults[tries]] += 1
                return faults[tries]
            self.counts["forwarded"] += 1
            return None

    def forward(self, body: bytes) -> tuple[int, bytes]:
        host, port, path = self.upstream
        conn = http.client.HTTPConnection(host, port, timeout=60)
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        try:
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()


def _handler(stub: MuseStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None):
            self.send_response(status)
            for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            fault = stub.decide(body)
            if fault == "429":
                self._reply(429, b'{"error": "slow down"}', {"Retry-After": stub.retry_after})
            elif fault == "400":
                self._reply(400, b'{"error": "bad request", "field": "body"}')
            elif fault == "500":
                self._reply(500, b'{"error": "internal"}')
            elif fault == "garbage":
                self._reply(200, b"<html>upstream hiccup</html>")
            elif fault == "hang":
                time.sleep(stub.hang_s)
                self.close_connection = True
            else:
                self._reply(*stub.forward(body))

    return Handler
