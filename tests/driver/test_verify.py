"""`wham-batch verify` and the check behind it, on a real folder and the S3 endpoint."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.units import commit_unit

from pipeline.cli import main
from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.contracts.markers import _digest
from pipeline.contracts.plan import plan_for_spec
from pipeline.contracts.spec import spec_from_data
from pipeline.contracts.storage import LocalStorage, ObjectHead, open_storage
from pipeline.driver.discovery import discover_seeds
from pipeline.driver.run_state import read_markers, run_fingerprint
from pipeline.driver.verify import check_units, verify_run

DEMO = Path(__file__).resolve().parents[2] / "configs" / "seeds" / "demo"
DATE = "2026-01-02"


def write_run(root: str, frames: str) -> tuple[object, int]:
    """A run of 6 seeds x 2 rollouts in units of 4, committed with `frames`, plus manifest."""
    spec = spec_from_data({
        "run": {"name": "v", "run_id": "audit", "run_date": DATE},
        "model": {"preset": "tiny"}, "seeds": {"source": str(DEMO)},
        "rollouts": {"steps": 2, "per_seed": 2},
        "resources": {"rollouts_per_unit": 4}, "output": {"root": root, "frames": frames}})
    storage = open_storage(root)
    units = plan_for_spec(spec, discover_seeds(str(DEMO)))
    fingerprint = run_fingerprint(spec, units)
    for unit in units:
        commit_unit(storage, spec, dataclasses.replace(unit, plan_fingerprint=fingerprint),
                    frames=frames)
    storage.put_bytes(layout.manifest_key(DATE, "audit"), json.dumps(
        {"plan_fingerprint": fingerprint, "counts": {"units_total": len(units)}}).encode())
    return storage, len(units)


@pytest.fixture(params=["local", "s3"])
def written(request, tmp_path):
    """A run with a PNG object per frame, on a folder and on the S3 endpoint."""
    root = str(tmp_path / "out") if request.param == "local" else request.getfixturevalue(
        "s3_bucket")
    storage, units = write_run(root, "png")
    return root, storage, units


def test_a_whole_run_verifies(written, capsys):
    root, storage, units = written
    check = verify_run(storage, run_date=DATE, run_id="audit")
    assert check.ok and check.units_checked == units
    assert check.rows == check.stored_frames == units * 4 * 3  # 4 rollouts x (1 + 2 steps)
    assert main(["verify", root, "--run-id", "audit"]) == 0
    assert f"ok: {units} units" in capsys.readouterr().out


def test_problems_are_listed_and_exit_1(written, capsys):
    root, storage, units = written
    frames = list(storage.list_keys(layout.run_prefix(layout.FRAMES_DIR, DATE, "audit")))
    storage.delete(frames[0])
    storage.delete(layout.rollouts_part_key(DATE, "audit", "u000001"))
    storage.delete(layout.commit_key(DATE, "audit", "u000002"))
    assert main(["verify", root, "--run-id", "audit", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert not result["ok"] and sorted(result["bad_units"]) == ["u000000", "u000001"]
    assert "1 of 12 frames its rows name are missing" in result["bad_units"]["u000000"][0]
    assert "rollouts part" in result["bad_units"]["u000001"][0]
    assert f"{units - 1} of {units} planned units are committed" in result["problems"]
    assert main(["verify", root, "--run-id", "audit"]) == 1
    err = capsys.readouterr().err
    assert "problem(s)" in err and "unit u000000:" in err


def test_unknown_runs_are_user_errors(written, capsys):
    root, storage, _ = written
    assert main(["verify", root, "--run-id", "nope"]) == 2
    assert "no run nope" in capsys.readouterr().err
    with pytest.raises(UserError, match="no run nope of 2026-01-02"):
        verify_run(storage, run_date=DATE, run_id="nope")


class CountingListings(LocalStorage):
    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.listings: list[tuple[str, str]] = []
        self.heads: list[str] = []

    def list_keys(self, prefix: str = "", *, start_after: str = "") -> Iterator[str]:
        self.listings.append((prefix, start_after))
        return super().list_keys(prefix, start_after=start_after)

    def head(self, key: str) -> ObjectHead:
        self.heads.append(key)
        return super().head(key)


def as_version_2(storage, run_id: str = "audit") -> None:  # noqa: ANN001
    """Rewrite the run's markers as schema version 2 wrote them: counts only, the stored
    frames named `frames`, no object sums."""
    for key in list(storage.list_keys(layout.commits_prefix(DATE, run_id))):
        body = json.loads(storage.get_bytes(key))
        for name in ("checksum", "objects", "generated_frames"):
            del body[name]
        body["frames"] = body.pop("stored_frames")
        body["schema_version"] = 2
        body["checksum"] = _digest(body)
        storage.put_bytes(key, json.dumps(body).encode())


def test_every_frame_object_is_checked_by_its_sum(written):
    root, storage, units = written
    if not isinstance(storage, LocalStorage):
        pytest.skip("counts requests on the local root")
    counting = CountingListings(root)
    markers = read_markers(counting, run_date=DATE, run_id="audit").good
    counting.listings.clear()
    check = check_units(counting, run_date=DATE, run_id="audit", markers=markers)
    assert check.ok and check.units_by_counts == 0 and counting.listings == []
    assert sorted(counting.heads) == sorted(
        k for k in storage.list_keys("frames/") if k.endswith(".png"))


def test_version_2_units_are_checked_by_counts_with_one_listing_per_unit(written, capsys):
    root, storage, units = written
    as_version_2(storage)
    counting = CountingListings(root) if isinstance(storage, LocalStorage) else storage
    markers = read_markers(counting, run_date=DATE, run_id="audit").good
    assert all(m["stored_frames"] == 12 and "frames" not in m for m in markers.values())
    if isinstance(counting, CountingListings):
        counting.listings.clear()
    check = check_units(counting, run_date=DATE, run_id="audit", markers=markers)
    assert check.ok and check.units_by_counts == units
    if isinstance(counting, CountingListings):
        assert len(counting.listings) == units and counting.heads == []
        prefix, start_after = counting.listings[0]
        assert prefix.startswith(f"frames/run_date={DATE}/run_id=audit/")
        assert start_after > prefix
    assert main(["verify", root, "--run-id", "audit"]) == 0
    assert f"{units} units written before schema version 3 were checked by counts only" in \
        capsys.readouterr().out
    storage.delete(next(k for k in storage.list_keys("frames/") if k.endswith(".png")))
    check = verify_run(storage, run_date=DATE, run_id="audit")
    assert "1 of 12 frames its rows name are missing" in check.bad_units["u000000"][0]


def test_listing_after_a_key(written):
    _, storage, _ = written
    keys = list(storage.list_keys("frames/"))
    assert list(storage.list_keys("frames/", start_after=keys[2])) == keys[3:]
    assert list(storage.list_keys("frames/", start_after=keys[-1])) == []


def rewrite_part(storage, key: str, edit) -> None:  # noqa: ANN001
    table = pq.read_table(pa.BufferReader(storage.get_bytes(key)))
    sink = pa.BufferOutputStream()
    pq.write_table(edit(table), sink)
    storage.put_bytes(key, sink.getvalue().to_pybytes())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_frames_in_parquet_parts_are_checked_row_by_row(where, tmp_path, capsys, request):
    root = str(tmp_path / "out") if where == "local" else request.getfixturevalue("s3_bucket")
    storage, units = write_run(root, "parquet")
    check = verify_run(storage, run_date=DATE, run_id="audit")
    assert check.ok and check.rows == check.stored_frames == units * 4 * 3
    assert not any(k.endswith(".png") for k in storage.list_keys("frames/"))

    rewrite_part(storage, layout.frames_part_key(DATE, "audit", "u000000"),
                 lambda t: t.slice(1))  # the first frame is gone
    storage.delete(layout.frames_part_key(DATE, "audit", "u000001"))
    check = verify_run(storage, run_date=DATE, run_id="audit")
    assert sorted(check.bad_units) == ["u000000", "u000001"]
    first = " ".join(check.bad_units["u000000"])
    assert "holds 11 rows, its marker records 12" in first
    assert "1 of 12 frames its rows name are missing from" in first
    assert "frames part" in check.bad_units["u000001"][0]
    assert "is missing" in check.bad_units["u000001"][0]
    assert main(["verify", root, "--run-id", "audit"]) == 1
    assert "unit u000000:" in capsys.readouterr().err


def test_rows_without_frame_or_tokens_are_flagged(tmp_path):
    storage, units = write_run(str(tmp_path / "out"), "none")
    check = verify_run(storage, run_date=DATE, run_id="audit")
    assert check.ok and check.rows == units * 4 * 3 and check.stored_frames == 0

    def drop_tokens(table: pa.Table) -> pa.Table:
        i = table.schema.get_field_index("image_tokens")
        field = table.schema.field(i)
        return table.set_column(i, field, pa.nulls(table.num_rows, field.type))

    rewrite_part(storage, layout.steps_part_key(DATE, "audit", "u000002"), drop_tokens)
    check = verify_run(storage, run_date=DATE, run_id="audit")
    assert list(check.bad_units) == ["u000002"]
    assert "12 rows have neither a frame nor image tokens" in check.bad_units["u000002"]


def test_a_foreign_steps_part_is_a_problem_not_a_crash(tmp_path):
    storage, _ = write_run(str(tmp_path / "out"), "png")
    rewrite_part(storage, layout.steps_part_key(DATE, "audit", "u000001"),
                 lambda t: t.drop_columns(["frame_key"]))
    check = verify_run(storage, run_date=DATE, run_id="audit")
    assert ("steps part of u000001 has no frame_key column (not a wham-batch steps part)"
            in check.bad_units["u000001"])
