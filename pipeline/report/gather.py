"""What a run's report shows, read from its root: status, settings, rollouts, pictures.

The rollouts table (committed units only, as the loader sees them) gives every rollout's
quality signals, errors and timings; the run's manifest its settings; `list_runs` its
status. Each ok rollout's picture is its GIF preview, or, for a run without previews, its
first and last frames read like the loader reads them (decoded by the run's model for a
`frames: none` run). Rollouts are shown worst first (`worst_first`), at most
`max_previews` of them: a nightly of 80,000 rollouts gives a page of its worst, not of all.
Previews fill the page up to `max_picture_bytes` (the previews of long rollouts run to
megabytes each); a tile whose preview does not fit shows its first and last frames instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.contracts.storage import Storage, open_storage
from pipeline.contracts.storage.base import ObjectTooLarge
from pipeline.dataset.index import Source, select_shards
from pipeline.dataset.reader import UnitReader
from pipeline.driver.run_state import list_runs, read_json
from pipeline.query import NoTable, query

#: Rollouts shown with a picture unless the caller asks for another number.
MAX_PREVIEWS = 300
#: Bytes of GIF previews one page holds, unless the caller asks for another number.
MAX_PICTURE_BYTES = 64 * 2**20


@dataclass
class Tile:
    """One rollout in the grid: its rollouts row and its pictures, (MIME type, bytes)."""

    row: dict[str, Any]
    images: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass
class RunData:
    root: str
    run_date: str
    run_id: str
    status: dict[str, Any]  # the run as `wham-batch runs` lists it
    manifest: dict[str, Any]  # {} when the run has none yet
    rollouts: list[dict[str, Any]]  # every committed rollouts row
    tiles: list[Tile]  # worst first, at most max_previews
    problems: list[str] = field(default_factory=list)  # pictures that could not be read
    over_budget: int = 0  # previews left out: they did not fit the page's picture budget


def worst_first(row: dict[str, Any]) -> tuple[Any, ...]:
    """Sort key, worst rollout first: collapsed ones (earliest collapse first), then frozen
    ones, then by mean log-probability, lowest first; rollouts without signals (a model
    endpoint sends none) last, by id."""
    collapse, logprob = row.get("collapse_step"), row.get("mean_logprob")
    return (collapse is None, collapse if collapse is not None else 0,
            not row.get("frozen"), logprob is None,
            logprob if logprob is not None else 0.0, row["rollout_id"])


def _find_run(root: str, *, run_id: str, run_date: str | None, endpoint_url: str | None,
              region: str | None) -> Any:
    runs = [r for r in list_runs(root, endpoint_url=endpoint_url, region=region,
                                 run_date=run_date) if r.run_id == run_id]
    if not runs:
        raise UserError(f"no run {run_id!r} under {root} (see `wham-batch runs {root}`)")
    if len(runs) > 1:
        dates = ", ".join(r.run_date for r in runs)
        raise UserError(f"run {run_id!r} exists on several dates ({dates}); pass --run-date")
    return runs[0]


def _rollouts(root: str, *, run_date: str, run_id: str, endpoint_url: str | None,
              region: str | None) -> list[dict[str, Any]]:
    try:
        table = query(root, table=layout.ROLLOUTS_TABLE, run_id=run_id,
                      where=f"run_date = '{layout.run_date_str(run_date)}'",
                      committed_only=True, endpoint_url=endpoint_url, region=region)
    except NoTable:
        return []
    return table.to_pylist()


def gather_run(root: str, *, run_id: str, run_date: str | None = None,
               max_previews: int = MAX_PREVIEWS, max_picture_bytes: int = MAX_PICTURE_BYTES,
               endpoint_url: str | None = None, region: str | None = None) -> RunData:
    """Everything the report of `run_id` shows (`run_date` when the id exists on several)."""
    info = _find_run(root, run_id=run_id, run_date=run_date, endpoint_url=endpoint_url,
                     region=region)
    storage = open_storage(root, endpoint_url=endpoint_url, region=region)
    manifest = read_json(storage, layout.manifest_key(info.run_date, run_id)) or {}
    rows = _rollouts(root, run_date=info.run_date, run_id=run_id, endpoint_url=endpoint_url,
                     region=region)
    shown = sorted((r for r in rows if r["status"] == "ok"), key=worst_first)[:max_previews]
    data = RunData(root=storage.uri, run_date=info.run_date, run_id=run_id,
                   status=dataclasses.asdict(info), manifest=manifest, rollouts=rows,
                   tiles=[Tile(row) for row in shown])
    _add_previews(storage, data, budget=max_picture_bytes)
    missing = [t for t in data.tiles if not t.images]
    if missing:
        _add_frames(Source(root, endpoint_url=endpoint_url, region=region), data, missing)
    return data


def _add_previews(storage: Storage, data: RunData, *, budget: int) -> None:
    prefix = layout.run_prefix(layout.PREVIEWS_DIR, data.run_date, data.run_id) + "/"
    stored = set(storage.list_keys(prefix))
    for tile in data.tiles:
        key = layout.preview_key(data.run_date, data.run_id, tile.row["rollout_id"])
        if key not in stored:
            continue
        try:
            gif = storage.get_bytes(key, max_bytes=budget)
        except ObjectTooLarge:  # not read past what is left
            data.over_budget += 1
            continue
        budget -= len(gif)
        tile.images.append(("image/gif", gif))


def _add_frames(source: Source, data: RunData, tiles: list[Tile]) -> None:
    """The first generated and the last frame of each tile's rollout, unit by unit."""
    wanted = {t.row["rollout_id"]: t for t in tiles}
    reader = UnitReader(source, frames="png")
    for shard in select_shards(source, run_id=data.run_id, run_date=data.run_date):
        rollouts = tuple(r for r in shard.rollouts if r[0] in wanted)
        if not rollouts:
            continue
        try:
            read = reader.read(dataclasses.replace(shard, rollouts=rollouts))
        except UserError as exc:
            data.problems.append(f"frames of unit {shard.unit_id}: {exc}")
            continue
        for r in read:
            generated = r.steps.column("generated").to_pylist()
            first = generated.index(True) if True in generated else 0
            wanted[r.rollout_id].images += [("image/png", r.frames[first]),
                                            ("image/png", r.frames[-1])]

