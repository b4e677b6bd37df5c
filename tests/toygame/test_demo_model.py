"""The shipped demo world models have learned the toy game: a regression in the engine, the
tokenizer or the model files makes their rollouts no better than copying the last frame.

models/demo: 4 x 4 tokens a frame, a 10-step window; models/demo-large: 8 x 8 tokens a frame
(where the order of decoding matters), a 4-step window. `DEMO_MODEL=<folder>` points the
tests of models/demo at a retrained model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from workers.toygame import SIZE, make_clip
from workers.toygame.evaluate import HELD_OUT_SEED, psnr
from workers.wham import RolloutEngine, SamplingParams, load_model

ROOT = Path(__file__).resolve().parents[2]
SEEDS = ROOT / "configs" / "seeds" / "toygame"
STEPS = 5
#: dB above copy-last (the "learned nothing" line) at 1 and 5 steps ahead, on the 4 shipped
#: seed clips; errors compound, so the margin narrows with the horizon.
MARGIN_DB = {1: 2.0, 5: 0.5}
#: folder -> (token grid, window steps, context steps given)
MODELS = {
    Path(os.environ.get("DEMO_MODEL", ROOT / "models" / "demo")): ((4, 4), 10, 4),
    ROOT / "models" / "demo-large": ((8, 8), 4, 3),
}


@pytest.fixture(scope="module", params=list(MODELS), ids=lambda p: p.name)
def folder(request) -> Path:
    return request.param


@pytest.fixture(scope="module")
def model(folder: Path):
    return load_model(folder)


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


def test_model_shape(folder: Path, model) -> None:
    grid, window, _ = MODELS[folder]
    assert model.image_size == (SIZE, SIZE)
    assert model.token_grid == grid and model.config.seq_len == window
    assert sum(f.stat().st_size for f in folder.iterdir()) < 20 * 2**20


def test_world_model_rollout_beats_copying_the_last_frame(folder: Path, model) -> None:
    """At 1 step ahead and at 5, as `wham-batch eval-demo --model` reports them."""
    CONTEXT = MODELS[folder][2]  # noqa: N806
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
    for h, margin in MARGIN_DB.items():
        model_psnr = psnr(generated[:, h - 1], real[:, h - 1])
        copy_psnr = psnr(last[:, h - 1], real[:, h - 1])
        assert model_psnr > copy_psnr + margin, (h, model_psnr, copy_psnr)
