"""MuseReplica called directly (no Serve): the HTTP edge's rules and batched answers equal
to one-by-one answers."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from starlette.requests import Request
from support.asgi import make_request

from workers import wham
from workers.actor.muse import (
    MAX_BODY_BYTES,
    ScoreRequest,
    context_entry,
    model_to_official,
    parse_request,
    request_body,
)
from workers.actor.serve_replica import MuseReplica, key_digest

KEY = "replica-test-key"


@pytest.fixture(scope="module")
def replica() -> MuseReplica:
    return MuseReplica(checkpoint=None, preset="tiny", device="cpu", dtype="float32",
                       max_batch=4, max_queue=1, retry_after_s=3,
                       api_key_sha256=key_digest(KEY))


def _request(body: bytes = b"", *, path: str = "/score", method: str = "POST",
             headers: dict[str, str] | None = None) -> Request:
    return make_request(path, method=method, body=body, headers=headers)


def _handle(replica: MuseReplica, request: Request):
    return asyncio.run(replica.handle(request))


@pytest.mark.parametrize(("header", "status"), [
    (None, 401), ("Bearer wrong", 401), (f"Basic {KEY}", 401), (f"Bearer {KEY}x", 401),
    (f"Bearer {KEY}", 400), (f"bearer  {KEY}", 400),  # authorised; the empty body is bad
])
def test_only_the_right_bearer_key_gets_through(replica: MuseReplica, header, status) -> None:
    headers = {} if header is None else {"Authorization": header}
    reply = _handle(replica, _request(b"", headers=headers))
    assert reply.status == status, reply.body
    if status == 401:
        assert reply.headers == {"WWW-Authenticate": "Bearer"}


def test_routes_and_health(replica: MuseReplica) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    assert _handle(replica, _request(path="/health", method="GET")).body["status"] == "ok"
    assert _handle(replica, _request(path="/v1/x", headers=auth)).status == 404
    reply = _handle(replica, _request(method="GET", headers=auth))
    assert reply.status == 405 and reply.headers == {"Allow": "POST"}


def test_a_declared_body_over_the_limit_is_413_unread(replica: MuseReplica) -> None:
    headers = {"Authorization": f"Bearer {KEY}",
               "Content-Length": str(replica.max_body_bytes + 1)}
    reply = _handle(replica, _request(b"{}", headers=headers))
    assert reply.status == 413 and reply.body["field"] == "body"


def test_numbers_beyond_a_float_are_400_naming_the_field(replica: MuseReplica) -> None:
    h, w = replica.shape.image_size
    entry = context_entry(image=np.zeros((3, h, w), np.uint8), action=np.zeros(16, np.int64),
                          tokens=None)
    auth = {"Authorization": f"Bearer {KEY}"}
    for bad, field in (({**entry, "actions": [0] * 15 + [10**400]},
                        "input_data.context[0].actions[15]"),
                       ({**entry, "tokens": [2**70] * replica.shape.tokens_per_image},
                        "input_data.context[0].tokens")):
        reply = _handle(replica, _request(request_body([bad], parameters={}), headers=auth))
        assert (reply.status, reply.body["field"]) == (400, field), reply.body
    body = request_body([entry], parameters={"temperature": 10**400})
    reply = _handle(replica, _request(body, headers=auth))
    assert (reply.status, reply.body["field"]) == (400, "input_data.parameters.temperature")


def test_the_body_bound_is_the_replicas_setting(replica: MuseReplica) -> None:
    """A bound above the protocol's default lets a larger body through to the parser."""
    body = json.dumps({"input_data": {"context": [{"image": "x"}]},
                       "padding": "x" * MAX_BODY_BYTES}).encode()
    auth = {"Authorization": f"Bearer {KEY}"}
    assert _handle(replica, _request(body, headers=auth)).status == 413
    replica.max_body_bytes = 2 * MAX_BODY_BYTES
    try:
        reply = _handle(replica, _request(body, headers=auth))
    finally:
        replica.max_body_bytes = MAX_BODY_BYTES
    assert (reply.status, reply.body["field"]) == (400, "input_data.context[0].actions")


def test_a_full_replica_answers_503_with_retry_after(replica: MuseReplica) -> None:
    replica._pending = replica.max_batch + replica.max_queue
    try:
        reply = _handle(replica, _request(b"{}", headers={"Authorization": f"Bearer {KEY}"}))
    finally:
        replica._pending = 0
    assert reply.status == 503 and reply.headers == {"Retry-After": "3"}
    assert "busy" in reply.body["error"]


def _score_request(replica: MuseReplica, *, steps: int, seed: int, **params) -> ScoreRequest:
    rng = np.random.default_rng(seed)
    h, w = replica.shape.image_size
    images = rng.integers(0, 256, (steps, 3, h, w), dtype=np.uint8)
    actions = np.concatenate([rng.integers(0, 2, (steps, 12)), rng.integers(0, 11, (steps, 4))],
                             axis=1)
    context = [context_entry(image=i, action=a, tokens=None)
               for i, a in zip(images, actions, strict=True)]
    return parse_request(request_body(context, parameters={"seed": seed, **params}),
                         shape=replica.shape)


def test_a_batch_answers_as_one_by_one_requests_do(replica: MuseReplica) -> None:
    """Mixed context lengths and sampling settings are grouped; each answer equals the
    request answered alone."""
    requests = [_score_request(replica, steps=2, seed=1), _score_request(replica, steps=3, seed=2),
                _score_request(replica, steps=2, seed=3),
                _score_request(replica, steps=2, seed=4, temperature=0.5, top_k=5)]
    together = replica.score_batch(requests)
    alone = [replica.score_batch([r])[0] for r in requests]
    assert [r.status for r in together] == [200] * 4
    for a, b in zip(together, alone, strict=True):
        assert a.body == b.body
    results = [r.body["results"][0] for r in together]
    assert len({json.dumps(r["tokens"]) for r in results}) == 4  # different seeds, answers


def test_health_counts_engine_calls_and_rows_exactly(replica: MuseReplica) -> None:
    def counts() -> tuple[int, int]:
        body = _handle(replica, _request(path="/health", method="GET")).body
        return body["engine_calls"], body["engine_rows"]

    calls, rows = counts()
    replica.score_batch([_score_request(replica, steps=2, seed=s) for s in (11, 12, 13)])
    replica.score_batch([_score_request(replica, steps=3, seed=14)])
    assert counts() == (calls + 2, rows + 4)


def test_given_tokens_answer_as_the_encoded_image_does(replica: MuseReplica) -> None:
    request = _score_request(replica, steps=2, seed=5)
    tokens = replica.model.encode_images(np.stack(request.images)[None])[0].cpu().numpy()
    given = ScoreRequest(images=[None, request.images[1]], tokens=[tokens[0], None],
                         actions=request.actions, seed=5)
    assert replica.score_batch([given])[0].body == replica.score_batch([request])[0].body


def test_an_answer_is_the_engines_step(replica: MuseReplica) -> None:
    """The reply carries the engine's own next frame tokens and action for that seed."""
    request = _score_request(replica, steps=2, seed=6)
    (out,) = wham.RolloutEngine(replica.model, max_batch=1).rollout(
        context_images=np.stack(request.images)[None], context_actions=request.actions[None],
        steps=1, mode="full", sampling=wham.SamplingParams(), seeds=[6])
    result = replica.score_batch([request])[0].body["results"][0]
    assert result["tokens"] == out.image_tokens[0].tolist()
    assert result["actions"] == model_to_official(out.actions[0].numpy())


@pytest.mark.parametrize("decoding", ["diagonal", "diagonal-checked"])
def test_a_diagonal_replica_answers_the_engines_diagonal_step(decoding) -> None:
    replica = MuseReplica(checkpoint=None, preset="tiny", device="cpu", dtype="float32",
                          max_batch=2, decoding=decoding)
    engine = wham.RolloutEngine(replica.model, max_batch=1)
    differs = []
    for seed in range(7, 13):
        request = _score_request(replica, steps=2, seed=seed)
        kw = {"context_images": np.stack(request.images)[None],
              "context_actions": request.actions[None], "steps": 1, "mode": "full",
              "sampling": wham.SamplingParams(), "seeds": [seed]}
        (diagonal,) = engine.rollout(**kw, decoding=decoding)
        # the decoding next to it: sequential for diagonal, plain diagonal for checked
        (other,) = engine.rollout(**kw, decoding="diagonal" if decoding != "diagonal" else
                                  "sequential")
        result = replica.score_batch([request])[0].body["results"][0]
        assert result["tokens"] == diagonal.image_tokens[0].tolist()
        differs.append(result["tokens"] != other.image_tokens[0].tolist())
    assert any(differs)  # the setting is used: some answers are not the other decoding's


def test_a_resent_image_answers_the_same_from_remembered_tokens(replica: MuseReplica) -> None:
    """The second request's seed frame comes from the token cache, not the tokenizer."""
    request = _score_request(replica, steps=2, seed=8)
    body = request_body([context_entry(image=i, action=a, tokens=None)
                         for i, a in zip(request.images, request.actions, strict=True)],
                        parameters={"seed": 8})
    first = parse_request(body, shape=replica.shape, known=replica._tokens.get)
    answer = replica.score_batch([first])[0].body
    again = parse_request(body, shape=replica.shape, known=replica._tokens.get)
    assert again.images == [None, None] and all(t is not None for t in again.tokens)
    assert replica.score_batch([again])[0].body == answer
