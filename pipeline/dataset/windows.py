"""Windows of T consecutive steps of one rollout, as training examples.

A window is a dict of arrays with a leading time axis T:

| key | value |
|---|---|
| `frames` | uint8 (T, 3, H, W) (absent with `frames=False`) |
| `actions` | int64 (T, 16): the model form, buttons 0/1 then stick bins 0..10 |
| each action name (`button_A`, `left_stick_x`, ...) | bool (T,) buttons, float32 (T,) sticks |
| `image_tokens` | int64 (T, n) |
| `step`, `generated`, `timestamp_s` | int64 / bool / float64 (T,) |
| the step quality signals (`image_logprob`, ...) | float32 (T,), NaN where the table has null |
| `run_date`, `run_id`, `rollout_id` | str; `start`: int, the step the window starts at |

Windows start at step 0 (or at the first generated step with `generated_only=True`) and
every `stride` steps after; a rollout shorter than T gives none.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.contracts import layout
from pipeline.dataset.index import Shard, count_windows
from pipeline.dataset.reader import RolloutRows, UnitReader
from workers.wham.actions import ACTION_NAMES, BUTTON_NAMES

_STEP_ARRAYS = (("step", np.int64), ("generated", np.bool_), ("timestamp_s", np.float64))


def rollout_arrays(r: RolloutRows) -> dict[str, np.ndarray]:
    """Every per-step array of one rollout (leading axis: its steps in order)."""
    t = r.steps
    out: dict[str, np.ndarray] = {}
    bins = t.column("action_bins").combine_chunks().flatten().to_numpy()
    out["actions"] = bins.reshape(t.num_rows, len(ACTION_NAMES)).astype(np.int64)
    for name in ACTION_NAMES:
        dtype = np.bool_ if name in BUTTON_NAMES else np.float32
        out[name] = t.column(name).to_numpy().astype(dtype)
    tokens = t.column("image_tokens").to_pylist()
    if all(x is not None for x in tokens):
        out["image_tokens"] = np.asarray(tokens, dtype=np.int64).reshape(t.num_rows, -1)
    for name, dtype in _STEP_ARRAYS:
        out[name] = t.column(name).to_numpy().astype(dtype)
    for name in layout.STEP_QUALITY_COLUMNS:
        column = t.column(name) if name in t.column_names else None
        out[name] = (np.full(t.num_rows, np.nan, np.float32) if column is None
                     else column.to_numpy(zero_copy_only=False).astype(np.float32))
    if r.frames is not None:
        out["frames"] = np.stack(r.frames)  # (T, 3, H, W) uint8
    return out


def rollout_windows(r: RolloutRows, *, window: int, stride: int,
                    generated_only: bool) -> Iterator[dict[str, Any]]:
    """The windows of one rollout, in order of their first step."""
    arrays = rollout_arrays(r)
    skip = int(np.argmax(arrays["generated"])) if generated_only else 0
    total = len(arrays["step"]) - skip
    for i in range(count_windows(total, window=window, stride=stride)):
        lo = skip + i * stride
        item: dict[str, Any] = {k: v[lo:lo + window] for k, v in arrays.items()}
        item.update(run_date=r.run_date, run_id=r.run_id, rollout_id=r.rollout_id,
                    start=int(arrays["step"][lo]))
        yield item


def shard_windows(reader: UnitReader, shard: Shard, *, window: int, stride: int,
                  generated_only: bool, order: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Every window of one shard (in `order`, a permutation, when given)."""
    items = [w for r in reader.read(shard)
             for w in rollout_windows(r, window=window, stride=stride,
                                      generated_only=generated_only)]
    return items if order is None else [items[i] for i in order]
