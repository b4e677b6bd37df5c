"""JobBoard with a hand-driven clock: every step delivered exactly once, the concurrency
limit, cancelling, a lost replica's job resumed elsewhere (or failed and reported), and old
results expiring as in the official server."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np

from workers.actor.jobboard import EXPIRY_CHECK_S, JobBoard
from workers.actor.official import JobState, StepResult


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state(job_id: str, steps_total: int = 3) -> JobState:
    return JobState(job_id=job_id, seed=1, steps_total=steps_total, steps_done=0,
                    temperature=0.9, top_k=None, top_p=1.0, max_context=10, images=[None],
                    tokens=[np.zeros(4, np.int64)], actions=np.zeros((1, 16), np.int64),
                    future=np.zeros((0, 16), np.int64))


def result(job_id: str, step: int) -> StepResult:
    return StepResult(job_id=job_id, step=step, png=b"png%d" % step,
                      action=np.zeros(16, np.int64), tokens=np.zeros(4, np.int64))


async def run_steps(board: JobBoard, owner: str, job: JobState, upto: int) -> JobState:
    """Post steps of `job` as a replica would, up to step `upto` (exclusive)."""
    go_on = True
    while go_on and job.steps_done < upto:
        out = result(job.job_id, job.steps_done)
        job = replace(job, steps_done=job.steps_done + 1)
        go_on = await board.post(owner, out, job)
    return job


def delivered(polls) -> list[tuple[str, int]]:  # noqa: ANN001
    return [(r.job_id, r.step) for p in polls for r in p.results]


def test_every_step_once_and_204_after() -> None:
    async def scenario() -> None:
        board = JobBoard(max_concurrent_jobs=4, clock=Clock())
        assert await board.submit([state("a"), state("b")]) == (True, 2)
        claimed = await board.claim("r1", [], want=8, wait_s=0)
        assert [s.job_id for s in claimed] == ["a", "b"]
        assert await board.claim("r2", [], want=8, wait_s=0) == []  # nothing left to claim
        polls = []
        for job in claimed:
            await run_steps(board, "r1", job, upto=2)
            polls.append(await board.poll(["a", "b"]))
        # a step posted twice (a retry, a stale replica) is not accepted twice
        assert not await board.post("r1", result("a", 1), replace(claimed[0], steps_done=2))
        for job in claimed:
            await run_steps(board, "r1", replace(job, steps_done=2), upto=3)
        polls.append(await board.poll(["b", "a", "b"]))
        assert sorted(delivered(polls)) == [(j, s) for j in "ab" for s in range(3)]
        last = await board.poll(["a", "b"])
        assert (last.results, last.failed, last.unknown) == ([], {}, [])  # the route's 204
        assert (await board.counts())["done"] == 2

    asyncio.run(scenario())


def test_the_concurrency_limit_counts_undelivered_jobs() -> None:
    async def scenario() -> None:
        board = JobBoard(max_concurrent_jobs=3, clock=Clock())
        assert (await board.submit([state("a"), state("b")]))[0]
        assert await board.submit([state("c"), state("d")]) == (False, 2)
        (a, b) = await board.claim("r1", [], want=2, wait_s=0)
        await run_steps(board, "r1", a, upto=3)  # finished, results not fetched: still counts
        assert not (await board.submit([state("c"), state("d")]))[0]
        await board.poll(["a"])
        assert await board.cancel("b") is True
        assert await board.cancel("never") is False
        assert await board.submit([state("c"), state("d")]) == (True, 2)

    asyncio.run(scenario())


def test_a_cancelled_job_delivers_nothing_more() -> None:
    async def scenario() -> None:
        board = JobBoard(clock=Clock())
        await board.submit([state("a", steps_total=5)])
        (job,) = await board.claim("r1", [], want=1, wait_s=0)
        job = await run_steps(board, "r1", job, upto=2)
        assert await board.cancel("a")
        # the owner's next post is refused, so it stops; nothing of the job comes out again
        assert not await board.post("r1", result("a", 2), replace(job, steps_done=3))
        assert (await board.poll(["a"])).results == []
        assert await board.claim("r2", [], want=1, wait_s=0) == []

    asyncio.run(scenario())


def test_a_lost_replicas_job_resumes_elsewhere_then_fails_after_max_attempts() -> None:
    async def scenario() -> None:
        clock = Clock()
        board = JobBoard(lease_s=10, max_attempts=2, clock=clock)
        await board.submit([state("a", steps_total=4)])
        (job,) = await board.claim("r1", [], want=1, wait_s=0)
        await run_steps(board, "r1", job, upto=2)
        clock.now += 9
        await board.claim("r1", ["a"], want=0, wait_s=0)  # r1 renews its lease
        clock.now += 9
        assert await board.claim("r2", [], want=1, wait_s=0) == []  # not yet lost
        clock.now += 2  # r1 stopped renewing 11 s ago: its job goes back to the queue
        (resumed,) = await board.claim("r2", [], want=1, wait_s=0)
        assert resumed.steps_done == 2  # from its last posted state
        # r1 comes back and posts the step it was computing: refused, r2 owns the job now
        assert not await board.post("r1", result("a", 2), replace(resumed, steps_done=3))
        await run_steps(board, "r2", resumed, upto=3)
        clock.now += 11  # r2 is lost too: the second loss fails the job
        poll = await board.poll(["a"])
        assert [r.step for r in poll.results] == [0, 1, 2]  # what was made is still delivered
        assert "stopped 2 times (at step 3 of 4)" in poll.failed["a"]
        assert (await board.poll(["a"])).failed  # and the failure stays reported

    asyncio.run(scenario())


def test_a_failed_job_is_reported_with_its_reason() -> None:
    async def scenario() -> None:
        board = JobBoard(clock=Clock())
        await board.submit([state("a")])
        await board.claim("r1", [], want=1, wait_s=0)
        await board.fail("r2", "a", "not its job")  # only the owner fails a job
        assert (await board.poll(["a"])).failed == {}
        await board.fail("r1", "a", "the model failed at step 0")
        assert (await board.poll(["a"])).failed == {"a": "the model failed at step 0"}

    asyncio.run(scenario())


def test_results_expire_a_lifespan_after_the_newest() -> None:
    async def scenario() -> None:
        clock = Clock()
        board = JobBoard(max_job_lifespan_s=100, clock=clock)
        await board.submit([state("a", steps_total=2), state("b", steps_total=2)])
        jobs = await board.claim("r1", [], want=2, wait_s=0)
        for job in jobs:
            await run_steps(board, "r1", job, upto=1)
        clock.now += 60
        await run_steps(board, "r1", replace(jobs[1], steps_done=1), upto=2)  # b's newest
        clock.now += 50  # a: 110 s after its newest result, b: 50 s
        poll = await board.poll(["a", "b"])
        assert (poll.unknown, [(r.job_id, r.step) for r in poll.results]) == (
            ["a"], [("b", 0), ("b", 1)])
        clock.now += 99
        assert (await board.poll(["b"])).unknown == []  # a poll counts as a sign of life
        clock.now += 101 + EXPIRY_CHECK_S
        assert (await board.poll(["b"])).unknown == ["b"]


def test_an_abandoned_running_job_is_stopped_and_deleted() -> None:
    async def scenario() -> None:
        clock = Clock()
        board = JobBoard(max_job_lifespan_s=100, lease_s=1000, clock=clock)
        await board.submit([state("a", steps_total=5)])
        (job,) = await board.claim("r1", [], want=1, wait_s=0)
        job = await run_steps(board, "r1", job, upto=1)
        clock.now += 101 + EXPIRY_CHECK_S  # nobody polled, nothing new for a lifespan
        assert not await board.post("r1", result("a", 1), replace(job, steps_done=2))
        assert (await board.poll(["a"])).unknown == ["a"]

    asyncio.run(scenario())


def test_a_waiting_claim_wakes_on_new_work() -> None:
    async def scenario() -> None:
        board = JobBoard()
        waiting = asyncio.create_task(board.claim("r1", [], want=1, wait_s=30))
        await asyncio.sleep(0.05)
        await board.submit([state("a")])
        claimed = await asyncio.wait_for(waiting, timeout=5)
        assert [s.job_id for s in claimed] == ["a"]

    asyncio.run(scenario())
