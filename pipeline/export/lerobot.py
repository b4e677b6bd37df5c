"""A run as a LeRobot dataset (codebase version v3.0), written with pyarrow and PyAV.

The `lerobot` library cannot be installed beside this project's torch (its releases for
Python 3.11 pin an older torch, or pull a torchvision that does not load with it), so the
documented v3.0 layout is written directly:

```
meta/info.json                                   fps 10, features, paths, totals
meta/stats.json                                  min/max/mean/std/count per feature
meta/tasks.parquet                               one task: the run's mode
meta/episodes/chunk-000/file-000.parquet         one row per episode (= rollout)
data/chunk-000/file-NNN.parquet                  one row per frame
videos/observation.image/chunk-000/file-NNN.mp4  the episodes' frames, back to back
```

Episodes are the run's ok rollouts; `observation.image` is the frame (H.264, as LeRobot's
viewer expects), `action` the 16 numbers as float32 (buttons 0/1, sticks in [-1, 1]),
`timestamp` = frame_index / 10. Frames come as stored (watermark included) or, for a
`frames: none` run, decoded from the tokens. Every `EPISODES_PER_FILE` episodes start a new
data and video file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.export.episodes import run_episodes
from workers.actor.encode import VIDEO_CODEC, VIDEO_FPS, VIDEO_PIX_FMT, Mp4Writer
from workers.wham.actions import ACTION_NAMES, NUM_BUTTONS, bins_to_sticks

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000  # files per chunk folder, as LeRobot writes them
EPISODES_PER_FILE = 100
IMAGE_KEY = "observation.image"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"
_INDEX_FEATURES = {name: {"dtype": "int64", "shape": [1], "names": None}
                   for name in ("frame_index", "episode_index", "index", "task_index")}


def model_actions(action_bins: np.ndarray) -> np.ndarray:
    """Model-form actions (N, 16) -> float32 (N, 16): buttons 0/1, sticks in [-1, 1]."""
    out = action_bins.astype(np.float32)
    out[:, NUM_BUTTONS:] = bins_to_sticks(action_bins[:, NUM_BUTTONS:])
    return out


def _features(height: int, width: int) -> dict[str, Any]:
    return {
        IMAGE_KEY: {"dtype": "video", "shape": [height, width, 3],
                    "names": ["height", "width", "channels"],
                    "info": {"video.height": height, "video.width": width,
                             "video.codec": "h264", "video.pix_fmt": VIDEO_PIX_FMT,
                             "video.is_depth_map": False, "video.fps": VIDEO_FPS,
                             "video.channels": 3, "has_audio": False}},
        "action": {"dtype": "float32", "shape": [len(ACTION_NAMES)], "names": list(ACTION_NAMES)},
        "generated": {"dtype": "bool", "shape": [1], "names": None},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        **_INDEX_FEATURES,
    }


def _stats(values: np.ndarray) -> dict[str, Any]:
    """LeRobot's per-feature statistics over axis 0."""
    return {"min": values.min(axis=0).tolist(), "max": values.max(axis=0).tolist(),
            "mean": values.mean(axis=0).tolist(), "std": values.std(axis=0).tolist(),
            "count": [int(len(values))]}


class _Files:
    """The current data and video file, rolled over every EPISODES_PER_FILE episodes."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.index = -1
        self.video: Mp4Writer | None = None
        self.rows: list[dict[str, Any]] = []
        self.seconds = 0.0  # length of the current video so far

    def location(self) -> dict[str, int]:
        return {"chunk_index": self.index // CHUNKS_SIZE, "file_index": self.index % CHUNKS_SIZE}

    def next(self) -> None:
        self.close()
        self.index += 1
        path = self.out / VIDEO_PATH.format(video_key=IMAGE_KEY, **self.location())
        path.parent.mkdir(parents=True, exist_ok=True)
        self.video = Mp4Writer(str(path), watermark=False)  # frames carry their mark already
        self.rows, self.seconds = [], 0.0

    def close(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.video is None:
            return
        self.video.close()
        path = self.out / DATA_PATH.format(**self.location())
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(self.rows, schema=pa.schema([
            ("action", pa.list_(pa.float32())), ("generated", pa.bool_()),
            ("timestamp", pa.float32()), ("frame_index", pa.int64()),
            ("episode_index", pa.int64()), ("index", pa.int64()), ("task_index", pa.int64())]))
        pq.write_table(table, path)
        self.video = None


def export_lerobot(root: str, *, run_id: str, out: str, decoder: Any = None,
                   endpoint_url: str | None = None, region: str | None = None) -> dict[str, int]:
    """Write the run as a LeRobot v3.0 dataset into the local folder `out` (must be empty)."""
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise UserError(f"{out} is a file; export into a new folder")
    if target.exists() and any(target.iterdir()):
        raise UserError(f"{out} is not empty; export into a new folder")
    episodes = run_episodes(root, run_id=run_id, frames="array", decoder=decoder,
                            endpoint_url=endpoint_url, region=region)
    files, meta, actions, pixels = _Files(target), [], [], _PixelStats()
    total, size, task = 0, None, ""
    for episode, r in enumerate(episodes):
        if episode % EPISODES_PER_FILE == 0:
            files.next()
        steps = r.steps.to_pydict()
        action = model_actions(np.asarray(steps["action_bins"], dtype=np.int64))
        start = files.seconds
        for i, (frame, gen) in enumerate(zip(r.frames, steps["generated"], strict=True)):
            files.video.add(frame, generated=gen)
            files.rows.append({"action": action[i].tolist(), "generated": gen,
                               "timestamp": i / VIDEO_FPS, "frame_index": i,
                               "episode_index": episode, "index": total + i, "task_index": 0})
        length = len(r.frames)
        files.seconds += length / VIDEO_FPS
        size = r.frames[0].shape[1:]
        task = f"WHAM rollouts of run {r.run_id}"
        actions.append(action)
        pixels.add(np.stack(r.frames))
        loc = files.location()
        meta.append({
            "episode_index": episode, "tasks": [task], "length": length,
            "rollout_id": r.rollout_id, "run_id": r.run_id,
            "data/chunk_index": loc["chunk_index"], "data/file_index": loc["file_index"],
            "dataset_from_index": total, "dataset_to_index": total + length,
            f"videos/{IMAGE_KEY}/chunk_index": loc["chunk_index"],
            f"videos/{IMAGE_KEY}/file_index": loc["file_index"],
            f"videos/{IMAGE_KEY}/from_timestamp": start,
            f"videos/{IMAGE_KEY}/to_timestamp": files.seconds,
            "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
        })
        total += length
    files.close()
    _write_meta(target, meta=meta, total=total, size=size, task=task, actions=actions,
                pixels=pixels)
    return {"episodes": len(meta), "frames": total}


class _PixelStats:
    """Per-channel statistics of every pixel in [0, 1], shaped (3, 1, 1) as LeRobot keeps
    them for images."""

    def __init__(self) -> None:
        self.n, self.total, self.squares = 0, np.zeros(3), np.zeros(3)
        self.low, self.high = np.ones(3), np.zeros(3)

    def add(self, frames: np.ndarray) -> None:  # (T, 3, H, W) uint8
        x = frames.astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1) / 255.0
        self.n += x.shape[1]
        self.total += x.sum(axis=1)
        self.squares += (x * x).sum(axis=1)
        self.low, self.high = np.minimum(self.low, x.min(axis=1)), np.maximum(self.high,
                                                                             x.max(axis=1))

    def as_dict(self) -> dict[str, Any]:
        mean = self.total / self.n
        std = np.sqrt(np.maximum(self.squares / self.n - mean * mean, 0.0))
        shaped = {k: [[[float(v)]] for v in vals] for k, vals in
                  (("min", self.low), ("max", self.high), ("mean", mean), ("std", std))}
        return {**shaped, "count": [self.n]}


def _write_meta(out: Path, *, meta: list[dict[str, Any]], total: int, size: Any, task: str,
                actions: list[np.ndarray], pixels: _PixelStats) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (out / "meta/episodes/chunk-000").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(meta), out / EPISODES_PATH)
    tasks = pa.table({"task_index": pa.array([0], pa.int64()), "task": [task]})
    # LeRobot reads tasks with pandas, indexed by the task text.
    pandas_meta = {b"pandas": json.dumps({
        "index_columns": ["task"], "column_indexes": [], "pandas_version": "2.0.0",
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                     "numpy_type": "int64", "metadata": None},
                    {"name": "task", "field_name": "task", "pandas_type": "unicode",
                     "numpy_type": "object", "metadata": None}]}).encode()}
    pq.write_table(tasks.replace_schema_metadata(pandas_meta), out / "meta/tasks.parquet")
    stats = {
        "action": _stats(np.concatenate(actions)),
        IMAGE_KEY: pixels.as_dict(),
        "timestamp": _stats(np.concatenate([np.arange(len(a)) / VIDEO_FPS for a in actions])),
    }
    (out / "meta/stats.json").write_text(json.dumps(stats, indent=2))
    height, width = (int(x) for x in size)
    info = {
        "codebase_version": CODEBASE_VERSION, "robot_type": None,
        "total_episodes": len(meta), "total_frames": total, "total_tasks": 1,
        "chunks_size": CHUNKS_SIZE, "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 200, "fps": VIDEO_FPS,
        "splits": {"train": f"0:{len(meta)}"}, "data_path": DATA_PATH, "video_path": VIDEO_PATH,
        "features": _features(height, width),
        "wham_batch": {"schema_version": layout.SCHEMA_VERSION, "video_codec": VIDEO_CODEC},
    }
    (out / "meta/info.json").write_text(json.dumps(info, indent=2))
