"""Commit markers: what a unit's marker records, its own checksum, and how it is read back.

A marker is the last object a unit writes (`workers/actor/writer.py`); the driver trusts nothing
else to know a unit is done. So a marker must prove itself: it carries the fingerprint of
the plan it was written for (a resume with other settings is refused even when the run's
manifest is gone) and a SHA-256 of its own content (a truncated or edited marker is not
read as a smaller unit). `read_marker` returns the marker or a `MarkerProblem` saying why
it cannot be trusted; the driver then treats the unit as not done and reports it.

From schema version 3 a marker also records the size and SHA-256 of every object its unit
wrote (`objects`, key -> sum; pipeline/contracts/checksums.py): its table parts directly, and
its other objects (PNG frames, previews, videos) through the unit's object list
(`layout.unit_objects_key`), whose own sum the marker records. `wham-batch verify` and the
check before `_SUCCESS` compare storage with these sums. Its frame counts are
`generated_frames` (frames the model generated: ok rollouts x steps) and `stored_frames`
(frames stored: PNG objects or rows of the frames part, context frames included).

Markers of schema version 1 (written before checksums) have neither a checksum nor a plan;
markers of versions 1 and 2 record no object sums and name stored frames `frames`. They are
read as before (`stored_frames` taken from `frames`, `generated_frames` absent) and checked
by counts.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pipeline.contracts import layout
from pipeline.contracts.checksums import ObjectSum
from pipeline.contracts.errors import UserError
from pipeline.contracts.storage.base import validate_key

#: Counts every marker records, each a non-negative integer (`retryable`: failed rollouts a
#: rerun may complete, the model endpoint having failed them).
COUNT_FIELDS = ("rollouts", "ok", "failed", "retryable", "steps", "generated_frames",
                "stored_frames", "previews")
#: The counts of markers before schema version 3 (`frames`: the frames stored).
LEGACY_COUNT_FIELDS = ("rollouts", "ok", "failed", "retryable", "steps", "frames", "previews")
CHECKSUM_FIELD = "checksum"
OBJECTS_FIELD = "objects"
#: The first schema version whose markers record object sums.
SUMS_VERSION = 3
#: Largest marker read back; a real one is a few hundred bytes.
MAX_MARKER_BYTES = 64 * 1024


class MarkerProblem(ValueError):
    """A marker that cannot be trusted; the message says why (the unit is redone)."""


def _digest(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def marker_bytes(*, run_date: str, run_id: str, unit_id: str, plan_fingerprint: str,
                 counts: Mapping[str, int], objects: Mapping[str, ObjectSum]) -> bytes:
    """The bytes of a unit's commit marker, checksum included; `objects`: the sum of every
    object the marker vouches for (the unit's parts and its object list), by key."""
    body: dict[str, Any] = {
        "schema_version": layout.SCHEMA_VERSION,
        "run_date": run_date,
        "run_id": run_id,
        "unit_id": unit_id,
        "plan_fingerprint": plan_fingerprint,
        **{name: int(counts.get(name, 0)) for name in COUNT_FIELDS},
        OBJECTS_FIELD: {key: objects[key].to_json() for key in sorted(objects)},
        "committed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    body[CHECKSUM_FIELD] = _digest(body)
    return json.dumps(body, sort_keys=True).encode()


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_marker(data: bytes, *, unit_id: str) -> dict[str, Any]:
    """The marker in `data` for `unit_id`; MarkerProblem if it does not parse, its
    checksum does not match, or it names another unit, a malformed schema version or plan,
    impossible counts or malformed object sums. A marker of a newer schema version is a
    UserError: this wham-batch cannot tell whether it is sound. Markers before version 3
    come back with their stored frames as `stored_frames`."""
    if len(data) > MAX_MARKER_BYTES:
        raise MarkerProblem(f"{len(data)} bytes, more than a marker ever holds")
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise MarkerProblem("not valid JSON (truncated or overwritten?)") from None
    if not isinstance(body, dict):
        raise MarkerProblem("not a JSON object")
    version = body.get("schema_version", 1)
    if not _is_count(version) or version < 1:
        raise MarkerProblem(f"its schema_version {version!r:.40} is not a positive integer")
    layout.check_schema_version(version, where=f"commit marker of {unit_id}")
    if version >= 2:
        claimed = body.pop(CHECKSUM_FIELD, None)
        if claimed != _digest(body):
            raise MarkerProblem("its checksum does not match its content")
    if body.get("unit_id", unit_id) != unit_id:
        raise MarkerProblem(f"it names unit {body.get('unit_id')!r:.80}")
    if not isinstance(body.get("plan_fingerprint", ""), str):
        raise MarkerProblem("its 'plan_fingerprint' is not a string")
    for name in COUNT_FIELDS if version >= SUMS_VERSION else LEGACY_COUNT_FIELDS:
        value = body.get(name, 0)
        if not _is_count(value):
            raise MarkerProblem(f"its {name!r} count {value!r:.40} is not a non-negative integer")
    if version < SUMS_VERSION:
        body["stored_frames"] = body.pop("frames", 0)
        return body
    _objects(body.get(OBJECTS_FIELD), what="its")
    return body


def marker_objects(marker: Mapping[str, Any]) -> dict[str, ObjectSum] | None:
    """The object sums of a marker `read_marker` returned; None before schema version 3."""
    if marker.get("schema_version", 1) < SUMS_VERSION:
        return None
    return _objects(marker.get(OBJECTS_FIELD), what="its")


def _objects(value: object, *, what: str) -> dict[str, ObjectSum]:
    if not isinstance(value, dict):
        raise MarkerProblem(f"{what} {OBJECTS_FIELD!r} is not an object of key -> sum")
    out = {}
    for key, entry in value.items():
        try:
            validate_key(key)
            out[key] = ObjectSum.from_json(entry)
        except (ValueError, UserError) as exc:
            raise MarkerProblem(f"{what} entry for {str(key)[:120]!r}: {exc}") from None
    return out


def object_list_bytes(*, run_id: str, unit_id: str, objects: Mapping[str, ObjectSum]) -> bytes:
    """A unit's object list: every object it wrote other than its table parts, with sums."""
    body = {"schema_version": layout.SCHEMA_VERSION, "run_id": run_id, "unit_id": unit_id,
            OBJECTS_FIELD: {key: objects[key].to_json() for key in sorted(objects)}}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def read_object_list(data: bytes, *, unit_id: str) -> dict[str, ObjectSum]:
    """The sums in a unit's object list; MarkerProblem if it does not parse or names
    another unit (its bytes are checked against the marker before this is called)."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise MarkerProblem("its object list is not valid JSON") from None
    if not isinstance(body, dict) or body.get("unit_id") != unit_id:
        raise MarkerProblem("its object list names another unit")
    return _objects(body.get(OBJECTS_FIELD), what="its object list's")
