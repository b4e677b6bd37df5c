"""What fails a rollout and what fails its unit: outputs that cannot be written fail the
unit (the driver retries it, or stops the run when the store refuses writes); a seed that
could not be read fails its rollouts `retryable`, so a rerun reopens the unit; a seed that
does not decode fails its rollouts for good."""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support.faultproxy import FaultProxy

from pipeline.contracts import layout
from pipeline.contracts.plan import make_plan
from pipeline.contracts.spec import JobSpec, spec_from_data
from pipeline.contracts.storage import StorageFatalError, open_storage
from pipeline.contracts.storage import s3 as s3_storage
from pipeline.driver.discovery import discover_seeds
from pipeline.driver.run_state import read_markers, reopen_retryable_units
from workers.actor.actor import RolloutActor

DEMO = Path(__file__).resolve().parents[2] / "configs" / "seeds" / "demo"
DATE, RUN = "2026-01-02", "fail"


def make_spec(tmp_path: Path, seeds: dict, **output: object) -> JobSpec:
    return spec_from_data({
        "run": {"name": "t", "run_id": RUN, "run_date": DATE, "seed": 3},
        "model": {"preset": "tiny", "device": "cpu"},
        "seeds": seeds,
        "rollouts": {"steps": 2, "per_seed": 2},
        "resources": {"batch_size": 1, "rollouts_per_unit": 8},
        "output": {"root": str(tmp_path / "out"), "previews": False, **output},
    })


def demo_seeds(folder: Path, n: int) -> Path:
    folder.mkdir()
    for p in sorted(DEMO.glob("*.png"))[:n]:
        shutil.copy(p, folder / p.name)
    return folder


def the_unit(spec: JobSpec, **discover: object):  # noqa: ANN201
    refs = discover_seeds(spec.seeds.source, format="images", **discover)
    (unit,) = make_plan(refs, run_seed=spec.run.seed, per_seed=spec.rollouts.per_seed,
                        unit_size=spec.resources.unit_size())
    return unit


def rollouts_of(spec: JobSpec, unit_id: str) -> list[dict]:
    data = open_storage(spec.output.root).get_bytes(layout.rollouts_part_key(DATE, RUN, unit_id))
    return pq.read_table(io.BytesIO(data)).to_pylist()


def test_outputs_that_cannot_be_written_fail_the_unit_not_its_rollouts(tmp_path, caplog):
    spec = make_spec(tmp_path, {"source": str(demo_seeds(tmp_path / "seeds", 3))},
                     frames="png")
    # A link in the output root: every frame upload is refused at once, for good.
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "frames").symlink_to(tmp_path / "elsewhere")
    actor = RolloutActor(spec, worker="w0")
    unit = the_unit(spec)
    with caplog.at_level(logging.ERROR, logger="workers.actor.actor"), \
            pytest.raises(StorageFatalError, match="symbolic link"):
        actor.run_unit(unit)  # the store's own error: the driver stops the run on it
    actor.close()
    # no batch was turned into failed rollouts, and nothing of the unit was committed
    assert not [r for r in caplog.records if "batch failed" in r.getMessage()]
    out = open_storage(spec.output.root)
    assert not out.exists(layout.commit_key(DATE, RUN, unit.unit_id))
    assert not out.exists(layout.rollouts_part_key(DATE, RUN, unit.unit_id))
    assert not list((tmp_path / "elsewhere").iterdir())


def test_a_seed_that_could_not_be_read_is_retried_by_a_rerun(tmp_path, s3_server, s3_bucket,
                                                             monkeypatch):
    # Every read is still tried max_attempts times; only the waits between tries (up to a
    # minute per seed) are cut, as they do not change what the unit records.
    monkeypatch.setattr(s3_storage, "backoff_delay", lambda attempt: 0.01)
    store = open_storage(s3_bucket)
    for p in sorted(DEMO.glob("*.png"))[:2]:
        store.put_bytes(f"seeds/{p.name}", p.read_bytes())
    # Every answer is cut off mid-body: the seeds cannot be read, however often tried.
    with FaultProxy(s3_server, rates={"reset": 1.0}, max_consecutive=10_000) as proxy:
        spec = make_spec(tmp_path, {"source": f"{s3_bucket}/seeds", "endpoint_url": proxy.url})
        unit = the_unit(spec, endpoint_url=s3_server)
        actor = RolloutActor(spec, worker="w0")
        receipt = actor.run_unit(unit)
        actor.close()
    assert proxy.counts["reset"] >= 2 * store.max_attempts  # each seed, every try
    assert (receipt.ok, receipt.failed) == (0, 4)
    assert all("cannot read" in e for e in receipt.errors)
    rows = rollouts_of(spec, unit.unit_id)
    assert all(r["status"] == "failed" and "cannot read" in r["error"] for r in rows)
    out = open_storage(spec.output.root)
    markers = read_markers(out, run_date=DATE, run_id=RUN).good
    assert markers[unit.unit_id]["retryable"] == 4
    assert reopen_retryable_units(out, run_date=DATE, run_id=RUN,
                                  markers=markers) == {unit.unit_id}
    # the rerun, with the store answering again, completes the unit
    spec = make_spec(tmp_path, {"source": f"{s3_bucket}/seeds", "endpoint_url": s3_server})
    actor = RolloutActor(spec, worker="w0")
    assert actor.run_unit(unit).ok == 4
    actor.close()


def test_a_seed_that_does_not_decode_fails_for_good(tmp_path):
    folder = demo_seeds(tmp_path / "seeds", 1)
    (folder / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    spec = make_spec(tmp_path, {"source": str(folder)})
    actor = RolloutActor(spec, worker="w0")
    unit = the_unit(spec)
    receipt = actor.run_unit(unit)
    actor.close()
    assert (receipt.ok, receipt.failed) == (2, 2)
    marker = read_markers(open_storage(spec.output.root), run_date=DATE,
                          run_id=RUN).good[unit.unit_id]
    assert (marker["failed"], marker["retryable"]) == (2, 0)
