"""A run's committed ok rollouts, one after another, as the episodes of an export."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.contracts.errors import UserError
from pipeline.dataset.index import Shard, Source, select_shards
from pipeline.dataset.reader import RolloutRows, UnitReader


@dataclass(frozen=True)
class RunEpisodes:
    """The rollouts of one run, unit by unit; picklable (libraries that hash their inputs,
    like `datasets`, get plain data)."""

    reader: UnitReader
    shards: tuple[Shard, ...]

    @property
    def count(self) -> int:
        return sum(len(s.rollouts) for s in self.shards)

    def __iter__(self) -> Iterator[RolloutRows]:
        for shard in self.shards:
            yield from self.reader.read(shard)


def run_episodes(root: str, *, run_id: str, frames: str, decoder: Any = None,
                 endpoint_url: str | None = None, region: str | None = None) -> RunEpisodes:
    """The run's episodes with frames as "array" or "png" (see `UnitReader`); UserError when
    the run has no committed ok rollout."""
    source = Source(root, endpoint_url=endpoint_url, region=region)
    shards = select_shards(source, run_id=run_id)
    if not shards:
        raise UserError(f"no committed rollouts of run {run_id!r} under {root} "
                        "(see `wham-batch runs ROOT`)")
    return RunEpisodes(UnitReader(source, frames=frames, decoder=decoder), tuple(shards))
