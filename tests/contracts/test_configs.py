"""Every shipped job YAML validates, and the demo points at files that ship with the repo."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.contracts.spec import load_spec

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_validates(path: Path) -> None:
    spec = load_spec(path)
    assert spec.run.run_id


def test_configs_exist() -> None:
    assert {"demo.yaml", "nightly.yaml"} <= {p.name for p in CONFIGS.glob("*.yaml")}


def test_demo_seeds_ship_with_the_repo() -> None:
    spec = load_spec(CONFIGS / "demo.yaml")
    seeds = CONFIGS.parent / spec.seeds.source
    assert len(list(seeds.glob("*.png"))) >= 4
    assert not spec.output.root.startswith("s3://") and spec.output.previews


def test_nightly_is_dated_gpu_and_s3() -> None:
    spec = load_spec(CONFIGS / "nightly.yaml", ["run.run_date=2026-03-04"])
    assert spec.run.run_id == "nightly-2026-03-04"
    assert spec.output.root.startswith("s3://") and spec.resources.gpus_per_actor > 0
