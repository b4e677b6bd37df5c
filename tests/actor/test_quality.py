"""Quality signals through the actor: per-step columns from the engine's sampler, per-rollout
aggregates in the rollouts row, and that they rank sampling settings on the demo model."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_actor import make_spec, plan, read, seed_folder

from pipeline.contracts import quality
from pipeline.contracts.layout import rollouts_part_key, steps_part_key
from workers.actor.actor import RolloutActor

REPO = Path(__file__).resolve().parents[2]
TOYGAME_SEEDS = REPO / "configs" / "seeds" / "toygame"
DATE = "2026-01-02"


def _run(spec):
    actor = RolloutActor(spec, worker="w0")
    units = plan(spec)
    for unit in units:
        actor.run_unit(unit)
    actor.close()
    def rows(key):
        return [r for u in units for r in read(spec, key(DATE, "act", u.unit_id)).to_pylist()]

    return rows(steps_part_key), rows(rollouts_part_key)


def test_step_signals_and_rollout_aggregates(tmp_path: Path) -> None:
    seed_folder(tmp_path)
    steps, rows = _run(make_spec(tmp_path, output={"frames": "none"}))
    for r in steps:
        signals = [r[name] for name in ("image_logprob", "image_entropy", "changed_fraction")]
        if not r["generated"]:
            assert signals == [None, None, None] and len(r["image_tokens"]) == 16
            continue
        lp, entropy, changed = signals
        assert lp <= 0 and 0 <= entropy <= math.log(64) + 1e-4 and 0 <= changed <= 1
        assert r["action_logprob"] is None and r["action_entropy"] is None  # actions given
    for row in rows:
        mine = sorted((s for s in steps if s["rollout_id"] == row["rollout_id"] and s["generated"]),
                      key=lambda s: s["step"])
        lps = np.array([s["image_logprob"] for s in mine])
        # world_model samples only image tokens: the aggregates are those of the image column
        assert row["mean_logprob"] == pytest.approx(lps.mean(), rel=1e-5)
        assert row["min_logprob"] == pytest.approx(lps.min(), rel=1e-5)
        assert row["mean_changed_fraction"] == pytest.approx(
            np.mean([s["changed_fraction"] for s in mine]), rel=1e-5)
        assert isinstance(row["frozen"], bool)
        threshold = quality.collapse_logprob(64)
        first = next((s["step"] for s in mine if s["image_logprob"] < threshold), None)
        assert row["collapse_step"] == first


def test_full_mode_weighs_image_and_action_tokens(tmp_path: Path) -> None:
    seed_folder(tmp_path, n=1)
    steps, rows = _run(make_spec(tmp_path, rollouts={"mode": "full"}, output={"frames": "none"}))
    generated = [s for s in steps if s["generated"] and s["rollout_id"] == rows[0]["rollout_id"]]
    assert all(s["action_logprob"] is not None and s["action_logprob"] <= 0 for s in generated)
    per_step = [(16 * s["image_logprob"] + 16 * s["action_logprob"]) / 32 for s in generated]
    assert rows[0]["mean_logprob"] == pytest.approx(np.mean(per_step), rel=1e-5)


def test_greedy_rollouts_are_likelier_than_hot_ones_on_the_demo_model(tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for p in sorted(TOYGAME_SEEDS.glob("*.png")):
        shutil.copy(p, seeds / p.name)
    lps = {}
    for name, sampling in (("greedy", {"greedy": True}), ("hot", {"temperature": 1.5})):
        spec = make_spec(tmp_path, model={"preset": None, "checkpoint": str(REPO / "models/demo")},
                         rollouts={"steps": 8, "per_seed": 1, "sampling": sampling},
                         output={"root": str(tmp_path / name), "frames": "none"})
        _, rows = _run(spec)
        lps[name] = np.array([r["mean_logprob"] for r in rows])
    assert len(lps["greedy"]) == len(lps["hot"]) == 6
    # Every greedy rollout is likelier than every temperature-1.5 rollout of the same seeds.
    assert lps["greedy"].min() > lps["hot"].max()
