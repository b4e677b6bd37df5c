"""A run as a Hugging Face `datasets` dataset (`save_to_disk`): one row per step.

Columns: `image` (an `Image` feature holding the stored PNG, watermark and provenance
included), `episode_index`, `rollout_id`, `run_id`, `step`, `timestamp` (seconds, 10 Hz),
`generated`, `action` (the 16 numbers in model form), the 12 buttons and 4 sticks by name,
`image_tokens` and the per-step quality signals. Read it back with
`datasets.load_from_disk(OUT)`. Needs the `export` extra (`datasets`).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.export.episodes import RunEpisodes, run_episodes
from workers.wham.actions import ACTION_NAMES, BUTTON_NAMES


def _features() -> Any:
    import datasets as hf

    columns = {
        "image": hf.Image(), "episode_index": hf.Value("int64"),
        "rollout_id": hf.Value("string"), "run_id": hf.Value("string"),
        "step": hf.Value("int32"), "timestamp": hf.Value("float32"),
        "generated": hf.Value("bool"),
        "action": hf.Sequence(hf.Value("int64"), length=len(ACTION_NAMES)),
    }
    for name in ACTION_NAMES:
        columns[name] = hf.Value("bool" if name in BUTTON_NAMES else "float32")
    columns["image_tokens"] = hf.Sequence(hf.Value("uint16"))
    for name in layout.STEP_QUALITY_COLUMNS:
        columns[name] = hf.Value("float32")
    return hf.Features(columns)


def _rows(episodes: RunEpisodes) -> Iterator[dict[str, Any]]:
    for episode, r in enumerate(episodes):
        for row, png in zip(r.steps.to_pylist(), r.frames, strict=True):
            out = {"image": {"bytes": png, "path": None}, "episode_index": episode,
                   "rollout_id": r.rollout_id, "run_id": r.run_id, "step": row["step"],
                   "timestamp": row["timestamp_s"], "generated": row["generated"],
                   "action": row["action_bins"], "image_tokens": row["image_tokens"]}
            out.update({name: row[name] for name in ACTION_NAMES})
            out.update({name: row.get(name) for name in layout.STEP_QUALITY_COLUMNS})
            yield out


def export_hf(root: str, *, run_id: str, out: str, decoder: Any = None,
              endpoint_url: str | None = None, region: str | None = None) -> dict[str, int]:
    """Write the run to the local folder `out` with `Dataset.save_to_disk`."""
    try:
        import datasets as hf
    except ImportError:
        raise UserError("--format hf needs the `datasets` library: "
                        "pip install 'wham-batch[data]'") from None
    episodes = run_episodes(root, run_id=run_id, frames="png", decoder=decoder,
                            endpoint_url=endpoint_url, region=region)
    cache = tempfile.mkdtemp(prefix="wham-hf-")  # from_generator's Arrow cache, then gone
    try:
        dataset = hf.Dataset.from_generator(_rows, gen_kwargs={"episodes": episodes},
                                            features=_features(), cache_dir=cache)
        dataset.save_to_disk(str(Path(out)))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return {"episodes": episodes.count, "frames": dataset.num_rows}
