"""Runs as a LeRobot dataset (codebase version v3.0), written with pyarrow and PyAV.

The `lerobot` library cannot be installed beside this project's torch (its releases for
Python 3.11 pin an older torch, or pull a torchvision that does not load with it), so the
documented v3.0 layout is written directly:

```
meta/info.json                                   fps 10, features, paths, totals
meta/stats.json                                  min/max/mean/std/count per feature
meta/tasks.parquet                               one task per exported run
meta/episodes/chunk-000/file-000.parquet         one row per episode (= rollout)
data/chunk-000/file-NNN.parquet                  one row per frame
videos/observation.image/chunk-000/file-NNN.mp4  the episodes' frames, back to back
```

Episodes are the selected runs' ok rollouts, numbered across runs (the episodes table
names each one's `run_date`, `run_id` and `rollout_id`); `observation.image` is the frame
(H.264, as LeRobot's viewer expects), `action` the 16 controls as float32 (buttons 0/1,
sticks in [-1, 1]), `action_bins` the model form (int64, stick bins 0..10), `timestamp` =
frame_index / 10. Statistics have the shapes LeRobot computes: the feature's shape for
vectors, (1,) for scalars, (3, 1, 1) for the image, `count` (1,) (frames, for the image
too). Frames come as stored (watermark included) or, for a `frames: none` run, decoded from
the tokens. Every `EPISODES_PER_FILE` episodes start a new data and video file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.contracts import layout
from pipeline.dataset.reader import RolloutRows
from pipeline.export.episodes import ExportSource, float_actions, open_export
from pipeline.export.target import staged
from workers.actor.encode import VIDEO_CODEC, VIDEO_FPS, VIDEO_PIX_FMT, Mp4Writer
from workers.wham.actions import ACTION_NAMES

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000  # files per chunk folder, as LeRobot writes them
EPISODES_PER_FILE = 100
IMAGE_KEY = "observation.image"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"
#: The per-frame columns of the data files: (name, LeRobot dtype, shape).
FRAME_FEATURES = (
    ("action", "float32", [len(ACTION_NAMES)]), ("action_bins", "int64", [len(ACTION_NAMES)]),
    ("generated", "bool", [1]), ("timestamp", "float32", [1]), ("frame_index", "int64", [1]),
    ("episode_index", "int64", [1]), ("index", "int64", [1]), ("task_index", "int64", [1]),
)


def _features(height: int, width: int) -> dict[str, Any]:
    video = {"video.height": height, "video.width": width, "video.codec": "h264",
             "video.pix_fmt": VIDEO_PIX_FMT, "video.is_depth_map": False,
             "video.fps": VIDEO_FPS, "video.channels": 3, "has_audio": False}
    features: dict[str, Any] = {IMAGE_KEY: {
        "dtype": "video", "shape": [height, width, 3], "names": ["height", "width", "channels"],
        "info": video}}
    for name, dtype, shape in FRAME_FEATURES:
        names = list(ACTION_NAMES) if name.startswith("action") else None
        features[name] = {"dtype": dtype, "shape": shape, "names": names}
    return features


def _data_schema() -> Any:
    import pyarrow as pa

    types = {"float32": pa.float32(), "int64": pa.int64(), "bool": pa.bool_()}
    return pa.schema([(name, pa.list_(types[dtype]) if shape[0] > 1 else types[dtype])
                      for name, dtype, shape in FRAME_FEATURES])


class _Moments:
    """Running min/max/mean/std of a feature over its values (N, D), as LeRobot's stats."""

    def __init__(self) -> None:
        self.n = self.count = 0
        self.total = self.squares = self.low = self.high = None

    def add(self, values: np.ndarray, *, count: int) -> None:
        x = values.astype(np.float64)
        self.n += len(x)
        self.count += count
        if self.total is None:
            self.total, self.squares = x.sum(axis=0), (x * x).sum(axis=0)
            self.low, self.high = x.min(axis=0), x.max(axis=0)
            return
        self.total, self.squares = self.total + x.sum(axis=0), self.squares + (x * x).sum(axis=0)
        self.low, self.high = np.minimum(self.low, x.min(axis=0)), np.maximum(self.high,
                                                                             x.max(axis=0))

    def as_dict(self, shape: tuple[int, ...]) -> dict[str, Any]:
        mean = self.total / self.n
        std = np.sqrt(np.maximum(self.squares / self.n - mean * mean, 0.0))
        out = {k: np.reshape(v, shape).tolist() for k, v in
               (("min", self.low), ("max", self.high), ("mean", mean), ("std", std))}
        return {**out, "count": [self.count]}


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
        pq.write_table(pa.Table.from_pylist(self.rows, schema=_data_schema()), path)
        self.video = None


class _Writer:
    """Episodes in, the v3.0 files out: data and video files as it goes, metadata at the
    end."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.files = _Files(out)
        self.meta: list[dict[str, Any]] = []
        self.tasks: dict[tuple[str, str], int] = {}  # (run_date, run_id) -> task index
        self.stats = {name: _Moments() for name, _, _ in FRAME_FEATURES}
        self.pixels = _Moments()
        self.total = 0
        self.size: tuple[int, int] | None = None

    def add(self, r: RolloutRows) -> None:
        episode = len(self.meta)
        if episode % EPISODES_PER_FILE == 0:
            self.files.next()
        steps = r.steps.to_pydict()
        bins = np.asarray(steps["action_bins"], dtype=np.int64)
        task = self.tasks.setdefault((r.run_date, r.run_id), len(self.tasks))
        columns = {"action": float_actions(bins), "action_bins": bins,
                   "generated": np.asarray(steps["generated"]),
                   "timestamp": np.arange(len(bins), dtype=np.float32) / VIDEO_FPS,
                   "frame_index": np.arange(len(bins)), "episode_index": np.full(len(bins),
                                                                                 episode),
                   "index": self.total + np.arange(len(bins)),
                   "task_index": np.full(len(bins), task)}
        start = self.files.seconds
        for frame, gen in zip(r.frames, steps["generated"], strict=True):
            self.files.video.add(frame, generated=gen)
        self.files.rows.extend({k: v[i].tolist() for k, v in columns.items()}
                               for i in range(len(bins)))
        self.files.seconds += len(bins) / VIDEO_FPS
        for name, values in columns.items():
            self.stats[name].add(values.reshape(len(bins), -1), count=len(bins))
        frames = np.stack(r.frames)  # (T, 3, H, W) uint8
        self.pixels.add(frames.transpose(0, 2, 3, 1).reshape(-1, 3) / 255.0, count=len(bins))
        self.size = frames.shape[2:]
        self.meta.append(self._episode_row(r, episode=episode, length=len(bins), start=start))
        self.total += len(bins)

    def _episode_row(self, r: RolloutRows, *, episode: int, length: int,
                     start: float) -> dict[str, Any]:
        loc = self.files.location()
        return {
            "episode_index": episode, "tasks": [_task(r.run_date, r.run_id)], "length": length,
            "run_date": r.run_date, "run_id": r.run_id, "rollout_id": r.rollout_id,
            "data/chunk_index": loc["chunk_index"], "data/file_index": loc["file_index"],
            "dataset_from_index": self.total, "dataset_to_index": self.total + length,
            f"videos/{IMAGE_KEY}/chunk_index": loc["chunk_index"],
            f"videos/{IMAGE_KEY}/file_index": loc["file_index"],
            f"videos/{IMAGE_KEY}/from_timestamp": start,
            f"videos/{IMAGE_KEY}/to_timestamp": self.files.seconds,
            "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
        }

    def finish(self) -> None:
        self.files.close()
        _write_tables(self.out, meta=self.meta, tasks=[_task(*run) for run in self.tasks])
        stats = {name: self.stats[name].as_dict(tuple(shape))
                 for name, _, shape in FRAME_FEATURES}
        stats[IMAGE_KEY] = self.pixels.as_dict((3, 1, 1))
        (self.out / "meta/stats.json").write_text(json.dumps(stats, indent=2))
        height, width = (int(x) for x in self.size)
        info = {
            "codebase_version": CODEBASE_VERSION, "robot_type": None,
            "total_episodes": len(self.meta), "total_frames": self.total,
            "total_tasks": len(self.tasks), "chunks_size": CHUNKS_SIZE,
            "data_files_size_in_mb": 100, "video_files_size_in_mb": 200, "fps": VIDEO_FPS,
            "splits": {"train": f"0:{len(self.meta)}"}, "data_path": DATA_PATH,
            "video_path": VIDEO_PATH, "features": _features(height, width),
            "wham_batch": {"schema_version": layout.SCHEMA_VERSION, "video_codec": VIDEO_CODEC,
                           "runs": [{"run_date": d, "run_id": r} for d, r in self.tasks]},
        }
        (self.out / "meta/info.json").write_text(json.dumps(info, indent=2))


def _task(run_date: str, run_id: str) -> str:
    """The task of a run's episodes (LeRobot indexes tasks by their text: one per run)."""
    return f"WHAM rollouts of run {run_id} ({run_date})"


def _write_tables(out: Path, *, meta: list[dict[str, Any]], tasks: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (out / "meta/episodes/chunk-000").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(meta), out / EPISODES_PATH)
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": tasks})
    # LeRobot reads tasks with pandas, indexed by the task text.
    pandas_meta = {b"pandas": json.dumps({
        "index_columns": ["task"], "column_indexes": [], "pandas_version": "2.0.0",
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                     "numpy_type": "int64", "metadata": None},
                    {"name": "task", "field_name": "task", "pandas_type": "unicode",
                     "numpy_type": "object", "metadata": None}]}).encode()}
    pq.write_table(table.replace_schema_metadata(pandas_meta), out / "meta/tasks.parquet")


def export_lerobot(source: ExportSource, out: str, *, overwrite: bool = False,
                   verbose: bool = False) -> dict[str, Any]:
    """Write the selected runs as one LeRobot v3.0 dataset into the local folder `out`.
    (`verbose` is accepted for symmetry with `export_hf`: nothing here prints.)"""
    target, episodes = open_export(source, out, frames="array", overwrite=overwrite)
    with staged(target) as folder:
        writer = _Writer(folder)
        for r in episodes:
            writer.add(r)
        writer.finish()
    return {"episodes": episodes.count, "frames": writer.total, "runs": episodes.runs}
