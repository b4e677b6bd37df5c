"""Work-unit planning: deterministic ids, grouping, rng seeds and resume."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.contracts.layout import commit_key
from pipeline.contracts.markers import marker_bytes
from pipeline.contracts.plan import (
    make_plan,
    pending_units,
    plan_fingerprint,
    rng_seed_for,
)
from pipeline.contracts.storage import open_storage
from pipeline.driver.run_state import read_markers


@dataclass(frozen=True)
class Seed:
    seed_id: str
    uri: str
    root: str | None = None


SEEDS = [Seed(f"s{i:02d}", f"/seeds/s{i:02d}.png", "/seeds") for i in range(5)]


def test_units_group_rollouts_seed_major() -> None:
    units = make_plan(SEEDS, run_seed=7, per_seed=3, unit_size=4)
    assert [u.unit_id for u in units] == ["u000000", "u000001", "u000002", "u000003"]
    assert [u.num_rollouts for u in units] == [4, 4, 4, 3]
    flat = [(i.seed_id, i.rollout_index) for u in units for i in u.items]
    assert flat == [(s.seed_id, r) for s in SEEDS for r in range(3)]
    assert units[0].items[0].rollout_id == "s00-r000"
    assert units[0].items[0].seed_root == "/seeds"


def test_plan_is_deterministic_and_order_free() -> None:
    a = make_plan(SEEDS, run_seed=1, per_seed=2, unit_size=3)
    b = make_plan(list(reversed(SEEDS)), run_seed=1, per_seed=2, unit_size=3)
    assert a == b and plan_fingerprint(a) == plan_fingerprint(b)
    c = make_plan(SEEDS, run_seed=2, per_seed=2, unit_size=3)
    assert plan_fingerprint(c) != plan_fingerprint(a)


def test_rng_seeds_depend_only_on_run_seed_seed_and_index() -> None:
    seeds = {i.rng_seed for u in make_plan(SEEDS, run_seed=0, per_seed=4, unit_size=8)
             for i in u.items}
    assert len(seeds) == 20 and all(0 <= s < 2**63 for s in seeds)
    assert rng_seed_for(0, "s01", 2) == rng_seed_for(0, "s01", 2)
    assert rng_seed_for(0, "s01", 2) != rng_seed_for(1, "s01", 2)
    # the grouping does not change any rollout's seed
    small = make_plan(SEEDS, run_seed=0, per_seed=4, unit_size=1)
    assert seeds == {u.items[0].rng_seed for u in small}


def test_rng_seeds_mix_in_the_run_id_when_given() -> None:
    by_run = {run_id: make_plan(SEEDS, run_seed=3, per_seed=2, unit_size=3, run_id=run_id)
              for run_id in ("night-a", "night-b")}
    a, b = by_run["night-a"], by_run["night-b"]
    # the same units and rollout ids, other rng seeds: new data per run id
    assert [(u.unit_id, [i.rollout_id for i in u.items]) for u in a] == \
        [(u.unit_id, [i.rollout_id for i in u.items]) for u in b]
    seeds_a = [i.rng_seed for u in a for i in u.items]
    seeds_b = [i.rng_seed for u in b for i in u.items]
    assert not set(seeds_a) & set(seeds_b)
    assert plan_fingerprint(a) != plan_fingerprint(b)
    assert make_plan(SEEDS, run_seed=3, per_seed=2, unit_size=3, run_id="night-a") == a
    assert rng_seed_for(3, "s01", 1, run_id="night-a") == a[1].items[0].rng_seed


def test_config_scoped_rng_seeds_are_those_of_plans_made_before_seed_scopes() -> None:
    # Values of the formula every run used before seed scopes existed: runs written then
    # resume with these seeds.
    assert rng_seed_for(7, "seed_a", 3) == 4846744161376537846
    assert rng_seed_for(0, "clip_1000000", 0) == 8194651306709789648
    assert rng_seed_for(7, "seed_a", 3, run_id="r") != 4846744161376537846


def test_unsafe_seed_names_become_safe_rollout_ids() -> None:
    units = make_plan([Seed("../evil name", "/x/a"), Seed("ok", "/x/b")], run_seed=0,
                      per_seed=1, unit_size=8)
    ids = [i.rollout_id for i in units[0].items]
    assert all("/" not in r and ".." not in r and " " not in r for r in ids)
    assert len(set(ids)) == 2


def test_bad_sizes_rejected() -> None:
    with pytest.raises(ValueError):
        make_plan(SEEDS, run_seed=0, per_seed=0, unit_size=1)


def test_resume_skips_committed_units(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    units = make_plan(SEEDS, run_seed=0, per_seed=2, unit_size=3)
    counts = dict.fromkeys(("rollouts", "ok", "failed", "steps", "stored_frames", "previews"), 1)
    for run_id, uid in (("r1", "u000001"), ("r1", "u000003"), ("other", "u000000")):
        storage.put_bytes(commit_key("2026-01-02", run_id, uid), marker_bytes(
            run_date="2026-01-02", run_id=run_id, unit_id=uid, plan_fingerprint="p",
            counts=counts, objects={}))
    storage.put_bytes(commit_key("2026-01-02", "r1", "u000002"), b'{"schema_vers')  # cut short
    markers = read_markers(storage, run_date="2026-01-02", run_id="r1")
    assert set(markers.good) == {"u000001", "u000003"}
    assert markers.bad == {"u000002": "not valid JSON (truncated or overwritten?)"}
    done = set(markers.good)
    assert [u.unit_id for u in pending_units(units, done)] == ["u000000", "u000002"]
