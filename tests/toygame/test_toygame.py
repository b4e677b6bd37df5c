"""The toy game behind the demo model: deterministic, and every control has its visible effect."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from workers.toygame import initial_state, make_clip, render, scripted_actions, step, write_clip
from workers.toygame.game import (
    ATTACK,
    FLASH_COLOUR,
    JUMP,
    JUMP_ARC,
    LEFT_X,
    LEFT_Y,
    PLAYER,
    PLAYER_COLOURS,
    RIGHT_X,
    SHADOW_COLOUR,
    SIZE,
    STEP,
    SWITCH,
    GameState,
    stick_speed,
)
from workers.wham.actions import ACTION_DIM, CENTRE_BIN, validate_actions

NEUTRAL = np.array([0] * 12 + [CENTRE_BIN] * 4, dtype=np.int64)
START = GameState(x=12, y=16, cam_x=0, cam_y=0, colour=0)


def act(**changes: int) -> np.ndarray:
    a = NEUTRAL.copy()
    for index, value in changes.items():
        a[int(index.removeprefix("i"))] = value
    return a


def player_box(frame: np.ndarray, colour: int) -> tuple[float, float]:
    """Centroid (row, col) of the pixels in the player's colour."""
    mask = (frame.transpose(1, 2, 0) == PLAYER_COLOURS[colour]).all(-1)
    rows, cols = np.nonzero(mask)
    assert len(rows), "player not visible"
    return rows.mean(), cols.mean()


def colour_count(frame: np.ndarray, colour: np.ndarray) -> int:
    return int((frame.transpose(1, 2, 0) == colour).all(-1).sum())


def test_clips_are_deterministic_per_seed() -> None:
    a_img, a_act = make_clip(7, 24)
    b_img, b_act = make_clip(7, 24)
    c_img, _ = make_clip(8, 24)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_act, b_act)
    assert not np.array_equal(a_img, c_img)
    assert a_img.shape == (24, 3, SIZE, SIZE) and a_img.dtype == np.uint8


def test_npz_layout_matches_the_sample_data(tmp_path) -> None:
    path = write_clip(tmp_path / "c.npz", seed=3, steps=12)
    with np.load(path, allow_pickle=False) as npz:
        assert set(npz.files) == {"images", "actions"}
        images, actions = npz["images"], npz["actions"]
    assert images.shape == (12, 3, SIZE, SIZE) and images.dtype == np.uint8
    assert actions.shape == (12, ACTION_DIM)
    validate_actions(actions)
    assert np.array_equal(images, make_clip(3, 12)[0])


def test_stick_dead_zone_and_speed() -> None:
    assert [stick_speed(b) for b in range(11)] == [-STEP] * 4 + [0] * 3 + [STEP] * 4


@pytest.mark.parametrize(("axis", "bin_", "d_row", "d_col"), [
    (LEFT_X, 10, 0, STEP), (LEFT_X, 0, 0, -STEP), (LEFT_Y, 10, -STEP, 0), (LEFT_Y, 0, STEP, 0),
])
def test_left_stick_moves_the_player(axis: int, bin_: int, d_row: int, d_col: int) -> None:
    before = player_box(render(START), 0)
    after = player_box(render(step(START, act(**{f"i{axis}": bin_}))), 0)
    assert after[0] - before[0] == pytest.approx(d_row)
    assert after[1] - before[1] == pytest.approx(d_col)


def test_player_stays_on_screen() -> None:
    state = START
    for _ in range(20):
        state = step(state, act(**{f"i{LEFT_X}": 10}))
    assert state.x == SIZE - PLAYER
    assert player_box(render(state), 0)[1] == pytest.approx(SIZE - PLAYER / 2 - 0.5)


def test_right_stick_pans_the_view_not_the_player() -> None:
    state = replace(START, x=0, y=SIZE - PLAYER)  # player in the bottom-left corner
    before = render(state)
    moved = step(state, act(**{f"i{RIGHT_X}": 10}))
    after = render(moved)
    top = slice(0, SIZE - PLAYER)  # rows without the player
    # The camera moves right, so the world scrolls left by STEP pixels.
    assert np.array_equal(after[:, top, :-STEP], before[:, top, STEP:])
    assert not np.array_equal(after[:, top], before[:, top])
    assert player_box(after, 0) == player_box(before, 0)


def test_jump_rises_and_lands_with_a_shadow() -> None:
    state = step(START, act(**{f"i{JUMP}": 1}))
    tops = []
    for _ in range(len(JUMP_ARC) - 1):
        frame = render(state)
        tops.append(player_box(frame, 0)[0])
        assert colour_count(frame, SHADOW_COLOUR) > 0
        state = step(state, NEUTRAL)
    ground = player_box(render(START), 0)[0]
    assert [ground - t for t in tops] == list(JUMP_ARC[1:])
    assert player_box(render(state), 0)[0] == ground
    assert colour_count(render(state), SHADOW_COLOUR) == 0


def test_attack_flashes_while_held() -> None:
    assert colour_count(render(START), FLASH_COLOUR) == 0
    flashing = step(START, act(**{f"i{ATTACK}": 1}))
    assert colour_count(render(flashing), FLASH_COLOUR) == PLAYER * PLAYER - (PLAYER - 4) ** 2
    assert colour_count(render(step(flashing, NEUTRAL)), FLASH_COLOUR) == 0


def test_colour_switches_once_per_press() -> None:
    press = act(**{f"i{SWITCH}": 1})
    s1 = step(START, press)
    s2 = step(s1, press)  # still held: no further switch
    s3 = step(step(s2, NEUTRAL), press)
    assert [s.colour for s in (s1, s2, s3)] == [1, 1, 2]
    player_box(render(s1), 1)


def test_other_buttons_do_nothing_visible() -> None:
    assert np.array_equal(render(step(START, act(i0=1, i7=1, i11=1))), render(step(START, NEUTRAL)))


def test_scripted_actions_are_valid_and_sticky() -> None:
    actions = scripted_actions(5, 200)
    validate_actions(actions)
    changes = (np.diff(actions[:, 12:], axis=0) != 0).sum()
    assert changes < 200 * 4 / 3  # sticks hold each choice for several steps
    assert actions[:, [JUMP, ATTACK, SWITCH]].any(0).all()
    assert len({tuple(a) for a in actions[:, 12:]}) > 5


def test_initial_states_vary_and_align_to_the_grid() -> None:
    states = [initial_state(s) for s in range(50)]
    assert len({(s.x, s.y, s.cam_x, s.cam_y, s.colour) for s in states}) > 40
    assert all(v % STEP == 0 for s in states for v in (s.x, s.y, s.cam_x, s.cam_y))
