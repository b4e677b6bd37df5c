"""Sequential against diagonal decoding on the 540-token layout: frames/s of each in one run,
the forward passes a frame takes, and whether overlapping two frames' diagonals (the second
half of Diagonal Decoding) would add speed on this machine.

Run through `python benchmarks/bench_engine.py --decoding both`; this module holds the
measurement and its section of docs/benchmarks.md ("## Diagonal decoding").

- Decoding: world-model rollouts (given actions) of the `wham-200m-540` preset, random
  weights, float32, greedy, a context of 2 steps and 1 generated step per rollout, at batch
  1 and 4: the same engine, the same inputs and the same work on both sides, rounds
  alternating (sequential, diagonal, sequential, ...) and the best round of each kept, so a
  load spike on the shared machine does not decide the ratio. Forward passes are counted
  (a hook on the token embedding, which every forward calls once) in an untimed round.
- Temporal overlap: the passes of two consecutive frames through the engine's own
  `Decoder.forward_at`, once one frame after the other (the tail of the first frame and
  the given action prefilled between them, as the engine does) and once with the second
  frame's pass k merged into the first frame's pass k + offset (the paper's schedule; the
  tail joins the first merged pass). Same rows, same cache, same key lengths: the only
  difference is how many forward calls carry them.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import torch
from docs_section import provenance, replace_section

from workers.wham import RolloutEngine, SamplingParams, prepare_rollout, random_model

SECTION = "## Diagonal decoding"
PRESET = "wham-200m-540"
CONTEXT_STEPS = 2
DECODINGS = ("sequential", "diagonal")


def _rollout(model, *, batch: int, decoding: str):
    g = torch.Generator().manual_seed(0)
    n, c = model.tokens_per_image, CONTEXT_STEPS

    def actions(t):
        return torch.cat([torch.randint(0, 2, (batch, t, 12), generator=g),
                          torch.randint(0, 11, (batch, t, 4), generator=g)], 2)

    return prepare_rollout(
        model, context_tokens=torch.randint(1, model.image_vocab_size, (batch, c, n),
                                            generator=g),
        context_actions=actions(c), actions=actions(1), steps=1, mode="world_model",
        seeds=list(range(batch)), decode_images=False, sampling=SamplingParams(greedy=True),
        max_batch=batch, decoding=decoding)


def count_passes(engine: RolloutEngine, r) -> int:
    """Forward passes of the transformer during one rollout (the embedding runs once each)."""
    calls = []
    hook = engine.gpt.transformer.wte.register_forward_hook(lambda *_: calls.append(1))
    try:
        list(engine.generate(r))
    finally:
        hook.remove()
    return len(calls)


def _timed(fn: Callable[[], object], times: list[float]) -> None:
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)


def measure_decodings(model, *, batch: int, rounds: int) -> dict:
    """frames/s of each decoding (best of `rounds`, alternating) and passes per frame."""
    engine = RolloutEngine(model, max_batch=batch)
    runs = {d: _rollout(model, batch=batch, decoding=d) for d in DECODINGS}
    row = {"batch": batch}
    for d in DECODINGS:
        row[f"{d}_passes"] = count_passes(engine, runs[d])  # also the warm-up
    times: dict[str, list[float]] = {d: [] for d in DECODINGS}
    for _ in range(rounds):
        for d in DECODINGS:
            _timed(lambda d=d: list(engine.generate(runs[d])), times[d])
    for d in DECODINGS:
        row[f"{d}_s"] = min(times[d])
        row[f"{d}_frames_per_s"] = batch / row[f"{d}_s"]
    row["speedup"] = row["sequential_s"] / row["diagonal_s"]
    return row


def _pass_inputs(engine: RolloutEngine, *, batch: int, start: int, frames: int):
    """(tokens [B, P], positions [P], mask length) of every pass of `frames` frames laid out
    one step apart from `start` (the masks' content does not change the cost)."""
    tps, out = engine.model.tokens_per_step, []
    for f in range(frames):
        base = start + f * tps
        out.append([(torch.ones(batch, p.queries.numel(), dtype=torch.long), p.queries + base,
                     base + p.span) for p in engine.passes])
    return out


def _merged(a, b) -> tuple[torch.Tensor, torch.Tensor, int]:
    return (torch.cat([a[0], b[0]], 1), torch.cat([a[1], b[1]]), max(a[2], b[2]))


def measure_overlap(model, *, batch: int, rounds: int) -> dict:
    """Seconds of two frames' diagonal passes run one after the other and overlapped."""
    engine = RolloutEngine(model, max_batch=batch)
    decoder = engine.decoder(batch)
    n, tps = model.tokens_per_image, model.tokens_per_step
    start = CONTEXT_STEPS * tps
    first, second = _pass_inputs(engine, batch=batch, start=start, frames=2)
    # the first frame's last token and the given action: the prefill before the second frame
    tail = (torch.ones(batch, 1 + tps - n, dtype=torch.long),
            torch.arange(start + n - 1, start + tps), start + tps)
    offset = len(first) // 2
    plain = [*first, tail, *second]
    overlap = [*first[:offset], _merged(first[offset], tail)]
    overlap += [_merged(a, b) for a, b in zip(first[offset + 1:], second, strict=False)]
    overlap += second[len(first) - offset - 1:]

    def run(schedule):
        for tokens, positions, length in schedule:
            mask = torch.ones(tokens.shape[1], length, dtype=torch.bool)
            decoder.forward_at(tokens, positions=positions, mask=mask)

    times: dict[str, list[float]] = {"plain": [], "overlap": []}
    with torch.no_grad():
        run(plain)  # warm-up
        for _ in range(rounds):
            _timed(lambda: run(plain), times["plain"])
            _timed(lambda: run(overlap), times["overlap"])
    return {"batch": batch, "offset": offset, "plain_passes": len(plain),
            "overlap_passes": len(overlap), "plain_s": min(times["plain"]),
            "overlap_s": min(times["overlap"]),
            "overlap_gain": min(times["plain"]) / min(times["overlap"])}


def run(*, batches: tuple[int, ...] = (1, 4), rounds: int = 2, preset: str = PRESET,
        device: str = "cpu", dtype: torch.dtype | None = None) -> dict:
    model = random_model(preset, seed=0, device=device, dtype=dtype)
    result = {"preset": preset, "grid": model.token_grid, "threads": torch.get_num_threads(),
              "load_average": os.getloadavg()[0], "rows": [], "overlap": []}
    for batch in batches:
        result["rows"].append(measure_decodings(model, batch=batch, rounds=rounds))
        result["overlap"].append(measure_overlap(model, batch=batch, rounds=rounds))
    result["load_average_end"] = os.getloadavg()[0]
    return result


def gpu_run() -> dict:
    """Both decodings in bfloat16 on CUDA at batch 1, 8 and 32 (what gpu_engine.sh records);
    a tiny CPU smoke run without CUDA."""
    if not torch.cuda.is_available():
        return {"device": "cpu (smoke run)", **run(batches=(1, 2), rounds=1, preset="tiny")}
    result = run(batches=(1, 8, 32), rounds=2, device="cuda", dtype=torch.bfloat16)
    return {"device": torch.cuda.get_device_name(), "dtype": "bfloat16", **result}


def main(*, gpu: bool, docs: Path, started: float, command: str) -> int:
    if gpu:
        print(json.dumps(gpu_run(), default=str))
        return 0
    result = run()
    for row in (*result["rows"], *result["overlap"]):
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    write_docs(result, docs=docs, seconds=time.perf_counter() - started, command=command)
    print(f"wrote {docs}")
    return 0


def write_docs(result: dict, *, docs: Path, seconds: float, command: str) -> None:
    rows, overlap = result["rows"], result["overlap"]
    rows_x, cols_x = result["grid"]
    decode = [
        "| batch | sequential frames/s | diagonal frames/s | diagonal / sequential "
        "| forward passes a frame, sequential | diagonal |",
        "|---|---|---|---|---|---|",
        *(f"| {r['batch']} | {r['sequential_frames_per_s']:.3f} "
          f"| {r['diagonal_frames_per_s']:.3f} | {r['speedup']:.2f}x "
          f"| {r['sequential_passes']} | {r['diagonal_passes']} |" for r in rows),
    ]
    temporal = [
        "| batch | two frames one after the other: passes, s | overlapped (offset "
        f"{overlap[0]['offset']} diagonals): passes, s | overlapped / one after the other |",
        "|---|---|---|---|",
        *(f"| {o['batch']} | {o['plain_passes']}, {o['plain_s']:.2f} "
          f"| {o['overlap_passes']}, {o['overlap_s']:.2f} | {o['overlap_gain']:.2f}x |"
          for o in overlap),
    ]
    lines = [
        SECTION, "",
        provenance(command, load=(result["load_average"], result["load_average_end"]),
                   seconds=seconds, note=f"{result['threads']} CPU threads"), "",
        f"`{result['preset']}` ({rows_x} x {cols_x} image tokens a frame, 16 action tokens a "
        "step), random weights, float32, greedy world-model rollouts (given actions), context "
        "of 2 steps, 1 generated step; the same engine and inputs for both decodings, rounds "
        "alternating, the best of each kept (a shared machine).", "",
        *decode, "",
        "Forward passes are counted, not computed: every call of the transformer in one "
        "rollout step (the prefill included).", "",
        "Temporal overlap, the same engine's `Decoder.forward_at` over the passes of two "
        "consecutive frames (the second frame's first diagonals sharing passes with the "
        "first frame's last ones) against the same rows in separate passes:", "",
        *temporal, "",
    ]
    lines = [line if line.startswith(("|", "#")) else textwrap.fill(line, 92,
                                                                       break_on_hyphens=False)
             for line in lines]
    replace_section(docs, "\n".join(lines), stop=("## ",))
