"""Action names, stick bins (every edge and centre) and action <-> token conversion."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.wham import InputError
from workers.wham.actions import (
    ACTION_NAMES,
    ACTION_VOCAB_SIZE,
    BUTTON_NAMES,
    CENTRE_BIN,
    NUM_STICK_BINS,
    STICK_BIN_CENTRES,
    STICK_BIN_EDGES,
    STICK_NAMES,
    action_token_ranges,
    actions_to_tokens,
    bins_to_sticks,
    sticks_to_bins,
    tokens_to_actions,
    validate_actions,
)

OFFICIAL_EDGES = [-1.05, -0.95, -0.75, -0.5, -0.25, -0.05, 0.05, 0.25, 0.5, 0.75, 0.95, 1.05]
OFFICIAL_CENTRES = [-1, -0.85, -0.625, -0.375, -0.15, 0, 0.15, 0.375, 0.625, 0.85, 1]


def _slow_bin(value: float) -> int:
    """Bin k holds [edge_k, edge_k+1); the top edge closes the last bin."""
    for k in range(NUM_STICK_BINS):
        lo, hi = OFFICIAL_EDGES[k], OFFICIAL_EDGES[k + 1]
        if lo <= value < hi or (k == NUM_STICK_BINS - 1 and value == hi):
            return k
    raise AssertionError(value)


def test_names_and_constants():
    assert BUTTON_NAMES == (
        "trigger_LT", "trigger_RT", "button_A", "button_B", "button_X", "button_Y",
        "dpad_up", "dpad_down", "dpad_left", "dpad_right", "skill_1", "skill_2",
    )
    assert STICK_NAMES == ("left_stick_x", "left_stick_y", "right_stick_x", "right_stick_y")
    assert ACTION_NAMES == BUTTON_NAMES + STICK_NAMES and len(set(ACTION_NAMES)) == 16
    assert STICK_BIN_EDGES.tolist() == OFFICIAL_EDGES
    np.testing.assert_allclose(STICK_BIN_CENTRES, OFFICIAL_CENTRES)
    assert NUM_STICK_BINS == 11 and CENTRE_BIN == 5 and STICK_BIN_CENTRES[CENTRE_BIN] == 0
    assert ACTION_VOCAB_SIZE == 68


def test_every_edge_belongs_to_the_bin_above_and_just_below_to_the_bin_below():
    for k, edge in enumerate(OFFICIAL_EDGES[:-1]):
        assert sticks_to_bins(np.array([edge])).tolist() == [k], edge
        if k > 0:
            below = np.nextafter(edge, -np.inf)
            assert sticks_to_bins(np.array([below])).tolist() == [k - 1], edge
    assert sticks_to_bins(np.array([1.05])).tolist() == [10]
    assert sticks_to_bins(np.array([np.nextafter(1.05, -np.inf)])).tolist() == [10]


def test_interior_edges_match_the_servers_digitize():
    interior = np.array(OFFICIAL_EDGES[:-1])
    np.testing.assert_array_equal(sticks_to_bins(interior),
                                  np.digitize(interior, OFFICIAL_EDGES) - 1)


def test_centres_round_trip():
    bins = np.arange(NUM_STICK_BINS)
    np.testing.assert_array_equal(sticks_to_bins(STICK_BIN_CENTRES), bins)
    np.testing.assert_array_equal(sticks_to_bins(bins_to_sticks(bins)), bins)
    assert bins_to_sticks(bins).dtype == np.float32
    np.testing.assert_allclose(bins_to_sticks(bins), OFFICIAL_CENTRES)
    assert sticks_to_bins(np.array([-1.0, 0.0, 1.0])).tolist() == [0, 5, 10]


@given(st.floats(min_value=-1.05, max_value=1.05, allow_nan=False))
@settings(max_examples=300, deadline=None)
def test_bins_match_the_slow_interval_search(value):
    assert int(sticks_to_bins(np.array([value]))[0]) == _slow_bin(value)


def test_shapes_are_kept():
    values = np.zeros((2, 3, 4))
    out = sticks_to_bins(values)
    assert out.shape == (2, 3, 4) and out.dtype == np.int64 and (out == 5).all()


@pytest.mark.parametrize("bad", [1.06, -1.2, np.nan, np.inf, -np.inf])
def test_bad_stick_values_are_rejected_with_index(bad):
    values = np.zeros((2, 4))
    values[1, 2] = bad
    with pytest.raises(InputError, match=r"index \(1, 2\)"):
        sticks_to_bins(values)


@pytest.mark.parametrize("bad", [-1, 11, 2.5])
def test_bad_bins_are_rejected(bad):
    with pytest.raises(InputError, match="bin"):
        bins_to_sticks(np.array([0, bad]))


def _valid_actions(rng, shape=(3, 5)) -> np.ndarray:
    buttons = rng.integers(0, 2, (*shape, 12))
    sticks = rng.integers(0, NUM_STICK_BINS, (*shape, 4))
    return np.concatenate([buttons, sticks], axis=-1)


def test_validate_actions_accepts_model_form():
    rng = np.random.default_rng(0)
    actions = _valid_actions(rng)
    np.testing.assert_array_equal(validate_actions(actions), actions)
    as_float = validate_actions(actions.astype(np.float32))
    assert as_float.dtype == np.int64 and (as_float == actions).all()
    assert validate_actions(actions.astype(np.uint8)).dtype == np.int64


@pytest.mark.parametrize(
    "column,value,message",
    [
        (1, 2, r"ctx: trigger_RT at index \(1, 3\) is 2, expected 0 or 1"),
        (0, -1, r"trigger_LT at index \(1, 3\) is -1"),
        (13, 11, r"left_stick_y at index \(1, 3\) is 11, expected a bin 0..10"),
        (15, 0.5, r"right_stick_y at index \(1, 3\) is 0.5, expected a finite integer"),
        (12, np.nan, r"left_stick_x at index \(1, 3\) is nan"),
    ],
)
def test_validate_actions_names_column_and_index(column, value, message):
    actions = _valid_actions(np.random.default_rng(1)).astype(np.float64)
    actions[1, 3, column] = value
    with pytest.raises(InputError, match=message):
        validate_actions(actions, name="ctx")


def test_validate_actions_rejects_wrong_shape_and_dtype():
    with pytest.raises(InputError, match=r"expected shape \(\.\.\., 16\), got \(2, 15\)"):
        validate_actions(np.zeros((2, 15), dtype=np.int64))
    with pytest.raises(InputError, match="dtype"):
        validate_actions(np.array([["a"] * 16]))


@pytest.mark.parametrize("v_img", [64, 16384])
def test_token_ranges_follow_the_vocabulary_layout(v_img):
    ranges = action_token_ranges(v_img)
    assert ranges.shape == (16, 2) and ranges.dtype == np.int64
    for b in range(12):
        assert ranges[b].tolist() == [v_img + 2 * b, v_img + 2 * b + 1]
    for s in range(4):
        assert ranges[12 + s].tolist() == [v_img + 24 + 11 * s, v_img + 24 + 11 * s + 10]
    covered = np.concatenate([np.arange(lo, hi + 1) for lo, hi in ranges])
    np.testing.assert_array_equal(covered, np.arange(v_img, v_img + ACTION_VOCAB_SIZE))


def test_every_action_value_round_trips_through_tokens():
    v_img = 64
    for column in range(16):
        top = 1 if column < 12 else NUM_STICK_BINS - 1
        for value in range(top + 1):
            actions = np.zeros((1, 16), dtype=np.int64)
            actions[:, 12:] = CENTRE_BIN
            actions[0, column] = value
            tokens = actions_to_tokens(actions, v_img)
            lo, hi = action_token_ranges(v_img)[column]
            assert lo <= tokens[0, column] <= hi
            np.testing.assert_array_equal(tokens_to_actions(tokens, v_img), actions)
    batch = _valid_actions(np.random.default_rng(2), shape=(4, 7))
    np.testing.assert_array_equal(tokens_to_actions(actions_to_tokens(batch, 100), 100), batch)


def test_tokens_outside_their_position_range_are_rejected():
    tokens = actions_to_tokens(np.zeros((2, 16), dtype=np.int64), 64)
    tokens[1, 0] = 64 + 2  # button 1's token at button 0's position
    with pytest.raises(InputError, match=r"trigger_LT at index \(1,\) is token 66"):
        tokens_to_actions(tokens, 64)
    with pytest.raises(InputError, match="integers"):
        tokens_to_actions(np.zeros((2, 16), dtype=np.float32), 64)
    with pytest.raises(InputError, match="trigger_LT at index \\(0,\\) is 2"):
        actions_to_tokens(np.full((1, 16), 2), 64)
