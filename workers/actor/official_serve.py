"""The official local-server protocol on a serving replica: its routes and the loop that
runs its jobs (the codec is `workers.actor.official`, the job state `workers.actor.jobboard`).

A `MuseReplica` holds one `OfficialProtocol` and hands it `GET /`, `POST /new_job`,
`GET /get_job_results` and `GET /cancel_job`. Every route needs the server's key when one
is configured (none when it is not: the server then listens on loopback only). A new job's
form is read within the server's body limit, parsed within the part limits of
`workers.actor.multipart`, and its jobs go to the board; they are answered by whichever
replica claims them.

The job loop (started on the replica's event loop at construction, or by the first
official request of a replica built outside Serve) claims up to `capacity` jobs (the
replica's batch size) and runs each as a task: one step at a time through the replica's
batch queue, so job steps share engine calls with each other and with Muse requests, and
each result is posted to the board before the next step starts. The loop renews the leases
of its running jobs about once a second; it never stops on a board that cannot be reached
(it waits and tries again: the board's leases resume the jobs it loses meanwhile).

Statuses: 200; 204 (no new results); 400 (bad input, too many steps or jobs) and 413 (a
body or part over its limit) with `{"error", "field"}`; 401; 404 (results of job ids the
board does not know); 405; 500 (results of a job that failed: `{"error", "field",
"failed": {job_id: reason}}`); 503 with Retry-After when the job board is unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from workers.actor.jobboard import JobBoard
from workers.actor.multipart import parse_form
from workers.actor.muse import MAX_IMAGE_BYTES, ModelShape, ProtocolError
from workers.actor.official import (
    MAX_FORM_PARTS,
    JobLimits,
    JobState,
    JobStep,
    NewJob,
    StepResult,
    advance,
    next_step,
    parse_new_job,
    results_zip,
    server_details,
)

log = logging.getLogger("workers.serve.official")
#: Routes of the official protocol besides `GET /`.
OFFICIAL_PATHS = ("/new_job", "/get_job_results", "/cancel_job")
METHODS = {"/": "GET", "/new_job": "POST", "/get_job_results": "GET", "/cancel_job": "GET"}
CLAIM_WAIT_S = 1.0
BOARD_RETRY_S = 1.0
#: Most job ids one poll may name.
MAX_POLL_IDS = 1024


class BoardUnavailable(RuntimeError):
    """The job board did not answer (it is restarting, or gone with the application)."""


class Reply:
    """A status, a body and its media type; becomes a Starlette response at the edge."""

    __slots__ = ("body", "headers", "media_type", "status")

    def __init__(self, status: int, body: bytes = b"", *, media_type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.status, self.body, self.media_type = status, body, media_type
        self.headers = headers or {}

    @classmethod
    def json(cls, status: int, data: Any, headers: dict[str, str] | None = None) -> Reply:
        return cls(status, json.dumps(data).encode(), media_type="application/json",
                   headers=headers)

    def response(self) -> Any:
        from starlette.responses import Response

        return Response(self.body, status_code=self.status, media_type=self.media_type,
                        headers=self.headers)


def is_official(path: str, method: str) -> bool:
    """Whether a request belongs to the official protocol (`POST /` is Muse's)."""
    return path in OFFICIAL_PATHS or (path == "/" and method == "GET")


class OfficialProtocol:
    def __init__(self, *, board: Any | None, shape: ModelShape, limits: JobLimits,
                 model_file: str, model_id: str, capacity: int,
                 batched: Callable[[JobStep], Awaitable[Any]],
                 authorised: Callable[[str], bool],
                 read_body: Callable[[Any], Awaitable[bytes]]) -> None:
        self.board = board if board is not None else JobBoard(
            max_concurrent_jobs=limits.max_concurrent_jobs,
            max_job_lifespan_s=limits.max_job_lifespan_s)
        self.shape, self.limits, self.capacity = shape, limits, capacity
        self.details = server_details(model_file=model_file, model_id=model_id, limits=limits)
        self._batched, self._authorised, self._read_body = batched, authorised, read_body
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._running: dict[str, asyncio.Task] = {}
        self._loop_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ routes

    async def handle(self, request: Any, path: str) -> Reply:
        method = request.method
        if method != METHODS[path]:
            return Reply.json(405, {"error": f"{method} not allowed on {path}; use "
                                             f"{METHODS[path]}", "field": "method"},
                              {"Allow": METHODS[path]})
        if not self._authorised(request.headers.get("authorization", "")):
            return Reply.json(401, {"error": "missing or wrong API key (Authorization: "
                                             "Bearer KEY)", "field": "Authorization"},
                              {"WWW-Authenticate": "Bearer"})
        self.start()
        route = {"/": self._details, "/new_job": self._new_job,
                 "/get_job_results": self._results, "/cancel_job": self._cancel}[path]
        try:
            return await route(request)
        except ProtocolError as exc:
            return Reply.json(exc.status, exc.body())
        except BoardUnavailable as exc:
            return Reply.json(503, {"error": f"the job service is not reachable ({exc}); "
                                             "retry shortly", "field": None},
                              {"Retry-After": str(int(BOARD_RETRY_S))})

    async def _details(self, request: Any) -> Reply:
        return Reply.json(200, self.details)

    async def _new_job(self, request: Any) -> Reply:
        body = await self._read_body(request)
        content_type = request.headers.get("content-type")
        try:
            job = await asyncio.to_thread(self._parse, body, content_type)
        except ProtocolError:
            raise
        except Exception as exc:  # a form the parser did not foresee is still bad input
            log.warning("unreadable new_job request: %s", type(exc).__name__)
            raise ProtocolError("body", f"unreadable request ({type(exc).__name__})") from None
        states = [replace(job.start, job_id=uuid.uuid4().hex, seed=secrets.randbits(63))
                  for _ in range(job.parallel)]
        accepted, in_queue = await self._call("submit", states)
        if not accepted:
            raise ProtocolError("json.num_parallel_predictions", f"too many jobs already "
                                f"running ({in_queue}); at most "
                                f"{self.limits.max_concurrent_jobs} at once")
        return Reply.json(200, {"job_ids": [s.job_id for s in states],
                                "current_jobs_in_queue": in_queue})

    def _parse(self, body: bytes, content_type: str | None) -> NewJob:
        parts = parse_form(body, content_type, max_parts=MAX_FORM_PARTS,
                           max_part_bytes=MAX_IMAGE_BYTES)
        return parse_new_job(parts, shape=self.shape, limits=self.limits)

    async def _results(self, request: Any) -> Reply:
        job_ids = request.query_params.getlist("job_ids")
        if not job_ids:
            raise ProtocolError("job_ids", "missing (get_job_results?job_ids=ID, repeatable)")
        if len(job_ids) > MAX_POLL_IDS:
            raise ProtocolError("job_ids", f"{len(job_ids)} ids; at most {MAX_POLL_IDS}")
        poll = await self._call("poll", job_ids)
        if poll.results:
            body = await asyncio.to_thread(results_zip, poll.results)
            stamp = time.strftime("%Y%m%d_%H%M%S")
            headers = {"Content-Disposition":
                       f'attachment; filename="dreaming_results_{stamp}.zip"'}
            if poll.failed:
                headers["X-Failed-Jobs"] = ",".join(poll.failed)
            return Reply(200, body, media_type="application/zip", headers=headers)
        if poll.failed:
            reasons = "; ".join(f"{k}: {v}" for k, v in poll.failed.items())
            return Reply.json(500, {"error": f"job(s) failed: {reasons}", "field": "job_ids",
                                    "failed": poll.failed})
        if poll.unknown:
            return Reply.json(404, {"error": "unknown job id(s) " + ", ".join(
                j[:64] for j in poll.unknown[:10]) + ": never started here, expired "
                f"{self.limits.max_job_lifespan_s:g} s after their newest result, or lost "
                "when the job service restarted", "field": "job_ids"})
        return Reply(204)

    async def _cancel(self, request: Any) -> Reply:
        job_id = request.query_params.get("job_id")
        if not job_id:
            raise ProtocolError("job_id", "missing (cancel_job?job_id=ID)")
        known = await self._call("cancel", job_id)
        return Reply.json(200, {"job_id": job_id, "cancelled": known})

    async def _call(self, method: str, *args: Any) -> Any:
        target = getattr(self.board, method)
        if not hasattr(target, "remote"):  # the in-process board
            return await target(*args)
        try:
            return await target.remote(*args)
        except Exception as exc:
            raise BoardUnavailable(type(exc).__name__) from None

    # ------------------------------------------------------------------ running jobs

    def start(self) -> None:
        """Start the job loop on the running event loop, unless it runs already."""
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._claim_loop())

    async def _claim_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            free = self.capacity - len(self._running)
            try:
                states = await self._call("claim", self.owner, list(self._running), free,
                                          CLAIM_WAIT_S if free > 0 else 0.0)
            except Exception as exc:  # the loop must outlive any one failure
                log.warning("job board: %s; trying again in %g s", exc, BOARD_RETRY_S)
                await asyncio.sleep(BOARD_RETRY_S)
                continue
            for state in states:
                self._running[state.job_id] = loop.create_task(self._run(state))
            if free <= 0:
                await asyncio.sleep(CLAIM_WAIT_S)  # full: only renew the leases

    async def _run(self, state: JobState) -> None:
        job_id = state.job_id
        try:
            while state.steps_done < state.steps_total:
                step = next_step(state)
                out = await self._batched(step)
                if not isinstance(out, StepResult):  # the engine call failed
                    await self._call("fail", self.owner, job_id,
                                     f"the model failed at step {step.step} (see the log)")
                    return
                state = advance(state, step, out)
                if not await self._call("post", self.owner, out, state):
                    return  # cancelled, finished, or resumed elsewhere
        except BoardUnavailable as exc:  # the lease runs out; the job resumes from its post
            log.warning("job %s: the board went away (%s)", job_id, exc)
        except Exception as exc:
            log.exception("job %s failed", job_id)
            with contextlib.suppress(BoardUnavailable):
                await self._call("fail", self.owner, job_id, f"{type(exc).__name__}: {exc}")
        finally:
            self._running.pop(job_id, None)
