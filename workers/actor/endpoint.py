"""EndpointBackend: rollouts through a Muse-protocol endpoint instead of a local model.

Each rollout runs like the Muse iterative client: post the context (up to 10 steps, each a
base64 PNG, the official action and the frame's tokens), take the next frame back, append
it with its action (the returned one in `full` mode, the given one in `world_model` mode)
and post again, `steps` times. The rollouts of a batch run concurrently on one event loop
(a thread of the actor), with at most `max_concurrency` requests in flight.

A request that times out, fails to connect, gets 408/429/5xx or an unusable answer is
retried with exponential backoff and full jitter (or after the endpoint's Retry-After);
after `max_attempts` tries the rollout fails with a *retryable* error (a rerun of the run
redoes it). Other statuses (400, 401, 403, 404, ...) fail the rollout at once; so does a
redirect (3xx), which is never followed: the key would go wherever it points.

Step k of a rollout sends the seed `step_seed(rng_seed, k)`: an endpoint that honours seeds
(`wham-batch serve`) then answers reruns identically, and no two steps share noise.

The key is read from the environment variable the job names, in this process only; it goes
into the Authorization header and nowhere else (its value is masked in log lines). So the
requests go through no proxy the environment names (HTTP_PROXY, ...) unless the job says
`model.trust_env: true`.

The frame size learned from the endpoint is held to the model library's bound on image
sides, so seeds are never resized to a size an endpoint makes up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.contracts.errors import UserError
from pipeline.contracts.secrets import bearer_headers, public_url, redact
from pipeline.contracts.sources import NEUTRAL_ACTION
from workers.actor.muse import (
    MAX_BODY_BYTES,
    ProtocolError,
    ScoreResult,
    context_entry,
    parse_response,
    request_body,
)
from workers.wham.actions import ACTION_DIM
from workers.wham.config import check_image_size
from workers.wham.errors import CheckpointError

log = logging.getLogger("workers.actor.endpoint")
#: Context steps a Muse client sends (the model's window).
CONTEXT_STEPS = 10
MAX_BACKOFF_S = 60.0
RETRY_STATUSES = frozenset({408, 429})
READ_CHUNK_BYTES = 2**16
PROBE_SIZE = (64, 64)  # the probe frame: any size works, the endpoint resizes it


class EndpointError(RuntimeError):
    """A rollout the endpoint could not finish; `retryable` when a rerun may succeed."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class RolloutJob:
    """One rollout's inputs in model form."""

    context_images: np.ndarray  # uint8 (T,3,H,W)
    context_actions: np.ndarray  # int64 (T,16)
    actions: np.ndarray | None  # int64 (steps,16) given actions (world_model)
    rng_seed: int


@dataclass(frozen=True, slots=True)
class StepRecord:
    image: np.ndarray  # uint8 (3,H,W)
    action: np.ndarray  # int64 (16,) model form: what joined the context
    tokens: np.ndarray | None  # (n,)
    source: str  # "model" | "given"


def step_seed(rng_seed: int, step: int) -> int:
    """The sampling seed of step `step` of a rollout: 63 bits from (rng_seed, step)."""
    digest = hashlib.blake2b(f"{rng_seed}\0{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _retry_after(value: str | None) -> float | None:
    try:
        return min(MAX_BACKOFF_S, max(0.0, float(value))) if value else None
    except ValueError:  # an HTTP date: fall back to our own backoff
        return None


def _parse_answer(data: bytes, *, size: tuple[int, int] | None,
                  tokens_per_image: int | None) -> ScoreResult:
    """`parse_response`, with any failure to read the answer a ProtocolError (retried)."""
    try:
        return parse_response(data, size=size, tokens_per_image=tokens_per_image)
    except ProtocolError:
        raise
    except Exception as exc:  # a decoder's own error on a malformed answer
        raise ProtocolError("response", f"unreadable ({type(exc).__name__})") from None


class EndpointBackend:
    """Model facts (`model_id`, `image_size`, `tokens_per_image`, ...) as an actor reads them
    from a local replica, and `rollouts()` that runs a batch through the endpoint."""

    device = "endpoint"
    dtype = "remote"
    sha256 = ""  # the endpoint's weights are not known here

    def __init__(self, *, url: str, api_key_env: str | None, max_concurrency: int,
                 timeout_s: float, max_attempts: int, backoff_s: float,
                 sampling: dict[str, Any], trust_env: bool = False) -> None:
        self.url = url
        self.model_id = public_url(url)
        self.timeout_s, self.max_attempts, self.backoff_s = timeout_s, max_attempts, backoff_s
        self.sampling = sampling  # temperature, top_k, top_p as the protocol names them
        self._headers = bearer_headers(api_key_env, missing=(
            "it must hold the endpoint's key on every node the actors run on"))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="endpoint-client")
        self._thread.start()
        self._session = self._submit(self._open(max_concurrency, trust_env=trust_env)).result()
        self._slots = asyncio.Semaphore(max_concurrency)
        self.image_size: tuple[int, int] = PROBE_SIZE
        self.tokens_per_image: int | None = None
        try:
            self._probe()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ facts

    @property
    def tokens_per_step(self) -> int:
        return (self.tokens_per_image or 0) + ACTION_DIM

    def _probe(self) -> None:
        """Learn the endpoint's frame size and token count from one request."""
        frame = np.full((3, *PROBE_SIZE), 128, dtype=np.uint8)
        entry = context_entry(image=frame, action=NEUTRAL_ACTION, tokens=None)
        try:
            result = self._submit(self._call([entry], seed=0, size=None)).result()
        except EndpointError as exc:
            raise UserError(f"model.endpoint: {self.model_id} did not answer a probe request: "
                            f"{exc}") from None
        size = tuple(int(v) for v in result.image.shape[1:])
        try:
            check_image_size(size, what="frame size")
        except CheckpointError as exc:
            raise UserError(f"model.endpoint: {self.model_id} answered a {exc}") from None
        self.image_size = size
        self.tokens_per_image = None if result.tokens is None else len(result.tokens)
        log.info("endpoint %s: frames %dx%d, %s image tokens", self.model_id,
                 *self.image_size[::-1], self.tokens_per_image or "no")

    # ------------------------------------------------------------------ rollouts

    def rollouts(self, jobs: list[RolloutJob], *, steps: int,
                 mode: str) -> Iterator[tuple[int, list[StepRecord] | EndpointError]]:
        """Run every job; yield (index, its steps or its error) as each rollout finishes."""
        futures = {self._submit(self._rollout(job, steps=steps, mode=mode)): i
                   for i, job in enumerate(jobs)}
        for future in concurrent.futures.as_completed(futures):
            try:
                yield futures[future], future.result()
            except EndpointError as exc:
                yield futures[future], exc

    async def _rollout(self, job: RolloutJob, *, steps: int, mode: str) -> list[StepRecord]:
        context = [context_entry(image=img, action=act, tokens=None)
                   for img, act in zip(job.context_images, job.context_actions, strict=True)]
        records = []
        for k in range(steps):
            result = await self._call(context[-CONTEXT_STEPS:], seed=step_seed(job.rng_seed, k),
                                      size=self.image_size)
            given = mode == "world_model"
            action = job.actions[k] if given else result.action
            records.append(StepRecord(image=result.image, action=action, tokens=result.tokens,
                                      source="given" if given else "model"))
            context.append(context_entry(image=result.image, action=action, tokens=result.tokens))
        return records

    async def _call(self, context: list[dict[str, Any]], *, seed: int,
                    size: tuple[int, int] | None) -> ScoreResult:
        """One step through the endpoint, retried; EndpointError when it keeps failing."""
        import aiohttp

        body = request_body(context, parameters={**self.sampling, "seed": seed})
        last = "no answer"
        for attempt in range(1, self.max_attempts + 1):
            wait = None
            try:
                status, data, retry_after = await self._post(body)
                if status == 200:
                    return _parse_answer(data, size=size, tokens_per_image=self.tokens_per_image)
                snippet = redact(data[:200].decode("utf-8", "replace"))
                last = (f"HTTP {status}, a redirect (not followed: set model.endpoint to the "
                        "URL it points to)" if 300 <= status < 400 else f"HTTP {status}: {snippet}")
                if status not in RETRY_STATUSES and status < 500:
                    raise EndpointError(f"{self.model_id} answered {last}", retryable=False)
                wait = retry_after
            except TimeoutError:
                last = f"no answer within {self.timeout_s:g} s"
            except OSError as exc:  # aiohttp's connection errors are OSErrors too
                last = f"connection failed ({type(exc).__name__})"
            except ProtocolError as exc:
                last = f"unusable answer ({exc})"
            except aiohttp.ClientError as exc:
                last = f"request failed ({type(exc).__name__})"
            if attempt < self.max_attempts:
                cap = min(MAX_BACKOFF_S, self.backoff_s * 2 ** (attempt - 1))
                await asyncio.sleep(wait if wait is not None else random.uniform(0, cap))
        raise EndpointError(f"{self.model_id} failed {self.max_attempts} times; last: {last}",
                            retryable=True)

    async def _post(self, body: bytes) -> tuple[int, bytes, float | None]:
        import aiohttp

        async with self._slots, self._session.post(
                self.url, data=body, headers=self._headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
            # The whole body, up to the bound: one read() returns only what has arrived.
            chunks, size = [], 0
            async for chunk in resp.content.iter_chunked(READ_CHUNK_BYTES):
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise ProtocolError("response", f"larger than {MAX_BODY_BYTES} bytes")
                chunks.append(chunk)
            return resp.status, b"".join(chunks), _retry_after(resp.headers.get("Retry-After"))

    # ------------------------------------------------------------------ the loop thread

    def _submit(self, coro: Any) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _open(self, max_concurrency: int, *, trust_env: bool) -> Any:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=max_concurrency)
        return aiohttp.ClientSession(connector=connector, trust_env=trust_env)

    def close(self) -> None:
        if self._loop.is_running():
            self._submit(self._session.close()).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
