"""Where the given actions of world-model rollouts come from.

Every source returns actions in model form: int64 (steps, 16), 12 buttons as 0/1 then 4
stick bins 0..10 (5 = centred), exactly what the engine takes.

- `random`: buttons pressed independently with probability `button_prob`, stick bins uniform
  over 0..10; a function of the rollout's `rng_seed` only, so reruns repeat it exactly, and
  a longer rollout starts with the same actions as a shorter one.
- `constant`: one action every step.
- `file`: a scripted CSV or Parquet table, one row per step, one column per action name
  (`workers.wham.actions.ACTION_NAMES`); buttons 0/1 (or true/false), sticks as values in
  [-1, 1] (binned like the official server) or, with `sticks="bins"`, as bins 0..10.
- `replay`: the recorded actions of the seed clip that follow its context.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.seeds import SeedData, SeedError, read_table_file
from workers.wham.actions import (
    ACTION_DIM,
    ACTION_NAMES,
    BUTTON_NAMES,
    CENTRE_BIN,
    NUM_BUTTONS,
    NUM_STICK_BINS,
    STICK_NAMES,
    sticks_to_bins,
    validate_actions,
)
from workers.wham.errors import InputError

KINDS = ("random", "constant", "file", "replay")
DEFAULT_BUTTON_PROB = 0.05
#: No button pressed, both sticks centred.
NEUTRAL_ACTION = np.array([0] * NUM_BUTTONS + [CENTRE_BIN] * len(STICK_NAMES), dtype=np.int64)
NEUTRAL_ACTION.setflags(write=False)


def constant_action(value: Sequence[float] | Mapping[str, Any]) -> np.ndarray:
    """One model-form action (16,) int64 from a user's description.

    `value` is either 16 numbers (12 buttons 0/1, then 4 sticks in [-1, 1]) or a mapping
    `{"buttons": ["button_A", ...], "left_stick_x": 0.5, ...}` (unnamed sticks are centred).
    """
    if isinstance(value, Mapping):
        unknown = set(value) - {"buttons", *STICK_NAMES}
        if unknown:
            raise UserError(
                f"constant action: unknown key(s) {sorted(unknown)}; use 'buttons' "
                f"and {', '.join(STICK_NAMES)}"
            )
        pressed = value.get("buttons") or []
        bad = [b for b in pressed if b not in BUTTON_NAMES]
        if bad:
            raise UserError(
                f"constant action: unknown button(s) {bad}; buttons are {', '.join(BUTTON_NAMES)}"
            )
        numbers = [1.0 if name in pressed else 0.0 for name in BUTTON_NAMES]
        numbers += [float(value.get(name, 0.0)) for name in STICK_NAMES]
    else:
        numbers = [float(v) for v in value]
        if len(numbers) != ACTION_DIM:
            raise UserError(
                f"constant action: expected {ACTION_DIM} numbers (12 buttons, "
                f"4 sticks), got {len(numbers)}"
            )
    return _from_values(np.array([numbers], dtype=np.float64), where="constant action")[0]


def _from_values(values: np.ndarray, *, where: str, sticks: str = "values") -> np.ndarray:
    """(N,16) float: buttons 0/1, sticks values in [-1,1] or bins -> model form int64."""
    for row, col in np.argwhere(~np.isfinite(values))[:1]:
        raise UserError(
            f"{where}: row {row + 1}, column {ACTION_NAMES[col]}: missing or not a number"
        )
    buttons = values[:, :NUM_BUTTONS]
    for row, col in np.argwhere((buttons != 0) & (buttons != 1))[:1]:
        raise UserError(
            f"{where}: row {row + 1}, column {ACTION_NAMES[col]}: "
            f"{buttons[row, col]:g} is not 0 or 1"
        )
    stick_values = values[:, NUM_BUTTONS:]
    if sticks == "bins":
        bad = (stick_values != np.round(stick_values)) | (stick_values < 0)
        bad |= stick_values > NUM_STICK_BINS - 1
        for row, col in np.argwhere(bad)[:1]:
            raise UserError(
                f"{where}: row {row + 1}, column {STICK_NAMES[col]}: "
                f"{stick_values[row, col]:g} is not a bin 0..{NUM_STICK_BINS - 1}"
            )
        bins = stick_values.astype(np.int64)
    else:
        for row, col in np.argwhere(np.abs(stick_values) > 1.0)[:1]:
            raise UserError(
                f"{where}: row {row + 1}, column {STICK_NAMES[col]}: "
                f"{stick_values[row, col]:g} is outside [-1, 1]"
            )
        bins = sticks_to_bins(stick_values)
    return np.concatenate([buttons.astype(np.int64), bins], axis=1)


def _column_floats(table: Any, name: str, *, where: str) -> np.ndarray:
    """One table column as float64 with NaN for nulls; names the first non-number."""
    import pyarrow as pa

    column = table.column(name)
    if (
        pa.types.is_boolean(column.type)
        or pa.types.is_integer(column.type)
        or pa.types.is_floating(column.type)
    ):
        return column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    out = np.empty(len(column), dtype=np.float64)
    for row, item in enumerate(column.to_pylist()):
        text = "" if item is None else str(item).strip().lower()
        if text in ("true", "false"):
            out[row] = float(text == "true")
            continue
        try:
            out[row] = float(text) if text else np.nan
        except ValueError:
            raise UserError(
                f"{where}: row {row + 1}, column {name}: {item!r} is not a number"
            ) from None
    return out


def load_action_script(
    uri: str,
    *,
    sticks: str = "values",
    endpoint_url: str | None = None,
    region: str | None = None,
) -> np.ndarray:
    """Read a scripted action table (CSV or Parquet) -> int64 (N, 16) in model form.

    Every problem raises UserError naming the file, the (1-based data) row and the column.
    """
    if sticks not in ("values", "bins"):
        raise UserError(f"action script: sticks must be 'values' or 'bins', got {sticks!r}")
    where = f"action script {uri}"
    table = read_table_file(uri, what="action script", endpoint_url=endpoint_url, region=region)
    missing = [name for name in ACTION_NAMES if name not in table.column_names]
    if missing:
        raise UserError(
            f"{where}: missing column(s) {', '.join(missing)}; "
            f"the columns are {', '.join(ACTION_NAMES)}"
        )
    if table.num_rows == 0:
        raise UserError(f"{where}: has no rows")
    values = np.stack([_column_floats(table, n, where=where) for n in ACTION_NAMES], axis=1)
    return _from_values(values, where=where, sticks=sticks)


def make_actions(
    kind: str,
    *,
    steps: int,
    rng_seed: int,
    constant: Sequence[float] | Mapping[str, Any] | np.ndarray | None = None,
    script: np.ndarray | None = None,
    seed: SeedData | None = None,
    button_prob: float = DEFAULT_BUTTON_PROB,
) -> np.ndarray:
    """The given actions of one rollout: int64 (steps, 16) in model form."""
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    if kind == "random":
        if not 0.0 <= button_prob <= 1.0:
            raise UserError(f"button_prob must be in [0, 1], got {button_prob}")
        # One row of uniforms per step, so the first steps do not depend on `steps`.
        uniform = np.random.default_rng(rng_seed).random((steps, ACTION_DIM))  # (steps,16)
        buttons = uniform[:, :NUM_BUTTONS] < button_prob  # (steps,12)
        stick_bins = np.floor(uniform[:, NUM_BUTTONS:] * NUM_STICK_BINS)  # (steps,4) in 0..10
        actions = np.concatenate([buttons, stick_bins], axis=1).astype(np.int64)
    elif kind == "constant":
        if constant is None:
            raise UserError("constant actions need a value")
        if isinstance(constant, np.ndarray) and constant.dtype.kind in "iu":
            one = constant
        else:
            one = constant_action(constant)
        actions = np.tile(one.reshape(1, ACTION_DIM), (steps, 1))
    elif kind == "file":
        if script is None:
            raise UserError("file actions need the loaded action script")
        if len(script) < steps:
            raise UserError(f"the action script has {len(script)} rows; rollouts need {steps}")
        actions = script[:steps]
    elif kind == "replay":
        if seed is None:
            raise UserError("replayed actions need the seed clip")
        have = 0 if seed.future_actions is None else len(seed.future_actions)
        if have < steps:
            raise SeedError(
                f"seed {seed.seed_id} ({seed.uri}): replay needs {steps} recorded "
                f"actions after the context, the clip has {have}"
            )
        actions = seed.future_actions[:steps]
    else:
        raise UserError(f"unknown action source {kind!r}; choose one of {', '.join(KINDS)}")
    try:
        return validate_actions(actions, name=f"{kind} actions")
    except InputError as exc:
        raise UserError(str(exc)) from None
