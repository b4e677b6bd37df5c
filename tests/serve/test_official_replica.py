"""The official local-server protocol on a MuseReplica called directly (no Serve): jobs run
on the replica's engine through its in-process job board; the key rule on every route."""

from __future__ import annotations

import asyncio
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image
from starlette.requests import Request
from support.asgi import make_request
from support.official import dotnet_form, job_json

from workers.actor.serve_replica import MuseReplica, key_digest

KEY = "official-replica-key"


def make_replica(key: str | None) -> MuseReplica:
    replica = MuseReplica(checkpoint=None, preset="tiny", device="cpu", dtype="float32",
                          max_batch=4, api_key_sha256=None if key is None else key_digest(key))

    async def one_step(step):  # noqa: ANN001, ANN202 - Serve's batch queue needs Serve
        return (await asyncio.to_thread(replica.score_batch, [step]))[0]

    replica.official._batched = one_step
    return replica


def new_job_request(parallel: int, predict: int, key: str | None = None) -> Request:
    buf = io.BytesIO()
    Image.fromarray(np.full((180, 300, 3), 90, np.uint8)).save(buf, format="PNG")
    steps = [{"image_name": "image0.png", "action": [0.0] * 16, "tokens": None}]
    body, content_type = dotnet_form([
        ("json", None, "text/plain", json.dumps(job_json(steps, predict=predict,
                                                          parallel=parallel)).encode()),
        ("image0.png", "image0.png", "image/png", buf.getvalue())])
    headers = {"Content-Type": content_type}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return make_request("/new_job", method="POST", body=body, headers=headers)


async def poll_all(replica: MuseReplica, job_ids: list[str], count: int) -> list[tuple]:
    got: list[tuple] = []
    for _ in range(600):
        reply = await replica.handle(make_request("/get_job_results",
                                             query=[("job_ids", j) for j in job_ids]))
        if reply.status == 200:
            with zipfile.ZipFile(io.BytesIO(reply.body)) as archive:
                got += [(p["job_id"], p["dream_step_index"])
                        for p in json.loads(archive.read("predictions.json"))]
        else:
            assert reply.status == 204, reply.body
        if len(got) >= count:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"only {len(got)} of {count} results came")


def test_jobs_run_to_the_end_and_a_cancelled_one_stops() -> None:
    async def scenario() -> None:
        replica = make_replica(None)  # no key: no Authorization needed, as on loopback
        reply = await replica.handle(new_job_request(parallel=2, predict=1))
        assert reply.status == 200, reply.body
        ids = json.loads(reply.body)["job_ids"]
        got = await poll_all(replica, ids, 4)
        assert sorted(got) == sorted((j, s) for j in ids for s in range(2))
        reply = await replica.handle(make_request("/get_job_results", query=[("job_ids", ids[0])]))
        assert reply.status == 204
        reply = await replica.handle(new_job_request(parallel=1, predict=9))
        (long_job,) = json.loads(reply.body)["job_ids"]
        await poll_all(replica, [long_job], 1)
        reply = await replica.handle(make_request("/cancel_job", query={"job_id": long_job}))
        assert (reply.status, json.loads(reply.body)["cancelled"]) == (200, True)
        for _ in range(300):  # the step in flight ends, its post is refused, the task ends
            if not replica.official._running:
                break
            await asyncio.sleep(0.1)
        assert not replica.official._running
        reply = await replica.handle(make_request("/get_job_results", query={"job_ids": long_job}))
        assert reply.status == 204  # nothing of the cancelled job came out after the cancel

    asyncio.run(scenario())


@pytest.mark.parametrize("route", ["/", "/new_job", "/get_job_results", "/cancel_job"])
def test_with_a_key_every_route_needs_it(route: str) -> None:
    async def scenario() -> None:
        replica = make_replica(KEY)
        method = "POST" if route == "/new_job" else "GET"
        reply = await replica.handle(make_request(route, method=method))
        assert reply.status == 401 and reply.headers == {"WWW-Authenticate": "Bearer"}
        reply = await replica.handle(make_request(route, method=method,
                                             headers={"Authorization": f"Bearer {KEY}"}))
        assert reply.status in (200, 400), reply.body  # past the key: details, or a bad request

    asyncio.run(scenario())
