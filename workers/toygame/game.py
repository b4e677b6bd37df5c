"""A tiny deterministic game driven by the 16-d WHAM action, for training a demo world model.

The screen is a 32x32 RGB window onto an endless checkerboard world. Controls (model form:
buttons 0/1, stick bins 0..10 with 5 = centred):

- left stick moves the player square one half-square (4 px) per step when tilted past the
  dead zone (stick y up moves up, as on a game pad);
- right stick pans the view: the checkerboard scrolls the opposite way, as a camera would;
- ``button_A`` starts a jump (the square rises and falls over `JUMP_ARC` steps);
- ``button_B`` held: attack flash, the player's rim turns white;
- ``button_X`` pressed (0 -> 1): the player switches to the next colour of `PLAYER_COLOURS`.

Every position and offset is a multiple of 4 px, so the picture is made of a small set of
8x8 patches: a 4x4-token tokenizer can represent it almost exactly, which keeps the demo
model small. Frame t+1 is a pure function of the state at t and action t, so a clip is
(frames, actions) with actions[t] the action taken after seeing frames[t], as in WHAM's step
layout.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from workers.wham.actions import ACTION_DIM, BUTTON_NAMES, CENTRE_BIN, STICK_NAMES

SIZE = 32  # frames are SIZE x SIZE RGB
PLAYER = 8  # side of the player square in pixels
STEP = 4  # pixels per step of a tilted stick; every offset is a multiple of it
TILE = 8  # checkerboard tile side in pixels
JUMP_ARC = (0, 4, 8, 4)  # pixels above the ground, by steps since the jump started
PLAYER_COLOURS = np.array(
    [(230, 60, 50), (60, 110, 240), (250, 210, 40), (170, 70, 220)], dtype=np.uint8
)
TILE_COLOURS = np.array([(40, 120, 60), (90, 170, 90)], dtype=np.uint8)  # dark / light grass
FLASH_COLOUR = np.array((255, 255, 255), dtype=np.uint8)
SHADOW_COLOUR = np.array((20, 50, 25), dtype=np.uint8)

JUMP = BUTTON_NAMES.index("button_A")
ATTACK = BUTTON_NAMES.index("button_B")
SWITCH = BUTTON_NAMES.index("button_X")
LEFT_X, LEFT_Y, RIGHT_X, RIGHT_Y = (len(BUTTON_NAMES) + i for i in range(len(STICK_NAMES)))


@dataclass(frozen=True)
class GameState:
    """Everything that decides a frame; all integers."""

    x: int  # player's left column on screen
    y: int  # player's top row on screen when on the ground
    cam_x: int  # world coordinate of the screen's left column
    cam_y: int  # world coordinate of the screen's top row
    colour: int  # index into PLAYER_COLOURS
    jump: int = 0  # steps since the jump started, 0 = on the ground
    attack: bool = False  # attack flash shown in this frame
    switch_held: bool = False  # button_X was down in the previous action (edge detection)


def stick_speed(bin_: int) -> int:
    """Stick bin 0..10 -> signed speed in pixels per step: -STEP, 0 (dead zone) or STEP."""
    offset = int(bin_) - CENTRE_BIN
    return 0 if abs(offset) <= 1 else int(np.sign(offset)) * STEP


def initial_state(seed: int) -> GameState:
    """A random start (player position, camera offset, colour), reproducible for a seed."""
    rng = np.random.default_rng(seed)
    cells = (SIZE - PLAYER) // STEP + 1
    return GameState(
        x=STEP * int(rng.integers(0, cells)),
        y=STEP * int(rng.integers(max(JUMP_ARC) // STEP, cells)),
        cam_x=STEP * int(rng.integers(0, 2 * TILE // STEP)),
        cam_y=STEP * int(rng.integers(0, 2 * TILE // STEP)),
        colour=int(rng.integers(len(PLAYER_COLOURS))),
    )


def step(state: GameState, action: np.ndarray) -> GameState:
    """The state after taking `action` (int (16,), model form) in `state`."""
    a = np.asarray(action)
    if a.shape != (ACTION_DIM,):
        raise ValueError(f"action: expected shape ({ACTION_DIM},), got {a.shape}")
    x = int(np.clip(state.x + stick_speed(a[LEFT_X]), 0, SIZE - PLAYER))
    y = int(np.clip(state.y - stick_speed(a[LEFT_Y]), max(JUMP_ARC), SIZE - PLAYER))
    jump = state.jump + 1 if state.jump else 0
    if jump >= len(JUMP_ARC):
        jump = 0
    if not state.jump and a[JUMP]:
        jump = 1
    pressed = bool(a[SWITCH])
    colour = (state.colour + 1) % len(PLAYER_COLOURS) if pressed and not state.switch_held \
        else state.colour
    return replace(
        state,
        x=x,
        y=y,
        # Camera coordinates wrap at the checkerboard period: the picture is the same.
        cam_x=(state.cam_x + stick_speed(a[RIGHT_X])) % (2 * TILE),
        cam_y=(state.cam_y - stick_speed(a[RIGHT_Y])) % (2 * TILE),
        colour=colour,
        jump=jump,
        attack=bool(a[ATTACK]),
        switch_held=pressed,
    )


def render(state: GameState) -> np.ndarray:
    """uint8 (3, SIZE, SIZE) frame of `state`."""
    rows = (np.arange(SIZE) + state.cam_y) // TILE
    cols = (np.arange(SIZE) + state.cam_x) // TILE
    checker = (rows[:, None] + cols[None, :]) % 2  # (H, W)
    img = TILE_COLOURS[checker].copy()  # (H, W, 3)
    top = state.y - JUMP_ARC[state.jump]
    if state.jump:  # a shadow on the ground tells a jump from moving up
        img[state.y + PLAYER - STEP:state.y + PLAYER, state.x:state.x + PLAYER] = SHADOW_COLOUR
    body = img[top:top + PLAYER, state.x:state.x + PLAYER]
    body[:] = FLASH_COLOUR if state.attack else PLAYER_COLOURS[state.colour]
    body[2:-2, 2:-2] = PLAYER_COLOURS[state.colour]
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def play(state: GameState, actions: np.ndarray) -> tuple[np.ndarray, GameState]:
    """Frames of `state` and of each state after actions[:-1]: uint8 (T, 3, H, W).

    The last action is recorded but its result is not rendered (the clip ends there), so
    ``len(frames) == len(actions)`` as in the official sample-data files. Returns the frames
    and the final state (after every action).
    """
    acts = np.asarray(actions)
    frames = np.empty((len(acts), 3, SIZE, SIZE), dtype=np.uint8)
    for t, action in enumerate(acts):
        frames[t] = render(state)
        state = step(state, action)
    return frames, state
