"""A toy game for the demo world model: numpy + Pillow only (no torch, no Ray)."""

from .clips import make_clip, make_dataset, scripted_actions, write_clip
from .game import SIZE, GameState, initial_state, play, render, step, stick_speed

__all__ = [
    "SIZE",
    "GameState",
    "initial_state",
    "make_clip",
    "make_dataset",
    "play",
    "render",
    "scripted_actions",
    "step",
    "stick_speed",
    "write_clip",
]
