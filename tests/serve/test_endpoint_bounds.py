"""Calls to a model endpoint stay within bounds: the preflight probe has a total deadline
(a server that drips its answer a byte at a time cannot hold it), requests that carry the
key go through no proxy unless the job opts in, and a frame size an endpoint makes up is
refused before any seed is resized to it."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from support.stubhttp import scripted_server

from pipeline.contracts.errors import UserError
from pipeline.contracts.spec import spec_from_data
from pipeline.driver.preflight import check_endpoint
from workers.actor.endpoint import EndpointBackend
from workers.actor.muse import ScoreResult, build_response

KEY = "k-proxy-test-5e1d"
ACTION = np.array([1, 0] * 6 + [0, 10, 5, 7])
#: Seconds the test waits for a probe that should end at its 2 s deadline.
GUARD_S = 60


@contextmanager
def dripping_server() -> Iterator[str]:
    """A loopback server that answers a status line, then headers a byte every 0.2 s,
    without end: each socket read gets a byte long before any per-read timeout."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def drip(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            payload = b"HTTP/1.1 200 OK\r\nX-Drip: " + b"a" * 10**6
            for byte in payload:
                if stop.wait(0.2):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=drip, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/score"
    finally:
        stop.set()
        thread.join(timeout=10)
        listener.close()


def test_the_preflight_probe_has_a_total_deadline():
    with dripping_server() as url:
        outcome: list[object] = []

        def probe() -> None:
            try:
                check_endpoint(url, api_key_env=None, timeout_s=2)
                outcome.append("answered")
            except UserError as exc:
                outcome.append(exc)

        start = time.monotonic()
        worker = threading.Thread(target=probe, daemon=True)
        worker.start()
        worker.join(GUARD_S)
        took, ended = time.monotonic() - start, list(outcome)  # before the server stops
    assert ended, f"the probe was still waiting after {GUARD_S} s"
    assert isinstance(ended[0], UserError)
    assert "no answer within 2 s" in str(ended[0]) and took < 15


@pytest.fixture
def proxied(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """The environment names a proxy (for every host) and holds the endpoint's key. The
    'proxy' is a loopback server that records what it is sent and answers 502."""
    with scripted_server(status=502) as proxy:
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
            monkeypatch.setenv(name, proxy["url"].removesuffix("/score"))
        monkeypatch.setenv("MUSE_API_KEY", KEY)
        yield proxy


def _answer() -> bytes:
    frame = np.zeros((3, 24, 32), np.uint8)
    return json.dumps(build_response(ScoreResult(image=frame, action=ACTION,
                                                 tokens=None))).encode()


def _backend(url: str, *, trust_env: bool) -> EndpointBackend:
    return EndpointBackend(url=url, api_key_env="MUSE_API_KEY", max_concurrency=1,
                           timeout_s=10.0, max_attempts=1, backoff_s=0.0,
                           sampling={"temperature": 1.0, "top_k": None, "top_p": 1.0},
                           trust_env=trust_env)


def test_the_key_goes_to_the_endpoint_not_to_a_proxy(proxied: dict):
    with scripted_server(status=400) as endpoint:
        check_endpoint(endpoint["url"], api_key_env="MUSE_API_KEY", timeout_s=5)
        assert endpoint["seen"] == [("POST", "/score", f"Bearer {KEY}")]
        endpoint["status"], endpoint["body"] = 200, _answer()
        backend = _backend(endpoint["url"], trust_env=False)
        backend.close()
        assert backend.image_size == (24, 32)
        assert [auth for *_, auth in endpoint["seen"]] == [f"Bearer {KEY}"] * 2
    assert proxied["seen"] == []


def test_a_job_that_opts_in_goes_through_the_proxy(proxied: dict):
    with scripted_server(status=400) as endpoint:
        check_endpoint(endpoint["url"], api_key_env="MUSE_API_KEY", timeout_s=5,
                       trust_env=True)  # the proxy's 502: something answered
        with pytest.raises(UserError, match="did not answer a probe request"):
            _backend(endpoint["url"], trust_env=True)
        assert endpoint["seen"] == []
    assert [auth for *_, auth in proxied["seen"]] == [f"Bearer {KEY}"] * 2
    spec = {"run": {"name": "n"}, "model": {"endpoint": "http://127.0.0.1:9/score"},
            "seeds": {"source": "s"}, "rollouts": {"steps": 1}, "output": {"root": "o"}}
    assert spec_from_data(spec).model.trust_env is False  # off unless the job says so
    spec["model"]["trust_env"] = True
    assert spec_from_data(spec).model.trust_env is True


def test_a_frame_size_an_endpoint_makes_up_is_refused():
    frame = np.zeros((3, 1, 5000), np.uint8)  # within the pixel bound, not the side bound
    body = json.dumps(build_response(ScoreResult(image=frame, action=ACTION,
                                                 tokens=None))).encode()
    with scripted_server(body=body) as endpoint, \
            pytest.raises(UserError, match=r"answered a frame size=\(1, 5000\): expected "
                          r"\(H, W\) of at most 4096 pixels per side"):
        EndpointBackend(url=endpoint["url"], api_key_env=None, max_concurrency=1,
                        timeout_s=10.0, max_attempts=1, backoff_s=0.0,
                        sampling={"temperature": 1.0, "top_k": None, "top_p": 1.0})
