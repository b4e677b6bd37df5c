"""Check a run against storage: what its commit markers claim must be there.

For every committed unit: its steps and rollouts parts exist, are readable Parquet and hold
the row counts its marker records, every row has a frame or image tokens, and every frame
its steps rows name exists: as a PNG object (`output.frames: png`) or as a row of the unit's
frames part (`parquet`, which must also hold the count its marker records).
Frames are checked with one listing per unit, never one request per frame: the listing
covers the span from the unit's smallest to its largest frame key (S3 pages hold 1,000
keys, so a unit of up to ~1,000 frames is one request). Steps and rollouts parts are read
whole through the root's Storage (the retries of the writes apply); a frames part is opened
for ranged reads and only its footer and (rollout_id, step) columns are read, so a check
moves the run's tables once, not its frames.

The driver runs this before `_SUCCESS` (a unit that fails is redone), and
`wham-batch verify ROOT --run-id ID` runs it on any run, to audit a dataset one did not
write.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.contracts.storage import Storage
from pipeline.driver.run_state import Markers, read_json, read_markers

#: Units checked at once (each reads two part footers and lists its frames).
VERIFY_THREADS = 16
#: Problems listed per unit and in total before the rest are only counted.
SHOWN_PROBLEMS = 20


@dataclass(slots=True)
class UnitCheck:
    unit_id: str
    rows: int = 0  # steps rows found
    frames: int = 0  # frame keys its rows name
    problems: list[str] = field(default_factory=list)


@dataclass(slots=True)
class RunCheck:
    """What `verify_run` found; `ok` when nothing is wrong."""

    run_date: str
    run_id: str
    units_checked: int = 0
    rows: int = 0
    frames: int = 0
    bad_units: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # of the run, not of one unit

    @property
    def ok(self) -> bool:
        return not self.bad_units and not self.problems

    def lines(self) -> list[str]:
        """One line per problem (capped), run problems first."""
        out = list(self.problems)
        for unit_id in sorted(self.bad_units):
            out += [f"unit {unit_id}: {p}" for p in self.bad_units[unit_id]]
        if len(out) > SHOWN_PROBLEMS:
            out = out[:SHOWN_PROBLEMS] + [f"... and {len(out) - SHOWN_PROBLEMS} more"]
        return out


class _Parts:
    """Reads table parts through the root's Storage, so the same retries apply as to the
    writes (pyarrow's own S3 client would bypass them)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._fs: tuple[Any, str] | None = None

    def open(self, key: str, *, whole: bool = True) -> Any:
        """The part as a `pyarrow.parquet.ParquetFile`. `whole=False` (frames parts, which
        hold a unit's PNG bytes) opens it for ranged reads through pyarrow's filesystem,
        so only its footer and the columns read later move, not the frames."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if whole:
            source = pa.BufferReader(self.storage.get_bytes(key))  # FileNotFoundError
        else:
            if self._fs is None:
                self._fs = self.storage.arrow_fs()
            fs, base = self._fs
            source = fs.open_input_file(f"{base}/{key}")  # FileNotFoundError
        try:
            return pq.ParquetFile(source)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"{key} is not a readable Parquet file ({exc})") from None


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


def _check_part(parts: _Parts, key: str, *, expect: int | None, what: str,
                check: UnitCheck, whole: bool = True) -> Any:
    try:
        part = parts.open(key, whole=whole)
    except FileNotFoundError:
        check.problems.append(f"{what} part {key} is missing")
        return None
    except ValueError as exc:
        check.problems.append(f"{what} part: {exc}")
        return None
    except OSError as exc:  # storage still failing after its retries
        check.problems.append(f"{what} part {key} could not be read ({exc})")
        return None
    rows = part.metadata.num_rows
    if expect is not None and rows != expect:
        check.problems.append(f"{what} part {key} holds {rows} rows, its marker records {expect}")
    return part


def check_unit(storage: Storage, parts: _Parts, *, run_date: str, run_id: str, unit_id: str,
               marker: dict[str, Any]) -> UnitCheck:
    """One committed unit against storage."""
    check = UnitCheck(unit_id)
    rollouts = marker.get("rollouts")
    _check_part(parts, layout.rollouts_part_key(run_date, run_id, unit_id),
                expect=int(rollouts) if rollouts is not None else None, what="rollouts",
                check=check)
    steps = _check_part(parts, layout.steps_part_key(run_date, run_id, unit_id),
                        expect=int(marker.get("steps", 0)), what="steps", check=check)
    if steps is None:
        return check
    check.rows = steps.metadata.num_rows
    columns = [c for c in ("rollout_id", "step", "frame_key", "image_tokens")
               if c in steps.schema_arrow.names]
    lacking = [c for c in ("rollout_id", "step", "frame_key") if c not in columns]
    if lacking:
        check.problems.append(f"steps part of {unit_id} has no {', '.join(lacking)} column "
                              "(not a wham-batch steps part)")
        return check
    try:
        table = steps.read(columns=columns)
    except Exception as exc:  # a part whose footer reads but whose data does not
        check.problems.append(f"steps part of {unit_id} cannot be read ({exc})")
        return check
    names = table.column("frame_key").to_pylist()
    tokens = (table.column("image_tokens").is_valid().to_pylist()
              if "image_tokens" in columns else [False] * len(names))
    meta = steps.schema_arrow.metadata or {}
    version = meta.get(layout.SCHEMA_VERSION_KEY, str(layout.SCHEMA_VERSION).encode())
    bare = sum(1 for name, has in zip(names, tokens, strict=True) if name is None and not has)
    if bare and version != b"1":  # version 1 wrote neither with `frames: false`
        check.problems.append(f"{bare} rows have neither a frame nor image tokens")
    part_key = layout.frames_part_key(run_date, run_id, unit_id)
    in_part = {(r, s) for r, s, k in zip(table.column("rollout_id").to_pylist(),
                                          table.column("step").to_pylist(), names, strict=True)
               if k == part_key}
    if in_part:
        _check_frames_part(parts, part_key, in_part, marker, check)
    keys = {k for k in names if k is not None and k != part_key}
    check.frames = len(keys) + len(in_part)
    frames_prefix = layout.run_prefix(layout.FRAMES_DIR, run_date, run_id) + "/"
    outside = sorted(k for k in keys if not k.startswith(frames_prefix))
    if outside:
        check.problems.append(f"{len(outside)} rows name frames outside the run, e.g. "
                              f"{outside[0]!r}")
        keys -= set(outside)
    missing = sorted(keys - _listed(storage, keys))
    if missing:
        check.problems.append(f"{len(missing)} of {len(keys)} frames its rows name are "
                              f"missing, e.g. {missing[0]}")
    return check


def _check_frames_part(parts: _Parts, key: str, wanted: set[tuple[str, int]],
                       marker: dict[str, Any], check: UnitCheck) -> None:
    """The unit's frames part (`output.frames: parquet`) holds a frame for every steps row
    that names it, and as many rows as the marker records."""
    expect = marker.get("frames")
    part = _check_part(parts, key, expect=int(expect) if expect is not None else None,
                       what="frames", check=check, whole=False)
    if part is None:
        return
    try:
        table = part.read(columns=["rollout_id", "step"])
    except Exception as exc:
        check.problems.append(f"frames part {key} cannot be read ({exc})")
        return
    held = set(zip(table.column("rollout_id").to_pylist(), table.column("step").to_pylist(),
                   strict=True))
    missing = sorted(wanted - held)
    if missing:
        check.problems.append(f"{len(missing)} of {len(wanted)} frames its rows name are "
                              f"missing from {key}, e.g. {missing[0][0]} step {missing[0][1]}")


def check_units(storage: Storage, *, run_date: str, run_id: str,
                markers: dict[str, dict[str, Any]]) -> RunCheck:
    """Every unit of `markers` against storage, in parallel."""
    parts = _Parts(storage)
    out = RunCheck(run_date=run_date, run_id=run_id)

    def one(item: tuple[str, dict[str, Any]]) -> UnitCheck:
        return check_unit(storage, parts, run_date=run_date, run_id=run_id, unit_id=item[0],
                          marker=item[1])

    with ThreadPoolExecutor(VERIFY_THREADS) as pool:
        for check in pool.map(one, sorted(markers.items())):
            out.units_checked += 1
            out.rows += check.rows
            out.frames += check.frames
            if check.problems:
                out.bad_units[check.unit_id] = check.problems
    return out


def verify_run(storage: Storage, *, run_date: str, run_id: str) -> RunCheck:
    """Everything `wham-batch verify` checks for one run: its markers (trusted, of one
    plan, as many as the manifest planned) and every committed unit against storage."""
    run_date = layout.run_date_str(run_date)
    if not any(True for _ in storage.list_keys(
            layout.run_prefix(layout.RUNS_DIR, run_date, run_id) + "/")):
        raise UserError(f"no run {run_id} of {run_date} under {storage.uri} "
                        "(`wham-batch runs ROOT` lists the runs there)")
    markers: Markers = read_markers(storage, run_date=run_date, run_id=run_id)
    check = check_units(storage, run_date=run_date, run_id=run_id, markers=markers.good)
    for unit_id, why in sorted(markers.bad.items()):
        check.problems.append(f"commit marker of unit {unit_id} cannot be trusted: {why}")
    manifest = read_json(storage, layout.manifest_key(run_date, run_id))
    fingerprints = {m.get("plan_fingerprint") for m in markers.good.values()} - {None, ""}
    if manifest and manifest.get("plan_fingerprint"):
        fingerprints.add(manifest["plan_fingerprint"])
    if len(fingerprints) > 1:
        check.problems.append(f"its commit markers and manifest come from {len(fingerprints)} "
                              "different plans (runs with other settings wrote into it)")
    if manifest is None or manifest == {}:
        check.problems.append("its manifest.json is missing or unreadable")
    planned = (manifest or {}).get("counts", {}).get("units_total")
    if isinstance(planned, int) and planned != len(markers.good):
        check.problems.append(f"{len(markers.good)} of {planned} planned units are committed")
    success = storage.exists(layout.success_key(run_date, run_id))
    if success and not check.ok:
        check.problems.insert(0, "_SUCCESS is present although the checks below fail")
    return check
