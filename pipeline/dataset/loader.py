"""`RolloutWindows`: a run's outputs as training windows, for PyTorch and Ray Data.

```python
from torch.utils.data import DataLoader
from pipeline.dataset import RolloutWindows

windows = RolloutWindows("s3://bucket/wham", run_id="nightly-2026-11-30", window=8,
                         where="mean_logprob > -2.5 and frozen = false")
for batch in DataLoader(windows.torch(shuffle=True), batch_size=16, num_workers=4):
    batch["frames"]      # uint8 [16, 8, 3, H, W]
    batch["actions"]     # int64 [16, 8, 16]
rays = windows.ray()     # a ray.data.Dataset of the same windows
```

Sharding: the selected rollouts are grouped by work unit (`index.Shard`); every consumer
(data-loader worker x distributed rank, or Ray read task) takes its own shards, so each
window is produced exactly once per epoch. With `shuffle`, shards and the windows within a
shard are permuted by (seed, epoch), the same permutation in every worker.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.contracts.errors import UserError
from pipeline.dataset.index import Shard, Source, as_list, is_glob, select_shards
from pipeline.dataset.ray_data import windows_dataset
from pipeline.dataset.reader import UnitReader
from pipeline.dataset.shapes import check_one_shape
from pipeline.dataset.windows import shard_windows
from pipeline.query import check_runs_exist


class RolloutWindows:
    """The windows of T consecutive steps of every selected rollout under an output root.

    root: a local folder or s3://bucket/prefix; run_id: one run or a list, exact ids or
    globs like "nightly-*" (None: all; an exact id that names no run under the root is a
    UserError, where a filter that selects none of a run's rollouts is not); run_date: the
    same for dates ("2026-12-*"); status: rollouts of this status (None: any; failed
    rollouts have no steps);
    where: a filter on the rollouts table in `wham-batch query --where` syntax, e.g.
    "mean_logprob > -2.5 and frozen = false"; window / stride: steps per window and between
    window starts (stride defaults to window: every step once); generated_only: windows
    only over generated steps; frames: read frames (False: tokens and actions only);
    decoder: the model that decodes runs stored with `frames: none` (default: each run's
    own, from its manifest); committed_only: only units with a commit marker.

    The selected runs must share one model's shapes (frame size, token count): a root
    holding runs of several models is refused here, naming the runs of each, since their
    windows could not share a batch (`pipeline.dataset.shapes`).
    """

    def __init__(self, root: str, *, window: int, stride: int | None = None,
                 run_id: str | list[str] | None = None,
                 run_date: str | list[str] | None = None, status: str | None = "ok",
                 where: str | None = None, generated_only: bool = False, frames: bool = True,
                 decoder: Any = None, committed_only: bool = True,
                 endpoint_url: str | None = None, region: str | None = None) -> None:
        if window < 1 or (stride is not None and stride < 1):
            raise UserError("window and stride must be at least 1")
        self.window = int(window)
        self.stride = int(stride or window)
        self.generated_only = generated_only
        self.source = Source(root, endpoint_url=endpoint_url, region=region)
        self.reader = UnitReader(self.source, frames="array" if frames else None,
                                 decoder=decoder)
        self.shards: list[Shard] = select_shards(self.source, run_id=run_id, run_date=run_date,
                                                 status=status, where=where,
                                                 committed_only=committed_only)
        found = {s.run_id for s in self.shards}
        unseen = [r for r in as_list(run_id) or [] if not is_glob(r) and r not in found]
        if unseen:  # selected nothing: filtered out, or a typo
            check_runs_exist(root, unseen, option="run_id=", endpoint_url=endpoint_url,
                             region=region)
        check_one_shape(self.reader, self.shards, root=root)

    @property
    def num_rollouts(self) -> int:
        return sum(len(s.rollouts) for s in self.shards)

    def __len__(self) -> int:
        """Windows per epoch."""
        return sum(s.windows(window=self.window, stride=self.stride,
                             generated_only=self.generated_only) for s in self.shards)

    def read_shard(self, shard: Shard) -> list[dict[str, Any]]:
        """Every window of one shard, in (rollout, start) order."""
        return shard_windows(self.reader, shard, window=self.window, stride=self.stride,
                             generated_only=self.generated_only)

    def shard_order(self, *, shuffle: bool = False, seed: int = 0, epoch: int = 0) -> list[int]:
        """Indices of the shards in reading order (a (seed, epoch) permutation if shuffled)."""
        if not shuffle:
            return list(range(len(self.shards)))
        return np.random.default_rng([seed, epoch]).permutation(len(self.shards)).tolist()

    def shards_for(self, index: int, count: int, *, shuffle: bool = False, seed: int = 0,
                   epoch: int = 0) -> list[Shard]:
        """Consumer `index` of `count`'s shards: a disjoint, covering split of all shards."""
        order = self.shard_order(shuffle=shuffle, seed=seed, epoch=epoch)
        return [self.shards[i] for i in order[index::count]]

    def iter_windows(self, *, index: int = 0, count: int = 1, shuffle: bool = False,
                     seed: int = 0, epoch: int = 0) -> Iterator[dict[str, Any]]:
        """Consumer `index` of `count`'s windows, shard by shard (shuffled within each shard
        too when asked)."""
        rng = np.random.default_rng([seed, epoch, index]) if shuffle else None
        for shard in self.shards_for(index, count, shuffle=shuffle, seed=seed, epoch=epoch):
            items = self.read_shard(shard)
            if rng is not None:
                items = [items[i] for i in rng.permutation(len(items))]
            yield from items

    def torch(self, *, shuffle: bool = False, seed: int = 0) -> Any:
        """A torch IterableDataset of the windows, sharded across data-loader workers and
        distributed ranks (call `.set_epoch(n)` between epochs to reshuffle)."""
        # Resolved here so that importing pipeline.dataset does not import torch.
        module = importlib.import_module("pipeline.dataset.torch_data")
        return module.TorchWindows(self, shuffle=shuffle, seed=seed)

    def ray(self, *, shuffle: bool = False, seed: int = 0) -> Any:
        """A ray.data.Dataset of the windows: one read task per shard."""
        return windows_dataset(self, shuffle=shuffle, seed=seed)
