"""The contracts behind verified bytes: object sums in markers, stored checksums, and parts
that say whose they are (one rule for every reader)."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from pipeline.contracts import layout
from pipeline.contracts.checksums import ObjectSum, s3_form, stored_matches, sum_of
from pipeline.contracts.errors import UserError
from pipeline.contracts.markers import (
    MarkerProblem,
    _digest,
    marker_bytes,
    marker_objects,
    read_marker,
)
from pipeline.contracts.parts import DamagedPart, check_part, part_metadata

KEY = layout.steps_part_key("2026-01-02", "night", "u000003")
COUNTS = {"rollouts": 2, "ok": 2, "failed": 0, "retryable": 0, "steps": 8,
          "generated_frames": 6, "stored_frames": 8, "previews": 0}


def _meta(**changes: str) -> dict[bytes, bytes]:
    meta = part_metadata(layout.STEPS_TABLE, run_date="2026-01-02", run_id="night",
                         unit_id="u000003", plan_fingerprint="p1")
    return {**meta, **{f"wham_batch.{k}".encode(): v.encode() for k, v in changes.items()}}


def test_a_part_where_it_belongs_passes() -> None:
    check_part(KEY, _meta(), plan_fingerprint="p1")
    check_part(KEY, _meta())  # readers that do not know the plan


@pytest.mark.parametrize("changes, said", [
    ({"unit_id": "u000004"}, "it says it is the steps part of unit u000004 of run night"),
    ({"run_id": "other"}, "of run other (2026-01-02), where the steps part of unit u000003"),
    ({"run_date": "2026-01-03"}, "of run night (2026-01-03)"),
    ({"table": "rollouts"}, "it says it is the rollouts part"),
])
def test_a_part_standing_elsewhere_is_refused_by_name(changes: dict, said: str) -> None:
    with pytest.raises(DamagedPart, match=re.escape(f"table part /x/{KEY} does not belong "
                                                    "there: ") + ".*" + re.escape(said)):
        check_part(KEY, _meta(**changes), shown=f"/x/{KEY}")


def test_plans_versions_and_older_parts() -> None:
    with pytest.raises(DamagedPart, match="written for another plan of run night"):
        check_part(KEY, _meta(), plan_fingerprint="p2")
    identityless = {layout.SCHEMA_VERSION_KEY: b"3", b"wham_batch.table": b"steps"}
    with pytest.raises(DamagedPart, match="it says it is the steps part of unit \\? of run \\?"):
        check_part(KEY, identityless)
    check_part(KEY, {layout.SCHEMA_VERSION_KEY: b"2"})  # before parts said whose they are
    check_part(KEY, None)  # version 1
    with pytest.raises(UserError, match="schema version 4, newer"):
        check_part(KEY, {**_meta(), layout.SCHEMA_VERSION_KEY: b"4"})
    with pytest.raises(DamagedPart, match="schema version b'x' is not a number"):
        check_part(KEY, {layout.SCHEMA_VERSION_KEY: b"x"})
    with pytest.raises(DamagedPart, match="is not where a table part stands"):
        check_part("steps/elsewhere.parquet", _meta())


def test_markers_record_object_sums_and_old_markers_read_by_their_counts() -> None:
    sums = {KEY: sum_of(b"part bytes")}
    marker = read_marker(marker_bytes(run_date="2026-01-02", run_id="night", unit_id="u000003",
                                      plan_fingerprint="p", counts=COUNTS, objects=sums),
                         unit_id="u000003")
    assert marker_objects(marker) == sums and marker["stored_frames"] == 8
    assert marker["generated_frames"] == 6 and "frames" not in marker
    old = {"schema_version": 2, "unit_id": "u000003", "plan_fingerprint": "p", "rollouts": 2,
           "ok": 2, "failed": 0, "steps": 8, "frames": 8, "previews": 0}
    old["checksum"] = _digest(old)
    legacy = read_marker(json.dumps(old).encode(), unit_id="u000003")
    assert legacy["stored_frames"] == 8 and "frames" not in legacy
    assert "generated_frames" not in legacy and marker_objects(legacy) is None


@pytest.mark.parametrize("entry, said", [
    ({"size": -1, "sha256": "0" * 64}, "size -1"),
    ({"size": 1, "sha256": "XYZ"}, "is not 64 hex digits"),
    ({"size": 1, "sha256": "0" * 64, "s3": "nope"}, "not an S3 SHA-256 checksum"),
    ("12", "is not an object"),
])
def test_malformed_object_sums_make_the_marker_untrusted(entry: object, said: str) -> None:
    body = json.loads(marker_bytes(run_date="2026-01-02", run_id="night", unit_id="u000003",
                                   plan_fingerprint="p", counts=COUNTS, objects={}))
    del body["checksum"]
    body["objects"] = {KEY: entry}
    body["checksum"] = _digest(body)
    with pytest.raises(MarkerProblem, match=said):
        read_marker(json.dumps(body).encode(), unit_id="u000003")
    body["objects"] = {"../outside": {"size": 1, "sha256": "0" * 64}}
    body["checksum"] = _digest({k: v for k, v in body.items() if k != "checksum"})
    with pytest.raises(MarkerProblem, match="unsafe storage key"):
        read_marker(json.dumps(body).encode(), unit_id="u000003")


def test_stored_checksums_match_whole_objects_and_recorded_composites() -> None:
    data = b"frames part"
    written = sum_of(data)
    assert written.sha256 == hashlib.sha256(data).hexdigest()
    assert stored_matches(written, s3_form(written.sha256))
    assert not stored_matches(written, s3_form(hashlib.sha256(b"other").hexdigest()))
    composite = s3_form(hashlib.sha256(b"parts").hexdigest())
    assert not stored_matches(written, composite + "-3")  # unknown composite: hash instead
    recorded = ObjectSum(size=written.size, sha256=written.sha256, s3=composite + "-3")
    assert stored_matches(recorded, composite + "-3") and stored_matches(recorded, composite)
    assert not stored_matches(written, "not base64!")
