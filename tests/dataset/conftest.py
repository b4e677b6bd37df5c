"""Runs of the real pipeline (local Ray, tiny model) in every frame storage mode, shared by
the loader, decode and export tests: same seeds and settings, so the modes can be compared."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.contracts.plan import make_plan
from pipeline.contracts.spec import JobSpec, spec_from_data
from pipeline.driver import run_job
from pipeline.driver.discovery import discover_seeds
from workers.actor.actor import RolloutActor

REPO = Path(__file__).resolve().parents[2]
DATE = "2026-02-03"
RUN_ID = "modes"
MODES = ("png", "parquet", "none")


def job(seeds: Path, root: str, mode: str, **sections: dict) -> JobSpec:
    data = {
        "run": {"name": "modes", "run_id": RUN_ID, "run_date": DATE, "seed": 11},
        "model": {"preset": "tiny", "device": "cpu"},
        "seeds": {"source": str(seeds)},
        "rollouts": {"steps": 5, "per_seed": 2},
        "resources": {"actors": 1, "batch_size": 2, "rollouts_per_unit": 2},
        "output": {"root": root, "frames": mode},
    }
    for key, value in sections.items():
        data[key] = {**data[key], **value}
    return spec_from_data(data)


@pytest.fixture(scope="session")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("seeds")
    for p in sorted((REPO / "configs" / "seeds" / "demo").glob("*.png"))[:3]:
        shutil.copy(p, folder / p.name)
    return folder


@pytest.fixture(scope="session")
def mode_roots(tmp_path_factory: pytest.TempPathFactory, seeds: Path, ray_local: None,
               s3_server: str) -> dict[str, str]:
    """One committed run per frame mode (parquet on the S3 endpoint, the others local):
    3 seeds x 2 rollouts x (1 context + 5 generated) steps, 3 units of 2 rollouts."""
    import boto3

    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="modes")
    roots = {mode: str(tmp_path_factory.mktemp(f"out-{mode}")) for mode in MODES}
    roots["parquet"] = "s3://modes/root"
    for mode, root in roots.items():
        summary = run_job(job(seeds, root, mode), actor_cls=RolloutActor, progress=False)
        assert summary.complete and summary.rollouts_ok == 6
    return roots


def run_in_process(seeds: Path, root: Path, *, run_id: str, run_date: str,
                   preset: str = "tiny", **output: object) -> None:
    """Every unit of a small run (2 rollouts per seed, 3 steps), run and committed by the
    actor itself, without Ray: no manifest, no _SUCCESS, the tables and markers as a
    driver's run leaves them."""
    spec = spec_from_data({
        "run": {"name": "t", "run_id": run_id, "run_date": run_date},
        "model": {"preset": preset, "device": "cpu"}, "seeds": {"source": str(seeds)},
        "rollouts": {"steps": 3, "per_seed": 2}, "resources": {"batch_size": 4},
        "output": {"root": str(root), **output}})
    actor = RolloutActor(spec)
    for unit in make_plan(discover_seeds(str(seeds), format="images"), run_seed=0,
                          per_seed=2, unit_size=4):
        actor.run_unit(unit)
    actor.close()


def _two_seeds(folder: Path) -> Path:
    folder.mkdir()
    for p in sorted((REPO / "configs" / "seeds" / "demo").glob("*.png"))[:2]:
        shutil.copy(p, folder / p.name)
    return folder


RUNS = {"run-tiny": ("tiny", 16), "run-vit": ("tiny-vit", 15)}


@pytest.fixture(scope="session")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root written by two models whose frames differ in size and token count (16x16, 16
    tokens; 10x18, 15 tokens): 2 seeds x 2 rollouts x (1 + 3) steps each."""
    base = tmp_path_factory.mktemp("two-models")
    seeds, root = _two_seeds(base / "seeds"), base / "out"
    for run_id, (preset, _) in RUNS.items():
        run_in_process(seeds, root, run_id=run_id, run_date="2026-02-03", preset=preset)
    return root


#: (run_date, run_id) of the runs of `three_runs`, one model, 4 rollouts of 4 steps each.
NIGHTS = (("2026-02-03", "night-a"), ("2026-02-04", "night-b"), ("2026-02-04", "other"))


@pytest.fixture(scope="session")
def three_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("three-runs")
    seeds, root = _two_seeds(base / "seeds"), base / "out"
    for run_date, run_id in NIGHTS:
        run_in_process(seeds, root, run_id=run_id, run_date=run_date)
    return root
