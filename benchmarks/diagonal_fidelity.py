"""Fidelity of diagonal decoding on the trained toy-game models, against sequential decoding.

    python benchmarks/diagonal_fidelity.py   # -> docs/benchmarks.md, its own section
    python benchmarks/diagonal_fidelity.py --clips 8 --no-docs   # a quick look, prints only

For each trained model (models/demo: 4 x 4 tokens a frame; models/demo-large: 8 x 8), the
held-out toy-game clips of `wham-batch eval-demo` (game seeds 1,000,000+), the model's
default context, then greedy world-model rollouts with the clips' true actions, once with
each decoding (sequential, diagonal, diagonal-checked): PSNR of the generated frame against
the game's real frame 1, 5 and 10 steps after the context (pooled over the clips), the
copy-last-frame PSNR beside them, the fraction of image tokens each diagonal rollout shares
with the sequential one at that step, and the forward passes a frame each decoding ran
(checked: in the batch, and one rollout at a time). Every rollout is deterministic (greedy),
so one run decides; the seconds of each decoding are those of the same rollouts.
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

from workers import wham  # noqa: E402
from workers.toygame.evaluate import (  # noqa: E402
    HORIZONS,
    default_context,
    held_out_clips,
    psnr,
    rollout_clips,
)
from workers.wham import load_model  # noqa: E402
from workers.wham.modes import DECODINGS  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Diagonal decoding: fidelity"
MODELS = ("models/demo", "models/demo-large")


def _rollouts(model, images, actions, *, context: int, steps: int, decoding: str):
    """Greedy world-model rollouts, one batch; -> (StepOutputs, forward passes a frame)."""
    engine = wham.RolloutEngine(model, max_batch=len(images))
    outputs = rollout_clips(model, images, actions, context=context, steps=steps,
                            decoding=decoding, engine=engine)
    passes = model.tokens_per_image if decoding == "sequential" \
        else 1 + engine.diagonal_passes / steps  # the first token's pass, then the engine's
    return outputs, passes


def measure(folder: str, *, clips: int) -> dict:
    model = load_model(ROOT / folder)
    context, steps = default_context(model), max(HORIZONS)
    images, actions = held_out_clips(clips, context + steps)
    real = images[:, context:context + steps]  # (B, steps, 3, H, W)
    out, seconds, passes = {}, {}, {}
    for decoding in DECODINGS:
        t0 = time.perf_counter()
        out[decoding], passes[decoding] = _rollouts(model, images, actions, context=context,
                                                    steps=steps, decoding=decoding)
        seconds[decoding] = time.perf_counter() - t0
    # a checked rollout's passes depend on its batch (any rollout's change is run again for
    # all): the same rollouts one at a time
    alone = [_rollouts(model, images[i:i + 1], actions[i:i + 1], context=context, steps=steps,
                       decoding="diagonal-checked") for i in range(clips)]
    for i, (outputs, _) in enumerate(alone):  # the same tokens as in the batch
        assert all(torch.equal(a.image_tokens[0], b.image_tokens[i])
                   for a, b in zip(outputs, out["diagonal-checked"], strict=True)), i
    rows = []
    for h in HORIZONS:
        seq = out["sequential"][h - 1]
        row = {"horizon": h, "copy_last_psnr": psnr(images[:, context - 1], real[:, h - 1])}
        for decoding in DECODINGS:
            got = out[decoding][h - 1]
            row[f"{decoding}_psnr"] = psnr(got.images, real[:, h - 1])
            row[f"{decoding}_same"] = float((seq.image_tokens == got.image_tokens).float().mean())
        rows.append(row)
    passes["diagonal-checked alone"] = sum(p for _, p in alone) / clips
    return {"model": folder, "model_id": model.model_id, "grid": model.token_grid,
            "context": context, "clips": clips, "rows": rows, "seconds": seconds,
            "passes": passes}


def write_docs(results: list[dict], *, seconds: float, load: tuple[float, float]) -> None:
    table = ["| model (grid) | steps ahead | sequential PSNR | diagonal PSNR (- sequential dB) "
             "| checked PSNR (- sequential dB) | image tokens equal to sequential's: diagonal, "
             "checked | copy-last PSNR |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        rows_x, cols_x = res["grid"]
        for r in res["rows"]:
            seq = r["sequential_psnr"]
            table.append(
                f"| {res['model_id']} ({rows_x} x {cols_x}) | {r['horizon']} | {seq:.2f} "
                f"| {r['diagonal_psnr']:.2f} ({r['diagonal_psnr'] - seq:+.2f}) "
                f"| {r['diagonal-checked_psnr']:.2f} ({r['diagonal-checked_psnr'] - seq:+.2f}) "
                f"| {r['diagonal_same']:.3f}, {r['diagonal-checked_same']:.3f} "
                f"| {r['copy_last_psnr']:.2f} |")
    clips = results[0]["clips"]
    cost = ["| model (grid) | sequential | diagonal | checked, the batch of "
            f"{clips} | checked, one rollout at a time (mean) |", "|---|---|---|---|---|"]
    for res in results:
        rows_x, cols_x = res["grid"]
        p = res["passes"]
        cost.append(f"| {res['model_id']} ({rows_x} x {cols_x}) | {p['sequential']} "
                    f"| {p['diagonal']:.1f} | {p['diagonal-checked']:.1f} "
                    f"| {p['diagonal-checked alone']:.1f} |")
    timing = "; ".join(
        f"{res['model_id']}: " + ", ".join(f"{res['seconds'][d]:.1f} s {d}" for d in DECODINGS)
        for res in results)
    contexts = ", ".join(f"{r['model_id']}: {r['context']} steps" for r in results)
    lines = [
        SECTION, "",
        provenance(command_line(), load=load, seconds=seconds,
                   note=f"{torch.get_num_threads()} CPU threads"), "",
        f"Greedy world-model rollouts of the trained toy-game models on {clips} "
        "held-out clips (game seeds 1,000,000+) in one batch, each model's default context "
        f"({contexts}), the clips' true actions; PSNR against the game's real frames, pooled "
        "over the clips. Checked is `diagonal-checked`: diagonal decoding with each row's "
        "first token drawn again once the row above is complete (docs/model.md, \"Checked "
        f"diagonal decoding\"). Rollout times ({timing}) are of one process on a shared "
        "machine, not a speed measurement.", "",
        "`models/demo-large` ships fine-tuned for both decodings (`scripts/finetune_diagonal.py`"
        ", see docs/model.md, \"Diagonal decoding\"); `models/demo` keeps its raster-trained "
        "weights. Each row compares the decodings of one set of weights. The goal set for "
        "diagonal decoding is to stay within half a decibel of sequential one and five steps "
        "ahead.", "",
        *table, "",
        "Forward passes a frame (the pass that gives its first token included), counted by the "
        "engine over the same rollouts. Checked decoding runs passes again for the whole batch "
        "when any rollout's row start changes, so its count grows with the batch; the same "
        "rollouts one at a time gave the same tokens (checked by the script).", "",
        *cost, "",
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
        print(res["model_id"], "passes a frame", res["passes"])
    if not args.no_docs:
        write_docs(results, seconds=time.perf_counter() - t0,
                   load=(load0, os.getloadavg()[0]))
        print(f"wrote {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
