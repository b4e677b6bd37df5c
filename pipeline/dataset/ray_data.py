"""The Ray Data face of `RolloutWindows`: a `ray.data.Dataset` with one read task per shard."""

from __future__ import annotations

from typing import Any


class _ReadShards:
    """A picklable callable: the windows of the shards in a batch of shard indices."""

    def __init__(self, windows: Any) -> None:
        self.windows = windows

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        return self.windows.read_shard(self.windows.shards[int(row["shard"])])


def windows_dataset(windows: Any, *, shuffle: bool = False, seed: int = 0) -> Any:
    """The windows as a ray.data.Dataset: a block per shard, each read by one Ray task, so
    splitting the dataset between training workers (`split`, `streaming_split`, Ray Train)
    never yields a window twice."""
    import ray

    items = [{"shard": i} for i in windows.shard_order(shuffle=shuffle, seed=seed)]
    if not items:
        return ray.data.from_items([])
    return ray.data.from_items(items, override_num_blocks=len(items)).flat_map(
        _ReadShards(windows))
