"""MuseReplica: one WHAM replica answering the Muse endpoint protocol inside Ray Serve.

A plain class: tests call it directly with Starlette requests; the serving app
(`pipeline.serve`) wraps it with `serve.deployment(...)`. Per request, on the replica's
event loop: authenticate, admit (or answer 503), read a bounded body, parse it in a thread
(`workers.actor.muse`; images seen before are not decoded again, their tokens are remembered),
then wait in Serve's batch queue (`serve.batch`). Each batch runs on a
worker thread, one at a time, as one `RolloutEngine` call per group of requests that can
share one: the same context length and the same sampling settings (a shared window and
sampler need both). Every step is a full-generation step (frame and action).

The official local-server protocol (`GET /`, `POST /new_job`, `GET /get_job_results`,
`GET /cancel_job`) is answered beside it by `workers.actor.official_serve`, whose job
steps join the same batches.

Statuses: 200 with a result; 400 / 413 with `{"error", "field"}` for bad input (also for a
request the parser fails on in a way it did not foresee); 401 for a missing or wrong key;
503 with Retry-After when `max_batch + max_queue` requests are already waiting; 404 / 405
for other paths and methods; 500 only if the engine itself fails.

The key never reaches the replica: it holds the key's SHA-256, and compares the digest of
the presented key with `hmac.compare_digest` (constant time).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict, defaultdict
from typing import Any

import numpy as np

from pipeline.contracts.metrics import ServeMetrics
from workers import wham
from workers.actor.muse import (
    MAX_BODY_BYTES,
    ModelShape,
    ProtocolError,
    ScoreRequest,
    ScoreResult,
    build_response,
    parse_request,
)
from workers.actor.official import JobLimits, JobStep, step_result
from workers.actor.official_serve import OfficialProtocol, is_official
from workers.actor.ray_hooks import install_ray_hooks
from workers.actor.replica import load_replica

log = logging.getLogger("workers.serve")
SCORE_PATHS = ("/", "/score")
HEALTH_PATH = "/health"
#: Image tokens remembered per replica, by image text: a Muse client resends its seed frames
#: with every step, and each would otherwise be decoded and encoded again.
TOKEN_CACHE_ENTRIES = 4096


def key_digest(key: str) -> str:
    """What a replica holds instead of the key: its SHA-256, hex."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class _Reply:
    """A status, a JSON body and extra headers; becomes a Starlette response at the edge."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: dict[str, Any],
                 headers: dict[str, str] | None = None) -> None:
        self.status, self.body, self.headers = status, body, headers or {}

    def response(self) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


class _TokenCache:
    """A bounded map image_key -> tokens (least recently used out first), thread-safe."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, tokens: np.ndarray) -> None:
        with self._lock:
            self._items[key] = tokens
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


class MuseReplica:
    def __init__(self, *, checkpoint: str | None, preset: str | None = None,
                 device: str = "auto", dtype: str | None = None, threads: int | None = None,
                 max_batch: int = 16, batch_wait_s: float = 0.01, max_queue: int = 64,
                 retry_after_s: int = 1, max_body_bytes: int = MAX_BODY_BYTES,
                 watermark: bool = True, api_key_sha256: str | None = None,
                 jobs: Any | None = None, job_limits: dict[str, Any] | None = None) -> None:
        from ray import serve

        install_ray_hooks()  # the replica's metrics go to Ray
        self.model = load_replica(checkpoint=checkpoint, preset=preset, device=device,
                                  dtype=dtype, threads=threads)
        self.engine = wham.RolloutEngine(self.model, max_batch=max_batch)
        self.shape = ModelShape(image_size=tuple(self.model.image_size),
                                tokens_per_image=self.model.tokens_per_image,
                                image_vocab_size=self.model.image_vocab_size,
                                window=self.model.config.seq_len)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.retry_after_s = retry_after_s
        self.max_body_bytes = max_body_bytes
        self.watermark = watermark
        self._key_sha256 = api_key_sha256
        self._pending = 0  # admitted and not yet answered
        self._tokens = _TokenCache(TOKEN_CACHE_ENTRIES)
        self.metrics = ServeMetrics(self.model.model_id)
        self._text = {"Software": "wham-batch", "generator": "WHAM world model (wham-batch serve)",
                      "model_id": self.model.model_id}
        # Per instance, so the batch size is a setting and every replica has its own queue.
        self._batched = serve.batch(max_batch_size=max_batch,
                                    batch_wait_timeout_s=batch_wait_s)(self._run_batch)
        # `jobs`: the app's job board (a Serve handle); None keeps one in this replica.
        self.official = OfficialProtocol(
            board=jobs, shape=self.shape, limits=JobLimits(**(job_limits or {})),
            model_file=os.path.basename((checkpoint or "").rstrip("/")) or str(preset),
            model_id=self.model.model_id, capacity=max_batch, batched=self._batched,
            authorised=self._authorised,
            read_body=lambda request: _read_body(request, limit=self.max_body_bytes))
        with contextlib.suppress(RuntimeError):  # no event loop here: on the first job route
            self.official.start()

    # ------------------------------------------------------------------ HTTP edge

    async def __call__(self, request: Any) -> Any:
        reply = await self.handle(request)
        self.metrics.record_request(reply.status)
        return reply.response()

    async def handle(self, request: Any) -> _Reply:
        path, method = request.url.path.rstrip("/") or "/", request.method
        if path == HEALTH_PATH:
            return _Reply(200, {"status": "ok", "model_id": self.model.model_id,
                                "pending": self._pending})
        if is_official(path, method):
            return await self.official.handle(request, path)
        if path not in SCORE_PATHS:
            return _Reply(404, {"error": f"no route {path}; POST to / or /score",
                                "field": "path"})
        if method != "POST":
            return _Reply(405, {"error": f"{method} not allowed; POST a JSON request",
                                "field": "method"}, {"Allow": "POST"})
        if not self._authorised(request.headers.get("authorization", "")):
            return _Reply(401, {"error": "missing or wrong API key (Authorization: Bearer KEY)",
                                "field": "Authorization"}, {"WWW-Authenticate": "Bearer"})
        if self._pending >= self.max_batch + self.max_queue:
            return _Reply(503, {"error": f"busy: {self._pending} requests waiting; retry "
                                         f"after {self.retry_after_s} s", "field": None},
                          {"Retry-After": str(self.retry_after_s)})
        self._pending += 1
        try:
            return await self._score(request)
        finally:
            self._pending -= 1

    def _authorised(self, header: str) -> bool:
        if self._key_sha256 is None:
            return True
        scheme, _, presented = header.partition(" ")
        digest = key_digest(presented.strip()) if scheme.lower() == "bearer" else ""
        return hmac.compare_digest(digest.encode(), self._key_sha256.encode())

    async def _score(self, request: Any) -> _Reply:
        try:
            body = await _read_body(request, limit=self.max_body_bytes)
            parsed = await asyncio.to_thread(parse_request, body, shape=self.shape,
                                             known=self._tokens.get,
                                             max_body_bytes=self.max_body_bytes)
        except ProtocolError as exc:
            return _Reply(exc.status, exc.body())
        except Exception as exc:  # a request the parser did not foresee is still bad input
            log.warning("unreadable request: %s", type(exc).__name__)
            return _Reply(400, {"error": f"unreadable request ({type(exc).__name__})",
                                "field": "body"})
        if parsed.seed is None:
            parsed.seed = secrets.randbits(63)  # without a seed, a fresh one per request
        return await self._batched(parsed)

    # ------------------------------------------------------------------ batches

    async def _run_batch(self, requests: list[ScoreRequest]) -> list[_Reply]:
        # Serve runs one batch at a time; the engine runs off the event loop, so requests
        # keep arriving (and queueing into the next batch) while it computes.
        return await asyncio.to_thread(self.score_batch, requests)

    def score_batch(self, requests: list[ScoreRequest]) -> list[_Reply]:
        """Answer requests that arrived together: one engine call per compatible group."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[(len(r.actions), r.sampling_key)].append(i)
        replies: list[_Reply | None] = [None] * len(requests)
        for rows in groups.values():
            group = [requests[i] for i in rows]
            try:
                results = self._step(group)
                answers = [self._answer(r, res) for r, res in zip(group, results, strict=True)]
            except Exception as exc:
                log.exception("engine call for %d requests failed", len(group))
                answers = [_Reply(500, {"error": f"the model failed: {type(exc).__name__}",
                                        "field": None})] * len(group)
            for i, answer in zip(rows, answers, strict=True):
                replies[i] = answer
        return replies

    def _answer(self, request: ScoreRequest, result: ScoreResult) -> Any:
        if isinstance(request, JobStep):
            return step_result(request, result, text=self._text, watermark=self.watermark)
        return _Reply(200, build_response(result, text=self._text, watermark=self.watermark))

    def _step(self, group: list[ScoreRequest]) -> list[ScoreResult]:
        """One engine call: the next frame and action of every request in `group`."""
        import torch

        first = group[0]
        sampling = wham.SamplingParams(temperature=first.temperature, top_k=first.top_k,
                                       top_p=first.top_p)
        tokens = torch.stack([self._context_tokens(r) for r in group])  # [B, T, n]
        actions = np.stack([r.actions for r in group])  # (B, T, 16)
        t0 = time.perf_counter()
        (out,) = self.engine.rollout(context_tokens=tokens, context_actions=actions, steps=1,
                                     mode="full", sampling=sampling,
                                     seeds=[r.seed for r in group])
        self.metrics.record_batch(rows=len(group), seconds=time.perf_counter() - t0)
        step_actions, step_tokens = out.actions.numpy(), out.image_tokens.numpy()
        return [ScoreResult(image=out.images[b], action=step_actions[b], tokens=step_tokens[b])
                for b in range(len(group))]

    def _context_tokens(self, request: ScoreRequest) -> Any:
        """[T, n] image tokens of one request: given ones as sent, the rest encoded together
        (one call per request, as `wham-batch dream` encodes its context)."""
        import torch

        missing = [i for i, t in enumerate(request.tokens) if t is None]
        encoded: dict[int, Any] = {}
        if missing:
            images = torch.from_numpy(np.stack([request.images[i] for i in missing]))[None]
            codes = self.model.encode_images(images)[0].cpu()  # [k, n]
            encoded = dict(zip(missing, codes, strict=True))
            for i in missing:
                request.tokens[i] = encoded[i].numpy()  # a job step goes on with the tokens
                if request.image_keys and request.image_keys[i] is not None:
                    self._tokens.put(request.image_keys[i], encoded[i].numpy())
        return torch.stack([encoded[i] if t is None else torch.as_tensor(t)
                            for i, t in enumerate(request.tokens)]).long()


async def _read_body(request: Any, *, limit: int) -> bytes:
    """The request body, refusing (413) more than `limit` bytes without reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ProtocolError("body", f"{declared} bytes; at most {limit} are accepted",
                            status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProtocolError("body", f"more than {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)
