"""Training data from a run's outputs: windows of T consecutive steps per rollout, for a
PyTorch DataLoader (`RolloutWindows.torch()`) or Ray Data (`RolloutWindows.ray()`).

Layout: `index` (which rollouts, grouped into per-unit shards), `reader` (a unit's rows and
frames in any `output.frames` mode), `windows` (rows -> windows), `loader` (the facade),
`torch_data` and `ray_data` (the two faces). docs/training-data.md shows it in use.
"""

from __future__ import annotations

from pipeline.dataset.index import Shard, Source, select_shards
from pipeline.dataset.loader import RolloutWindows
from pipeline.dataset.reader import RolloutRows, UnitReader, png_to_array
from pipeline.dataset.windows import rollout_arrays

__all__ = ["RolloutRows", "RolloutWindows", "Shard", "Source", "UnitReader", "png_to_array",
           "rollout_arrays", "select_shards"]
