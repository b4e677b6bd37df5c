"""Scripted play and clip files in the official sample-data `.npz` layout.

The policy is sticky: each stick holds a bin for a random number of steps and buttons are
pressed in short bursts, so motion is smooth enough for a world model to learn from ten
steps of context. Everything is a function of the seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from workers.wham.actions import ACTION_DIM, CENTRE_BIN, NUM_BUTTONS, NUM_STICKS

from .game import ATTACK, JUMP, SWITCH, initial_state, play

#: Stick bins the policy picks from: centred most often, then full and half tilt.
STICK_CHOICES = np.array([5, 5, 5, 0, 10, 0, 10, 2, 8], dtype=np.int64)
#: Per-step chance that a button burst starts: jump, attack, colour switch, an idle button.
BUTTON_START_PROB = {JUMP: 0.06, ATTACK: 0.06, SWITCH: 0.05, 0: 0.03, 7: 0.03}


def scripted_actions(seed: int, steps: int) -> np.ndarray:
    """int64 (steps, 16) sticky actions in model form, reproducible for `seed`."""
    rng = np.random.default_rng([seed, 1])
    out = np.zeros((steps, ACTION_DIM), dtype=np.int64)
    sticks = np.full(NUM_STICKS, CENTRE_BIN, dtype=np.int64)
    hold = np.zeros(NUM_STICKS, dtype=np.int64)
    burst = np.zeros(NUM_BUTTONS, dtype=np.int64)
    for t in range(steps):
        for s in range(NUM_STICKS):
            if hold[s] == 0:
                sticks[s] = rng.choice(STICK_CHOICES)
                hold[s] = rng.integers(3, 12)
            hold[s] -= 1
        for b, p in BUTTON_START_PROB.items():
            if burst[b] == 0 and rng.random() < p:
                burst[b] = rng.integers(1, 4)
        out[t, :NUM_BUTTONS] = burst > 0
        burst = np.maximum(burst - 1, 0)
        out[t, NUM_BUTTONS:] = sticks
    return out


def make_clip(seed: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (steps, 3, H, W), actions int64 (steps, 16)) for one seed."""
    actions = scripted_actions(seed, steps)
    frames, _ = play(initial_state(seed), actions)
    return frames, actions


def write_clip(path: str | Path, *, seed: int, steps: int) -> Path:
    """Write one clip as `.npz` with `images` (T, 3, H, W) uint8 and `actions` (T, 16)."""
    images, actions = make_clip(seed, steps)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, images=images, actions=actions)
    return out


def make_dataset(seeds: range | list[int], steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Stacked clips: images uint8 (N, steps, 3, H, W), actions int64 (N, steps, 16)."""
    clips = [make_clip(s, steps) for s in seeds]
    return np.stack([c[0] for c in clips]), np.stack([c[1] for c in clips])
