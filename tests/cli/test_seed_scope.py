"""New data per run id, reproduced per run id: a rollout's RNG seed mixes in the run id, so
two run ids of one config generate different rollouts and the same run id generates the
same ones wherever it runs (real tiny model, real Ray, real Parquet)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import yaml

from pipeline.cli import main as cli_main
from pipeline.contracts.storage import open_storage

DEMO = Path(__file__).resolve().parents[2] / "configs" / "seeds" / "demo"
pytestmark = pytest.mark.usefixtures("ray_local")


def _run(tmp_path: Path, root: Path, run_id: str) -> dict[tuple[str, int], tuple]:
    """Run one job of the shared config as `run_id` into `root`; its generated steps."""
    seeds = tmp_path / "seeds"
    if not seeds.exists():
        seeds.mkdir()
        for picture in sorted(DEMO.glob("*.png"))[:2]:
            shutil.copyfile(picture, seeds / picture.name)
    config = tmp_path / f"{run_id}-{root.name}.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"name": "scope", "run_id": run_id, "run_date": "2026-08-09", "seed": 5},
        "model": {"preset": "tiny", "device": "cpu", "dtype": "float32"},
        "seeds": {"source": str(seeds)},
        "rollouts": {"steps": 3, "per_seed": 2, "mode": "full"},
        "resources": {"actors": 1, "cpus_per_actor": 1, "batch_size": 4},
        "output": {"root": str(root), "previews": False, "frames": "none"},
    }))
    assert cli_main(["run", str(config), "--quiet"]) == 0
    fs, base = open_storage(str(root)).arrow_fs()
    table = ds.dataset(f"{base}/steps", filesystem=fs, partitioning="hive").to_table(
        columns=["run_id", "rollout_id", "step", "generated", "action_bins", "image_tokens"])
    return {(r["rollout_id"], r["step"]): (r["action_bins"], r["image_tokens"])
            for r in table.to_pylist() if r["run_id"] == run_id and r["generated"]}


def test_run_ids_generate_new_rollouts_and_reproduce_their_own(tmp_path: Path) -> None:
    night_a = _run(tmp_path, tmp_path / "root1", "night-a")
    night_b = _run(tmp_path, tmp_path / "root1", "night-b")
    again_a = _run(tmp_path, tmp_path / "root2", "night-a")
    assert len(night_a) == 4 * 3 and night_a.keys() == night_b.keys()
    assert again_a == night_a  # the same run id elsewhere: the same actions and tokens
    differ = [k for k in night_a if night_a[k] != night_b[k]]
    assert len(differ) == len(night_a)  # another run id: every generated step is new
