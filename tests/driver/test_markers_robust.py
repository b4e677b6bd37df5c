"""Commit markers that cannot be trusted (malformed, oversized, stray files under commits/)
are reported and their units redone; they never stop a run or `wham-batch verify`. A marker
of a newer schema version is a clear error."""

from __future__ import annotations

import json

import pytest

from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.contracts.markers import MAX_MARKER_BYTES, _digest, marker_bytes
from pipeline.contracts.storage import open_storage
from pipeline.driver.run_state import read_markers, reopen_retryable_units
from pipeline.driver.verify import verify_run

DATE, RUN = "2026-01-02", "robust"
COUNTS = {"rollouts": 2, "ok": 1, "failed": 1, "retryable": 0, "steps": 8,
          "generated_frames": 6, "stored_frames": 8, "previews": 1}


def _good(unit_id: str, **counts: int) -> bytes:
    return marker_bytes(run_date=DATE, run_id=RUN, unit_id=unit_id, plan_fingerprint="p",
                        counts={**COUNTS, **counts}, objects={})


def _signed(unit_id: str, **changes: object) -> bytes:
    """A marker with `changes` applied and a checksum that matches them: only its fields
    can tell that it is wrong."""
    body = json.loads(_good(unit_id))
    del body["checksum"]
    body.update(changes)
    body["checksum"] = _digest(body)
    return json.dumps(body).encode()


MALFORMED = {
    "u000001": (_signed("u000001", schema_version=None), "schema_version None"),
    "u000002": (json.dumps({"schema_version": "2", "ok": 1}).encode(), "schema_version '2'"),
    "u000003": (json.dumps({"schema_version": True}).encode(), "schema_version True"),
    "u000004": (_signed("u000004", rollouts="2"), "'rollouts' count '2'"),
    "u000005": (_signed("u000005", stored_frames=-1), "'stored_frames' count -1"),
    "u000006": (_signed("u000006", previews=1.5), "'previews' count 1.5"),
    "u000007": (_signed("u000007", retryable=None), "'retryable' count None"),
    "u000008": (json.dumps({"schema_version": 1, "steps": [1]}).encode(), "'steps' count"),
    "u000009": (_signed("u000009", plan_fingerprint=["p"]), "'plan_fingerprint'"),
    "u000010": (b" " * (MAX_MARKER_BYTES + 1) + _good("u000010"), "larger than the"),
    "u000014": (b"[" * 60_000, "not valid JSON"),  # nested past Python's recursion limit
}


def _write_run(storage, markers: dict[str, bytes]) -> None:  # noqa: ANN001
    for unit_id, data in markers.items():
        storage.put_bytes(layout.commit_key(DATE, RUN, unit_id), data)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):  # noqa: ANN001, ANN201
    if request.param == "local":
        return open_storage(str(tmp_path))
    return open_storage(request.getfixturevalue("s3_bucket"))


def test_malformed_markers_are_untrusted_not_fatal(storage):
    prefix = layout.commits_prefix(DATE, RUN)
    _write_run(storage, {"u000000": _good("u000000"), "u000011": _good("u000011", retryable=1),
                         **{uid: data for uid, (data, _) in MALFORMED.items()}})
    for stray in ("notes.json", "u1.json", "U000012.json", "README", "old/u000013.json"):
        storage.put_bytes(prefix + stray, b"not a marker")
    markers = read_markers(storage, run_date=DATE, run_id=RUN)
    assert set(markers.good) == {"u000000", "u000011"}
    assert set(markers.bad) == set(MALFORMED)  # the stray files are no markers at all
    for unit_id, (_, why) in MALFORMED.items():
        assert why in markers.bad[unit_id], (unit_id, markers.bad[unit_id])
    # a rerun reopens the unit whose marker counts retryable rollouts, and only it
    assert reopen_retryable_units(storage, run_date=DATE, run_id=RUN,
                                  markers=markers.good) == {"u000011"}
    assert not storage.exists(layout.commit_key(DATE, RUN, "u000011"))


def test_verify_reports_untrusted_markers_instead_of_failing(tmp_path):
    storage = open_storage(str(tmp_path))
    _write_run(storage, {uid: data for uid, (data, _) in MALFORMED.items()})
    storage.put_bytes(layout.commits_prefix(DATE, RUN) + "notes.json", b"{}")
    check = verify_run(storage, run_date=DATE, run_id=RUN)
    assert not check.ok
    untrusted = [p for p in check.problems if "cannot be trusted" in p]
    assert len(untrusted) == len(MALFORMED)
    assert any("u000001" in p and "schema_version" in p for p in untrusted)
    assert not any("notes" in p for p in check.problems)


def test_a_marker_of_a_newer_schema_is_a_clear_error(tmp_path):
    storage = open_storage(str(tmp_path))
    _write_run(storage, {"u000000": _signed("u000000", schema_version=layout.SCHEMA_VERSION + 1)})
    newer = f"commit marker of u000000 has schema version {layout.SCHEMA_VERSION + 1}, newer"
    with pytest.raises(UserError, match=newer):
        read_markers(storage, run_date=DATE, run_id=RUN)
