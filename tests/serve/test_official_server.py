"""`wham-batch serve` on the shipped demo model, spoken to as the WHAM Demonstrator speaks the
official local-server protocol: multipart uploads, polling, cancelling; concurrent jobs with
several parallel predictions, every step delivered exactly once, 204 when nothing is new,
bad requests answered 400 naming the field, the limits, and a replica killed mid-job."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from support.muse import ServeProcess, running_server
from support.official import Answer, DemonstratorClient, dotnet_form, job_json
from support.procs import session_pids

from workers.actor.official import MAX_FORM_PARTS
from workers.wham.actions import STICK_BIN_CENTRES

pytestmark = pytest.mark.slow
KEY = "official-protocol-key-9c2e"
MAX_JOBS, MAX_STEPS, LEASE_S = 8, 4, 4
SERVER_ARGS = ["--checkpoint", "models/demo", "--device", "cpu", "--max-batch", "16",
               "--batch-wait-ms", "100", "--max-body-mb", "1",
               "--max-concurrent-jobs", str(MAX_JOBS), "--max-dream-steps-per-job",
               str(MAX_STEPS), "--job-lease-s", str(LEASE_S)]
RESULTS_TIMEOUT_S = 240.0
DEMO_SIZE, DEMO_TOKENS = (32, 32), 16  # models/demo: 32x32 frames, 16 tokens each


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with running_server(SERVER_ARGS, key=KEY, log_dir=tmp_path_factory.mktemp("official")) as proc:
        yield proc


@pytest.fixture
def client(server: ServeProcess) -> DemonstratorClient:
    return DemonstratorClient(server.url, key=KEY)


def frame_png(index: int) -> bytes:
    """A 300x180 frame, as the Demonstrator's examples are."""
    img = Image.new("RGB", (300, 180), (30 + 7 * index, 80, 140))
    ImageDraw.Draw(img).rectangle([20 + 15 * index, 50, 90 + 15 * index, 130], fill=(240, 210, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def context(n: int, offset: int = 0) -> tuple[list[dict], dict[str, bytes]]:
    steps = [{"image_name": f"image{offset + i}.png",
              "action": [0.0, 1.0] + [0.0] * 10 + [0.15000000596046448, 1.0, 0.0, -0.625],
              "tokens": None} for i in range(n)]
    return steps, {s["image_name"]: frame_png(offset + i) for i, s in enumerate(steps)}


def start(client: DemonstratorClient, *, predict: int, parallel: int, n: int = 2,
          offset: int = 0) -> list[str]:
    steps, images = context(n, offset)
    answer = client.new_job(job_json(steps, predict=predict, parallel=parallel), images)
    assert answer.status == 200, answer.body
    reply = answer.json()
    assert len(reply["job_ids"]) == parallel and reply["current_jobs_in_queue"] >= 1
    return reply["job_ids"]


def check_zip(answer: Answer) -> None:
    """The files of a results zip are the PNGs predictions.json names, at the model's size."""
    names = {p["image_filename"] for p in answer.predictions}
    assert set(answer.files) == names | {"predictions.json"}
    for p in answer.predictions:
        assert p["image_filename"] == f"{p['job_id']}_{p['dream_step_index']}.png"
        with Image.open(io.BytesIO(answer.files[p["image_filename"]])) as img:
            assert (img.format, img.size) == ("PNG", DEMO_SIZE)
        assert len(p["tokens"]) == DEMO_TOKENS and all(isinstance(t, int) for t in p["tokens"])
        assert len(p["action"]) == 16 and set(p["action"][:12]) <= {0.0, 1.0}
        assert all(any(abs(s - c) < 1e-6 for c in STICK_BIN_CENTRES) for s in p["action"][12:])


def collect(client: DemonstratorClient, job_ids: list[str], count: int, *,
            statuses: Counter | None = None) -> list[tuple[str, int]]:
    """Poll until `count` results came (in the order they came); a 503 or a proxy error while
    a replica restarts is polled through."""
    got: list[tuple[str, int]] = []
    deadline = time.monotonic() + RESULTS_TIMEOUT_S
    while len(got) < count:
        assert time.monotonic() < deadline, f"{len(got)} of {count} results: {got}"
        try:
            answer = client.results(job_ids)
        except OSError:  # the proxy dropped the connection while no replica was up
            answer = Answer(599, {}, b"")
        if statuses is not None:
            statuses[answer.status] += 1
        if answer.status == 200:
            check_zip(answer)
            got += [(p["job_id"], p["dream_step_index"]) for p in answer.predictions]
        elif answer.status != 204:  # while a replica restarts: no replica, or no board call
            assert statuses is not None and answer.status in (500, 502, 503, 504, 599) \
                and b"job(s) failed" not in answer.body, (answer.status, answer.body)
        time.sleep(0.1)
    return got


def test_details_and_the_key_on_every_route(server: ServeProcess,
                                            client: DemonstratorClient) -> None:
    answer = client.details()
    assert answer.status == 200
    assert answer.json() == {"model_file": "demo", "max_concurrent_jobs": MAX_JOBS,
                             "max_dream_steps_per_job": MAX_STEPS, "max_job_lifespan": 600,
                             "model_id": "toygame-demo"}
    anonymous = DemonstratorClient(server.url, key=None)
    steps, images = context(1)
    for answer in (anonymous.details(), anonymous.new_job(job_json(steps, predict=0), images),
                   anonymous.results(["x"]), anonymous.cancel("x")):
        assert answer.status == 401 and answer.headers["www-authenticate"] == "Bearer"


def test_concurrent_jobs_deliver_every_step_once(client: DemonstratorClient) -> None:
    """Three Demonstrator windows at once, each predicting 3 steps (4 frames) with 2
    parallel predictions: every (job, step) arrives exactly once, then polls answer 204."""
    outcome: dict[int, list] = {}

    def window(k: int) -> None:
        ids = start(client, predict=3, parallel=2, n=2 + k % 2, offset=3 * k)
        outcome[k] = [ids, collect(client, ids, 8)]

    threads = [threading.Thread(target=window, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=RESULTS_TIMEOUT_S + 30)
    assert sorted(outcome) == [0, 1, 2]
    for ids, got in outcome.values():
        assert sorted(got) == sorted((j, s) for j in ids for s in range(4)), got
        assert client.results(ids).status == 204  # nothing new: 204, nothing repeated


def test_a_cancelled_job_delivers_nothing_later(client: DemonstratorClient) -> None:
    (job,) = start(client, predict=MAX_STEPS, parallel=1)
    first = collect(client, [job], 1)
    cancelled = client.cancel(job)
    assert cancelled.status == 200 and cancelled.json() == {"job_id": job, "cancelled": True}
    deadline = time.monotonic() + 6.0  # several steps' worth of time
    while time.monotonic() < deadline:
        answer = client.results([job])
        assert answer.status == 204, (first, answer.predictions)
        time.sleep(0.2)


def _form(job: dict | bytes, images: dict[str, bytes]) -> tuple[bytes, str]:
    data = job if isinstance(job, bytes) else json.dumps(job).encode()
    return dotnet_form([("json", None, "text/plain; charset=utf-8", data)] +
                       [(n, n, "image/png", b) for n, b in images.items()])


def bad_forms() -> list[tuple[str, bytes, str, int, str]]:
    """(what, body, content type, status, field)."""
    steps, images = context(2)
    good = job_json(steps, predict=1)
    cases: list[tuple[str, dict | bytes, dict, int, str]] = [
        ("no json field", None, images, 400, "json"),
        ("json that is not JSON", b"{steps: ", images, 400, "json"),
        ("no steps", {**good, "steps": None}, images, 400, "json.steps"),
        ("no num_steps_to_predict", {k: v for k, v in good.items()
                                     if k != "num_steps_to_predict"},
         images, 400, "json.num_steps_to_predict"),
        ("too many steps", {**good, "num_steps_to_predict": MAX_STEPS + 1}, images, 400,
         "json.num_steps_to_predict"),
        ("an image named but not uploaded", good, {"image0.png": images["image0.png"]}, 400,
         "json.steps[1].image_name"),
        ("an undecodable image", good, {**images, "image1.png": b"\x89PNG\r\n\x1a\n broken"},
         400, "files[image1.png]"),
        ("an action of 15 values", {**good, "steps": [{**steps[0], "action": [0.0] * 15}]},
         images, 400, "json.steps[0].action"),
        ("more parallel jobs than the server runs", {**good, "num_parallel_predictions":
                                                     MAX_JOBS + 1}, images, 400,
         "json.num_parallel_predictions"),
    ]
    out = []
    for what, job, files, status, field in cases:
        if job is None:
            body, content_type = dotnet_form([(n, n, "image/png", b) for n, b in files.items()])
        else:
            body, content_type = _form(job, files)
        out.append((what, body, content_type, status, field))
    many = {f"extra{i}.png": b"x" for i in range(MAX_FORM_PARTS)}
    out.append(("too many form parts", *_form(good, {**images, **many}), 413, "body"))
    big = {**images, "image1.png": frame_png(1) + b"\0" * 2**20}
    out.append(("a body over --max-body-mb", *_form(good, big), 413, "body"))
    out.append(("not a form", json.dumps(good).encode(), "application/json", 400,
                "Content-Type"))
    return out


@pytest.mark.parametrize("case", bad_forms(), ids=lambda c: c[0])
def test_bad_jobs_are_400_naming_the_field(client: DemonstratorClient, case: tuple) -> None:
    _, body, content_type, status, field = case
    answer = client.post_form(body, content_type)
    assert answer.status == status, answer.body
    assert answer.json()["field"] == field, answer.body


def test_bad_polls_and_cancels(client: DemonstratorClient) -> None:
    answer = client._request("GET", "/get_job_results")
    assert (answer.status, answer.json()["field"]) == (400, "job_ids")
    answer = client._request("GET", "/cancel_job")
    assert (answer.status, answer.json()["field"]) == (400, "job_id")
    answer = client.results(["0123456789abcdef0123456789abcdef"])
    assert (answer.status, answer.json()["field"]) == (404, "job_ids")
    assert "unknown job id" in answer.json()["error"]
    assert client._request("POST", "/get_job_results").status == 405


def test_the_concurrent_jobs_limit(client: DemonstratorClient) -> None:
    ids = start(client, predict=MAX_STEPS, parallel=MAX_JOBS)
    steps, images = context(1)
    refused = client.new_job(job_json(steps, predict=0), images)
    assert refused.status == 400 and refused.json()["field"] == "json.num_parallel_predictions"
    assert f"at most {MAX_JOBS}" in refused.json()["error"]
    for job in ids:
        assert client.cancel(job).status == 200
    again = client.new_job(job_json(steps, predict=0), images)
    assert again.status == 200, again.body
    (job,) = again.json()["job_ids"]
    assert collect(client, [job], 1) == [(job, 0)]


def _replica_pids(server: ServeProcess) -> list[int]:
    pids = []
    for pid in session_pids(server.proc.pid):
        with contextlib.suppress(OSError):
            if b"ServeReplica:wham:MuseReplica" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
    return pids


def test_jobs_survive_a_replica_killed_mid_job(server: ServeProcess,
                                               client: DemonstratorClient) -> None:
    """The model replica dies between steps of two jobs; Serve starts a new one, the jobs'
    leases run out, and the new replica resumes them: every step still arrives once."""
    ids = start(client, predict=MAX_STEPS, parallel=2)
    got = collect(client, ids, 1)
    (old,) = _replica_pids(server)
    os.kill(old, signal.SIGKILL)
    statuses: Counter = Counter()
    got += collect(client, ids, 2 * (MAX_STEPS + 1) - len(got), statuses=statuses)
    assert sorted(got) == sorted((j, s) for j in ids for s in range(MAX_STEPS + 1)), got
    assert _replica_pids(server) and _replica_pids(server) != [old]
    assert client.results(ids).status == 204
