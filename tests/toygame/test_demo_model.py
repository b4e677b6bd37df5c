"""The shipped demo world model has learned the toy game: a regression in the engine, the
tokenizer or the model files makes its rollouts no better than copying the last frame.

`DEMO_MODEL=<folder>` points the tests at a retrained model instead of models/demo."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from workers.toygame import SIZE, make_clip
from workers.toygame.evaluate import HELD_OUT_SEED, psnr
from workers.wham import RolloutEngine, SamplingParams, load_model

ROOT = Path(__file__).resolve().parents[2]
MODEL = Path(os.environ.get("DEMO_MODEL", ROOT / "models" / "demo"))
SEEDS = ROOT / "configs" / "seeds" / "toygame"
CONTEXT, STEPS = 4, 5
MARGIN_DB = 2.0  # copy-last is the "learned nothing" line; the shipped model clears it by ~3 dB


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL)


def load_clips() -> tuple[np.ndarray, np.ndarray]:
    paths = sorted(SEEDS.glob("*.npz"))
    assert len(paths) >= 4
    images, actions = [], []
    for path in paths:
        with np.load(path, allow_pickle=False) as npz:
            images.append(npz["images"])
            actions.append(npz["actions"])
    return np.stack(images), np.stack(actions)


def test_shipped_seeds_are_held_out_game_clips() -> None:
    for path in sorted(SEEDS.glob("*.npz")):
        seed = int(path.stem.removeprefix("clip_"))
        assert seed >= HELD_OUT_SEED  # never seen in training (seeds 0 .. clips-1)
        with np.load(path, allow_pickle=False) as npz:
            images, actions = make_clip(seed, len(npz["images"]))
            assert np.array_equal(npz["images"], images)
            assert np.array_equal(npz["actions"], actions)


def test_model_shape(model) -> None:
    assert model.image_size == (SIZE, SIZE)
    assert model.token_grid == (4, 4) and model.config.seq_len == 10
    assert sum(f.stat().st_size for f in MODEL.iterdir()) < 20 * 2**20


def test_world_model_rollout_beats_copying_the_last_frame(model) -> None:
    images, actions = load_clips()
    engine = RolloutEngine(model, max_batch=len(images))
    outputs = list(engine.rollout(
        context_images=images[:, :CONTEXT], context_actions=actions[:, :CONTEXT],
        steps=STEPS, mode="world_model", actions=actions[:, CONTEXT:CONTEXT + STEPS],
        sampling=SamplingParams(greedy=True), seeds=list(range(len(images))),
    ))
    generated = np.stack([o.images for o in outputs], axis=1)  # (B, STEPS, 3, H, W)
    real = images[:, CONTEXT:CONTEXT + STEPS]
    last = np.repeat(images[:, CONTEXT - 1:CONTEXT], STEPS, axis=1)
    model_psnr, copy_psnr = psnr(generated, real), psnr(last, real)
    assert model_psnr > copy_psnr + MARGIN_DB, (model_psnr, copy_psnr)
