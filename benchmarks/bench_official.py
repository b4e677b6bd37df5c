"""wham-batch's engine against the official WHAM code: same checkpoint, same context, one run.

    python benchmarks/bench_official.py --official-repo <checkout> \\
        --official-python <venv>/bin/python --batch 1,4 [--repeats 3] [--json] [--write-docs]

The official code is research-only licensed and never part of this repository: fetch it and
give it its own environment (the model classes need only these of its requirements):

    git clone https://github.com/dweam-team/wham <checkout>   # the official code, on GitHub
    python3.11 -m venv <venv>
    <venv>/bin/pip install torch==2.13.0
    <venv>/bin/pip install pytorch-lightning==1.9.4 tensordict==0.1.2 einops==0.6.0 \\
        opencv-python-headless==4.9.0.80 'numpy<2' pillow 'setuptools>=77,<81'

What runs: `benchmarks/official_worker.py`, started with the official Python, builds a
checkpoint with the official classes (`WHAMTokenModule`: `GPTTokenPredictor` of size
`chinchilla-251M` over a ViT-VQGAN at 300x180, patch 10, 16,384 codes, and the action encoder;
random weights; the 540-token layout) and loads it with the official loader; this process
loads the same file with `load_model`. Per batch size, on the same random 2-step token
context, the two sides take turns `--repeats` times (official, ours, official, ...; the
other side idles meanwhile): the official `predictor.predict_next_step(...,
deterministic=True)` and `RolloutEngine.rollout(..., steps=1, decode_images=False)` with
greedy sampling, both generating the next step's 540 image and 16 action tokens. Each side's
best time counts (tokens/s = batch x 556 / seconds); the tokenizers are not timed. Prints one
JSON line per batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from docs_section import command_line, provenance, replace_section  # noqa: E402

from workers.wham import RolloutEngine, SamplingParams, load_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
SECTION = "### Against the official code"
WORKER = Path(__file__).resolve().with_name("official_worker.py")
CONTEXT_STEPS = 2
TARGET = 2.0  # at least 2x the official code's tokens/s on the same work
PLACEHOLDERS = {"--official-repo": "<checkout>", "--official-python": "<venv>/bin/python"}


class Official:
    """The official code in its own Python, one JSON command per line."""

    def __init__(self, *, repo: Path, python: str, log: Path) -> None:
        if not (repo / "wham" / "models" / "wham_token_model").is_dir():
            raise SystemExit(f"--official-repo {repo}: not a checkout of the official WHAM "
                             "code (no wham/models/wham_token_model)")
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [python, "-W", "ignore", str(WORKER), "--official-repo", str(repo)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)

    def __call__(self, **command) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the official code stopped; its output:\n"
                             f"{self.log.read_text(errors='replace')[-3000:]}")
        reply = json.loads(line)
        if "error" in reply:
            raise SystemExit(f"the official code failed on {command['cmd']}: {reply['error']}")
        return reply

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def context(model, *, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """A random 2-step context: image tokens [B, T, 540] (never 0) and actions [B, T, 16]."""
    rng = np.random.default_rng(batch)
    tokens = rng.integers(1, model.image_vocab_size,
                          (batch, CONTEXT_STEPS, model.tokens_per_image))
    actions = np.concatenate([rng.integers(0, 2, (batch, CONTEXT_STEPS, 12)),
                              rng.integers(0, 11, (batch, CONTEXT_STEPS, 4))], axis=2)
    return tokens, actions


def ours(engine: RolloutEngine, tokens: np.ndarray,
         actions: np.ndarray) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds of this process, outputs) of one step."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    (out,) = engine.rollout(context_tokens=torch.from_numpy(tokens),
                            context_actions=torch.from_numpy(actions), steps=1, mode="full",
                            decode_images=False, sampling=SamplingParams(greedy=True),
                            seeds=list(range(len(tokens))))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return seconds, cpu, {"image_tokens": out.image_tokens.numpy(),
                          "actions": out.actions.numpy()}


def compare(model, official: Official, *, batch: int, repeats: int, work: Path) -> dict:
    tokens, actions = context(model, batch=batch)
    path, out = work / f"context-{batch}.npz", work / f"official-{batch}.npz"
    np.savez(path, image_tokens=tokens, actions=actions)
    engine = RolloutEngine(model, max_batch=batch)
    theirs_s, ours_s, theirs_cpu, ours_cpu = [], [], [], []
    for _ in range(repeats):  # alternate, so the machine's other load falls on both sides
        reply = official(cmd="predict", context=str(path), out=str(out))
        theirs_s.append(reply["seconds"])
        theirs_cpu.append(reply["cpu_seconds"])
        seconds, cpu, mine = ours(engine, tokens, actions)
        ours_s.append(seconds)
        ours_cpu.append(cpu)
    theirs = np.load(out)
    per_call = batch * model.tokens_per_step
    row = {"batch": batch,
           "official_tokens_per_s": round(per_call / min(theirs_s), 2),
           "ours_tokens_per_s": round(per_call / min(ours_s), 2),
           "image_match": float((theirs["image_tokens"] == mine["image_tokens"]).mean()),
           "action_match": float((theirs["actions"] == mine["actions"]).mean())}
    row["ratio"] = round(row["ours_tokens_per_s"] / row["official_tokens_per_s"], 2)
    row.update(official_seconds=[round(s, 2) for s in theirs_s],
               ours_seconds=[round(s, 2) for s in ours_s],
               official_cpu_seconds=[round(s, 1) for s in theirs_cpu],
               ours_cpu_seconds=[round(s, 1) for s in ours_cpu],
               cpu_ratio=round(min(theirs_cpu) / min(ours_cpu), 2))
    return row


def run(args: argparse.Namespace, work: Path) -> tuple[list[dict], dict]:
    official = Official(repo=Path(args.official_repo).resolve(), python=args.official_python,
                        log=work / "official.log")
    try:
        ckpt = work / "official.ckpt"
        built = official(cmd="build", path=str(ckpt), seed=0)
        setup = official(cmd="load", path=str(ckpt), threads=args.threads)
        model = load_model(ckpt)
        if model.tokens_per_image != built["tokens_per_image"]:
            raise SystemExit(f"layouts differ: official {built['tokens_per_image']} image "
                             f"tokens, load_model {model.tokens_per_image}")
        rows = []
        for batch in args.batch:
            rows.append(compare(model, official, batch=batch, repeats=args.repeats, work=work))
            line = {k: rows[-1][k] for k in ("batch", "official_tokens_per_s",
                                             "ours_tokens_per_s", "ratio", "image_match",
                                             "action_match")}
            print(json.dumps({**line, **({} if not args.json else rows[-1])}), flush=True)
    finally:
        official.close()
    return rows, {"official_torch": setup["torch"], "checkpoint_bytes": built["bytes"]}


def write_docs(rows: list[dict], facts: dict, *, args: argparse.Namespace, load: tuple,
               seconds: float) -> None:
    met = all(r["ratio"] >= TARGET for r in rows)
    table = ["| batch | official tokens/s | wham-batch tokens/s | ratio | image tokens "
             "identical | action tokens identical | seconds per call, official | seconds per "
             "call, wham-batch | CPU seconds per call, official / wham-batch (best) |",
             "|---|---|---|---|---|---|---|---|---|",
             *(f"| {r['batch']} | {r['official_tokens_per_s']:.1f} | "
               f"{r['ours_tokens_per_s']:.1f} | {r['ratio']:.2f}x | {100 * r['image_match']:.1f}% "
               f"| {100 * r['action_match']:.1f}% | {' / '.join(map(str, r['official_seconds']))}"
               f" | {' / '.join(map(str, r['ours_seconds']))} | "
               f"{min(r['official_cpu_seconds'])} / {min(r['ours_cpu_seconds'])} "
               f"({r['cpu_ratio']:.2f}x) |" for r in rows)]
    prose = [
        provenance(command_line(placeholders=PLACEHOLDERS), load=load, seconds=seconds),
        f"An official-format checkpoint ({facts['checkpoint_bytes'] / 1e6:.0f} MB) built with "
        "the official classes (`WHAMTokenModule` with `GPTTokenPredictor` of size "
        "`chinchilla-251M`, a ViT-VQGAN at 300x180, patch 10, 16,384 codes, and the action "
        "encoder; random weights), loaded by the official loader in the official code's own "
        f"Python (torch {facts['official_torch']}) and by `load_model` here; then, per batch "
        f"size, {args.repeats} turns each, alternating, on the same 2-step token context: the "
        "official `predictor.predict_next_step(..., deterministic=True)` and "
        "`RolloutEngine.rollout(..., steps=1, decode_images=False)` with greedy sampling. "
        f"float32, {args.threads} threads on each side, tokenizers not timed, tokens/s = batch "
        "x 556 / the best of the turns (every turn's seconds are in the table). The CPU "
        "seconds of each side's process per call are beside them: on a loaded machine they "
        "move less with the load than wall times do.",
    ]
    short = ", ".join(str(r["batch"]) for r in rows if r["ratio"] < TARGET)
    verdict = (f"The target (at least {TARGET:g}x the official code on the same work) "
               + ("holds at every batch size measured." if met else
                  f"is not met at batch {short}."))
    setup = ("How to get the official code and its environment: the docstring of "
             "`benchmarks/bench_official.py` (it is never copied into this repository).")
    lines = [SECTION, "", *(textwrap.fill(p, 92, break_on_hyphens=False) + "\n" for p in prose),
             *table, "", textwrap.fill(verdict, 92), "", textwrap.fill(setup, 92)]
    replace_section(DOCS, "\n".join(lines), stop=("## ", "### "))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-repo", required=True, help="checkout of the official code")
    parser.add_argument("--official-python", required=True, help="the official code's Python")
    parser.add_argument("--batch", default="1,4",
                        type=lambda s: [int(b) for b in s.split(",") if b.strip()])
    parser.add_argument("--repeats", type=int, default=3, help="turns per side and batch")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    parser.add_argument("--json", action="store_true", help="every figure in each line")
    parser.add_argument("--write-docs", action="store_true",
                        help=f"replace '{SECTION}' in docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-official-") as tmp:
        rows, facts = run(args, Path(tmp))
    if args.write_docs:
        write_docs(rows, facts, args=args, load=(load0, os.getloadavg()[0]),
                   seconds=time.perf_counter() - t0)
        print(f"wrote {DOCS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
