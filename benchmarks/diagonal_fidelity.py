"""Fidelity of diagonal decoding on the trained toy-game models, against sequential decoding.

    python benchmarks/diagonal_fidelity.py   # -> docs/benchmarks.md, its own section
    python benchmarks/diagonal_fidelity.py --clips 8 --no-docs   # a quick look, prints only

For each trained model (models/demo: 4 x 4 tokens a frame; models/demo-large: 8 x 8), the
held-out toy-game clips of `wham-batch eval-demo` (game seeds 1,000,000+), the model's
default context, then greedy world-model rollouts with the clips' true actions, once with
each decoding: PSNR of the generated frame against the game's real frame 1, 5 and 10 steps
after the context (pooled over the clips), the copy-last-frame PSNR beside them, and the
fraction of image tokens the diagonal rollout shares with the sequential one at that step.
Both rollouts are deterministic (greedy), so one run decides; the seconds of each decoding
are those of the same rollouts.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from docs_section import command_line, provenance, replace_section  # noqa: E402

from workers.toygame.evaluate import (  # noqa: E402
    HORIZONS,
    default_context,
    held_out_clips,
    psnr,
    rollout_clips,
)
from workers.wham import load_model  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Diagonal decoding: fidelity"
MODELS = ("models/demo", "models/demo-large")


def measure(folder: str, *, clips: int) -> dict:
    model = load_model(ROOT / folder)
    context, steps = default_context(model), max(HORIZONS)
    images, actions = held_out_clips(clips, context + steps)
    real = images[:, context:context + steps]  # (B, steps, 3, H, W)
    out, seconds = {}, {}
    for decoding in ("sequential", "diagonal"):
        t0 = time.perf_counter()
        out[decoding] = rollout_clips(model, images, actions, context=context, steps=steps,
                                      decoding=decoding)
        seconds[decoding] = time.perf_counter() - t0
    rows = []
    for h in HORIZONS:
        seq, diag = out["sequential"][h - 1], out["diagonal"][h - 1]
        rows.append({
            "horizon": h,
            "sequential_psnr": psnr(seq.images, real[:, h - 1]),
            "diagonal_psnr": psnr(diag.images, real[:, h - 1]),
            "copy_last_psnr": psnr(images[:, context - 1], real[:, h - 1]),
            "same_tokens": float((seq.image_tokens == diag.image_tokens).float().mean()),
        })
    return {"model": folder, "model_id": model.model_id, "grid": model.token_grid,
            "context": context, "clips": clips, "rows": rows, "seconds": seconds}


def write_docs(results: list[dict], *, seconds: float, load: tuple[float, float]) -> None:
    table = ["| model (grid) | steps ahead | sequential PSNR | diagonal PSNR | diagonal - "
             "sequential dB | image tokens equal to sequential's | copy-last PSNR |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        rows_x, cols_x = res["grid"]
        for r in res["rows"]:
            table.append(
                f"| {res['model_id']} ({rows_x} x {cols_x}) | {r['horizon']} "
                f"| {r['sequential_psnr']:.2f} | {r['diagonal_psnr']:.2f} "
                f"| {r['diagonal_psnr'] - r['sequential_psnr']:+.2f} "
                f"| {r['same_tokens']:.3f} | {r['copy_last_psnr']:.2f} |")
    timing = "; ".join(
        f"{res['model_id']}: {res['seconds']['sequential']:.1f} s sequential, "
        f"{res['seconds']['diagonal']:.1f} s diagonal" for res in results)
    contexts = ", ".join(f"{r['model_id']}: {r['context']} steps" for r in results)
    lines = [
        SECTION, "",
        provenance(command_line(), load=load, seconds=seconds,
                   note=f"{torch.get_num_threads()} CPU threads"), "",
        f"Greedy world-model rollouts of the trained toy-game models on {results[0]['clips']} "
        "held-out clips (game seeds 1,000,000+), each model's default context "
        f"({contexts}), the clips' true actions; PSNR against the game's real frames, pooled "
        f"over the clips. Rollout times ({timing}) are of one process on a shared machine, "
        "not a speed measurement.", "",
        "`models/demo-large` ships fine-tuned for both decodings (`scripts/finetune_diagonal.py`"
        ", see docs/model.md, \"Diagonal decoding\"); `models/demo` keeps its raster-trained "
        "weights. Each row compares two decodings of one set of weights. The goal set for "
        "diagonal decoding is to stay within half a decibel of sequential one and five steps "
        "ahead.", "",
        *table, "",
    ]
    lines = [line if line.startswith(("|", "#")) else textwrap.fill(line, 92,
                                                                       break_on_hyphens=False)
             for line in lines]
    replace_section(DOCS, "\n".join(lines), stop=("## ",))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=32, help="held-out clips (default 32)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--no-docs", action="store_true", help="print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    results = [measure(folder, clips=args.clips) for folder in MODELS]
    for res in results:
        for r in res["rows"]:
            print(res["model_id"], {k: round(v, 4) for k, v in r.items()})
    if not args.no_docs:
        write_docs(results, seconds=time.perf_counter() - t0,
                   load=(load0, os.getloadavg()[0]))
        print(f"wrote {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
