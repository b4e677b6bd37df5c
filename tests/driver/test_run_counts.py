"""One meaning per number: generated and stored frames, frames per second of a run's own
attempts, `running` while a driver holds the lease, summaries that agree with themselves."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.contracts import layout
from pipeline.contracts.markers import marker_bytes
from pipeline.contracts.spec import spec_from_data
from pipeline.contracts.storage import open_storage
from pipeline.driver.lease import RunLease
from pipeline.driver.progress import Totals
from pipeline.driver.run_state import Throughput, list_runs, manifest_bytes, totals_of
from pipeline.driver.summary import RunSummary

DATE, RUN = "2026-03-04", "counts"


def _summary(**changes: object) -> RunSummary:
    base = dict(run_id=RUN, run_date=DATE, output_uri="out", complete=True, units_total=2,
                units_skipped=0, units_lost=0, rollouts_ok=2, rollouts_failed=0,
                generated_frames=4, stored_frames=6, wall_seconds=2.0, frames_per_second=2.0,
                max_failed_fraction=0.0, attempt_rollouts=2, attempt_generated_frames=4)
    return RunSummary(**{**base, **changes})


def test_a_repaired_run_does_not_say_nothing_was_left_to_generate() -> None:
    # Both units were committed before; one failed the check against storage and was redone.
    repaired = _summary(units_skipped=2, attempt_rollouts=1, attempt_generated_frames=2,
                        units_redone=1).line()
    assert "nothing left to generate" not in repaired
    assert "this attempt 1 rollout, 2 generated frames" in repaired
    assert "1 unit redone after checking storage" in repaired
    idle = _summary(units_skipped=2, attempt_rollouts=0, attempt_generated_frames=0).line()
    assert "nothing left to generate (2 of 2 units were committed before)" in idle
    fresh = _summary().line()
    assert "2 rollouts ok, 0 failed, 4 generated frames (6 frames stored, context included)" \
        in fresh


def test_marker_counts_read_both_namings() -> None:
    old = {"ok": 2, "failed": 1, "steps": 9, "frames": 9}  # before the two were named apart
    new = {"ok": 1, "failed": 0, "steps": 4, "stored_frames": 4, "generated_frames": 3}
    sums = totals_of([old, new], steps=3)
    assert (sums.ok, sums.failed, sums.stored_frames, sums.generated_frames) == (3, 1, 13, 9)
    assert totals_of([old]).generated_frames is None  # rollouts.steps unknown: not a guess
    assert totals_of([new]).generated_frames == 3


def _spec(root: Path) -> object:
    return spec_from_data({
        "run": {"name": "t", "run_id": RUN, "run_date": DATE}, "model": {"preset": "tiny"},
        "seeds": {"source": str(root / "seeds")}, "rollouts": {"steps": 2},
        "output": {"root": str(root)}})


def _write_complete(storage, spec, *, attempt_frames: int, throughput: Throughput) -> None:  # noqa: ANN001
    totals = Totals(rollouts_ok=2, generated_frames=4, stored_frames=6, units_total=1,
                    units_skipped=1)
    storage.put_bytes(layout.manifest_key(DATE, RUN), manifest_bytes(
        spec, status="complete", fingerprint="f", totals=totals, model={}, started_at=0.0,
        wall=1.0, attempt={"rollouts": 0, "generated_frames": attempt_frames,
                           "stored_frames": 0, "units": 0},
        throughput=throughput, seed_scope="run"))
    storage.put_bytes(layout.commit_key(DATE, RUN, "u000000"), marker_bytes(
        run_date=DATE, run_id=RUN, unit_id="u000000", plan_fingerprint="f",
        counts={"rollouts": 2, "ok": 2, "steps": 6, "generated_frames": 4, "stored_frames": 6},
        objects={}))
    storage.put_bytes(layout.success_key(DATE, RUN), b"")


def test_runs_shows_the_frames_per_second_of_the_runs_own_attempts(tmp_path: Path) -> None:
    spec, storage = _spec(tmp_path), open_storage(str(tmp_path))
    # The last attempt found nothing to do; the one before generated 4 frames in 2 s.
    _write_complete(storage, spec, attempt_frames=0,
                    throughput=Throughput().plus(4, 2.0).plus(0, 30.0))
    (run,) = list_runs(str(tmp_path))
    assert run.status == "complete" and run.frames_per_second == 2.0
    assert (run.generated_frames, run.stored_frames, run.wall_seconds) == (4, 6, 2.0)
    # A manifest written before throughput was recorded: its last attempt generated
    # nothing, so there is no rate to show (not 0.0).
    old = json.loads(storage.get_bytes(layout.manifest_key(DATE, RUN)))
    del old["throughput"], old["counts"]["stored_frames"], old["counts"]["generated_frames"]
    old["counts"]["frames"], old["attempt"], old["frames_per_second"] = 4, {"frames": 0}, 0.0
    storage.put_bytes(layout.manifest_key(DATE, RUN), json.dumps(old).encode())
    (run,) = list_runs(str(tmp_path))
    assert run.frames_per_second is None
    assert (run.generated_frames, run.stored_frames) == (4, 6)  # from the markers


def test_runs_shows_running_while_a_driver_holds_the_lease(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    lease = RunLease(storage, run_date=DATE, run_id=RUN).acquire()
    try:
        (run,) = list_runs(str(tmp_path))
        assert run.status == "running"
    finally:
        lease.release()
    storage.put_bytes(layout.lease_key(DATE, RUN), b"{}")  # a lease nobody holds any more
    (run,) = list_runs(str(tmp_path))
    assert run.status == "partial"
