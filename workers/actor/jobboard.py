"""JobBoard: where the jobs of the official local-server protocol live while they run.

Any replica may receive a job's `POST /new_job`, its polls and its cancel, so job state
cannot live in one replica. The board holds it: a small asynchronous class that the serving
app runs as its own single-replica Serve deployment (no model, no GPU), so it lives and
dies with the application, and that a lone replica (tests, `MuseReplica` called directly)
keeps in-process. Replicas pull work from it: each claims up to its batch size of queued
jobs, runs their steps through its batch queue (batched with Muse requests and other jobs'
steps), and posts every result with the job's state after it.

Nothing is lost silently:
- a step's result is accepted once (the job's owner, the next step index), so every step
  is delivered exactly once, and a poll hands out each result once;
- a claimed job carries a lease that its replica renews while it runs; a replica that
  stops (restart, crash) lets the lease run out, and the job goes back to the queue from
  its last posted state, to be resumed by any replica (its steps' seeds depend only on the
  job and the step, so a resumed step draws what the lost one would have); after
  `max_attempts` such losses, or when the model fails on it, the job is failed, and polls
  for it answer with the reason instead of nothing;
- a cancelled job's undelivered results are dropped and its owner's next post is refused,
  so no later step is delivered.

As in the official server, a job's results wait for at most `max_job_lifespan_s` after its
newest result and are then deleted (looked for at most every `EXPIRY_CHECK_S`, or every
lifespan when that is shorter); a job that nobody polled and that produced nothing for that
long is abandoned: it is deleted too, and stops at its next step. A job counts against
`max_concurrent_jobs` until it is finished and delivered, cancelled, failed or expired. A
board that itself restarts starts empty: polls for the jobs it held are answered "unknown
job", never with an endless 204.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from workers.actor.official import (
    MAX_CONCURRENT_JOBS,
    MAX_JOB_LIFESPAN_S,
    JobState,
    StepResult,
)

#: How long a claimed job stays with a replica that stopped renewing it.
LEASE_S = 30.0
#: Replicas lost while running one job before it is failed.
MAX_ATTEMPTS = 3
#: How often (at most) expired jobs are looked for, as the official server does.
EXPIRY_CHECK_S = 10.0
QUEUED, RUNNING, DONE, CANCELLED, FAILED = "queued", "running", "done", "cancelled", "failed"


@dataclass(slots=True)
class _Job:
    state: JobState
    status: str = QUEUED
    owner: str | None = None
    lease_until: float = 0.0
    attempts: int = 0
    results: list[StepResult] = field(default_factory=list)
    touched: float = 0.0  # creation, newest result or poll
    error: str | None = None

    @property
    def active(self) -> bool:
        return self.status in (QUEUED, RUNNING) or (self.status == DONE and bool(self.results))


@dataclass(frozen=True, slots=True)
class Poll:
    """What a poll found: new results, and the requested jobs that failed or are unknown."""

    results: list[StepResult]
    failed: dict[str, str]
    unknown: list[str]


class JobBoard:
    def __init__(self, *, max_concurrent_jobs: int = MAX_CONCURRENT_JOBS,
                 max_job_lifespan_s: float = MAX_JOB_LIFESPAN_S,
                 lease_s: float = LEASE_S, max_attempts: int = MAX_ATTEMPTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_concurrent_jobs = max_concurrent_jobs
        self.lifespan_s = max_job_lifespan_s
        self.lease_s, self.max_attempts = lease_s, max_attempts
        self._clock = clock
        self._jobs: dict[str, _Job] = {}  # insertion order = queue order
        self._work: asyncio.Event | None = None  # set when there is work to claim
        self._work_loop: asyncio.AbstractEventLoop | None = None
        self._last_expiry = 0.0

    # ------------------------------------------------------------------ clients

    async def submit(self, states: list[JobState]) -> tuple[bool, int]:
        """Queue new jobs unless that would pass max_concurrent_jobs; (accepted, jobs
        queued or running afterwards)."""
        now = self._tick()
        active = sum(job.active for job in self._jobs.values())
        if active + len(states) > self.max_concurrent_jobs:
            return False, active
        for state in states:
            self._jobs[state.job_id] = _Job(state=state, touched=now)
        self._wake()
        return True, sum(job.status in (QUEUED, RUNNING) for job in self._jobs.values())

    async def poll(self, job_ids: list[str]) -> Poll:
        """Hand out every result of `job_ids` not handed out before."""
        now = self._tick()
        results, failed, unknown = [], {}, []
        for job_id in dict.fromkeys(job_ids):
            job = self._jobs.get(job_id)
            if job is None:
                unknown.append(job_id)
                continue
            results += job.results
            job.results, job.touched = [], now
            if job.status == FAILED:
                failed[job_id] = job.error or "failed"
        return Poll(results=results, failed=failed, unknown=unknown)

    async def cancel(self, job_id: str) -> bool:
        """Stop a job: its undelivered results go, no later step is accepted. Whether the
        board knew the job."""
        self._tick()
        job = self._jobs.get(job_id)
        if job is None:
            return False
        if job.status in (QUEUED, RUNNING):
            job.status, job.owner, job.touched = CANCELLED, None, self._clock()
        job.results = []
        return True

    async def counts(self) -> dict[str, int]:
        self._tick()
        out = dict.fromkeys((QUEUED, RUNNING, DONE, CANCELLED, FAILED), 0)
        for job in self._jobs.values():
            out[job.status] += 1
        return out

    # ------------------------------------------------------------------ replicas

    async def claim(self, owner: str, running: list[str], want: int,
                    wait_s: float) -> list[JobState]:
        """Renew the leases of `owner`'s `running` jobs and give it up to `want` queued
        jobs, waiting up to `wait_s` for one when there is none."""
        now = self._tick()
        for job_id in running:
            job = self._jobs.get(job_id)
            if job is not None and job.status == RUNNING and job.owner == owner:
                job.lease_until = now + self.lease_s
        work = self._event()
        work.clear()  # before looking: a job submitted from here on wakes the wait below
        taken = self._take(owner, want)
        if not taken and want > 0 and wait_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(work.wait(), timeout=wait_s)
            self._tick()
            taken = self._take(owner, want)
        return taken

    async def post(self, owner: str, result: StepResult, state: JobState) -> bool:
        """Accept one step's result and the job's state after it; whether the owner should
        go on with the next step (False: cancelled, finished, or no longer its job)."""
        now = self._tick()
        job = self._jobs.get(result.job_id)
        if job is None or job.status != RUNNING or job.owner != owner \
                or result.step != job.state.steps_done:
            return False
        job.results.append(result)
        job.state, job.touched = state, now
        job.lease_until = now + self.lease_s
        if state.steps_done >= state.steps_total:
            job.status, job.owner = DONE, None
            return False
        return True

    async def fail(self, owner: str, job_id: str, reason: str) -> None:
        self._tick()
        job = self._jobs.get(job_id)
        if job is not None and job.status == RUNNING and job.owner == owner:
            job.status, job.owner, job.error = FAILED, None, reason
            job.touched = self._clock()  # the failure is reported for a whole lifespan

    # ------------------------------------------------------------------ housekeeping

    def _event(self) -> asyncio.Event:
        """The work signal of the running event loop (an in-process board may outlive one)."""
        loop = asyncio.get_running_loop()
        if self._work is None or self._work_loop is not loop:
            self._work, self._work_loop = asyncio.Event(), loop
        return self._work

    def _wake(self) -> None:
        if self._work is not None:
            self._work.set()

    def _take(self, owner: str, want: int) -> list[JobState]:
        taken = []
        for job in self._jobs.values():
            if len(taken) >= want:
                break
            if job.status == QUEUED:
                job.status, job.owner = RUNNING, owner
                job.lease_until = self._clock() + self.lease_s
                taken.append(job.state)
        return taken

    def _tick(self) -> float:
        """Requeue jobs whose replica stopped renewing them; now and then, expire old ones."""
        now = self._clock()
        for job in self._jobs.values():
            if job.status == RUNNING and job.lease_until < now:
                job.attempts += 1
                if job.attempts >= self.max_attempts:
                    job.status, job.owner, job.touched = FAILED, None, now
                    job.error = (f"the replica running it stopped {job.attempts} times "
                                 f"(at step {job.state.steps_done} of {job.state.steps_total})")
                else:
                    job.status, job.owner = QUEUED, None
                    self._wake()
        if now - self._last_expiry >= min(EXPIRY_CHECK_S, self.lifespan_s):
            self._last_expiry = now
            old = [job_id for job_id, job in self._jobs.items()
                   if now - job.touched > self.lifespan_s]
            for job_id in old:
                del self._jobs[job_id]
        return now
