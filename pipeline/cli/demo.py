"""`wham-batch eval-demo`: score a demo world model on held-out toy-game clips.

Rolls the model out greedily from the first K frames of held-out clips with the game's
true actions and compares frames 1, 5 and 10 steps later with the game's real frames, next
to two baselines: copying the last context frame, and the tokenizer's reconstruction of the
real frame (the ceiling). See workers/toygame/evaluate.py for the exact definitions.
`--model models/demo-large` scores the larger-grid demo model (8 x 8 tokens a frame);
`--decoding diagonal` samples each frame's image tokens one grid diagonal per pass;
`--decoding diagonal-checked` also draws each row's first token again once the row above is
complete (see workers/wham/diagonal.py).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipeline.cli.command import Command
from pipeline.contracts.choices import DECODINGS
from pipeline.contracts.errors import UserError
from workers import wham
from workers.toygame import SIZE
from workers.toygame.evaluate import HORIZONS, default_context, evaluate

#: The demo model in the project folder, found from whatever folder the command runs in.
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "demo"


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="native model folder trained on the toy game (default: the "
                        "project's models/demo)")
    parser.add_argument("--clips", type=int, default=32, help="held-out clips (default 32)")
    parser.add_argument("--context", type=int, default=None,
                        help="context steps given to the model, 1..seq_len - 1 (default 5, "
                        "or fewer when the model's window holds fewer)")
    parser.add_argument("--decoding", choices=DECODINGS, default="sequential",
                        help="how image tokens are sampled (default sequential)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_eval_demo(args: argparse.Namespace) -> int:
    import torch

    if args.clips < 1:
        raise UserError(f"--clips must be >= 1, got {args.clips}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = wham.load_model(args.model)
    if model.image_size != (SIZE, SIZE):
        raise UserError(f"--model {args.model}: image size {model.image_size} is not the toy "
                        f"game's ({SIZE}, {SIZE}); pass a model trained by scripts/train_demo.py")
    context = default_context(model) if args.context is None else args.context
    if not 1 <= context <= model.seq_len - 1:
        raise UserError(f"--context must be 1..{model.seq_len - 1} for this model "
                        f"(seq_len {model.seq_len}), got {context}")
    start = time.perf_counter()
    result = evaluate(model, clips=args.clips, context=context, decoding=args.decoding)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{model.model_id} ({model.sha256[:12]}), {result['clips']} held-out clips, "
          f"{context} context steps, greedy, {args.decoding} decoding, "
          f"{time.perf_counter() - start:.1f} s")
    print("| steps ahead | model PSNR | copy-last PSNR | VQ recon PSNR | model token acc |")
    print("|---|---|---|---|---|")
    for h in HORIZONS:
        row = result["horizons"][str(h)]
        print(f"| {h} | {row['model_psnr']:.2f} | {row['copy_last_psnr']:.2f} | "
              f"{row['recon_psnr']:.2f} | {row['model_token_acc']:.3f} |")
    return 0


EVAL_DEMO = Command("eval-demo", "score the demo world model against the toy game", _arguments,
                    cmd_eval_demo, description=__doc__, raw_description=True)
