"""Write toy-game seed clips: `python -m workers.toygame OUT_DIR --first-seed S --count N`.

Each clip becomes `clip_<seed>.npz` (official sample-data layout: `images` uint8 (T,3,H,W),
`actions` (T,16) in model form) plus `clip_<seed>.png`, its first frame.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from .clips import make_clip, write_clip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write into (created if needed)")
    parser.add_argument("--first-seed", type=int, required=True, help="game seed of clip 0")
    parser.add_argument("--count", type=int, default=6, help="number of clips (default 6)")
    parser.add_argument("--steps", type=int, default=30, help="steps per clip (default 30)")
    args = parser.parse_args(argv)
    for seed in range(args.first_seed, args.first_seed + args.count):
        path = write_clip(args.out / f"clip_{seed}.npz", seed=seed, steps=args.steps)
        first = make_clip(seed, 1)[0][0].transpose(1, 2, 0)  # (H, W, 3)
        Image.fromarray(first).save(path.with_suffix(".png"))
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
