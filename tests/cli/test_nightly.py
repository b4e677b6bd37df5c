"""Nightly runs: one run per date, reruns resume, `wham-batch runs` reports them."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from jobs.nightly import main as nightly_main
from jobs.nightly import nightly_overrides, resolve_date
from pipeline.contracts.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
SEEDS = ROOT / "configs" / "seeds" / "demo"
# Two seeds x one rollout x two steps, one rollout per unit: two units per night.
SMALL_NIGHT = ["rollouts.per_seed=1", "rollouts.steps=2", "seeds.limit=2",
               "resources.rollouts_per_unit=1", "output.previews=false",
               f"seeds.source={SEEDS}", "run.run_id=nightly-{date}"]


# jobs.nightly sets up structured logging in-process: undone after each test.
pytestmark = pytest.mark.usefixtures("keep_logging_config")


def test_date_defaults_to_utc_today_and_is_validated() -> None:
    assert resolve_date(None) == dt.datetime.now(dt.UTC).date()
    assert resolve_date("2026-02-28") == dt.date(2026, 2, 28)
    with pytest.raises(UserError, match="--date"):
        resolve_date("2026-02-30")
    with pytest.raises(UserError, match="comes from --date"):
        nightly_overrides(dt.date(2026, 1, 2), ["run.run_date=2026-01-03"])
    assert nightly_overrides(dt.date(2026, 1, 2), ["a.b=1"]) == ["a.b=1",
                                                                 "run.run_date=2026-01-02"]


def test_shipped_nightly_config_gets_a_dated_run_id() -> None:
    from pipeline.contracts.spec import load_spec

    spec = load_spec(ROOT / "configs" / "nightly.yaml",
                     nightly_overrides(dt.date(2026, 11, 30), []))
    assert spec.run.run_id == "nightly-2026-11-30"
    assert spec.run.run_date == dt.date(2026, 11, 30)


def _night(root: str, date: str) -> int:
    sets = [arg for item in [*SMALL_NIGHT, f"output.root={root}"] for arg in ("--set", item)]
    return nightly_main(["--config", str(ROOT / "configs" / "demo.yaml"), "--date", date,
                         "--quiet", *sets])


def _rollout_rows(root: str) -> list[tuple[str, str, str]]:
    import pyarrow.dataset as ds

    from pipeline.contracts.storage import open_storage

    fs, base = open_storage(root).arrow_fs()
    table = ds.dataset(f"{base}/rollouts", filesystem=fs, partitioning="hive").to_table(
        columns=["run_date", "run_id", "rollout_id"])
    return sorted(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True))


def _actions(root: str) -> dict[str, dict[str, list]]:
    """run id -> rollout id -> the actions of its generated steps, in order."""
    import pyarrow.dataset as ds

    from pipeline.contracts.storage import open_storage

    fs, base = open_storage(root).arrow_fs()
    table = ds.dataset(f"{base}/steps", filesystem=fs, partitioning="hive").to_table(
        columns=["run_id", "rollout_id", "step", "generated", "action_bins"])
    out: dict[str, dict[str, list]] = {}
    for row in sorted(table.to_pylist(), key=lambda r: r["step"]):
        if row["generated"]:
            out.setdefault(row["run_id"], {}).setdefault(row["rollout_id"], []).append(
                row["action_bins"])
    return out


def _runs(root: str, capsys: pytest.CaptureFixture[str]) -> list[dict]:
    from pipeline.cli import main as cli_main

    capsys.readouterr()
    assert cli_main(["runs", root, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.timeout(900)  # five nights on S3 through Ray: minutes on a busy machine
def test_same_date_resumes_and_new_date_partitions(
        ray_local: None, s3_bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.contracts.layout import commit_key, success_key
    from pipeline.contracts.storage import open_storage

    assert _night(s3_bucket, "2026-11-29") == 0
    first = _rollout_rows(s3_bucket)
    assert len(first) == 2 and {r[:2] for r in first} == {("2026-11-29", "nightly-2026-11-29")}

    # Same night again: complete already, nothing runs, nothing is added.
    capsys.readouterr()
    assert _night(s3_bucket, "2026-11-29") == 0
    assert "complete and verified (2 units" in capsys.readouterr().out
    assert _rollout_rows(s3_bucket) == first

    # `_SUCCESS` is not trusted alone: a night whose frames part was lost is redone.
    from pipeline.contracts.layout import frames_part_key

    storage = open_storage(s3_bucket)
    storage.delete(frames_part_key("2026-11-29", "nightly-2026-11-29", "u000000"))
    assert _night(s3_bucket, "2026-11-29") == 0
    out, err = capsys.readouterr()
    assert "fails the check against storage" in err and "frames part" in err
    # The summary says what the repair did, and nothing that contradicts it.
    assert "nothing left to generate" not in out
    assert "this attempt 1 rollout, 2 generated frames" in out and "1 unit redone" in out
    assert storage.exists(frames_part_key("2026-11-29", "nightly-2026-11-29", "u000000"))
    assert _rollout_rows(s3_bucket) == first

    # A night interrupted after one of its two units: `runs` shows it partial, and the
    # rerun redoes only the missing unit without duplicating rows.
    storage.delete_prefix(commit_key("2026-11-29", "nightly-2026-11-29", "u000001"))
    storage.delete_prefix(success_key("2026-11-29", "nightly-2026-11-29"))
    (partial,) = _runs(s3_bucket, capsys)
    assert partial["status"] == "partial"
    assert (partial["units_committed"], partial["units_planned"]) == (1, 2)
    assert _night(s3_bucket, "2026-11-29") == 0
    assert _rollout_rows(s3_bucket) == first

    # The next night is a new partition with its own run id.
    assert _night(s3_bucket, "2026-11-30") == 0
    rows = _rollout_rows(s3_bucket)
    assert len(rows) == 4
    assert {r[:2] for r in rows} == {("2026-11-29", "nightly-2026-11-29"),
                                     ("2026-11-30", "nightly-2026-11-30")}
    runs = _runs(s3_bucket, capsys)
    assert [(r["run_date"], r["run_id"], r["status"]) for r in runs] == [
        ("2026-11-29", "nightly-2026-11-29", "complete"),
        ("2026-11-30", "nightly-2026-11-30", "complete")]
    for run in runs:
        assert (run["units_committed"], run["units_planned"]) == (2, 2)
        assert run["rollouts_ok"] == 2 and run["generated_frames"] == 4
        assert run["stored_frames"] == 2 * (1 + 2)  # the context frames are stored too
        assert run["frames_per_second"] > 0

    # Every night generates new rollouts: same seeds, same rollout ids, other actions.
    nights = _actions(s3_bucket)
    assert nights["nightly-2026-11-29"].keys() == nights["nightly-2026-11-30"].keys()
    assert nights["nightly-2026-11-29"] != nights["nightly-2026-11-30"]

    from pipeline.cli import main as cli_main

    capsys.readouterr()
    assert cli_main(["runs", s3_bucket, "--run-date", "2026-11-30"]) == 0
    header, line = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["RUN_DATE", "RUN_ID", "STATUS"]
    assert line.split()[:4] == ["2026-11-30", "nightly-2026-11-30", "complete", "2/2"]


def test_bad_config_exits_2_before_running(s3_bucket: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code = nightly_main(["--config", str(ROOT / "configs" / "demo.yaml"), "--date",
                         "2026-11-29", "--set", "rollouts.steps=0", "--set",
                         f"output.root={s3_bucket}"])
    assert code == 2
    assert "rollouts.steps" in capsys.readouterr().err
    from pipeline.contracts.storage import open_storage

    assert list(open_storage(s3_bucket).list_keys("")) == []
