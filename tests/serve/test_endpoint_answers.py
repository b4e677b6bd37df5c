"""The endpoint client against a plain loopback HTTP server: answers larger than one socket
read, answers over the size limit, and redirects (never followed)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
from support.stubhttp import scripted_server

from pipeline.contracts.errors import UserError
from pipeline.contracts.sources import NEUTRAL_ACTION
from workers.actor.endpoint import EndpointBackend, EndpointError, RolloutJob
from workers.actor.muse import MAX_BODY_BYTES, ScoreResult, build_response

#: A noisy frame: its PNG does not compress, so the answer is ~1.9 MB of JSON.
FRAME = np.random.default_rng(0).integers(0, 256, (3, 600, 800), dtype=np.uint8)
ACTION = np.array([1, 0] * 6 + [0, 10, 5, 7])


@pytest.fixture(scope="module")
def big_answer() -> bytes:
    result = ScoreResult(image=FRAME, action=ACTION, tokens=np.arange(8))
    return json.dumps(build_response(result)).encode()


@pytest.fixture
def server(big_answer: bytes) -> Iterator[dict]:
    """A loopback server answering every request with the big answer (by default)."""
    with scripted_server(body=big_answer) as state:
        yield state


def _backend(url: str, *, api_key_env: str | None = None) -> EndpointBackend:
    return EndpointBackend(url=url, api_key_env=api_key_env, max_concurrency=2, timeout_s=30.0,
                           max_attempts=1, backoff_s=0.0,
                           sampling={"temperature": 0.9, "top_k": None, "top_p": 1.0})


def _job() -> RolloutJob:
    return RolloutJob(context_images=np.zeros((1, 3, 600, 800), np.uint8),
                      context_actions=NEUTRAL_ACTION[None], actions=None, rng_seed=5)


def test_an_answer_larger_than_one_read_is_read_whole(server: dict, big_answer: bytes) -> None:
    assert len(big_answer) > 2**20
    backend = _backend(server["url"])
    try:
        assert backend.image_size == (600, 800) and backend.tokens_per_image == 8
        [(_, records)] = list(backend.rollouts([_job()], steps=2, mode="full"))
    finally:
        backend.close()
    assert not isinstance(records, EndpointError), records
    assert [np.array_equal(r.image, FRAME) for r in records] == [True, True]
    assert all(np.array_equal(r.action, ACTION) for r in records)


def test_an_answer_over_the_limit_is_a_retryable_failure(server: dict) -> None:
    backend = _backend(server["url"])
    try:
        server["body"] = b" " * (MAX_BODY_BYTES + 1)
        [(_, outcome)] = list(backend.rollouts([_job()], steps=1, mode="full"))
    finally:
        backend.close()
    assert isinstance(outcome, EndpointError) and outcome.retryable
    assert f"larger than {MAX_BODY_BYTES} bytes" in str(outcome)


@pytest.mark.parametrize("status", [301, 302, 307])
def test_a_redirect_is_not_followed(server: dict, status: int,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The key would go wherever the redirect points: the client stops at the 3xx."""
    monkeypatch.setenv("MUSE_API_KEY", "k-redirect-7d2e")
    server["status"], server["location"] = status, server["url"].replace("/score", "/elsewhere")
    server["body"] = b"{}"
    with pytest.raises(UserError, match=f"HTTP {status}"):
        _backend(server["url"], api_key_env="MUSE_API_KEY")
    assert server["seen"] == [("POST", "/score", "Bearer k-redirect-7d2e")]
