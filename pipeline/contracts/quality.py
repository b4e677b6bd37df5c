"""Quality signals of a rollout: what the per-step numbers mean and how a rollout's row sums
them up (docs/training-data.md, "Quality signals").

The engine measures every generated step while it samples (no second forward pass), on the
model's own temperature-1 distribution restricted to each position's valid range:
`image_logprob` / `action_logprob` (mean log-probability of the sampled tokens),
`image_entropy` / `action_entropy` (mean entropy of those distributions) and
`changed_fraction` (share of the frame's image tokens that differ from the previous frame's).
A kind of token the mode does not sample (actions in world_model, images in policy) has no
value. `rollout_quality` turns one rollout's steps into the columns of its rollouts row.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: A rollout is `frozen` when its last FROZEN_STEPS generated frames equal the frame before.
FROZEN_STEPS = 3
#: A step has collapsed when its image tokens were drawn with a mean log-probability below
#: COLLAPSE_FRACTION * ln(1 / V_img): on average less likely than a pick among sqrt(V_img)
#: equally likely codes. Scale-free, so one rule holds for any codebook size.
COLLAPSE_FRACTION = 0.5
#: Action tokens per step (12 buttons + 4 sticks).
ACTION_TOKENS = 16


def collapse_logprob(image_vocab_size: int) -> float:
    """The step image log-probability below which a step counts as collapsed."""
    return -COLLAPSE_FRACTION * math.log(image_vocab_size)


def _weighted(image: np.ndarray, action: np.ndarray, *, tokens_per_image: int) -> np.ndarray:
    """Per-step mean over every sampled token: image and action means weighted by their
    token counts; NaN where the step sampled neither."""
    weights = np.stack([np.where(np.isnan(image), 0.0, tokens_per_image),
                        np.where(np.isnan(action), 0.0, ACTION_TOKENS)])  # (2, steps)
    values = np.nan_to_num(np.stack([image, action]))
    total = weights.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (weights * values).sum(axis=0) / total, np.nan)


def _mean(x: np.ndarray) -> float | None:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else None


def rollout_quality(steps: dict[str, np.ndarray], *, first_step: int, tokens_per_image: int,
                    image_vocab_size: int) -> dict[str, Any]:
    """The rollouts-row aggregates of one rollout's generated steps.

    `steps` maps each step signal name to float32 (generated_steps,) with NaN for missing
    values; `first_step` is the steps-table number of the first generated step (the
    context length). Returns mean_logprob, min_logprob, mean_entropy (over every sampled
    token, steps weighted equally), mean_changed_fraction, frozen and collapse_step (the
    steps-table step of the first collapsed frame, None if none).
    """
    image_lp = np.asarray(steps["image_logprob"], dtype=np.float64)
    logprob = _weighted(image_lp, np.asarray(steps["action_logprob"], dtype=np.float64),
                        tokens_per_image=tokens_per_image)
    entropy = _weighted(np.asarray(steps["image_entropy"], dtype=np.float64),
                        np.asarray(steps["action_entropy"], dtype=np.float64),
                        tokens_per_image=tokens_per_image)
    changed = np.asarray(steps["changed_fraction"], dtype=np.float64)
    tail = changed[-FROZEN_STEPS:]
    frozen = bool(changed.size >= FROZEN_STEPS and np.all(tail == 0.0))
    collapsed = np.flatnonzero(image_lp < collapse_logprob(image_vocab_size))
    known = logprob[~np.isnan(logprob)]
    return {
        "mean_logprob": _mean(logprob),
        "min_logprob": float(known.min()) if known.size else None,
        "mean_entropy": _mean(entropy),
        "mean_changed_fraction": _mean(changed),
        "frozen": frozen,
        "collapse_step": int(first_step + collapsed[0]) if collapsed.size else None,
    }
