"""`wham-batch serve` with 16 concurrent Muse clients vs the bare engine at batch 16, in one run.

    python benchmarks/bench_serve.py [--checkpoint models/demo | --preset wham-200m]
        [--clients 16] [--steps 6] [--context-steps 4] [--rounds 3] [--batch-wait-ms 100]

Every client is an iterative Muse client: it posts its context (the newest 10 steps, each a
base64 PNG, the official action and the frame's tokens), appends the answer and posts again,
`--steps` times, all clients at once. The server is the real command in a child process (its
own Ray instance, one replica with `--cpus` threads, batches of up to `--clients`).

The engine does the same work in-process with the same threads, two ways:
- step by step: one `RolloutEngine.rollout(steps=1)` per step over the grown context, which is
  what a stateless protocol costs (every request prefills its whole window), plus the PNG
  encoding of each answer;
- one rollout: `RolloutEngine.rollout(steps=N)`, the batch pipeline's way (the KV cache
  carries over while the window grows).

`--official` measures the official local-server protocol (the WHAM Demonstrator's) instead:
`--clients` pollers each submit a job of `--steps` frames and poll every `--poll-ms`,
against as many Muse clients making the same frames, on one server; `--write-docs` writes
"## Serve: the official protocol" in docs/benchmarks.md.

Throughput is frames per second (clients x steps / wall); latency is each request's wall
time seen by its client, p50 and p99. The server starts first (its start-up time is
reported apart) and idles while the engine runs; engine and server rounds alternate, so
the load of a shared machine falls on both, and the ratios are of summed times. Prints a
Markdown row and, with --json, one JSON line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from workers import wham
from workers.actor.encode import encode_png
from workers.actor.multipart import Part, encode_form
from workers.actor.muse import context_entry, model_to_official
from workers.actor.replica import load_replica

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import replace_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
WINDOW = 10
START_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _inputs(model, *, clients: int, context_steps: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    h, w = model.image_size
    images = rng.integers(0, 256, (clients, context_steps, 3, h, w), dtype=np.uint8)
    actions = np.concatenate([rng.integers(0, 2, (clients, context_steps, 12)),
                              rng.integers(0, 11, (clients, context_steps, 4))], axis=2)
    return images, actions


def engine_step_by_step(model, images: np.ndarray, actions: np.ndarray, *, steps: int) -> float:
    """Seconds for `steps` stateless steps of the whole batch (what the server computes)."""
    batch = len(images)
    engine = wham.RolloutEngine(model, max_batch=batch)
    tokens = model.encode_images(images).cpu()  # [B, T, n]
    acts = torch.from_numpy(actions)
    t0 = time.perf_counter()
    for k in range(steps):
        (out,) = engine.rollout(context_tokens=tokens[:, -WINDOW:],
                                context_actions=acts[:, -WINDOW:], steps=1, mode="full",
                                sampling=wham.SamplingParams(),
                                seeds=[1000 * b + k for b in range(batch)])
        for b in range(batch):  # the server answers each request with a PNG
            encode_png(out.images[b], text={}, watermark=True)
        tokens = torch.cat([tokens, out.image_tokens[:, None]], dim=1)
        acts = torch.cat([acts, out.actions[:, None]], dim=1)
    return time.perf_counter() - t0


def engine_one_rollout(model, images: np.ndarray, actions: np.ndarray, *, steps: int) -> float:
    batch = len(images)
    engine = wham.RolloutEngine(model, max_batch=batch)
    t0 = time.perf_counter()
    list(engine.rollout(context_images=images, context_actions=actions, steps=steps,
                        mode="full", sampling=wham.SamplingParams(), seeds=list(range(batch))))
    return time.perf_counter() - t0


class Server:
    def __init__(self, args: argparse.Namespace, log_path: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="wbs-"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.pop("WHAM_API_KEY", None)
        env.update(RAY_TMPDIR=str(self.ray_tmp), RAY_USAGE_STATS_ENABLED="0",
                   RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
        model = (["--checkpoint", args.checkpoint] if args.checkpoint
                 else ["--preset", args.preset])
        command = [str(Path(sys.executable).with_name("wham-batch")), "serve", *model,
                   "--device", "cpu", "--dtype", args.dtype, "--port", str(self.port),
                   "--cpus-per-replica", str(args.cpus), "--max-batch", str(args.clients),
                   "--batch-wait-ms", str(args.batch_wait_ms), "--no-watermark"
                   if args.no_watermark else "--watermark"]
        self.log_path = log_path
        self.t0 = time.perf_counter()
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        while "serving at" not in log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.perf_counter() - self.t0 > START_TIMEOUT_S:
                raise RuntimeError(log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.2)
        self.start_seconds = time.perf_counter() - self.t0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    def metric(self, name: str) -> float:
        text = self.log_path.read_text(errors="replace")
        url = next((line.split()[-1] for line in text.splitlines()
                    if line.startswith("metrics: ")), None)
        if url is None:
            return float("nan")
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
                   if line.startswith(name))


def _post(url: str, body: bytes) -> dict:
    request = urllib.request.Request(f"{url}/score", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as resp:
        return json.loads(resp.read())["results"][0]


def client(url: str, images: np.ndarray, actions: np.ndarray, *, steps: int, seed: int,
           barrier: threading.Barrier) -> list[float]:
    """One iterative Muse client; the wall time of each of its requests."""
    context = [context_entry(image=i, action=a, tokens=None)
               for i, a in zip(images, actions, strict=True)]
    latencies = []
    barrier.wait()
    for k in range(steps):
        body = json.dumps({"input_data": {"context": context[-WINDOW:],
                                          "parameters": {"seed": seed * 1000 + k}}}).encode()
        t0 = time.perf_counter()
        result = _post(url, body)
        latencies.append(time.perf_counter() - t0)
        context.append({"image": result["image"], "actions": result["actions"],
                        "tokens": result["tokens"]})
    return latencies


def serve_round(server: Server, images: np.ndarray, actions: np.ndarray, *,
                steps: int) -> tuple[float, list[float]]:
    clients = len(images)
    barrier = threading.Barrier(clients + 1)
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, server.url, images[c], actions[c], steps=steps, seed=c,
                               barrier=barrier) for c in range(clients)]
        barrier.wait()
        t0 = time.perf_counter()
        latencies = [x for f in futures for x in f.result()]
    return time.perf_counter() - t0, latencies


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=None, help="default models/demo")
    source.add_argument("--preset", default=None)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--context-steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3,
                        help="engine and server measured alternately, this many times each")
    parser.add_argument("--cpus", type=int, default=1, help="torch threads, both sides")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-wait-ms", type=float, default=100.0)
    parser.add_argument("--no-watermark", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--official", action="store_true",
                        help="the official local-server protocol against Muse, not the engine")
    parser.add_argument("--poll-ms", default="100,1000",
                        help="--official: how often a poller asks for results (ms, a list)")
    parser.add_argument("--write-docs", action="store_true",
                        help="--official: write its section of docs/benchmarks.md")
    args = parser.parse_args()
    if not args.checkpoint and not args.preset:
        args.checkpoint = "models/demo"
    return args


def main() -> int:
    args = _arguments()
    if args.official:
        return main_official(args)
    model = load_replica(checkpoint=args.checkpoint, preset=args.preset, device="cpu",
                         dtype=args.dtype, threads=args.cpus)
    images, actions = _inputs(model, clients=args.clients, context_steps=args.context_steps)
    frames = args.clients * args.steps
    load_start = os.getloadavg()[0]
    engine_step_by_step(model, images, actions, steps=1)  # warm-up
    server = Server(args, Path(tempfile.mkdtemp(prefix="bench-serve-")) / "serve.log")
    step_s, rollout_s, serve_s, latencies = [], [], [], []
    try:
        serve_round(server, images[:, :1], actions[:, :1], steps=1)  # warm-up
        for _ in range(args.rounds):  # alternate, so drifting load falls on every side
            step_s.append(engine_step_by_step(model, images, actions, steps=args.steps))
            rollout_s.append(engine_one_rollout(model, images, actions, steps=args.steps))
            wall, round_latencies = serve_round(server, images, actions, steps=args.steps)
            serve_s.append(wall)
            latencies += round_latencies
        time.sleep(12)  # Ray exports metrics every few seconds
        calls = server.metric("ray_wham_serve_batch_size_count")
        rows = server.metric("ray_wham_serve_batch_size_sum")
    finally:
        server.stop()
    p50, p99 = (float(np.percentile(latencies, q)) for q in (50, 99))

    def fps(seconds: list[float]) -> list[float]:
        return [round(frames / s, 3) for s in seconds]

    result = {
        "model": args.checkpoint or args.preset, "clients": args.clients, "steps": args.steps,
        "context_steps": args.context_steps, "rounds": args.rounds, "cpus": args.cpus,
        "dtype": args.dtype, "batch_wait_ms": args.batch_wait_ms,
        "serve_start_s": round(server.start_seconds, 1),
        "serve_fps": fps(serve_s), "engine_step_fps": fps(step_s),
        "engine_rollout_fps": fps(rollout_s),
        "serve_vs_engine_step": round(sum(step_s) / sum(serve_s), 3),
        "serve_vs_engine_rollout": round(sum(rollout_s) / sum(serve_s), 3),
        "latency_p50_s": round(p50, 4), "latency_p99_s": round(p99, 4),
        "mean_rows_per_engine_call": round(rows / calls, 2) if calls else None,
        "load_avg_start_end": [round(load_start, 1), round(os.getloadavg()[0], 1)],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
    }
    if args.json:
        print(json.dumps(result))
    print(markdown_row(result))
    return 0


def rounds(values: list[float]) -> str:
    return " / ".join(f"{v:g}" for v in values)


def markdown_row(r: dict) -> str:
    return (f"| {r['model']} | {r['clients']} x {r['steps']} | {rounds(r['serve_fps'])} | "
            f"{rounds(r['engine_step_fps'])} | {rounds(r['engine_rollout_fps'])} | "
            f"{r['serve_vs_engine_step']}x | {r['serve_vs_engine_rollout']}x | "
            f"{r['latency_p50_s'] * 1000:.0f} / {r['latency_p99_s'] * 1000:.0f} | "
            f"{r['mean_rows_per_engine_call']} | {r['serve_start_s']} |")


def _job_form(images: np.ndarray, actions: np.ndarray, *, steps: int) -> tuple[bytes, str]:
    """A Demonstrator-style job: the context frames as PNG files, `steps` frames wanted."""
    names = [f"image{k}.png" for k in range(len(images))]
    job = {"steps": [{"image_name": n, "action": model_to_official(a), "tokens": None}
                     for n, a in zip(names, actions, strict=True)],
           "num_steps_to_predict": steps - 1, "num_parallel_predictions": 1}
    parts = [Part("json", None, "application/json", json.dumps(job).encode())]
    parts += [Part(n, n, "image/png", encode_png(i, text={}, watermark=False))
              for n, i in zip(names, images, strict=True)]
    return encode_form(parts)


def official_window(url: str, images: np.ndarray, actions: np.ndarray, *, steps: int,
                    poll_s: float, barrier: threading.Barrier) -> tuple[float, int]:
    """One Demonstrator window: submit a job, poll until its frames came; (its wall time,
    the requests it made)."""
    body, content_type = _job_form(images, actions, steps=steps)
    barrier.wait()
    t0 = time.perf_counter()
    request = urllib.request.Request(f"{url}/new_job", data=body,
                                     headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=600) as resp:
        (job,), frames, requests = json.loads(resp.read())["job_ids"], 0, 1
    while frames < steps:
        time.sleep(poll_s)
        requests += 1
        with urllib.request.urlopen(f"{url}/get_job_results?job_ids={job}", timeout=600) as resp:
            if resp.status == 200:
                with zipfile.ZipFile(io.BytesIO(resp.read())) as archive:
                    frames += len(json.loads(archive.read("predictions.json")))
    return time.perf_counter() - t0, requests


def official_round(server: Server, images: np.ndarray, actions: np.ndarray, *, steps: int,
                   poll_s: float) -> tuple[float, list[float], int]:
    clients = len(images)
    barrier = threading.Barrier(clients + 1)
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(official_window, server.url, images[c], actions[c], steps=steps,
                               poll_s=poll_s, barrier=barrier) for c in range(clients)]
        barrier.wait()
        t0 = time.perf_counter()
        windows = [f.result() for f in futures]
    return time.perf_counter() - t0, [w[0] for w in windows], sum(w[1] for w in windows)


def main_official(args: argparse.Namespace) -> int:
    """Muse and the official protocol at each poll interval, rounds alternating."""
    model = load_replica(checkpoint=args.checkpoint, preset=args.preset, device="cpu",
                         dtype=args.dtype, threads=args.cpus)
    images, actions = _inputs(model, clients=args.clients, context_steps=args.context_steps)
    polls, load_start = [float(ms) for ms in args.poll_ms.split(",")], os.getloadavg()[0]
    server = Server(args, Path(tempfile.mkdtemp(prefix="bench-official-")) / "serve.log")
    walls, latency = {"muse": [], **{ms: [] for ms in polls}}, {ms: [] for ms in polls}
    sent = {"muse": args.rounds * args.clients * args.steps, **dict.fromkeys(polls, 0)}
    try:
        serve_round(server, images[:, :1], actions[:, :1], steps=1)  # warm-ups
        official_round(server, images[:, :1], actions[:, :1], steps=1, poll_s=polls[0] / 1000)
        for _ in range(args.rounds):
            walls["muse"].append(serve_round(server, images, actions, steps=args.steps)[0])
            for ms in polls:
                wall, job_s, requests = official_round(server, images, actions,
                                                       steps=args.steps, poll_s=ms / 1000)
                walls[ms].append(wall)
                latency[ms], sent[ms] = latency[ms] + job_s, sent[ms] + requests
    finally:
        server.stop()
    rows = [_official_row(f"official, polls every {ms:g} ms", walls[ms], walls["muse"],
                          latency[ms], sent[ms], args) for ms in polls]
    rows.append(_official_row("Muse (`POST /score` per step)", walls["muse"], walls["muse"],
                              [], sent["muse"], args))
    load = (round(load_start, 1), round(os.getloadavg()[0], 1))
    if args.json:
        print(json.dumps({"rows": rows, "load_avg_start_end": load}))
    section = official_section(rows, args, load=load)
    print(section)
    if args.write_docs:
        replace_section(DOCS, section)
    return 0


def _official_row(name: str, walls: list[float], muse: list[float], latency: list[float],
                  requests: int, args: argparse.Namespace) -> dict:
    pct = (lambda q: round(float(np.percentile(latency, q)), 2)) if latency else (lambda q: "-")
    return {"protocol": name, "jobs_per_s": [round(args.clients / w, 3) for w in walls],
            "steps_per_s": [round(args.clients * args.steps / w, 2) for w in walls],
            "vs_muse": round(sum(muse) / sum(walls), 3), "job_s_p50": pct(50),
            "job_s_p99": pct(99), "requests_per_s": round(requests / sum(walls), 1)}


def official_section(rows: list[dict], args: argparse.Namespace, *, load: tuple) -> str:
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    table = "".join(f"| {r['protocol']} | {rounds(r['jobs_per_s'])} | "
                    f"{rounds(r['steps_per_s'])} | {r['vs_muse']}x | {r['job_s_p50']} / "
                    f"{r['job_s_p99']} | {r['requests_per_s']} |\n" for r in rows)
    return (
        f"## Serve: the official protocol\n\n`python benchmarks/bench_serve.py "
        f"{' '.join(sys.argv[1:])}` (model {args.checkpoint or args.preset}; {args.clients} "
        f"clients x {args.steps} steps from {args.context_steps} context frames; batch wait "
        f"{args.batch_wait_ms:g} ms) on {machine}, {dt.date.today().isoformat()}, load "
        f"average {load[0]}-{load[1]}. One `wham-batch serve` (one replica, one torch "
        "thread), rounds alternating, equal frames: each official poller submits one job "
        "(a multipart upload of the context) and polls `get_job_results` until its frames "
        "came; each Muse client posts its context once per frame. Ratios are of summed "
        "times.\n\n| protocol | jobs/s (rounds) | steps/s (rounds) | vs Muse | job seconds "
        f"p50 / p99 | HTTP requests/s |\n|---|---|---|---|---|---|\n{table}\n"
        "Job steps run one at a time through the replica's batch queue, as Muse requests "
        "do, so both fill engine calls alike. The official protocol sends its context once "
        "per job, but every poll is a request through Serve's proxy, the replica and the "
        "job board, on the CPUs the model uses here; its results wait for the next poll.\n")


if __name__ == "__main__":
    sys.exit(main())
