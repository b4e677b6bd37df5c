"""How well the demo world model predicts the toy game it was trained on.

Held-out clips come from game seeds the training never used (`HELD_OUT_SEED`); the model
gets the first `context` steps and then rolls out greedily in world-model mode with the
clip's true actions. At each horizon h the generated frame is compared with the game's real
frame h steps after the context:

- `model_psnr`: PSNR of the generated frame;
- `copy_last_psnr`: PSNR of the last context frame (the "nothing moves" baseline);
- `recon_psnr`: PSNR of the real frame after the tokenizer's encode + decode (the ceiling
  any rollout through this tokenizer can reach);
- `model_token_acc`: fraction of generated image tokens equal to the real frame's tokens.

PSNR is over all clips at that horizon (mean squared error of the pooled pixels), in dB for
8-bit pixels, capped at `PSNR_CAP` when the frames are identical. `decoding` picks how the
rollouts sample their image tokens (sequential or diagonal; see workers/wham/diagonal.py).
"""

from __future__ import annotations

import math

import numpy as np

from workers import wham
from workers.toygame.clips import make_dataset

#: First game seed of the held-out clips; training uses seeds 0 .. clips-1 (far below).
HELD_OUT_SEED = 1_000_000
PSNR_CAP = 99.0
HORIZONS = (1, 5, 10)
#: Context steps by default: 5, or what the model's window holds when that is fewer.
DEFAULT_CONTEXT = 5


def default_context(model) -> int:
    """Context steps for `model`: DEFAULT_CONTEXT within its window (seq_len - 1 steps)."""
    return min(DEFAULT_CONTEXT, model.seq_len - 1)


def psnr(pred: np.ndarray, target: np.ndarray) -> float:
    """PSNR in dB of uint8 arrays of the same shape (pooled over every element)."""
    mse = float(np.mean((pred.astype(np.float64) - target.astype(np.float64)) ** 2))
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(255.0**2 / mse))


def held_out_clips(count: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """images uint8 (count, steps, 3, H, W), actions int64 (count, steps, 16)."""
    return make_dataset(range(HELD_OUT_SEED, HELD_OUT_SEED + count), steps)


def rollout_clips(model, images: np.ndarray, actions: np.ndarray, *, context: int, steps: int,
                  decoding: str = "sequential", engine=None) -> list:
    """Greedy world-model StepOutputs of `model` from the first `context` steps of clips
    (images (B, T, 3, H, W), actions (B, T, 16)) with their true actions, on `engine` (default:
    a new one for the batch)."""
    engine = engine or wham.RolloutEngine(model, max_batch=len(images))
    return list(engine.rollout(
        context_images=images[:, :context], context_actions=actions[:, :context],
        steps=steps, mode="world_model", actions=actions[:, context:context + steps],
        sampling=wham.SamplingParams(greedy=True), seeds=list(range(len(images))),
        decoding=decoding,
    ))


def evaluate(model, *, clips: int = 32, context: int | None = None,
             horizons: tuple[int, ...] = HORIZONS, decoding: str = "sequential") -> dict:
    """Rollouts of `model` (a toy-game WHAMModel) on held-out clips, with baselines.

    Returns `{"horizons": {"h": {model_psnr, copy_last_psnr, recon_psnr, model_token_acc}},
    "clips": N, "context": K, "decoding": D}`.
    """
    context = default_context(model) if context is None else context
    steps = max(horizons)
    images, actions = held_out_clips(clips, context + steps)
    outputs = rollout_clips(model, images, actions, context=context, steps=steps,
                            decoding=decoding)
    real = images[:, context:context + steps]  # (B, steps, 3, H, W): frames the rollout predicts
    real_tokens = model.encode_images(real).cpu()  # (B, steps, n)
    recon = model.decode_tokens(real_tokens)
    table = {}
    for h in horizons:
        out = outputs[h - 1]
        table[str(h)] = {
            "model_psnr": round(psnr(out.images, real[:, h - 1]), 2),
            "copy_last_psnr": round(psnr(images[:, context - 1], real[:, h - 1]), 2),
            "recon_psnr": round(psnr(recon[:, h - 1], real[:, h - 1]), 2),
            "model_token_acc": round(
                float((out.image_tokens == real_tokens[:, h - 1]).float().mean()), 4),
        }
    return {"horizons": table, "clips": clips, "context": context, "decoding": decoding}
