"""Runs as a Hugging Face `datasets` dataset (`save_to_disk`): one row per step.

Columns: `image` (an `Image` feature holding the stored PNG, watermark and provenance
included), `episode_index` (numbered across the exported runs), `run_date`, `run_id`,
`rollout_id`, `step`, `timestamp` (seconds, 10 Hz), `generated`, `action` (the 16 controls
as float32: buttons 0/1, sticks in [-1, 1]), `action_bins` (the model form: int64, stick
bins 0..10), the 12 buttons and 4 sticks by name, `image_tokens` and the per-step quality
signals. Read it back with `datasets.load_from_disk(OUT)`. Needs the `export` extra
(`datasets`); its progress bars and INFO lines show only with `verbose`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.export.episodes import Episodes, ExportSource, float_actions, open_export
from pipeline.export.target import staged
from workers.wham.actions import ACTION_NAMES, BUTTON_NAMES


def _features() -> Any:
    import datasets as hf

    columns = {
        "image": hf.Image(), "episode_index": hf.Value("int64"),
        "run_date": hf.Value("string"), "run_id": hf.Value("string"),
        "rollout_id": hf.Value("string"), "step": hf.Value("int32"),
        "timestamp": hf.Value("float32"), "generated": hf.Value("bool"),
        "action": hf.Sequence(hf.Value("float32"), length=len(ACTION_NAMES)),
        "action_bins": hf.Sequence(hf.Value("int64"), length=len(ACTION_NAMES)),
    }
    for name in ACTION_NAMES:
        columns[name] = hf.Value("bool" if name in BUTTON_NAMES else "float32")
    columns["image_tokens"] = hf.Sequence(hf.Value("uint16"))
    for name in layout.STEP_QUALITY_COLUMNS:
        columns[name] = hf.Value("float32")
    return hf.Features(columns)


def _rows(episodes: Episodes) -> Iterator[dict[str, Any]]:
    for episode, r in enumerate(episodes):
        steps = r.steps.to_pylist()
        actions = float_actions(np.asarray([row["action_bins"] for row in steps], np.int64))
        for row, png, action in zip(steps, r.frames, actions, strict=True):
            out = {"image": {"bytes": png, "path": None}, "episode_index": episode,
                   "run_date": r.run_date, "run_id": r.run_id, "rollout_id": r.rollout_id,
                   "step": row["step"], "timestamp": row["timestamp_s"],
                   "generated": row["generated"], "action": action.tolist(),
                   "action_bins": row["action_bins"], "image_tokens": row["image_tokens"]}
            out.update({name: row[name] for name in ACTION_NAMES})
            out.update({name: row.get(name) for name in layout.STEP_QUALITY_COLUMNS})
            yield out


@contextmanager
def _library_output(hf: Any, *, verbose: bool) -> Iterator[None]:
    """`datasets`' progress bars and INFO lines only when asked for; as they were after."""
    bars_off, level = hf.are_progress_bars_disabled(), hf.logging.get_verbosity()
    if verbose:
        hf.enable_progress_bars()
        hf.logging.set_verbosity_info()
    else:
        hf.disable_progress_bars()
    try:
        yield
    finally:
        (hf.disable_progress_bars if bars_off else hf.enable_progress_bars)()
        hf.logging.set_verbosity(level)


def export_hf(source: ExportSource, out: str, *, overwrite: bool = False,
              verbose: bool = False) -> dict[str, Any]:
    """Write the selected runs to the local folder `out` with `Dataset.save_to_disk`."""
    try:
        import datasets as hf
    except ImportError:
        raise UserError("--format hf needs the `datasets` library: "
                        "pip install 'wham-batch[data]'") from None
    target, episodes = open_export(source, out, frames="png", overwrite=overwrite)
    cache = tempfile.mkdtemp(prefix="wham-hf-")  # from_generator's Arrow cache, then gone
    try:
        with _library_output(hf, verbose=verbose), staged(target) as folder:
            dataset = hf.Dataset.from_generator(_rows, gen_kwargs={"episodes": episodes},
                                                features=_features(), cache_dir=cache)
            dataset.save_to_disk(str(folder))
    except hf.exceptions.DatasetGenerationError as exc:
        # `datasets` wraps what reading the runs raised; that message is the one to show.
        if isinstance(exc.__cause__, UserError | OSError):
            raise exc.__cause__ from None
        raise
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return {"episodes": episodes.count, "frames": dataset.num_rows, "runs": episodes.runs}
