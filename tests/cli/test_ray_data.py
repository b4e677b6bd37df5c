"""Ray Data reads the output tables: what Ray users reach for first works on an output root."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from pipeline.contracts.spec import spec_from_data
from pipeline.driver import run_job
from workers.actor.actor import RolloutActor

DEMO_SEEDS = Path(__file__).resolve().parents[2] / "configs" / "seeds" / "demo"
pytestmark = pytest.mark.usefixtures("ray_local")


def test_ray_data_reads_steps_and_rollouts_with_hive_partitions(tmp_path: Path) -> None:
    import ray.data
    from ray.data.datasource.partitioning import Partitioning

    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for picture in sorted(DEMO_SEEDS.glob("*.png"))[:2]:
        shutil.copy(picture, seeds)
    root = tmp_path / "out"
    for run_id, steps in (("first", 3), ("second", 2)):
        spec = spec_from_data({
            "run": {"name": "rd", "run_id": run_id, "run_date": "2026-01-02"},
            "model": {"preset": "tiny", "device": "cpu"},
            "seeds": {"source": str(seeds)},
            "rollouts": {"steps": steps, "per_seed": 2},
            "resources": {"actors": 1, "batch_size": 4},
            "output": {"root": str(root), "previews": False},
        })
        assert run_job(spec, actor_cls=RolloutActor, progress=False).ok

    hive = Partitioning("hive")
    steps = ray.data.read_parquet(str(root / "steps"), partitioning=hive,
                                  columns=["run_id", "rollout_id", "step", "generated"])
    rollouts = ray.data.read_parquet(str(root / "rollouts"), partitioning=hive)
    # The slow, obvious reader: pyarrow over the same files.
    expected = ds.dataset(root / "steps", partitioning="hive").to_table()
    rows = steps.take_all()
    assert len(rows) == expected.num_rows == 4 * (1 + 3) + 4 * (1 + 2)
    # run_id and run_date come from the folder names, as in every other reader.
    assert sorted({r["run_id"] for r in rows}) == ["first", "second"]
    assert sum(r["generated"] for r in rows if r["run_id"] == "first") == 4 * 3
    rollout_rows = rollouts.take_all()
    assert len(rollout_rows) == 8
    assert {str(r["run_date"]) for r in rollout_rows} == {"2026-01-02"}
    per_run = {run: sum(r["generated_steps"] for r in rollout_rows if r["run_id"] == run)
               for run in ("first", "second")}
    assert per_run == {"first": 12, "second": 8}
