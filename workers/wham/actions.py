"""The 16-dimensional WHAM game-pad action: names, stick bins and action tokens.

An action is 12 binary buttons followed by 4 stick axes. Inside the model each stick axis is a
bin 0..10 (5 = centred); outside it (CSV/Parquet columns, user input) a stick is a float in
[-1, 1]. In the shared token vocabulary actions come after the ``v_img`` image codes:
button ``b`` off/on is ``v_img + 2*b + {0, 1}`` and stick ``s`` in bin ``k`` is
``v_img + 24 + 11*s + k``, 68 action tokens in all.
"""

from __future__ import annotations

import numpy as np

from workers.wham.errors import InputError

BUTTON_NAMES: tuple[str, ...] = (
    "trigger_LT",
    "trigger_RT",
    "button_A",
    "button_B",
    "button_X",
    "button_Y",
    "dpad_up",
    "dpad_down",
    "dpad_left",
    "dpad_right",
    "skill_1",
    "skill_2",
)
STICK_NAMES: tuple[str, ...] = ("left_stick_x", "left_stick_y", "right_stick_x", "right_stick_y")
ACTION_NAMES: tuple[str, ...] = BUTTON_NAMES + STICK_NAMES

NUM_BUTTONS = len(BUTTON_NAMES)
NUM_STICKS = len(STICK_NAMES)
ACTION_DIM = len(ACTION_NAMES)
NUM_STICK_BINS = 11
CENTRE_BIN = 5
#: 12 buttons x 2 values + 4 sticks x 11 bins.
ACTION_VOCAB_SIZE = 2 * NUM_BUTTONS + NUM_STICK_BINS * NUM_STICKS

#: Interval edges of the official server's stick binning (12 edges -> 11 bins).
STICK_BIN_EDGES = np.array(
    [-1.05, -0.95, -0.75, -0.5, -0.25, -0.05, 0.05, 0.25, 0.5, 0.75, 0.95, 1.05], dtype=np.float64
)
#: The value the official server gives back for each bin.
STICK_BIN_CENTRES = np.array(
    [-1.0, -0.85, -0.625, -0.375, -0.15, 0.0, 0.15, 0.375, 0.625, 0.85, 1.0], dtype=np.float32
)


def sticks_to_bins(values: np.ndarray) -> np.ndarray:
    """Map stick values in [-1, 1] to bins 0..10 (int64, same shape).

    Bin ``k`` is the half-open interval ``[edge[k], edge[k+1])``, exactly as the official server's
    ``np.digitize(v, edges) - 1``: an interior edge such as 0.05 belongs to the bin above it.
    The outermost edge 1.05 is closed (bin 10), where the server would produce an invalid bin 11.
    Values outside [-1.05, 1.05] and NaN raise InputError naming the first bad index.
    """
    arr = np.asarray(values, dtype=np.float64)
    bad = ~((arr >= STICK_BIN_EDGES[0]) & (arr <= STICK_BIN_EDGES[-1]))  # NaN compares False
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(
            f"stick value {float(arr[index])} at index {index} is outside "
            f"[{STICK_BIN_EDGES[0]}, {STICK_BIN_EDGES[-1]}] (sticks are floats in [-1, 1])"
        )
    bins = np.digitize(arr, STICK_BIN_EDGES) - 1
    return np.minimum(bins, NUM_STICK_BINS - 1).astype(np.int64)


def bins_to_sticks(bins: np.ndarray) -> np.ndarray:
    """Map bins 0..10 to the official bin centres (float32, same shape)."""
    arr = np.asarray(bins)
    if arr.dtype.kind not in "iu" and not (
        arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))
    ):
        raise InputError(
            f"stick bins must be integers 0..{NUM_STICK_BINS - 1}, got dtype {arr.dtype}"
        )
    idx = arr.astype(np.int64)
    bad = (idx < 0) | (idx >= NUM_STICK_BINS)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(
            f"stick bin {idx[index]} at index {index} is outside 0..{NUM_STICK_BINS - 1}"
        )
    return STICK_BIN_CENTRES[idx]


def validate_actions(actions: np.ndarray, *, name: str = "actions") -> np.ndarray:
    """Check actions in model form (..., 16) and return them as int64.

    Buttons must be 0/1 and sticks bins 0..10; values must be finite integers (floats such as
    1.0 are accepted). Raises InputError naming ``name``, the column and the index.
    """
    try:
        arr = np.asarray(actions)
    except Exception as exc:  # ragged lists and the like
        raise InputError(f"{name}: cannot be read as an array ({exc})") from exc
    if arr.ndim == 0 or arr.shape[-1] != ACTION_DIM:
        raise InputError(f"{name}: expected shape (..., {ACTION_DIM}), got {arr.shape}")
    if arr.dtype.kind == "b":
        arr = arr.astype(np.int64)
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(np.nan_to_num(arr)))
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise InputError(
                f"{name}: {ACTION_NAMES[index[-1]]} at index {index[:-1]} is {float(arr[index])}, "
                "expected a finite integer"
            )
    elif arr.dtype.kind not in "iu":
        raise InputError(f"{name}: expected integer actions, got dtype {arr.dtype}")
    out = arr.astype(np.int64)
    limits = np.array([1] * NUM_BUTTONS + [NUM_STICK_BINS - 1] * NUM_STICKS, dtype=np.int64)
    bad = (out < 0) | (out > limits)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        column = index[-1]
        allowed = "0 or 1" if column < NUM_BUTTONS else f"a bin 0..{NUM_STICK_BINS - 1}"
        raise InputError(
            f"{name}: {ACTION_NAMES[column]} at index {index[:-1]} is {out[index]}, "
            f"expected {allowed}"
        )
    return out


def _token_offsets(v_img: int) -> np.ndarray:
    """First token id of each of the 16 action positions, shape (16,)."""
    buttons = v_img + 2 * np.arange(NUM_BUTTONS, dtype=np.int64)
    sticks = v_img + 2 * NUM_BUTTONS + NUM_STICK_BINS * np.arange(NUM_STICKS, dtype=np.int64)
    return np.concatenate([buttons, sticks])


def action_token_ranges(v_img: int) -> np.ndarray:
    """Inclusive token range of each action position: int64 array (16, 2) of [lo, hi].

    The sampler masks action position ``i`` to ``lo[i] <= token <= hi[i]``.
    """
    lo = _token_offsets(v_img)
    width = np.array([2] * NUM_BUTTONS + [NUM_STICK_BINS] * NUM_STICKS, dtype=np.int64)
    return np.stack([lo, lo + width - 1], axis=1)


def actions_to_tokens(actions: np.ndarray, v_img: int) -> np.ndarray:
    """Model-form actions (..., 16) -> vocabulary tokens (..., 16), int64. Validates first."""
    return validate_actions(actions) + _token_offsets(v_img)


def tokens_to_actions(tokens: np.ndarray, v_img: int) -> np.ndarray:
    """Vocabulary tokens (..., 16) -> model-form actions (..., 16), int64.

    Raises InputError when a token lies outside its position's range.
    """
    arr = np.asarray(tokens)
    if arr.ndim == 0 or arr.shape[-1] != ACTION_DIM or arr.dtype.kind not in "iu":
        raise InputError(
            f"action tokens: expected integers of shape (..., {ACTION_DIM}), "
            f"got {arr.dtype} {arr.shape}"
        )
    ranges = action_token_ranges(v_img)
    arr = arr.astype(np.int64)
    bad = (arr < ranges[:, 0]) | (arr > ranges[:, 1])
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        column = index[-1]
        raise InputError(
            f"action tokens: {ACTION_NAMES[column]} at index {index[:-1]} is token {arr[index]}, "
            f"outside [{ranges[column, 0]}, {ranges[column, 1]}]"
        )
    return arr - ranges[:, 0]
