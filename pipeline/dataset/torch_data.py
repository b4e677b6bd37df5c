"""The PyTorch face of `RolloutWindows`: an IterableDataset sharded by worker and rank."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info


class TorchWindows(IterableDataset):
    """Yields the windows of `RolloutWindows` as dicts of torch tensors (strings stay str).

    Consumer i of n (n = data-loader workers x distributed ranks) reads every n-th shard, so
    together they yield each window once per epoch.
    """

    def __init__(self, windows: Any, *, shuffle: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.windows = windows
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.windows)

    @staticmethod
    def consumer() -> tuple[int, int]:
        """(index, count) of this process among every data-loader worker of every rank."""
        rank, ranks = ((dist.get_rank(), dist.get_world_size())
                       if dist.is_available() and dist.is_initialized() else (0, 1))
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, ranks * workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        index, count = self.consumer()
        for item in self.windows.iter_windows(index=index, count=count, shuffle=self.shuffle,
                                              seed=self.seed, epoch=self.epoch):
            yield {k: torch.from_numpy(v) if hasattr(v, "dtype") else v
                   for k, v in item.items()}
