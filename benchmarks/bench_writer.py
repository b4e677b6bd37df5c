"""Output writer speed, measured side by side in one run.

    python benchmarks/bench_writer.py [--frames N] [--write-docs]

(a) PNG encoding of a 300x180 game-like frame (the WHAM 1.6B size) at zlib level 1 (what
    the writer uses) against Pillow's default level 6: ms per frame and bytes per frame.
(b) overlap of output with generation: N steps of a stand-in accelerator step (a 20 ms
    sleep: on a GPU the actor thread waits on the device and holds no CPU) run (1) alone,
    (2) with each frame encoded and written to a local folder inline, and (3) with the
    background `OutputWriter` (2 threads), including its final `finish_unit`. The goal is
    (3) close to (1).

Frames are synthetic (gradients, blocks and mild noise), which compress roughly like game
frames; pure noise would not. `--write-docs` replaces the "## Writer" section of
docs/benchmarks.md with the table printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from docs_section import replace_section  # noqa: E402

from pipeline.contracts.storage import LocalStorage  # noqa: E402
from workers.actor import encode as watermark  # noqa: E402
from workers.actor.writer import OutputWriter, WriterSettings  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SECTION = "## Writer"
H, W = 180, 300


def game_like_frame(i: int) -> np.ndarray:
    """uint8 (3,H,W): a sky gradient, a moving block and mild noise."""
    rng = np.random.default_rng(i)
    y = np.linspace(0, 1, H)[:, None]
    x = np.linspace(0, 1, W)[None, :]
    img = np.stack([120 + 80 * y + 0 * x, 160 - 60 * y + 20 * x, 200 - 100 * y + 0 * x])
    x0 = (i * 7) % (W - 60)
    img[:, 100:160, x0 : x0 + 60] = np.array([90, 60, 40])[:, None, None]
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def bench_png(frames: list[np.ndarray]) -> list[tuple[str, float, float]]:
    rows = []
    text = {"Software": "wham-batch"}
    for level in (1, 6):
        watermark.PNG_COMPRESS_LEVEL = level
        t0 = time.perf_counter()
        sizes = [len(watermark.encode_png(f, text=text, watermark=True)) for f in frames]
        ms = (time.perf_counter() - t0) * 1000 / len(frames)
        rows.append((f"PNG level {level}", ms, float(np.mean(sizes))))
    watermark.PNG_COMPRESS_LEVEL = 1
    return rows


STEP_S = 0.02


def compute_step() -> None:
    time.sleep(STEP_S)  # the actor thread waiting for one generated step on the accelerator


def action(i: int) -> np.ndarray:
    return np.array([i % 2] * 12 + [5] * 4)


def bench_overlap(frames: list[np.ndarray], root: Path) -> list[tuple[str, float]]:
    results = []

    t0 = time.perf_counter()
    for _ in frames:
        compute_step()
    results.append(("generation only", time.perf_counter() - t0))

    storage = LocalStorage(root / "inline")
    t0 = time.perf_counter()
    for i, f in enumerate(frames):
        compute_step()
        data = watermark.encode_png(f, text={"step": str(i)}, watermark=True)
        storage.put_bytes(f"frames/{i:06d}.png", data)
    results.append(("generation + inline PNG writes", time.perf_counter() - t0))

    writer = OutputWriter(LocalStorage(root / "bg"), WriterSettings(
        run_date="2026-01-01",
        run_id="bench",
        model_id="bench",
        frame_mode="png",
        threads=2,
        image_tokens=False,
    ))
    t0 = time.perf_counter()
    for i, f in enumerate(frames):
        compute_step()
        writer.add_step(
            "u000000",
            "bench-r000",
            step=i,
            image=f,
            action=action(i),
            generated=True,
            action_source="model",
        )
    writer.finish_rollout("u000000", _row())
    writer.finish_unit("u000000")
    results.append(("generation + background OutputWriter", time.perf_counter() - t0))
    writer.close()
    return results


def _row() -> dict:
    now = dt.datetime.now(dt.UTC)
    return {
        "rollout_id": "bench-r000",
        "seed_id": "bench",
        "seed_uri": "bench.png",
        "rollout_index": 0,
        "mode": "world_model",
        "action_policy": "random",
        "context_steps": 0,
        "generated_steps": 1,
        "temperature": 0.9,
        "top_k": None,
        "top_p": 1.0,
        "greedy": False,
        "rng_seed": 0,
        "model_id": "bench",
        "model_sha256": "-",
        "status": "ok",
        "error": None,
        "worker": "bench",
        "started_at": now,
        "finished_at": now,
        "generate_seconds": 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    frames = [game_like_frame(i) for i in range(args.frames)]
    png = bench_png(frames)
    with tempfile.TemporaryDirectory() as tmp:
        overlap = bench_overlap(frames, Path(tmp))
    base = overlap[0][1]
    lines = [
        SECTION,
        "",
        f"`python benchmarks/bench_writer.py --frames {args.frames}` on {platform.machine()} "
        f"with {os.cpu_count()} CPUs (1-minute load average {os.getloadavg()[0]:.1f} at the "
        f"end), {dt.date.today().isoformat()}; {args.frames} frames of {W}x{H}, one run.",
        "",
        "| PNG encoding (with watermark) | ms / frame | KiB / frame |",
        "|---|---|---|",
        *(f"| {name} | {ms:.2f} | {size / 1024:.1f} |" for name, ms, size in png),
        f"| level 1 vs level 6 | {png[0][1] / png[1][1]:.2f}x time | "
        f"{png[0][2] / png[1][2]:.2f}x size |",
        "",
        "| generation with output | seconds | vs generation only |",
        "|---|---|---|",
        *(f"| {name} | {s:.2f} | {s / base:.2f}x |" for name, s in overlap),
        "",
        "Generation is a 20 ms sleep per step (the actor waiting on the accelerator). The",
        "writer threads share the CPUs with whatever else runs on the machine, so on a busy",
        "machine the background writer's overhead is an upper bound.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        replace_section(DOCS, text)


if __name__ == "__main__":
    main()
