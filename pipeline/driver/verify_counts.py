"""A unit whose commit marker records counts only (schema version 1 or 2), checked as those
versions were: its parts exist and hold the rows its marker records, and every frame its
rows name exists (PNG objects from one listing of the span their keys cover, not one
request per frame). There are no sums to compare: `wham-batch verify` says how many units
it checked this way.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline.contracts import layout
from pipeline.contracts.storage import Storage
from pipeline.driver.verify_unit import (
    Objects,
    UnitCheck,
    frames_part_covers,
    open_part,
    rows_match,
    steps_rows,
)


def _listed(storage: Storage, keys: set[str]) -> set[str]:
    """Those of `keys` that storage holds, from one listing of the span they cover.

    Every key between the smallest and the largest of `keys` starts with their longest
    common prefix, so one listing under that prefix, started just before the smallest and
    stopped after the largest, sees them all (a unit's rollouts are neighbours in the
    plan, so the span holds little else)."""
    if not keys:
        return set()
    first, last = min(keys), max(keys)
    prefix = os.path.commonprefix([first, last])
    found = set()
    for key in storage.list_keys(prefix, start_after=first[:-1]):
        if key > last:
            break
        if key in keys:
            found.add(key)
    return found


def check_by_counts(objects: Objects, *, run_date: str, run_id: str, unit_id: str,
                    marker: dict[str, Any]) -> UnitCheck:
    """A unit whose marker records counts only (schema version 1 or 2): its parts exist
    and hold the rows it records, and every frame its rows name exists (PNGs from one
    listing of the span their keys cover)."""
    check = UnitCheck(unit_id, by_counts=True)
    key = layout.rollouts_part_key(run_date, run_id, unit_id)
    part = _read_whole_part(objects, key, check, what="rollouts")
    if part is not None:
        rows_match(part, key, marker.get("rollouts"), what="rollouts", check=check)
    key = layout.steps_part_key(run_date, run_id, unit_id)
    steps = _read_whole_part(objects, key, check, what="steps")
    if steps is None:
        return check
    rows_match(steps, key, marker.get("steps", 0), what="steps", check=check)
    rows = steps_rows(steps, run_date=run_date, run_id=run_id, unit_id=unit_id, check=check)
    if rows is None:
        return check
    if rows.in_part:
        key = layout.frames_part_key(run_date, run_id, unit_id)
        frames = open_part(objects, key, check, what="frames")
        if frames is not None:
            rows_match(frames, key, marker.get("stored_frames"), what="frames", check=check)
            frames_part_covers(frames, key, rows.in_part, check)
    missing = sorted(rows.pngs - _listed(objects.storage, rows.pngs))
    if missing:
        check.problems.append(f"{len(missing)} of {len(rows.pngs)} frames its rows name are "
                              f"missing, e.g. {missing[0]}")
    return check


def _read_whole_part(objects: Objects, key: str, check: UnitCheck, *, what: str) -> Any:
    try:
        data = objects.storage.get_bytes(key)
    except FileNotFoundError:
        check.problems.append(f"{what} part {key} is missing")
        return None
    except OSError as exc:
        check.problems.append(f"{what} part {key} could not be read ({exc})")
        return None
    return open_part(objects, key, check, what=what, data=data)
