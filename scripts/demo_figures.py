"""The demo models' figures in the docs: the held-out evaluation table and the rollout sheet.

    python scripts/demo_figures.py [--clips 32] [--sheet-clips 4]

1. `evaluate` (what `wham-batch eval-demo --model M` prints) of models/demo and
   models/demo-large on held-out toy-game clips, each with its default context: the table
   of "### Held-out evaluation" in docs/benchmarks.md.
2. docs/demo-rollouts.png: for `--sheet-clips` held-out clips, the real game (upper row)
   above the pipeline's frames (lower row): `configs/demo.yaml` run through the real driver
   and actors with the clips as seeds (`seeds.format=wham-npz`, 4 context steps, the clips'
   own actions replayed, 12 generated steps), frames read back with `RolloutWindows`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from docs_section import command_line, provenance, replace_section  # noqa: E402

from pipeline.contracts.spec import load_spec  # noqa: E402
from pipeline.dataset import RolloutWindows  # noqa: E402
from pipeline.driver import run_job  # noqa: E402
from workers import wham  # noqa: E402
from workers.actor.actor import RolloutActor  # noqa: E402
from workers.toygame.clips import make_clip, write_clip  # noqa: E402
from workers.toygame.evaluate import HELD_OUT_SEED, HORIZONS, evaluate  # noqa: E402

DOCS = REPO / "docs" / "benchmarks.md"
SHEET = REPO / "docs" / "demo-rollouts.png"
MODEL = REPO / "models" / "demo"  # the one configs/demo.yaml runs: the rollout sheet's
MODELS = ("models/demo", "models/demo-large")
SECTION = "### Held-out evaluation"
CONTEXT, GENERATED, SCALE, GAP = 4, 12, 3, 8


def evaluation_section(results: list[tuple[str, dict]], *, clips: int, prov: str) -> str:
    rows = []
    for name, result in results:
        for h in HORIZONS:
            r = result["horizons"][str(h)]
            rows.append(f"| {name} | {result['context']} | {h} | {r['model_psnr']:.2f} "
                        f"| {r['copy_last_psnr']:.2f} | {r['recon_psnr']:.2f} "
                        f"| {r['model_token_acc']:.3f} |")
    return "\n".join([
        SECTION, "", textwrap.fill(prov, 92), "",
        textwrap.fill(f"`wham-batch eval-demo --model M` computes the same: {clips} held-out "
                      f"clips (game seeds from {HELD_OUT_SEED:,}, never used in training), "
                      "the model's default context, then a greedy world-model rollout with "
                      "the clips' true actions; each frame is compared with the game's real "
                      "frame that many steps after the context. PSNR in dB over all clips' "
                      "pixels; token accuracy against the tokenizer's tokens of the real "
                      "frame.", 92), "",
        "| model | context steps | steps ahead | model PSNR | copy-last-frame PSNR "
        "| VQ reconstruction PSNR (ceiling) | model token accuracy |",
        "|---|---|---|---|---|---|---|", *rows, ""])


def pipeline_frames(work: Path, clips: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(real frames, pipeline frames) per clip, each (T, 3, H, W) uint8."""
    seeds = work / "seeds"
    steps = CONTEXT + GENERATED
    for i in range(clips):
        write_clip(seeds / f"clip_{i}.npz", seed=HELD_OUT_SEED + i, steps=steps)
    spec = load_spec(REPO / "configs" / "demo.yaml", overrides=[
        f"seeds.source={seeds}", "seeds.format=wham-npz", f"seeds.context_steps={CONTEXT}",
        "rollouts.actions=replay", "rollouts.per_seed=1", f"rollouts.steps={GENERATED}",
        f"model.checkpoint={MODEL}", f"output.root={work / 'out'}"])
    summary = run_job(spec, actor_cls=RolloutActor, progress=False)
    if not summary.complete:
        raise SystemExit(f"the demo run did not complete: {summary.line()}")
    made = {w["rollout_id"].rsplit("-r", 1)[0]: np.stack(w["frames"])
            for w in RolloutWindows(str(work / "out"), window=steps).iter_windows()}
    real = [make_clip(HELD_OUT_SEED + i, steps)[0] for i in range(clips)]
    return real, [made[f"clip_{i}"] for i in range(clips)]


def sheet(real: list[np.ndarray], made: list[np.ndarray]) -> Image.Image:
    """Rows of frames: per clip the game, then the pipeline; a gap between clips."""
    def row(frames: np.ndarray) -> np.ndarray:  # (T, 3, H, W) -> (H, T * W, 3)
        return np.concatenate(list(frames.transpose(0, 2, 3, 1)), axis=1)

    blocks = []
    for r, m in zip(real, made, strict=True):
        blocks += [row(r), row(m), np.full((GAP, row(r).shape[1], 3), 255, np.uint8)]
    image = np.concatenate(blocks[:-1], axis=0)
    return Image.fromarray(image).resize((image.shape[1] * SCALE, image.shape[0] * SCALE),
                                         Image.NEAREST)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=32, help="clips of the evaluation")
    parser.add_argument("--sheet-clips", type=int, default=4, help="clips on the sheet")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    results = [(name, evaluate(wham.load_model(REPO / name), clips=args.clips))
               for name in MODELS]
    prov = provenance(command_line(), load=(load0, os.getloadavg()[0]),
                      seconds=time.perf_counter() - t0)
    replace_section(DOCS, evaluation_section(results, clips=args.clips, prov=prov),
                    stop=("## ", "### "))
    with tempfile.TemporaryDirectory() as tmp:
        real, made = pipeline_frames(Path(tmp), args.sheet_clips)
    sheet(real, made).save(SHEET, optimize=True)
    print(f"wrote {DOCS.relative_to(REPO)} and {SHEET.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
