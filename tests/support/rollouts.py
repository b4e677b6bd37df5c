"""Shared set-ups of the engine tests: one torch thread, and random rollout inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread avoids oversubscription on a shared 2-core machine (import
    it into a test module to apply it there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rollout_inputs(model, *, batch: int, context: int, steps: int, mode: str,  # noqa: ANN001
                   rng_seed: int = 0, first_seed: int = 0) -> dict:
    """Keyword arguments of `RolloutEngine.rollout` for `model`: random context frames and
    actions, given actions (world_model) or observations (policy), rollout seeds
    first_seed, first_seed + 1, ..."""
    rng = np.random.default_rng(rng_seed)
    h, w = model.image_size

    def actions(t: int) -> np.ndarray:
        return np.concatenate([rng.integers(0, 2, (batch, t, 12)),
                               rng.integers(0, 11, (batch, t, 4))], axis=-1)

    kw = {"context_images": rng.integers(0, 256, (batch, context, 3, h, w), dtype=np.uint8),
          "context_actions": actions(context), "steps": steps, "mode": mode,
          "seeds": [first_seed + b for b in range(batch)]}
    if mode == "world_model":
        kw["actions"] = actions(steps)
    if mode == "policy":
        kw["observations"] = rng.integers(0, 256, (batch, steps, 3, h, w), dtype=np.uint8)
    return kw
