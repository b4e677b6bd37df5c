"""Parquet parts that say whose they are.

From schema version 3 every table part carries in its key-value metadata the table, run
date, run id and unit it was written for, the fingerprint of the run's plan and the schema
version (`part_metadata`). `check_part` is the one rule that compares them with where the
part stands (its key); `wham-batch verify`, the driver's check before `_SUCCESS`, queries,
the training-data loader and the exports all call it, so a part moved or copied into
another unit's or another run's place is refused by name wherever it is read. Parts of
versions 1 and 2 carry no such metadata: they are read as before.
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.contracts import layout
from pipeline.contracts.errors import UserError

TABLE_KEY = b"wham_batch.table"
RUN_DATE_KEY = b"wham_batch.run_date"
RUN_ID_KEY = b"wham_batch.run_id"
UNIT_ID_KEY = b"wham_batch.unit_id"
PLAN_KEY = b"wham_batch.plan_fingerprint"
#: The first schema version whose parts say whose they are.
IDENTITY_VERSION = 3
_IDENTITY = (("table", TABLE_KEY), ("run date", RUN_DATE_KEY), ("run id", RUN_ID_KEY),
             ("unit", UNIT_ID_KEY))


class DamagedPart(UserError):
    """Stored bytes that cannot be what they claim to be: a part that does not read, or
    that says it belongs elsewhere than where it stands, a frame that does not decode."""


def part_metadata(table: str, *, run_date: str, run_id: str, unit_id: str,
                  plan_fingerprint: str) -> dict[bytes, bytes]:
    """The key-value metadata of a part of `table` for one unit: the table schema's own
    (schema version, table name) and whose part it is."""
    own = layout.query_schema(table).metadata or {}
    return {**own, RUN_DATE_KEY: layout.run_date_str(run_date).encode(),
            RUN_ID_KEY: run_id.encode(), UNIT_ID_KEY: unit_id.encode(),
            PLAN_KEY: plan_fingerprint.encode()}


def check_part(key: str, metadata: Mapping[bytes, bytes] | None, *, shown: str | None = None,
               plan_fingerprint: str | None = None) -> None:
    """DamagedPart naming the file (`shown`, default `key`) when the part at `key` says it
    belongs elsewhere (another table, run date, run or unit), or to another plan than
    `plan_fingerprint` when that is given; UserError when a newer wham-batch wrote it."""
    shown = shown or key
    meta = metadata or {}
    raw = meta.get(layout.SCHEMA_VERSION_KEY, b"1")
    if not raw.isdigit():
        raise DamagedPart(f"table part {shown} is damaged: its schema version {raw[:20]!r} "
                          "is not a number")
    version = int(raw)
    layout.check_schema_version(version, where=f"table part {shown}")
    if version < IDENTITY_VERSION:
        return  # written before parts said whose they are
    parsed = layout.parse_part_key(key)
    if parsed is None:
        raise DamagedPart(f"{shown} is not where a table part stands "
                          "(<table>/run_date=.../run_id=.../part-<unit>.parquet)")
    place = dict(zip((name for name, _ in _IDENTITY), parsed, strict=True))
    claims = {name: meta.get(field, b"").decode(errors="replace") for name, field in _IDENTITY}
    wrong = [name for name, _ in _IDENTITY if claims[name] != place[name]]
    if wrong:
        raise DamagedPart(
            f"table part {shown} does not belong there: it says it is {_whose(claims)}, "
            f"where {_whose(place)} belongs. Rerunning its run redoes the unit "
            "(`wham-batch verify` lists every such part)")
    written_for = meta.get(PLAN_KEY, b"").decode(errors="replace")
    if plan_fingerprint is not None and written_for != plan_fingerprint:
        raise DamagedPart(
            f"table part {shown} was written for another plan of run {place['run id']} "
            f"(fingerprint {written_for[:12] or '?'}..., the run's is "
            f"{plan_fingerprint[:12]}...): rerunning the run redoes the unit")


def _whose(part: Mapping[str, str]) -> str:
    return (f"the {part['table'] or '?'} part of unit {part['unit'] or '?'} of run "
            f"{part['run id'] or '?'} ({part['run date'] or '?'})")
