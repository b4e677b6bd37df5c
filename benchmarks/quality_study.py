"""Do the quality signals separate good rollouts from bad ones? Measured on the demo model
against the real toy game.

    python benchmarks/quality_study.py [--clips 32] [--steps 20] [--write-docs]

Held-out game clips (seeds the demo model never saw) become `wham-npz` seeds with 5 steps of
context; the pipeline's
own actor rolls each one out in world-model mode with the clip's recorded actions
(`actions: replay`), once per sampling setting, and writes the tables with the quality
signals. Since the actions are the game's, the game's next frames are the ground truth: a
rollout's quality is the mean PSNR of its generated frames (read back through the loader)
against the real frames. The script reports, per setting and over all rollouts pooled:

- how each rollout signal ranks with PSNR (Spearman's rho);
- AUC of each signal for telling "bad" rollouts (mean PSNR below the copy-last-frame
  baseline: a frozen picture would have done better) from the rest;
- the PSNR of the rollouts `mean_logprob > CUT` keeps and of those it drops.

`--write-docs` replaces the "## Quality study" section of docs/training-data.md.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from docs_section import replace_section  # noqa: E402

from pipeline.contracts.plan import plan_for_spec  # noqa: E402
from pipeline.contracts.spec import spec_from_data  # noqa: E402
from pipeline.dataset import RolloutWindows  # noqa: E402
from pipeline.driver.discovery import discover_seeds  # noqa: E402
from pipeline.query import query  # noqa: E402
from workers.actor.actor import RolloutActor  # noqa: E402
from workers.toygame.clips import make_clip, write_clip  # noqa: E402
from workers.toygame.evaluate import HELD_OUT_SEED, psnr  # noqa: E402

DOCS = REPO / "docs" / "training-data.md"
SECTION = "## Quality study"
SETTINGS = {"greedy": {"greedy": True}, "t=0.9": {"temperature": 0.9},
            "t=1.5": {"temperature": 1.5}, "t=2.5": {"temperature": 2.5}}
#: Each rollout signal and its direction: +1 when higher should mean a better rollout.
SIGNALS = {"mean_logprob": 1, "min_logprob": 1, "mean_entropy": -1, "mean_changed_fraction": -1}
CONTEXT = 5
CUT = -1.0


def ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random good rollout > score of a random bad one) (ties count half)."""
    good, bad = score[positive], score[~positive]
    if not len(good) or not len(bad):
        return float("nan")
    wins = (good[:, None] > bad[None, :]).sum() + 0.5 * (good[:, None] == bad[None, :]).sum()
    return float(wins / (len(good) * len(bad)))


def run_setting(work: Path, seeds: Path, name: str, sampling: dict, steps: int) -> str:
    root = str(work / f"out-{name}")
    spec = spec_from_data({
        "run": {"name": "study", "run_id": "study", "run_date": "2026-01-01"},
        "model": {"checkpoint": str(REPO / "models" / "demo"), "device": "cpu"},
        "seeds": {"source": str(seeds), "format": "wham-npz", "context_steps": CONTEXT},
        "rollouts": {"steps": steps, "per_seed": 1, "actions": "replay", "sampling": sampling},
        "resources": {"batch_size": 32}, "output": {"root": root, "frames": "none"}})
    actor = RolloutActor(spec)
    for unit in plan_for_spec(spec, discover_seeds(str(seeds), format="wham-npz")):
        actor.run_unit(unit)
    actor.close()
    return root


def measure(root: str, clips: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per rollout: its signals, mean PSNR against the game and the copy-last baseline."""
    rows = {r["rollout_id"]: r for r in query(root, table="rollouts").to_pylist()}
    out: dict[str, list] = {k: [] for k in (*SIGNALS, "frozen", "collapsed", "psnr", "copy")}
    for w in _whole(root):
        real = clips[w["rollout_id"].rsplit("-r", 1)[0]]  # (T, 3, H, W) the game
        gen = w["generated"]
        steps = w["step"][gen]
        out["psnr"].append(np.mean([psnr(f, real[s]) for f, s in zip(w["frames"][gen], steps,
                                                                      strict=True)]))
        out["copy"].append(np.mean([psnr(real[CONTEXT - 1], real[s]) for s in steps]))
        row = rows[w["rollout_id"]]
        for k in SIGNALS:
            out[k].append(row[k])
        out["frozen"].append(row["frozen"])
        out["collapsed"].append(row["collapse_step"] is not None)
    return {k: np.asarray(v) for k, v in out.items()}


def _whole(root: str):
    """One window per rollout holding all of its steps."""
    steps = max(r["context_steps"] + r["generated_steps"]
                for r in query(root, table="rollouts").to_pylist())
    return RolloutWindows(root, window=steps, decoder=str(REPO / "models" / "demo")).iter_windows()


def table(results: dict[str, dict[str, np.ndarray]]) -> str:
    pooled = {k: np.concatenate([r[k] for r in results.values()]) for k in
              next(iter(results.values()))}
    lines = ["| setting | rollouts | mean PSNR dB | bad (< copy-last) | "
             + " | ".join(f"rho / AUC {s}" for s in SIGNALS) + " | frozen | collapsed |",
             "|---|---|---|---|" + "---|" * len(SIGNALS) + "---|---|"]
    for name, r in [*results.items(), ("all pooled", pooled)]:
        good = r["psnr"] >= r["copy"]
        cells = [f"{spearman(r[s], r['psnr']):+.2f} / {auc(sign * r[s], good):.2f}"
                 for s, sign in SIGNALS.items()]
        lines.append(f"| {name} | {len(r['psnr'])} | {r['psnr'].mean():.2f} | "
                     f"{int((~good).sum())} | " + " | ".join(cells)
                     + f" | {int(r['frozen'].sum())} | {int(r['collapsed'].sum())} |")
    keep = pooled["mean_logprob"] > CUT
    lines += ["", f"`--where \"mean_logprob > {CUT}\"` keeps {int(keep.sum())} of "
              f"{len(keep)} rollouts: mean PSNR {pooled['psnr'][keep].mean():.2f} dB kept, "
              f"{pooled['psnr'][~keep].mean():.2f} dB dropped; bad rollouts kept "
              f"{int((keep & (pooled['psnr'] < pooled['copy'])).sum())}, dropped "
              f"{int((~keep & (pooled['psnr'] < pooled['copy'])).sum())}. Rollouts with a "
              f"`collapse_step`: mean PSNR {pooled['psnr'][pooled['collapsed']].mean():.2f} dB; "
              f"without: {pooled['psnr'][~pooled['collapsed']].mean():.2f} dB."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        seeds = work / "seeds"
        clips = {}
        for seed in range(HELD_OUT_SEED, HELD_OUT_SEED + args.clips):
            write_clip(seeds / f"clip_{seed}.npz", seed=seed, steps=CONTEXT + args.steps)
            clips[f"clip_{seed}"] = make_clip(seed, CONTEXT + args.steps)[0]
        results = {name: measure(run_setting(work, seeds, name, sampling, args.steps), clips)
                   for name, sampling in SETTINGS.items()}
    body = table(results)
    header = (f"Measured {dt.date.today().isoformat()} with `python benchmarks/quality_study.py "
              f"--clips {args.clips} --steps {args.steps}` ({platform.machine()}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
              f"{time.perf_counter() - t0:.0f} s). Cells: Spearman's rho with the rollout's "
              "mean PSNR against the real game / AUC for telling rollouts at or above the "
              "copy-last-frame baseline from those below it, with entropy and changed "
              "fraction counted lower-is-better.")
    print(header + "\n\n" + body)
    if args.write_docs:
        replace_section(DOCS, f"{SECTION}\n\n{header}\n\n{body}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
