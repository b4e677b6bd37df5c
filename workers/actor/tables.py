"""The Parquet parts of one work unit, built from the rows the writer buffered.

`OutputWriter` (workers/actor/writer.py) collects a unit's steps, rollouts rows and (frames:
parquet) PNG bytes while the unit runs; these functions turn them into tables of the
schemas in `pipeline.contracts.layout` and into Parquet bytes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.contracts import layout
from workers.wham.actions import (
    ACTION_DIM,
    BUTTON_NAMES,
    NUM_BUTTONS,
    STICK_NAMES,
    bins_to_sticks,
)


@dataclass(slots=True)
class StepRow:
    """One step of one rollout, as the writer buffers it."""

    step: int
    generated: bool
    action: np.ndarray  # int64 (16,)
    source: str
    tokens: np.ndarray | None  # (n,)
    frame_key: str | None
    quality: dict[str, float]  # pipeline.contracts.quality step signals; empty for context steps


def ok_steps(steps: Mapping[str, Mapping[int, StepRow]],
             rollouts: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, StepRow]]:
    """(rollout_id, step) of the ok rollouts, in (rollout, step) order."""
    return [
        (rollout_id, s)
        for rollout_id in sorted(steps)
        if rollouts[rollout_id]["status"] == "ok"
        for s in (steps[rollout_id][k] for k in sorted(steps[rollout_id]))
    ]


def steps_table(rows: list[tuple[str, StepRow]]) -> Any:
    """The steps part: actions as named buttons, stick bin centres and raw bins."""
    import pyarrow as pa

    n = len(rows)
    actions = np.stack([s.action for _, s in rows]) if n else np.zeros((0, ACTION_DIM), int)
    steps = np.array([s.step for _, s in rows], dtype=np.int32)
    columns: dict[str, Any] = {
        "rollout_id": pa.array([r for r, _ in rows], pa.string()),
        "step": steps,
        "generated": pa.array([s.generated for _, s in rows], pa.bool_()),
    }
    for i, name in enumerate(BUTTON_NAMES):
        columns[name] = actions[:, i].astype(bool)
    sticks = bins_to_sticks(actions[:, NUM_BUTTONS:])  # (n,4) float32 bin centres
    for i, name in enumerate(STICK_NAMES):
        columns[name] = sticks[:, i]
    flat_bins = pa.array(actions.astype(np.uint8).reshape(-1), pa.uint8())
    columns["action_bins"] = pa.FixedSizeListArray.from_arrays(flat_bins, ACTION_DIM)
    columns["action_source"] = pa.array([s.source for _, s in rows], pa.string())
    columns["image_tokens"] = tokens_column([s.tokens for _, s in rows])
    columns["frame_key"] = pa.array([s.frame_key for _, s in rows], pa.string())
    columns["timestamp_s"] = steps.astype(np.float64) / layout.STEP_RATE_HZ
    for name in layout.STEP_QUALITY_COLUMNS:
        values = np.array([s.quality.get(name, np.nan) for _, s in rows], dtype=np.float32)
        columns[name] = pa.array(values, pa.float32(), mask=np.isnan(values))
    return pa.Table.from_arrays(
        [pa.array(columns[f.name], f.type) for f in layout.STEPS_SCHEMA],
        schema=layout.STEPS_SCHEMA,
    )


def frames_table(rows: list[tuple[str, StepRow]], pngs: Mapping[tuple[str, int], bytes]) -> Any:
    """The frames part (`output.frames: parquet`): the PNG of every row that has one."""
    import pyarrow as pa

    kept = [(r, s.step) for r, s in rows if (r, s.step) in pngs]
    return pa.Table.from_arrays(
        [pa.array([r for r, _ in kept], pa.string()),
         pa.array([step for _, step in kept], pa.int32()),
         pa.array([pngs[k] for k in kept], pa.binary())],
        schema=layout.FRAMES_SCHEMA,
    )


def rollouts_table(rollouts: Mapping[str, Mapping[str, Any]]) -> Any:
    """The rollouts part, one row per rollout in id order."""
    import pyarrow as pa

    names = layout.ROLLOUTS_SCHEMA.names
    return pa.Table.from_pylist(
        [{k: rollouts[r].get(k) for k in names} for r in sorted(rollouts)],
        schema=layout.ROLLOUTS_SCHEMA,
    )


def parquet_bytes(table: Any, *, metadata: Mapping[bytes, bytes] | None = None) -> bytes:
    """`table` as a Parquet file: zstd, except PNG bytes (compressed already: zstd over them
    costs time and saves nothing); `metadata` replaces the schema's key-value metadata."""
    import pyarrow.parquet as pq

    if metadata is not None:
        table = table.replace_schema_metadata(metadata)
    sink = io.BytesIO()
    compression = {name: "none" if name == "png" else "zstd" for name in table.column_names}
    pq.write_table(table, sink, compression=compression)
    return sink.getvalue()


def tokens_column(tokens: list[np.ndarray | None]) -> Any:
    """list<uint16> of every row's image tokens (null where a row has none)."""
    import pyarrow as pa

    present = [t for t in tokens if t is not None]
    sizes = np.array([0 if t is None else t.size for t in tokens], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    values = (np.concatenate(present) if present else np.zeros(0)).astype(np.uint16)
    mask = pa.array([t is None for t in tokens], pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.uint16()),
                                    type=layout.IMAGE_TOKENS_TYPE, mask=mask)
