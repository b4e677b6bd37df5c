"""`_SUCCESS` means complete: the cases of the hostile and chaos runs, each ending in a
checked final state (rows, no duplicates, every row's frame present, `_SUCCESS` only when
all of that holds, exit status and message).

1. a second driver (`--fresh` or other settings) while one runs; outputs damaged under
   `_SUCCESS` (frames deleted, a steps part deleted with its marker kept); objects deleted
   from the bucket mid-run;
2. two drivers on one run id;
3. a changed plan with the manifest deleted or garbled; a truncated commit marker;
4. a symlink planted inside output.root;
5. (query bounds: tests/driver/test_sql.py);
6. inputs that would exhaust the machine: a huge per_seed, a run_id format width, 40
   actors at 0.01 CPU, an oversized seed file;
7. a disk that is read-only or fills up mid-run;
8. greedy rollouts recorded as such.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import pytest
import ray
import yaml
from support.faultproxy import record_figures
from support.gated import (
    DATE,
    REPO,
    WAIT_S,
    GatedActor,
    assert_same_final_state,
    ctl,
    make_job,
    missing_frames,
    spawn_driver,
    steps_table,
    wait_for,
)
from support.smallfs import run_with_small_fs

from pipeline.cli import main
from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.contracts.spec import JobSpec, spec_from_data
from pipeline.contracts.storage import open_storage
from pipeline.driver import run_job
from pipeline.query import sql
from workers.actor.actor import RolloutActor

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.usefixtures("ray_local")


def run(spec: JobSpec, **kwargs: object):  # noqa: ANN201
    return run_job(spec, progress=False, actor_cls=GatedActor, **kwargs)


def with_rollouts(spec: JobSpec, **changes: object) -> JobSpec:
    return spec.model_copy(update={"rollouts": spec.rollouts.model_copy(update=changes)})


def ran(spec: JobSpec) -> list[str]:
    log = ctl(spec) / "ran.log"
    return sorted(log.read_text().split()) if log.exists() else []


@pytest.mark.slow
def test_a_second_driver_is_refused_while_one_runs(tmp_path: Path,
                                                   reference_rows: list[dict],
                                                   capsys: pytest.CaptureFixture) -> None:
    data = make_job(tmp_path, run_id="night")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    spec = spec_from_data(data)
    (ctl(spec) / "hold").touch()
    first = spawn_driver(config)
    try:
        wait_for("the first driver to hold a unit", lambda: any(ctl(spec).glob("waiting-*")))
        holder = f"host {socket.gethostname()} pid {first.pid}"
        attempts = [lambda: run(spec, fresh=True),  # observed: 6 of 12 rollouts lost
                    lambda: run(with_rollouts(spec, steps=5)),  # other settings
                    lambda: run(spec)]
        for attempt in attempts:
            with pytest.raises(UserError, match=f"being run by another driver \\({holder}"):
                attempt()
        config_fresh = main(["run", str(config), "--fresh", "--quiet"])
        assert config_fresh == 2
        assert f"being run by another driver ({holder}" in capsys.readouterr().err
        (ctl(spec) / "hold").unlink()
        assert first.wait(timeout=WAIT_S) == 0
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert ran(spec) == [f"u00000{i}" for i in range(6)]  # each unit ran once, by the first
    assert_same_final_state(spec, reference_rows)
    record_figures("second_driver", tried=len(attempts) + 1, refused=len(attempts) + 1,
                   rows_lost=0)


@pytest.mark.slow
def test_outputs_damaged_under_success_are_found_and_redone(
        tmp_path: Path, reference_rows: list[dict], capsys: pytest.CaptureFixture) -> None:
    spec = spec_from_data(make_job(tmp_path, run_id="night"))
    assert run(spec).complete
    storage = open_storage(spec.output.root)
    rows = steps_table(spec)
    # frames of unit 1's rollouts gone (its frames part); unit 3's steps part gone, marker
    # kept; unit 5's marker cut short (it would read as a smaller unit)
    unit1_rows = [r for r in rows if r["rollout_id"].startswith("seed_1-")]
    (unit1,) = {r["frame_key"] for r in unit1_rows}
    assert unit1 == layout.frames_part_key(DATE, "night", "u000001")
    storage.delete(unit1)
    storage.delete(layout.steps_part_key(DATE, "night", "u000003"))
    marker = layout.commit_key(DATE, "night", "u000005")
    storage.put_bytes(marker, storage.get_bytes(marker)[:40])
    assert main(["verify", spec.output.root, "--run-id", "night"]) == 1
    err = capsys.readouterr().err
    assert f"unit u000001: frames part {unit1} is missing" in err
    assert "unit u000001" in err and "steps part" in err and "u000003" in err
    assert "commit marker of unit u000005 cannot be trusted: not valid JSON" in err
    assert "_SUCCESS is present although" in err
    (ctl(spec) / "ran.log").write_text("")
    summary = run(spec)
    assert summary.complete and summary.units_redone == 3
    assert ran(spec) == ["u000001", "u000003", "u000005"]
    assert any("u000005" in p and "could not be trusted" in p for p in summary.problems)
    assert summary.rollouts_ok == 12 and "3 units redone" in summary.line()
    assert_same_final_state(spec, reference_rows)
    assert main(["verify", spec.output.root, "--run-id", "night"]) == 0
    assert "run night (2026-05-06) ok: 6 units, 48 steps rows" in capsys.readouterr().out
    record_figures("damaged_outputs", damaged=3, redone=3, frames_deleted=len(unit1_rows),
                   rows_lost=0)


@pytest.mark.slow
@pytest.mark.parametrize("frames", ["png", "parquet"])
def test_objects_deleted_from_the_bucket_mid_run_are_rewritten(
        tmp_path: Path, s3_bucket: str, reference_rows: list[dict], frames: str) -> None:
    data = make_job(tmp_path, run_id="night")
    data["output"].update(root=s3_bucket, frames=frames)
    spec = spec_from_data(data)
    storage = open_storage(s3_bucket)
    deleted: list[str] = []

    def delete_first_units_frames(event) -> None:  # noqa: ANN001
        if event.kind == "unit_committed" and event.unit_id == "u000000" and not deleted:
            if frames == "png":
                prefix = layout.run_prefix(layout.FRAMES_DIR, DATE, "night") + "/seed_0-"
                deleted.extend(storage.list_keys(prefix))
            else:
                deleted.append(layout.frames_part_key(DATE, "night", "u000000"))
            for key in deleted:
                storage.delete(key)

    summary = run_job(spec, progress=False, actor_cls=RolloutActor,
                      on_event=delete_first_units_frames)
    # png: two rollouts x (1 seed + 3 generated) frames; parquet: the unit's frames part
    assert len(deleted) == (2 * 4 if frames == "png" else 1)
    assert summary.complete and summary.units_redone == 1
    rows = steps_table(spec)
    if frames == "png":  # the reference run keeps its frames in parts
        assert all(r["frame_key"].endswith(".png") for r in rows)
        rows = [{**r, "frame_key": None} for r in rows]
        reference_rows = [{**r, "frame_key": None} for r in reference_rows]
    assert rows == reference_rows and missing_frames(spec, steps_table(spec)) == []
    assert storage.exists(layout.success_key(DATE, "night"))
    record_figures("deleted_mid_run", deleted=len(deleted), redone=1, rows_lost=0)


@pytest.mark.slow
def test_changed_plan_is_refused_without_a_manifest_and_bad_markers_are_redone(
        tmp_path: Path, reference_rows: list[dict]) -> None:
    spec = spec_from_data(make_job(tmp_path, run_id="night"))
    storage = open_storage(spec.output.root)
    assert run(spec).complete
    manifest = layout.manifest_key(DATE, "night")
    changed = [with_rollouts(spec, steps=30),
               with_rollouts(spec, sampling=spec.rollouts.sampling.model_copy(
                   update={"greedy": True}))]
    refused = 0
    for damage in (lambda: storage.delete(manifest),
                   lambda: storage.put_bytes(manifest, b'{"status": "runn')):
        damage()
        for other in changed:
            with pytest.raises(UserError, match="already has outputs from a different plan"):
                run(other)
            refused += 1
    storage.delete(manifest)
    (ctl(spec) / "ran.log").write_text("")
    again = run(spec)  # the same plan resumes: nothing to redo, the manifest comes back
    assert again.complete and again.units_skipped == 6 and ran(spec) == []
    assert_same_final_state(spec, reference_rows)
    record_figures("changed_plan_without_manifest", tried=refused, refused=refused)


@pytest.mark.slow
def test_a_symlink_inside_the_root_stops_the_run_and_nothing_leaves_the_root(
        tmp_path: Path, reference_rows: list[dict], capsys: pytest.CaptureFixture) -> None:
    data = make_job(tmp_path, run_id="night")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    spec = spec_from_data(data)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    link = Path(spec.output.root) / layout.run_prefix(layout.FRAMES_DIR, DATE, "night")
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    with pytest.raises(UserError, match="refusing to write through the symbolic link"):
        run(spec)
    assert list(outside.iterdir()) == []
    assert not open_storage(spec.output.root).exists(layout.success_key(DATE, "night"))
    link.unlink()
    assert run(spec).complete
    assert_same_final_state(spec, reference_rows)
    assert list(outside.iterdir()) == []
    record_figures("symlink_in_root", tried=1, refused=1, files_outside=0)


def test_inputs_that_would_exhaust_the_machine_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_job(tmp_path, run_id="night")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    rejected = 0
    # a typo in per_seed, and a run_id template with a 100 MB format width
    for override, expect in (("rollouts.per_seed=1000000000", "run.max_rollouts=1000000"),
                             ("run.run_id={date:>100000000}", "no format spec")):
        assert main(["validate", str(config), "--set", override]) == 2
        err = capsys.readouterr().err
        assert expect in err and len(err) < 1000
        rejected += 1
    # 6 seeds x 200,000 rollouts passes validation (it cannot count seeds) but stops
    # before a single unit is planned
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match=r"would plan 1200000 rollouts \(6 seeds x "
                           r"rollouts.per_seed 200000\), more than run.max_rollouts"):
            run(spec_from_data({**data, "rollouts": {**data["rollouts"], "per_seed": 200_000}}))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20
    rejected += 1
    many = spec_from_data({**data, "resources": {**data["resources"], "actors": 40,
                                                 "cpus_per_actor": 0.01}})
    with pytest.raises(UserError, match="40 actors x 1 CPU = 40 CPUs .each actor is a process"):
        run(many)
    rejected += 1
    record_figures("bounded_inputs", tried=rejected, rejected=rejected)


@pytest.mark.slow
def test_an_oversized_seed_file_becomes_failed_rows(tmp_path: Path) -> None:
    data = make_job(tmp_path, run_id="night")
    with open(Path(data["seeds"]["source"]) / "seed_9.png", "wb") as fh:
        fh.truncate(4 * 2**30)  # 4 GiB, sparse: read whole it took 5.6 GB
    data["seeds"]["max_file_mb"] = 64
    data["run"]["max_failed_fraction"] = 0.5
    summary = run(spec_from_data(data))
    assert summary.complete and summary.rollouts_ok == 12 and summary.rollouts_failed == 2
    errors = sql(data["output"]["root"], "SELECT DISTINCT error FROM rollouts "
                 "WHERE status = 'failed'").column("error").to_pylist()
    assert len(errors) == 1 and "seed_9.png is 4096.0 MiB, more than the 64 MiB" in errors[0]
    record_figures("bounded_inputs", tried=1, rejected=1)


def test_greedy_rollouts_are_recorded_as_greedy(tmp_path: Path) -> None:
    data = make_job(tmp_path, run_id="night")
    data["seeds"]["limit"] = 1
    data["rollouts"]["sampling"] = {"greedy": True}
    assert run(spec_from_data(data)).complete
    data["run"]["run_id"] = "sampled"
    data["rollouts"]["sampling"] = {"temperature": 0.9}
    assert run(spec_from_data(data)).complete
    rows = sql(data["output"]["root"], "SELECT run_id, greedy, temperature FROM rollouts "
               "ORDER BY run_id").to_pylist()
    assert {(r["run_id"], r["greedy"]) for r in rows} == {("night", True), ("sampled", False)}


JOB_IN_SMALL_FS = """
export RAY_TMPDIR={ray_tmp}
cd {repo}
{py} -m jobs.run {config} --quiet > {tmp}/readonly.out 2>&1; echo "readonly=$?"
mount -o remount,rw {mount}
{py} -m jobs.run {config} --quiet > {tmp}/full.out 2>&1; echo "full=$?"
mount -o remount,size=64m {mount}
{py} -m jobs.run {config} --quiet > {tmp}/resumed.out 2>&1; echo "resumed=$?"
{py} -m pipeline.cli verify {mount}/out --run-id night > {tmp}/verify.out 2>&1; echo "verify=$?"
"""


@pytest.mark.slow
def test_a_read_only_or_full_disk_stops_the_run_and_it_resumes(tmp_path: Path) -> None:
    mount = tmp_path / "disk"
    data = make_job(tmp_path, run_id="night")
    data["output"]["root"] = str(mount / "out")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    ray_tmp = tempfile.mkdtemp(prefix="wfs-")  # short: Ray's socket paths are limited
    script = f"mount -o remount,ro {mount} && " + JOB_IN_SMALL_FS.format(
        tmp=tmp_path, repo=REPO, py=sys.executable, config=config, mount=mount,
        ray_tmp=ray_tmp)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        done = run_with_small_fs(mount, script, size_kb=96, timeout=500, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    codes = dict(line.split("=") for line in done.stdout.split())
    out = {name: (tmp_path / f"{name}.out").read_text() for name in codes}
    assert codes["readonly"] == "2", out["readonly"][-2000:]
    assert f"output folder {mount}/out is not writable (Read-only file system)" in \
        out["readonly"]
    assert codes["full"] == "2", out["full"][-2000:]
    assert f"output root {mount}/out is full" in out["full"]
    assert "rerun the same command to resume" in out["full"]
    assert "Traceback" not in out["full"] + out["readonly"]
    assert codes["resumed"] == "0", out["resumed"][-3000:]
    assert "run night complete: this attempt" in out["resumed"]
    assert "run total 12 rollouts ok, 0 failed" in out["resumed"]
    assert codes["verify"] == "0", out["verify"]
    record_figures("storage_full", tried=2, stopped_cleanly=2, resumed=1, rows_lost=0)


def test_lease_is_released_and_a_killed_drivers_lease_is_taken_over(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = spec_from_data(make_job(tmp_path, run_id="night"))
    storage = open_storage(spec.output.root)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    storage.put_bytes(layout.lease_key(DATE, "night"), json.dumps({
        "host": socket.gethostname(), "pid": dead.pid, "token": "x", "heartbeat": 1e18,
        "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip()}).encode())
    with caplog.at_level("WARNING", logger="pipeline.driver"):
        spec1 = spec.model_copy(update={"run": spec.run.model_copy(update={"max_rollouts": 1})})
        with pytest.raises(UserError, match="max_rollouts"):
            run(spec1)  # the lease is taken over, then the plan is refused: lease released
    assert f"taking over the lease of host {socket.gethostname()} pid {dead.pid}" in caplog.text
    assert not storage.exists(layout.lease_key(DATE, "night"))
