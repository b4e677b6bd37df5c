"""Each frame storage mode end to end: the objects a run writes, resuming a run that lost a
unit, querying the tables (CLI included) and reading windows back."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pytest
from conftest import DATE, RUN_ID, job

from pipeline.cli import main as cli_main
from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.contracts.storage import open_storage
from pipeline.dataset import RolloutWindows
from pipeline.driver import run_job
from pipeline.query import open_table, query
from workers.actor.actor import RolloutActor

UNITS = ("u000000", "u000001", "u000002")


def _windows(root: str) -> dict:
    return {(w["rollout_id"], w["start"]): w for w in RolloutWindows(root, window=6)
            .iter_windows()}


def test_objects_written_per_mode(mode_roots):
    counts = {}
    for mode, root in mode_roots.items():
        keys = list(open_storage(root).list_keys())
        counts[mode] = sum(k.startswith("frames/") for k in keys)
        manifest = json.loads(open_storage(root).get_bytes(layout.manifest_key(DATE, RUN_ID)))
        assert manifest["spec"]["output"]["frames"] == mode
        assert manifest["schema_version"] == layout.SCHEMA_VERSION == 3
    assert counts == {"png": 36, "parquet": 3, "none": 0}  # one PNG per step; one part per unit


@pytest.mark.parametrize("mode", ["png", "parquet", "none"])
def test_resume_after_a_lost_unit(mode_roots, seeds, mode):
    root = mode_roots[mode]
    storage = open_storage(root)
    before = _windows(root)
    # The unit's marker is gone (say the actor died before committing): it is not done,
    # whatever else it left, and the rerun writes it again over its own names.
    storage._delete(layout.commit_key(DATE, RUN_ID, UNITS[1]))  # noqa: SLF001
    summary = run_job(job(seeds, root, mode), actor_cls=RolloutActor, progress=False)
    assert summary.complete and summary.units_skipped == 2 and summary.rollouts_ok == 6
    after = _windows(root)
    assert before.keys() == after.keys()
    for key, window in before.items():
        np.testing.assert_array_equal(window["frames"], after[key]["frames"])
        np.testing.assert_array_equal(window["image_tokens"], after[key]["image_tokens"])
    steps = query(root, run_id=RUN_ID)
    counts = steps.group_by(["rollout_id", "step"]).aggregate([("step", "count")])
    assert steps.num_rows == 36 and pc.max(counts.column("step_count")).as_py() == 1
    if mode == "parquet":
        frames = open_table(root, "frames").to_table()
        assert frames.num_rows == 36
        assert len(set(zip(frames.column("rollout_id").to_pylist(),
                           frames.column("step").to_pylist(), strict=True))) == 36


def test_query_cli_reads_every_table(mode_roots, capsys):
    root = mode_roots["parquet"]
    assert cli_main(["query", root, "--table", "frames", "--columns", "rollout_id,step",
                     "--format", "json", "--committed-only"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 36 and set(rows[0]) == {"rollout_id", "step"}
    assert cli_main(["query", mode_roots["none"], "--table", "rollouts", "--where",
                     "mean_logprob < 0 and frozen = false", "--columns",
                     "rollout_id,mean_logprob,min_logprob,collapse_step", "--format", "json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 6 and all(r["min_logprob"] <= r["mean_logprob"] < 0 for r in rows)
    # a root whose runs stored PNGs has no frames table (and no warning about its PNGs)
    with pytest.raises(UserError, match="no frames table"):
        open_table(mode_roots["png"], "frames")
