"""Commit markers: what a unit's marker records, its own checksum, and how it is read back.

A marker is the last object a unit writes (`workers/actor/writer.py`); the driver trusts nothing
else to know a unit is done. So a marker must prove itself: it carries the fingerprint of
the plan it was written for (a resume with other settings is refused even when the run's
manifest is gone) and a SHA-256 of its own content (a truncated or edited marker is not
read as a smaller unit). `read_marker` returns the marker or a `MarkerProblem` saying why
it cannot be trusted; the driver then treats the unit as not done and reports it.

Markers of schema version 1 (written before checksums) have neither field; they are read
as before, without those guarantees.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pipeline.contracts import layout

#: Counts every marker records, each a non-negative integer (`retryable`: failed rollouts a
#: rerun may complete, the model endpoint having failed them).
COUNT_FIELDS = ("rollouts", "ok", "failed", "retryable", "steps", "frames", "previews")
CHECKSUM_FIELD = "checksum"
#: Largest marker read back; a real one is a few hundred bytes.
MAX_MARKER_BYTES = 64 * 1024


class MarkerProblem(ValueError):
    """A marker that cannot be trusted; the message says why (the unit is redone)."""


def _digest(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def marker_bytes(*, run_date: str, run_id: str, unit_id: str, plan_fingerprint: str,
                 counts: Mapping[str, int]) -> bytes:
    """The bytes of a unit's commit marker, checksum included."""
    body: dict[str, Any] = {
        "schema_version": layout.SCHEMA_VERSION,
        "run_date": run_date,
        "run_id": run_id,
        "unit_id": unit_id,
        "plan_fingerprint": plan_fingerprint,
        **{name: int(counts.get(name, 0)) for name in COUNT_FIELDS},
        "committed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    body[CHECKSUM_FIELD] = _digest(body)
    return json.dumps(body, sort_keys=True).encode()


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_marker(data: bytes, *, unit_id: str) -> dict[str, Any]:
    """The marker in `data` for `unit_id`; MarkerProblem if it does not parse, its
    checksum does not match, or it names another unit, a malformed schema version or plan,
    or impossible counts. A marker of a newer schema version is a UserError: this
    wham-batch cannot tell whether it is sound."""
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
    for name in COUNT_FIELDS:
        value = body.get(name, 0)
        if not _is_count(value):
            raise MarkerProblem(f"its {name!r} count {value!r:.40} is not a non-negative integer")
    return body
