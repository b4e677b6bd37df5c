"""The driver loop on real local Ray with a stub actor (no model): fan-out, resume, retries."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import support.units
from support.units import commit_unit

from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.contracts.layout import manifest_key, success_key
from pipeline.contracts.plan import UnitReceipt, WorkUnit, plan_for_spec
from pipeline.contracts.spec import JobSpec, spec_from_data
from pipeline.contracts.storage import open_storage
from pipeline.driver import actor_name, run_job
from pipeline.driver.discovery import discover_seeds
from pipeline.driver.run_state import run_fingerprint

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ray.cloudpickle.register_pickle_by_value(support.units)  # Ray's workers cannot import tests/
pytestmark = pytest.mark.usefixtures("ray_local")


class StubActor:
    """Commits each unit like the real actor would (real writer, no model), after an
    optional delay or crash."""

    def __init__(self, spec: JobSpec, *, worker: str, script=None) -> None:  # noqa: ANN001
        self.spec, self.worker = spec, worker
        self.storage = open_storage(spec.output.root)

    def ready(self) -> dict:
        return {"model_id": "stub", "sha256": "0" * 64, "batch_size": 4, "pid": os.getpid()}

    def run_unit(self, unit: WorkUnit) -> UnitReceipt:
        delay_file = Path(self.spec.output.root) / "delay"
        delay = float(delay_file.read_text()) if delay_file.exists() else 0.0
        time.sleep(delay)
        root = Path(self.spec.output.root)
        with open(root / "attempts.log", "a") as fh:
            fh.write(f"{unit.unit_id} {time.time()}\n")
        fail_flag = root / f"fail-{unit.unit_id}"
        if fail_flag.exists():
            fail_flag.unlink()  # fail once inside a live actor: the retry must succeed
            raise OSError("injected transient failure")
        crash_flag = Path(self.spec.output.root) / f"crash-{unit.unit_id}"
        if crash_flag.exists():
            crash_flag.unlink()  # crash once: the retry must succeed
            os._exit(1)
        n = unit.num_rollouts
        written = commit_unit(self.storage, self.spec, unit)
        log = Path(self.spec.output.root) / "ran.log"
        with open(log, "a") as f:
            f.write(unit.unit_id + "\n")
        # With an "adapt" file, each seed's first rollout reports its seed resized, as the
        # real actor does for seeds of another size.
        first = sum(i.rollout_index == 0 for i in unit.items)
        adapted = ({"resized 96x64 -> 16x16": first}
                   if first and (root / "adapt").exists() else {})
        return UnitReceipt(unit_id=unit.unit_id, ok=n, failed=0, generated_frames=n * 2, tokens=0,
                           generate_seconds=delay, write_seconds=0.0, worker=self.worker,
                           stored_frames=written.stored_frames, adaptations=adapted)


def make_spec(tmp_path: Path, *, seeds: int = 10, **resources: object) -> JobSpec:
    seed_dir = tmp_path / "seeds"
    seed_dir.mkdir(exist_ok=True)
    src = Path(__file__).resolve().parents[2] / "configs" / "seeds" / "demo" / "scene_00.png"
    for i in range(seeds):
        (seed_dir / f"s{i:02d}.png").write_bytes(src.read_bytes())
    return spec_from_data({
        "run": {"name": "t", "run_id": "drv", "run_date": "2026-01-02"},
        "model": {"preset": "tiny"},
        "seeds": {"source": str(seed_dir)},
        "rollouts": {"steps": 2, "per_seed": 2},
        "resources": {"actors": 2, "cpus_per_actor": 0.1, "rollouts_per_unit": 3, **resources},
        "output": {"root": str(tmp_path / "out")},
    })


def ran_units(spec: JobSpec) -> list[str]:
    log = Path(spec.output.root) / "ran.log"
    return log.read_text().split() if log.exists() else []


def test_fan_out_commits_every_unit(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    events = []
    summary = run_job(spec, actor_cls=StubActor, progress=False, on_event=events.append)
    assert summary.complete and summary.ok
    assert summary.units_total == 7 and summary.rollouts_ok == 20
    assert (summary.generated_frames, summary.stored_frames) == (40, 0)  # frames: none
    assert sorted(ran_units(spec)) == [f"u{i:06d}" for i in range(7)]
    storage = open_storage(spec.output.root)
    assert storage.exists(success_key("2026-01-02", "drv"))
    manifest = json.loads(storage.get_bytes(manifest_key("2026-01-02", "drv")))
    assert manifest["status"] == "complete" and manifest["counts"]["rollouts_ok"] == 20
    assert manifest["model"]["model_id"] == "stub"
    assert manifest["schema_version"] == layout.SCHEMA_VERSION
    kinds = [e.kind for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert kinds.count("unit_committed") == 7


def test_resume_skips_committed_units(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    storage = open_storage(spec.output.root)
    units = plan_for_spec(spec, discover_seeds(spec.seeds.source))
    fingerprint = run_fingerprint(spec, units)
    for index in (0, 4):
        commit_unit(storage, spec, dataclasses.replace(units[index], plan_fingerprint=fingerprint))
    summary = run_job(spec, actor_cls=StubActor, progress=False)
    assert summary.units_skipped == 2 and summary.complete
    assert sorted(ran_units(spec)) == ["u000001", "u000002", "u000003", "u000005", "u000006"]
    assert summary.rollouts_ok == 20  # counts include the units committed earlier
    # a second rerun has nothing to do and does not start actors
    again = run_job(spec, actor_cls=StubActor, progress=False)
    assert again.units_skipped == 7 and len(ran_units(spec)) == 5


def test_changed_plan_refuses_to_resume_and_fresh_replaces(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    run_job(spec, actor_cls=StubActor, progress=False)
    changed = spec.model_copy(update={"rollouts": spec.rollouts.model_copy(update={"per_seed": 3})})
    with pytest.raises(UserError, match="different plan"):
        run_job(changed, actor_cls=StubActor, progress=False)
    summary = run_job(changed, actor_cls=StubActor, fresh=True, progress=False)
    assert summary.complete and summary.units_skipped == 0 and summary.rollouts_ok == 30
    # same units, different generation settings: also refused
    longer = changed.model_copy(update={"rollouts": changed.rollouts.model_copy(
        update={"steps": 5})})
    with pytest.raises(UserError, match="different plan"):
        run_job(longer, actor_cls=StubActor, progress=False)


def test_dead_actor_units_are_retried(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, actors=1, max_restarts=2)
    (Path(spec.output.root)).mkdir(parents=True)
    (Path(spec.output.root) / "crash-u000002").touch()
    summary = run_job(spec, actor_cls=StubActor, progress=False)
    assert summary.complete and summary.rollouts_ok == 20
    assert sorted(set(ran_units(spec))) == [f"u{i:06d}" for i in range(7)]


def test_a_failed_unit_is_retried_after_a_backoff(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, actors=1)
    Path(spec.output.root).mkdir(parents=True)
    (Path(spec.output.root) / "fail-u000001").touch()
    summary = run_job(spec, actor_cls=StubActor, progress=False)
    assert summary.complete and summary.rollouts_ok == 20
    log = (Path(spec.output.root) / "attempts.log").read_text().split("\n")
    times = [float(line.split()[1]) for line in log if line.startswith("u000001")]
    assert len(times) == 2 and times[1] - times[0] >= 0.25  # not two tries in one moment


def test_a_full_output_root_stops_the_run_at_once(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, actors=1, max_unit_attempts=5)
    root = Path(spec.output.root)
    root.mkdir(parents=True)
    (root / "full").touch()
    with pytest.raises(UserError, match=f"stopping the run: output root {root} is full"):
        run_job(spec, actor_cls=FullStubActor, progress=False)
    attempts = (root / "attempts.log").read_text().split()
    assert len(attempts) <= 2 * 2  # one unit per actor slot, none retried
    assert not open_storage(spec.output.root).exists(success_key("2026-01-02", "drv"))


class FullStubActor(StubActor):
    """Fails every unit the way a full local disk does."""

    def run_unit(self, unit: WorkUnit) -> UnitReceipt:
        import errno

        with open(Path(self.spec.output.root) / "attempts.log", "a") as fh:
            fh.write(f"{unit.unit_id} {time.time()}\n")
        raise self.storage._fatal(OSError(errno.ENOSPC, "No space left on device"), "x")


def test_units_lost_after_attempts_make_the_run_incomplete(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, actors=1, max_restarts=0, max_unit_attempts=1)
    Path(spec.output.root).mkdir(parents=True)
    (Path(spec.output.root) / "crash-u000000").touch()
    with pytest.raises(UserError, match="every actor failed"):
        run_job(spec, actor_cls=StubActor, progress=False)
    storage = open_storage(spec.output.root)
    assert not storage.exists(success_key("2026-01-02", "drv"))


def test_killed_actor_is_restarted_and_run_completes(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, actors=1, max_restarts=2)
    Path(spec.output.root).mkdir(parents=True)
    (Path(spec.output.root) / "delay").write_text("0.3")
    result: dict = {}
    events: list = []
    thread = threading.Thread(target=lambda: result.update(
        s=run_job(spec, actor_cls=StubActor, progress=False, on_event=events.append)))
    thread.start()
    deadline = time.monotonic() + 60
    while not ran_units(spec) and time.monotonic() < deadline:
        time.sleep(0.05)
    ray.kill(ray.get_actor(actor_name("drv", 0)), no_restart=False)
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert result["s"].complete and result["s"].rollouts_ok == 20
    assert any(e.kind == "unit_retried" for e in events)  # the kill did interrupt a unit


def test_not_enough_gpus_fails_before_actors(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, gpus_per_actor=1)
    with pytest.raises(UserError, match="GPU"):
        run_job(spec, actor_cls=StubActor, progress=False)


def test_progress_logs_plain_lines_without_a_tty(caplog: pytest.LogCaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.driver.progress as progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    totals = progress.Totals(rollouts_total=4)
    prog = progress.Progress(run_id="r", totals=totals, show=True)
    prog.start()
    with caplog.at_level("INFO", logger="pipeline.driver"):
        prog.unit_done(UnitReceipt(unit_id="u000000", ok=1, failed=1, generated_frames=3, tokens=0,
                                   generate_seconds=0.1, write_seconds=0.0, worker="w"))
    prog.close()
    assert "r: 2/4 rollouts (1 failed), 3 generated frames" in caplog.text
    assert (totals.rollouts_ok, totals.rollouts_failed, totals.units_done) == (1, 1, 1)


def test_resume_refuses_a_run_written_by_a_newer_schema(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, seeds=2)
    run_job(spec, actor_cls=StubActor, progress=False)
    storage = open_storage(spec.output.root)
    key = manifest_key("2026-01-02", "drv")
    manifest = json.loads(storage.get_bytes(key))
    storage.put_bytes(key, json.dumps({**manifest, "schema_version": 99}).encode())
    with pytest.raises(UserError, match="schema version 99, newer than"):
        run_job(spec, actor_cls=StubActor, progress=False)


def test_fresh_leaves_runs_whose_id_starts_the_same_alone(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, actors=1)
    spec.run.run_id = "exp1"
    other = spec.model_copy(deep=True)
    other.run.run_id = "exp10"
    assert run_job(other, actor_cls=StubActor, progress=False).complete
    storage = open_storage(spec.output.root)
    before = sorted(k for k in storage.list_keys() if "run_id=exp10/" in k)
    assert any(k.startswith("steps/") for k in before)
    assert run_job(spec, actor_cls=StubActor, fresh=True, progress=False).complete
    assert run_job(spec, actor_cls=StubActor, fresh=True, progress=False).complete
    after = sorted(k for k in storage.list_keys() if "run_id=exp10/" in k)
    assert after == before and storage.exists(success_key("2026-01-02", "exp10"))


def test_a_rerun_that_does_not_complete_removes_an_old_success(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, actors=1, max_unit_attempts=1)
    assert run_job(spec, actor_cls=StubActor, progress=False).complete
    storage = open_storage(spec.output.root)
    marker = layout.commit_key("2026-01-02", "drv", "u000003")
    storage.put_bytes(marker, storage.get_bytes(marker)[:40])  # cut short: redone
    (Path(spec.output.root) / "fail-u000003").touch()  # and the redo fails
    summary = run_job(spec, actor_cls=StubActor, progress=False)
    assert not summary.complete and summary.units_lost == 1
    assert not storage.exists(success_key("2026-01-02", "drv"))
    manifest = json.loads(storage.get_bytes(manifest_key("2026-01-02", "drv")))
    assert manifest["status"] != "complete"


def test_seed_adaptations_are_one_line_per_run(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    spec = make_spec(tmp_path)
    (Path(spec.output.root)).mkdir(parents=True)
    (Path(spec.output.root) / "adapt").touch()
    with caplog.at_level("INFO", logger="pipeline.driver"):
        run_job(spec, actor_cls=StubActor, progress=False)
    lines = [r.getMessage() for r in caplog.records if "made to fit" in r.getMessage()]
    assert lines == ["run drv: seeds made to fit the model: 10 seeds resized 96x64 -> 16x16"]


def test_a_resume_with_nothing_to_do_keeps_the_runs_frames_per_second(tmp_path: Path) -> None:
    from pipeline.driver.run_state import list_runs

    spec = make_spec(tmp_path)
    first = run_job(spec, actor_cls=StubActor, progress=False)
    (before,) = list_runs(spec.output.root)
    again = run_job(spec, actor_cls=StubActor, progress=False)
    assert "nothing left to generate" in again.line() and again.frames_per_second == 0.0
    (after,) = list_runs(spec.output.root)
    assert after.frames_per_second == before.frames_per_second > 0
    assert (after.generated_frames, after.stored_frames) == (first.generated_frames, 0)
    manifest = json.loads(open_storage(spec.output.root).get_bytes(
        manifest_key("2026-01-02", "drv")))
    assert manifest["counts"]["generated_frames"] == 40 and manifest["seed_scope"] == "run"
    assert manifest["throughput"]["generated_frames"] == 40


def _rng_seeds(spec: JobSpec, run_id: str = "drv") -> dict[str, int]:
    from pipeline.query import open_table

    rows = open_table(spec.output.root, "rollouts").to_table(
        columns=["run_id", "rollout_id", "rng_seed"]).to_pylist()
    return {r["rollout_id"]: r["rng_seed"] for r in rows if r["run_id"] == run_id}


def test_a_run_written_before_seed_scopes_resumes_with_its_own_seeds(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    old = spec.model_copy(update={"run": spec.run.model_copy(update={"seed_scope": "config"})})
    assert run_job(old, actor_cls=StubActor, progress=False).complete
    # What a driver of that time left: no seed_scope anywhere, and an interrupted unit.
    storage = open_storage(spec.output.root)
    key = manifest_key("2026-01-02", "drv")
    manifest = json.loads(storage.get_bytes(key))
    del manifest["seed_scope"], manifest["spec"]["run"]["seed_scope"]
    storage.put_bytes(key, json.dumps(manifest).encode())
    storage.delete(layout.commit_key("2026-01-02", "drv", "u000002"))
    storage.delete(success_key("2026-01-02", "drv"))
    written = _rng_seeds(spec)
    summary = run_job(spec, actor_cls=StubActor, progress=False)  # run.seed_scope: run
    assert summary.complete and summary.units_skipped == 6
    assert _rng_seeds(spec) == written  # the redone unit kept the old scheme's seeds
    legacy = {i.rollout_id: i.rng_seed for u in plan_for_spec(spec, discover_seeds(
        spec.seeds.source), seed_scope="config") for i in u.items}
    assert written == legacy
    assert json.loads(storage.get_bytes(key))["seed_scope"] == "config"
    # A new run id of the same config gets seeds of its own.
    other = spec.model_copy(update={"run": spec.run.model_copy(update={"run_id": "drv2"})})
    run_job(other, actor_cls=StubActor, progress=False)
    seeds2 = _rng_seeds(spec, "drv2")
    assert seeds2.keys() == written.keys() and not set(seeds2.values()) & set(written.values())
