"""What rollouts start from and act on, as the driver and the actors both describe it.

- A seed is one picture (`images` format), a recorded clip (`wham-npz`: the official
  sample-data `.npz` files with `images` uint8 (T,3,H,W) and `actions` (T,16) in model form),
  or either of those listed in a `manifest` (CSV or Parquet with a `uri` column and an
  optional `seed_id` column), or a folder of the WHAM Demonstrator (`demonstrator`: an
  example or saved timeline, frames plus an `actions.json` mapping each frame's file name
  to its 16 values, read by `demonstrator_actions`). The driver finds `SeedRef`s
  (pipeline.driver.discovery); an actor loads each into `SeedData` (workers.actor.inputs).
- Given actions are in model form: int64 (steps, 16), 12 buttons as 0/1 then 4 stick bins
  0..10 (5 = centred). `constant_action` and `actions_from_values` turn what a user writes
  (numbers, names, sticks in [-1, 1]) into that form; the spec validates constant actions
  with the same function the actors apply.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.contracts.errors import UserError
from pipeline.contracts.storage import validate_key
from workers.wham.actions import (
    ACTION_DIM,
    ACTION_NAMES,
    BUTTON_NAMES,
    CENTRE_BIN,
    NUM_BUTTONS,
    NUM_STICK_BINS,
    STICK_NAMES,
    sticks_to_bins,
)

#: No button pressed, both sticks centred.
NEUTRAL_ACTION = np.array([0] * NUM_BUTTONS + [CENTRE_BIN] * len(STICK_NAMES), dtype=np.int64)
NEUTRAL_ACTION.setflags(write=False)


class SeedError(UserError):
    """A seed that cannot be used; the message names the seed."""


@dataclass(frozen=True, slots=True)
class SeedRef:
    """A discovered seed: a safe id and where to read it.

    `root` is the folder or prefix the seed must stay inside (set by discovery for the
    `images` and `wham-npz` formats; None for manifest rows, which name files explicitly).
    """

    seed_id: str
    uri: str
    root: str | None = None


@dataclass(frozen=True, slots=True)
class SeedData:
    """A loaded seed, already at the model's image size."""

    seed_id: str
    uri: str
    context_images: np.ndarray  # uint8 (T,3,H,W)
    context_actions: np.ndarray | None  # int64 (T,16); None for single pictures
    future_images: np.ndarray | None  # uint8 (R,3,H,W): recorded frames after the context
    future_actions: np.ndarray | None  # int64 (R,16): recorded actions after the context
    source_size: tuple[int, int]  # (H, W) before resizing
    #: How it was made to fit the model, in words (resized from which size, converted from
    #: which mode); empty when it was used as it is.
    adapted: tuple[str, ...] = ()


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
    return actions_from_values(np.array([numbers], dtype=np.float64), where="constant action")[0]


def actions_from_values(values: np.ndarray, *, where: str, sticks: str = "values",
                        rows: Sequence[str] | None = None) -> np.ndarray:
    """(N,16) float: buttons 0/1, sticks values in [-1,1] or bins -> model form int64.

    Errors name the row: its 1-based number, or `rows[i]` when the rows have names."""
    def row_name(row: int) -> str:
        return rows[row] if rows is not None else f"row {row + 1}"

    for row, col in np.argwhere(~np.isfinite(values))[:1]:
        raise UserError(
            f"{where}: {row_name(row)}, column {ACTION_NAMES[col]}: missing or not a number"
        )
    buttons = values[:, :NUM_BUTTONS]
    for row, col in np.argwhere((buttons != 0) & (buttons != 1))[:1]:
        raise UserError(
            f"{where}: {row_name(row)}, column {ACTION_NAMES[col]}: "
            f"{buttons[row, col]:g} is not 0 or 1"
        )
    stick_values = values[:, NUM_BUTTONS:]
    if sticks == "bins":
        bad = (stick_values != np.round(stick_values)) | (stick_values < 0)
        bad |= stick_values > NUM_STICK_BINS - 1
        for row, col in np.argwhere(bad)[:1]:
            raise UserError(
                f"{where}: {row_name(row)}, column {STICK_NAMES[col]}: "
                f"{stick_values[row, col]:g} is not a bin 0..{NUM_STICK_BINS - 1}"
            )
        bins = stick_values.astype(np.int64)
    else:
        for row, col in np.argwhere(np.abs(stick_values) > 1.0)[:1]:
            raise UserError(
                f"{where}: {row_name(row)}, column {STICK_NAMES[col]}: "
                f"{stick_values[row, col]:g} is outside [-1, 1]"
            )
        bins = sticks_to_bins(stick_values)
    return np.concatenate([buttons.astype(np.int64), bins], axis=1)


# ---------------------------------------------------------------- WHAM Demonstrator folders

#: The file of a Demonstrator example or saved timeline folder: image file name -> 16 values.
DEMONSTRATOR_ACTIONS = "actions.json"
#: Largest actions.json parsed: it becomes Python objects many times its size, and it is
#: read whole. The Demonstrator writes about 110 bytes a frame: some 70,000 frames.
MAX_ACTIONS_BYTES = 8 * 2**20


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders the digits in a name by their value: image2 before image10."""
    return tuple((0, int(part)) if part.isdecimal() else (1, part)
                 for part in re.split(r"(\d+)", name) if part)


def _frame_name(name: Any, *, where: str) -> str:
    """A name from actions.json that is one plain file name in the folder."""
    if not isinstance(name, str) or "/" in name or "\\" in name:
        raise SeedError(f"{where}: {str(name)[:200]!r} is not a file name in the folder")
    try:
        return validate_key(name)
    except UserError:
        raise SeedError(f"{where}: {name[:200]!r} is not a file name in the folder") from None


def demonstrator_actions(data: bytes, *, where: str) -> tuple[list[str], np.ndarray]:
    """An `actions.json` -> (its image names in numeric order, model-form actions (T,16)).

    Each value is 16 numbers: 12 buttons 0/1, then 4 sticks in [-1, 1], binned with the
    official server's bin edges. `where` starts every error (a SeedError naming the image).
    """
    if len(data) > MAX_ACTIONS_BYTES:
        raise SeedError(f"{where}: {len(data) / 2**20:.1f} MiB, more than the "
                        f"{MAX_ACTIONS_BYTES / 2**20:g} MiB an actions file may hold")
    try:
        table = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SeedError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(table, dict) or not table:
        raise SeedError(f"{where}: expected an object mapping image file names to 16 "
                        "numbers (12 buttons, then 4 sticks)")
    names = sorted((_frame_name(n, where=where) for n in table), key=natural_key)
    rows = []
    for name in names:
        value = table[name]
        if not isinstance(value, list) or len(value) != ACTION_DIM:
            got = f"{len(value)} values" if isinstance(value, list) else type(value).__name__
            raise SeedError(f"{where}: {name}: expected {ACTION_DIM} numbers (12 buttons, "
                            f"then 4 sticks), got {got}")
        bad = next((v for v in value if isinstance(v, bool) or not isinstance(v, int | float)),
                   None)
        if bad is not None:
            raise SeedError(f"{where}: {name}: {str(bad)[:40]!r} is not a number")
        rows.append(value)
    try:
        values = np.asarray(rows, dtype=np.float64)  # (T,16)
    except OverflowError:
        raise SeedError(f"{where}: a value is too large for a number") from None
    try:
        return names, actions_from_values(values, where=where, rows=names)
    except UserError as exc:
        raise SeedError(str(exc)) from None
