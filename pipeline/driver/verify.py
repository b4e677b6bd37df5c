"""Check a run against storage: what its commit markers vouch for must be there.

For every committed unit (pipeline/driver/verify_unit.py): every object its marker records
holds the bytes it records (size and SHA-256; by the checksum S3 keeps beside each object,
or by hashing where the store keeps none or with `deep`), every part says it is this unit's
part of this run and plan, holds the rows its marker records, and every steps row has a
frame or image tokens whose object or frames-part row exists. Units whose markers predate
schema version 3 record counts only; they are checked by counts
(pipeline/driver/verify_counts.py), and the result counts them (`units_by_counts`).

Steps and rollouts parts are read whole through the root's Storage (the retries of the
writes apply) and hashed; a frames part is compared by its checksum (one HEAD on S3), so a
check moves the run's steps and rollouts once, not its frames (`deep` downloads and hashes
those too, and reads their rows).

The driver runs this before `_SUCCESS` (a unit that fails is redone), and
`wham-batch verify ROOT --run-id ID [--deep]` runs it on any run, to audit a dataset one
did not write.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.contracts.markers import marker_objects
from pipeline.contracts.storage import Storage
from pipeline.driver.run_state import Markers, read_json, read_markers
from pipeline.driver.verify_counts import check_by_counts
from pipeline.driver.verify_unit import Objects, UnitCheck, check_by_sums

#: Units checked at once (each reads its parts and checks its objects).
VERIFY_THREADS = 16
#: Problems listed per unit and in total before the rest are only counted.
SHOWN_PROBLEMS = 20


@dataclass(slots=True)
class RunCheck:
    """What `verify_run` found; `ok` when nothing is wrong."""

    run_date: str
    run_id: str
    units_checked: int = 0
    rows: int = 0
    stored_frames: int = 0  # frames the checked rows name
    units_by_counts: int = 0  # units whose markers record no checksums (schema version < 3)
    deep: bool = False  # every object read and hashed, whatever the store keeps
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


def check_units(storage: Storage, *, run_date: str, run_id: str,
                markers: dict[str, dict[str, Any]], deep: bool = False) -> RunCheck:
    """Every unit of `markers` against storage, in parallel; `deep`: hash every object
    even where the store keeps a checksum beside it."""
    objects = Objects(storage, deep=deep)
    out = RunCheck(run_date=run_date, run_id=run_id, deep=deep)

    def one(item: tuple[str, dict[str, Any]]) -> UnitCheck:
        unit_id, marker = item
        sums = marker_objects(marker)
        if sums is None:  # a marker before schema version 3: counts only
            return check_by_counts(objects, run_date=run_date, run_id=run_id, unit_id=unit_id,
                                   marker=marker)
        return check_by_sums(objects, run_date=run_date, run_id=run_id, unit_id=unit_id,
                             marker=marker, sums=sums)

    with ThreadPoolExecutor(VERIFY_THREADS) as pool:
        for check in pool.map(one, sorted(markers.items())):
            out.units_checked += 1
            out.rows += check.rows
            out.stored_frames += check.stored_frames
            out.units_by_counts += check.by_counts
            if check.problems:
                out.bad_units[check.unit_id] = check.problems
    return out


def verify_run(storage: Storage, *, run_date: str, run_id: str, deep: bool = False) -> RunCheck:
    """Everything `wham-batch verify` checks for one run: its markers (trusted, of one
    plan, as many as the manifest planned) and every committed unit against storage."""
    run_date = layout.run_date_str(run_date)
    if not any(True for _ in storage.list_keys(
            layout.run_prefix(layout.RUNS_DIR, run_date, run_id) + "/")):
        raise UserError(f"no run {run_id} of {run_date} under {storage.uri} "
                        "(`wham-batch runs ROOT` lists the runs there)")
    markers: Markers = read_markers(storage, run_date=run_date, run_id=run_id)
    check = check_units(storage, run_date=run_date, run_id=run_id, markers=markers.good,
                        deep=deep)
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
