"""Fine-tune a trained demo world model so diagonal decoding predicts as well as it can, while
sequential decoding keeps working: the short fine-tune under the diagonal attention pattern
that Ye et al. (2025) give as the remedy for small models.

    python scripts/finetune_diagonal.py --model models/demo-large --out models/demo-large

The shipped models/demo-large is its raster-trained model after one run of the defaults
(800 steps, half the windows diagonal, learning rate 5e-4, seed 0). A second run with three
quarters of the windows diagonal and the rows' first tokens weighted 4x brought diagonal
decoding closer to sequential by lowering sequential's own PSNR, and was not kept; models/demo
did not keep its fine-tune either (docs/model.md, "Diagonal decoding", says why).

Each batch holds windows of the model's seq_len steps from training clips (the game seeds of
scripts/train_demo.py, far below the held-out ones). A share of the windows (--diagonal-share)
is fed as diagonal decoding feeds it: the first k >= 1 steps causal (the prefilled context),
the frames after them under the diagonal pattern, each row's first token predicted from a
"ghost" fed the previous frame's token (`workers.wham.diagonal_training`, tested against the
decoding itself); the other windows are plain causal, the original objective. The loss is
on image tokens only (the actions are given in world-model mode). Only the transformer
trains: the tokenizer, hence every token's meaning, is unchanged. Seeded; the run stops at
its step count (or at the time budget, logged). Not run by CI: the results ship in models/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train_demo import cosine, encode_all, log, optimizer_step  # noqa: E402

from workers.toygame import make_dataset  # noqa: E402
from workers.wham.actions import actions_to_tokens  # noqa: E402
from workers.wham.checkpoints import load_model, save_native  # noqa: E402
from workers.wham.diagonal_training import teacher_forced  # noqa: E402


def sample_windows(seqs: torch.Tensor, *, seq_len: int, batch: int, share: float,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(windows [B, W, tps], the frame before each of their frames [B, W, n] image tokens,
    the first diagonally decoded frame of each window [B]: W for a causal window)."""
    n_clips, t, _ = seqs.shape
    clip = torch.randint(n_clips, (batch,), generator=gen)
    first = torch.randint(1, t - seq_len + 1, (batch,), generator=gen)
    rows = torch.stack([seqs[c, f - 1:f + seq_len] for c, f in zip(clip, first, strict=True)])
    diagonal = torch.rand(batch, generator=gen) < share
    start = torch.randint(1, seq_len, (batch,), generator=gen)
    return rows[:, 1:], rows[:, :-1], torch.where(diagonal, start, seq_len)


def _accuracy(picked: torch.Tensor, target: torch.Tensor, ghost: torch.Tensor, *, tf,
              first: torch.Tensor) -> str:
    """Accuracy on causal frames, diagonal frames, and the rows' first tokens of diagonal
    frames (those a ghost predicts: the hardest)."""
    w, n = tf.valid.shape
    keep = tf.valid.reshape(-1)
    frame = torch.arange(w)[:, None].expand(-1, n).reshape(-1)[keep]
    diag = frame[None, :] >= first[:, None]  # [B, kept]
    hit = (picked.argmax(-1) == target).float()
    return (f"acc causal {hit[~diag].mean().item():.3f} diagonal {hit[diag].mean().item():.3f}"
            f" row starts {hit[diag & ghost].mean().item():.3f}")


def finetune(model, seqs: torch.Tensor, *, steps: int, seconds: float, batch: int, lr_max: float,
             share: float, row_weight: float, seed: int) -> None:
    gpt, n = model.gpt, model.tokens_per_image
    gpt.train()
    gen = torch.Generator().manual_seed(seed + 3)
    opt = torch.optim.AdamW(gpt.parameters(), lr=lr_max, betas=(0.9, 0.95), weight_decay=0.01)
    start = time.monotonic()
    for it in range(1, steps + 1):
        lr = lr_max * min(1.0, it / 50) * cosine(it, steps, time.monotonic() - start, seconds,
                                                 0.05)
        window, previous, first = sample_windows(seqs, seq_len=model.seq_len, batch=batch,
                                                 share=share, gen=gen)
        tf = teacher_forced(window, previous[:, :, :n], grid=model.token_grid,
                            first_diagonal=first)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = gpt(tf.inputs, tf.mask, positions=tf.positions)  # [B, L, V]
        src = tf.sources.reshape(batch, -1)  # [B, W * n]
        picked = logits.gather(1, src[..., None].expand(-1, -1, logits.shape[-1]))
        keep = tf.valid.reshape(-1)
        picked, target = picked[:, keep].float(), tf.targets.reshape(batch, -1)[:, keep]
        ghost = src[:, keep] >= tf.ghosts_from  # [B, kept] a row's first token, from a ghost
        losses = F.cross_entropy(picked.transpose(1, 2), target, reduction="none")  # [B, kept]
        weight = 1.0 + (row_weight - 1.0) * ghost
        loss = (losses * weight).sum() / weight.sum()
        optimizer_step(opt, loss, lr=lr, clip=list(gpt.parameters()))
        if it % 25 == 0 or it == steps:
            log(f"step {it}/{steps} loss {loss.item():.4f} "
                f"{_accuracy(picked, target, ghost, tf=tf, first=first)}"
                f" lr {lr:.2e} {time.monotonic() - start:.0f}s")
        if time.monotonic() - start > seconds:
            log(f"time budget reached after {it} steps")
            break
    gpt.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="trained native model folder")
    parser.add_argument("--out", required=True, help="native model folder to write")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--diagonal-share", type=float, default=0.5,
                        help="share of windows fed under the diagonal pattern (default 0.5)")
    parser.add_argument("--row-start-weight", type=float, default=1.0,
                        help="loss weight of the rows' first tokens of diagonal frames, the "
                        "hardest to predict (default 1: every token alike)")
    parser.add_argument("--clips", type=int, default=600, help="training clips (seeds 0..N-1)")
    parser.add_argument("--clip-steps", type=int, default=32)
    parser.add_argument("--budget-minutes", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.monotonic()
    model = load_model(args.model).eval()
    images, actions = make_dataset(range(args.clips), args.clip_steps)
    tokens = encode_all(model, images)  # [N, T, n]
    act = torch.from_numpy(actions_to_tokens(actions, model.image_vocab_size))
    seqs = torch.cat([tokens, act], dim=-1)
    log(f"data: {tuple(seqs.shape)} token steps in {time.monotonic() - t0:.0f}s")
    finetune(model, seqs, steps=args.steps, seconds=args.budget_minutes * 60.0,
             batch=args.batch, lr_max=args.lr, share=args.diagonal_share,
             row_weight=args.row_start_weight, seed=args.seed)
    log(f"saved {save_native(model, args.out)} after {(time.monotonic() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
