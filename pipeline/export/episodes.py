"""The episodes of an export: the committed ok rollouts of the selected runs, one after
another in (run_date, run_id, unit, rollout) order, numbered across runs.

Runs are named by id and by date, each exact or a glob (`--run-id 'nightly-*'`,
`--run-date '2026-12-*'`); an id named exactly that has no committed ok rollout is an error,
as is a selection whose runs were written by models of different shapes
(`pipeline.dataset.shapes`). Both exports use one action encoding: `action` holds the 16
controls as the game pad gives them (float32: buttons 0/1, sticks in [-1, 1]), and
`action_bins` the model form WHAM reads (int64: buttons 0/1, stick bins 0..10).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.contracts.errors import UserError
from pipeline.dataset.index import Shard, Source, is_glob, select_shards
from pipeline.dataset.reader import RolloutRows, UnitReader
from pipeline.dataset.shapes import check_one_shape
from pipeline.export.target import check_target
from workers.wham.actions import NUM_BUTTONS, bins_to_sticks


@dataclass(frozen=True)
class ExportSource:
    """Which runs an export reads and how to reach them. `decoder`: the model that decodes
    runs stored with `frames: none` (default: each run's own)."""

    root: str
    run_ids: tuple[str, ...] = ()
    run_dates: tuple[str, ...] = ()
    decoder: Any = None
    endpoint_url: str | None = None
    region: str | None = None

    def describe(self) -> str:
        named = [f"run {r!r}" for r in self.run_ids] + [f"date {d!r}" for d in self.run_dates]
        return ", ".join(named)


@dataclass(frozen=True)
class Episodes:
    """The selected rollouts, unit by unit; picklable (libraries that hash their inputs,
    like `datasets`, get plain data)."""

    reader: UnitReader
    shards: tuple[Shard, ...]

    @property
    def count(self) -> int:
        return sum(len(s.rollouts) for s in self.shards)

    @property
    def runs(self) -> list[tuple[str, str]]:
        """(run_date, run_id) of every run with episodes, in episode order."""
        return list(dict.fromkeys((s.run_date, s.run_id) for s in self.shards))

    def __iter__(self) -> Iterator[RolloutRows]:
        for shard in self.shards:
            yield from self.reader.read(shard)


def select_episodes(source: ExportSource, *, frames: str) -> Episodes:
    """The selected runs' episodes with frames as "array" or "png" (see `UnitReader`)."""
    if not source.run_ids and not source.run_dates:
        raise UserError("name the runs to export: --run-id ID (repeatable; globs like "
                        "'nightly-*' too) and/or --run-date YYYY-MM-DD (or '2026-12-*')")
    where = Source(source.root, endpoint_url=source.endpoint_url, region=source.region)
    shards = select_shards(where, run_id=list(source.run_ids) or None,
                           run_date=list(source.run_dates) or None)
    found = {s.run_id for s in shards}
    missing = [r for r in source.run_ids if not is_glob(r) and r not in found]
    if not shards or missing:
        what = ", ".join(repr(r) for r in missing) if missing else source.describe()
        raise UserError(f"no committed ok rollouts of {'run ' if missing else ''}{what} "
                        f"under {source.root} (see `wham-batch runs {source.root}`)")
    probe = UnitReader(where, frames="array", decoder=source.decoder)
    check_one_shape(probe, shards, root=source.root, option="--run-id")
    return Episodes(UnitReader(where, frames=frames, decoder=source.decoder), tuple(shards))


def open_export(source: ExportSource, out: str, *, frames: str,
                overwrite: bool = False) -> tuple[Path, Episodes]:
    """The folder to write and the episodes to write there; the folder is checked first,
    so a refused target costs no reads."""
    target = check_target(out, root=source.root, overwrite=overwrite)
    return target, select_episodes(source, frames=frames)


def float_actions(action_bins: np.ndarray) -> np.ndarray:
    """Model-form actions (N, 16) -> float32 (N, 16): buttons 0/1, sticks in [-1, 1] (the
    bins' centres, as the steps table's stick columns hold them)."""
    out = action_bins.astype(np.float32)
    out[:, NUM_BUTTONS:] = bins_to_sticks(action_bins[:, NUM_BUTTONS:])
    return out
