"""`wham-batch serve` with the shipped demo model, on loopback, spoken to over HTTP.

(a) an iterative Muse client loop, (b) concurrent requests batched and equal to `dream`,
(c) every bad input answered with its status and a JSON error; plus backpressure, health
and the Ray metrics.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from support.muse import SERVER_KEY, ServeProcess

from pipeline.cli import main as cli_main
from workers.actor.encode import encode_png
from workers.actor.muse import MAX_CONTEXT_ENTRIES, model_to_official
from workers.wham.actions import STICK_BIN_CENTRES

REPO = Path(__file__).resolve().parents[2]
CLIP = REPO / "configs" / "seeds" / "toygame" / "clip_1000000.npz"
SEED_PNG = REPO / "configs" / "seeds" / "toygame" / "clip_1000000.png"
pytestmark = pytest.mark.slow
METRICS_WAIT_S = 60.0


def post(url: str, body: bytes | dict, *, key: str | None = SERVER_KEY,
         path: str = "/score", method: str = "POST",
         timeout: float = 60.0) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON body or text) of one request."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=data if method == "POST" else None, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = raw.decode(errors="replace")
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload
    finally:
        conn.close()


def png_b64(image_hwc: np.ndarray, *, size: tuple[int, int] | None = None,
            fmt: str = "PNG") -> str:
    img = Image.fromarray(image_hwc, "RGB")
    if size is not None:
        img = img.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def decode_png(data: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(data))) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB")).transpose(2, 0, 1)


def clip_context(steps: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    with np.load(CLIP) as data:
        images, actions = data["images"][:steps], data["actions"][:steps]
    context = [{"image": png_b64(img.transpose(1, 2, 0)), "actions": model_to_official(a),
                "tokens": []} for img, a in zip(images, actions, strict=True)]
    return images, actions, context


def check_result(result: dict) -> None:
    image = decode_png(result["image"])
    assert image.shape == (3, 32, 32)
    actions = result["actions"]
    assert len(actions) == 16 and all(a in (0.0, 1.0) for a in actions[:12])
    assert all(min(abs(a - c) for c in STICK_BIN_CENTRES) < 1e-6 for a in actions[12:])
    assert len(result["tokens"]) == 16 and all(0 <= t < 256 for t in result["tokens"])


# ---------------------------------------------------------------- (a) the iterative client


def test_a_iterative_client_loop_of_five_steps(muse_server: ServeProcess) -> None:
    """Context built like the Muse client: 300x180 base64 PNG frames, 16-number actions,
    extra keys, the last 10 entries; each answer is appended."""
    with Image.open(SEED_PNG) as img:
        seed = np.asarray(img.convert("RGB"))
    context = [{"image": png_b64(seed, size=(300, 180)), "actions": [0.0] * 12 + [0.1] * 4,
                "tokens": [], "actions_output": [0.0] * 16, "frame_index": 0}]
    frames = []
    for step in range(5):
        status, _, reply = post(muse_server.url, {"input_data": {
            "context": context[-10:],
            "parameters": {"temperature": 0.9, "top_k": None, "top_p": 1.0, "seed": step}}})
        assert status == 200, reply
        (result,) = reply["results"]
        check_result(result)
        frames.append(decode_png(result["image"]))
        context.append({"image": result["image"], "actions": result["actions"],
                        "tokens": result["tokens"], "actions_output": result["actions"]})
    assert len(frames) == 5 and len(context) == 6


# ---------------------------------------------------------------- (b) batching and dream


def _batch_sizes(metrics_url: str) -> tuple[float, float]:
    """(engine calls, calls of one row) from the server's Prometheus text."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    calls = ones = 0.0
    for line in text.splitlines():
        if line.startswith("ray_wham_serve_batch_size_count"):
            calls += float(line.rsplit(" ", 1)[1])
        elif line.startswith("ray_wham_serve_batch_size_bucket") and 'le="1.0"' in line:
            ones += float(line.rsplit(" ", 1)[1])
    return calls, ones


def test_b_concurrent_requests_are_batched_and_equal_dream(
        muse_server: ServeProcess, tmp_path: Path) -> None:
    images, _, context = clip_context(4)
    seeds = list(range(100, 116))

    def ask(seed: int) -> dict:
        status, _, reply = post(muse_server.url, {"input_data": {
            "context": context, "parameters": {"seed": seed}}})
        assert status == 200, reply
        return reply["results"][0]

    with ThreadPoolExecutor(len(seeds)) as pool:
        results = list(pool.map(ask, seeds))
    out = tmp_path / "dream.npz"
    assert cli_main(["dream", "--checkpoint", str(REPO / "models" / "demo"), "--device", "cpu",
                     "--context", str(CLIP), "--context-steps", "4", "--steps", "1",
                     "--mode", "full", "--batch", str(len(seeds)), "--seed", str(seeds[0]),
                     "--out", str(out)]) == 0
    with np.load(out) as dream:  # rollout b of dream uses seed seeds[0] + b
        for b, result in enumerate(results):
            assert result["tokens"] == dream["image_tokens"][b, 0].tolist()
            assert result["actions"] == model_to_official(dream["actions"][b, 0])
            marked = Image.open(io.BytesIO(encode_png(dream["images"][b, 0], text={},
                                                      watermark=True)))
            assert np.array_equal(decode_png(result["image"]),
                                  np.asarray(marked).transpose(2, 0, 1))
    assert muse_server.metrics_url, muse_server.log()[-2000:]
    deadline = time.monotonic() + METRICS_WAIT_S
    calls, ones = _batch_sizes(muse_server.metrics_url)
    while not calls - ones > 0 and time.monotonic() < deadline:  # exported every few seconds
        time.sleep(1.0)
        calls, ones = _batch_sizes(muse_server.metrics_url)
    assert calls - ones > 0, f"no engine call carried more than one request ({calls} calls)"


# ---------------------------------------------------------------- (c) bad input


def _entry(**extra: Any) -> dict:
    return {"image": png_b64(np.zeros((32, 32, 3), np.uint8)), "actions": [0] * 16, **extra}


def _req(*entries: dict, **params: Any) -> dict:
    return {"input_data": {"context": list(entries), "parameters": params}}


def _huge_png() -> str:
    buf = io.BytesIO()
    Image.new("1", (4200, 4100)).save(buf, format="PNG")  # 17.2 M pixels, a few KB
    return base64.b64encode(buf.getvalue()).decode()


def _nan_body() -> bytes:
    body = json.dumps(_req(_entry()))
    return body.replace('"actions": [0, ', '"actions": [NaN, ', 1).encode()


BAD_INPUTS = [
    ("malformed JSON", b'{"input_data": {"context": [', 400, "body"),
    ("not an object", b"[1, 2]", 400, "body"),
    ("no input_data", {"inputs": []}, 400, "input_data"),
    ("empty context", _req(), 400, "input_data.context"),
    ("bad base64", _req(_entry(image="!!not base64!!")), 400, "input_data.context[0].image"),
    ("not an image", _req(_entry(image=base64.b64encode(b"GIF89a no").decode())), 400,
     "input_data.context[0].image"),
    ("oversized image", _req(_entry(image=_huge_png())), 400, "input_data.context[0].image"),
    ("missing image", _req({"actions": [0] * 16}), 400, "input_data.context[0].image"),
    ("15 actions", _req(_entry(actions=[0] * 15)), 400, "input_data.context[0].actions"),
    ("text action", _req(_entry(actions=["a"] + [0] * 15)), 400,
     "input_data.context[0].actions[0]"),
    ("NaN action", _nan_body(), 400, "input_data.context[0].actions[0]"),
    ("too many entries", _req(*[_entry()] * (MAX_CONTEXT_ENTRIES + 1)), 400,
     "input_data.context"),
    ("tokens out of range", _req(_entry(tokens=[999] * 16)), 400,
     "input_data.context[0].tokens"),
    ("bad temperature", _req(_entry(), temperature="hot"), 400,
     "input_data.parameters.temperature"),
    ("negative seed", _req(_entry(), seed=-1), 400, "input_data.parameters.seed"),
    ("body over 1 MiB", b"{" + b" " * (2**20 + 10) + b"}", 413, "body"),
]


@pytest.mark.parametrize(("what", "body", "status", "field"), BAD_INPUTS,
                         ids=[b[0] for b in BAD_INPUTS])
def test_c_bad_input_gets_its_status_and_a_json_error(
        muse_server: ServeProcess, what: str, body: Any, status: int, field: str) -> None:
    got, headers, reply = post(muse_server.url, body)
    assert got == status, reply
    assert headers["content-type"].startswith("application/json")
    assert reply["field"] == field and field in reply["error"], reply
    assert "Traceback" not in reply["error"]


@pytest.mark.parametrize(("key", "path", "method", "status"), [
    (None, "/score", "POST", 401),
    ("wrong-key", "/score", "POST", 401),
    ("", "/", "POST", 401),
    (SERVER_KEY, "/score", "GET", 405),
    (SERVER_KEY, "/predict", "POST", 404),
])
def test_c_auth_and_routes(muse_server: ServeProcess, key: str | None, path: str,
                           method: str, status: int) -> None:
    got, headers, reply = post(muse_server.url, _req(_entry()), key=key, path=path,
                               method=method)
    assert got == status, reply
    assert isinstance(reply, dict) and reply["error"]
    if status == 401:
        assert headers["www-authenticate"] == "Bearer"


def test_any_size_jpeg_and_given_tokens_are_accepted(muse_server: ServeProcess) -> None:
    """A JPEG of another size is resized; an entry with the model's token count is used
    instead of its image (here an image that would not decode)."""
    _, _, context = clip_context(2)
    with np.load(CLIP) as data:
        big = data["images"][0].transpose(1, 2, 0)
    context[0]["image"] = png_b64(big, size=(300, 180), fmt="JPEG")
    status, _, reply = post(muse_server.url, _req(*context, seed=7))
    assert status == 200, reply
    tokens = reply["results"][0]["tokens"]
    context.append({"image": "not even base64", "actions": [0.0] * 16, "tokens": tokens})
    status, _, reply = post(muse_server.url, _req(*context, seed=7))
    assert status == 200, reply
    check_result(reply["results"][0])


def test_a_full_queue_answers_503_with_retry_after(muse_server: ServeProcess) -> None:
    """More requests at once than max_batch + max_queue: the rest get 503 + Retry-After."""
    _, _, context = clip_context(4)
    body = _req(*context, seed=1)
    statuses: list[tuple[int, dict]] = []
    for _ in range(3):  # bounded: one burst nearly always overflows; three to be sure
        with ThreadPoolExecutor(48) as pool:
            replies = list(pool.map(lambda _: post(muse_server.url, body), range(48)))
        statuses += [(status, headers) for status, headers, _ in replies]
        if any(status == 503 for status, _ in statuses):
            break
    assert {status for status, _ in statuses} <= {200, 503}
    busy = [headers for status, headers in statuses if status == 503]
    assert busy, "no request was refused"
    assert all(int(h["retry-after"]) >= 1 for h in busy)


def test_health_route_needs_no_key(muse_server: ServeProcess) -> None:
    status, _, reply = post(muse_server.url, b"", key=None, path="/health", method="GET")
    assert status == 200 and reply["status"] == "ok" and reply["model_id"] == "toygame-demo"


def test_the_key_reaches_neither_the_log_nor_rays_session_folder(
        muse_server: ServeProcess) -> None:
    """The replicas hold the key's digest; the key itself stays in the server's environment."""
    status, _, _ = post(muse_server.url, _req(_entry()))  # at least one authorised request
    assert status == 200
    files = [p for p in muse_server.ray_tmp.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name.endswith((".out", ".err", ".log")) for p in files)
    leaks = [str(p) for p in files if SERVER_KEY.encode() in p.read_bytes()]
    assert leaks == [] and SERVER_KEY not in muse_server.log()


def test_the_server_is_quiet_by_default(muse_server: ServeProcess) -> None:
    """Ray Serve's INFO lines (controller, proxy, a line per request) only with --verbose."""
    status, _, _ = post(muse_server.url, _req(_entry()))
    assert status == 200
    log = muse_server.log()
    assert "serving at" in log
    for noise in ("Started Serve", "Deploying new version",
                  "POST / 200"):  # the last: Serve's line per request
        assert noise not in log, log[-2000:]
    # Serve's replica and proxy lines below WARNING; warnings and errors always show
    # (serve_logging), e.g. a router's slow queue-length probe on a loaded machine.
    chatty = [line for line in log.splitlines() if ("ServeReplica" in line or "ProxyActor" in line)
              and not re.search(r"\b(WARNING|ERROR)\b", line)]
    assert not chatty, chatty
