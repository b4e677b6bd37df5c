"""End to end on real local Ray and a real S3 endpoint (moto on loopback), tiny model."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import ray
import yaml
from PIL import Image

from pipeline.cli import main as cli_main
from pipeline.contracts.errors import UserError
from pipeline.contracts.layout import (
    FRAMES_SCHEMA,
    ROLLOUTS_SCHEMA,
    STEPS_SCHEMA,
    commits_prefix,
    frames_part_key,
    manifest_key,
    rollouts_part_key,
    steps_part_key,
    success_key,
)
from pipeline.contracts.parts import check_part
from pipeline.contracts.spec import JobSpec, spec_from_data
from pipeline.contracts.storage import open_storage
from pipeline.driver import actor_name, run_job
from workers.actor.actor import RolloutActor

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "seeds" / "demo"
DATE = "2026-01-02"
pytestmark = pytest.mark.usefixtures("ray_local")


def make_seeds(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pictures = sorted(DEMO.glob("*.png"))
    for i in range(n):
        shutil.copy(pictures[i % len(pictures)], folder / f"seed_{i:02d}.png")
    return folder


def job_data(tmp_path: Path, root: str, **sections: dict) -> dict:
    data = {
        "run": {"name": "e2e", "run_id": "e2e-{date}", "run_date": DATE},
        "model": {"preset": "tiny", "device": "cpu"},
        "seeds": {"source": str(tmp_path / "seeds")},
        "rollouts": {"steps": 4, "per_seed": 2},
        "resources": {"actors": 2, "cpus_per_actor": 1, "batch_size": 4},
        "output": {"root": root, "previews": True},
    }
    for key, value in sections.items():
        data[key] = {**data[key], **value}
    return data


def steps_rows(spec: JobSpec):
    fs, base = open_storage(spec.output.root).arrow_fs()
    dataset = ds.dataset(f"{base}/steps", filesystem=fs, partitioning="hive")
    return dataset.to_table(filter=ds.field("run_id") == spec.run.run_id)


def assert_no_duplicate_steps(spec: JobSpec) -> None:
    table = steps_rows(spec)
    counts = table.group_by(["rollout_id", "step"]).aggregate([("step", "count")])
    assert pc.max(counts.column("step_count")).as_py() == 1


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_local_and_s3_roots(tmp_path: Path, where: str, request: pytest.FixtureRequest) -> None:
    make_seeds(tmp_path / "seeds", 12)
    root = str(tmp_path / "out") if where == "local" else request.getfixturevalue("s3_bucket")
    spec = spec_from_data(job_data(tmp_path, root))
    summary = run_job(spec, actor_cls=RolloutActor, progress=False)
    assert summary.complete and summary.ok
    assert (summary.rollouts_ok, summary.rollouts_failed, summary.generated_frames) == (24, 0, 96)
    storage = open_storage(root)
    run_id = spec.run.run_id
    assert storage.exists(success_key(DATE, run_id)) and storage.exists(manifest_key(DATE, run_id))
    # every declared table row, exactly once
    steps = steps_rows(spec)
    assert steps.num_rows == 24 * (1 + 4)
    fs, base = storage.arrow_fs()
    rollouts = ds.dataset(f"{base}/rollouts", filesystem=fs, partitioning="hive").to_table(
        filter=(ds.field("run_id") == run_id) & (ds.field("run_date") == DATE))
    assert rollouts.num_rows == 24 and set(rollouts.column("status").to_pylist()) == {"ok"}
    assert ds.dataset(f"{base}/steps", filesystem=fs, partitioning="hive").to_table(
        filter=ds.field("run_id") == "other").num_rows == 0
    assert_no_duplicate_steps(spec)
    # Parquet parts carry exactly the declared schemas
    units = [k.rsplit("/", 1)[1].removesuffix(".json")
             for k in storage.list_keys(commits_prefix(DATE, run_id))]
    assert len(units) == summary.units_total == 6
    for uid in units:
        key = steps_part_key(DATE, run_id, uid)
        part = pq.read_table(io.BytesIO(storage.get_bytes(key)))
        assert part.schema.equals(STEPS_SCHEMA)
        check_part(key, part.schema.metadata)  # and it says it is this unit's part
        key = rollouts_part_key(DATE, run_id, uid)
        part = pq.read_table(io.BytesIO(storage.get_bytes(key)))
        assert part.schema.equals(ROLLOUTS_SCHEMA)
        check_part(key, part.schema.metadata)
        key = frames_part_key(DATE, run_id, uid)
        part = pq.read_table(io.BytesIO(storage.get_bytes(key)))
        assert part.schema.equals(FRAMES_SCHEMA)
        check_part(key, part.schema.metadata)
        assert part.num_rows == 4 * (1 + 4)  # frames: parquet (the default), one per step row
        for png in part.column("png").to_pylist():
            image = Image.open(io.BytesIO(png))
            assert image.format == "PNG" and image.size == (16, 16)
    assert set(steps.column("frame_key").to_pylist()) == {
        frames_part_key(DATE, run_id, uid) for uid in units}


def _commits(spec: JobSpec) -> list[str]:
    return list(open_storage(spec.output.root).list_keys(
        commits_prefix(DATE, spec.run.run_id)))


@pytest.mark.slow
def test_resume_after_the_driver_is_killed(tmp_path: Path) -> None:
    make_seeds(tmp_path / "seeds", 12)
    data = job_data(tmp_path, str(tmp_path / "out"),
                    rollouts={"steps": 6}, output={"previews": False},
                    resources={"actors": 1, "rollouts_per_unit": 2, "batch_size": 2})
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    spec = spec_from_data(data)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.run", str(config), "--quiet"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _commits(spec) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the driver ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_before = len(_commits(spec))
    assert 1 <= done_before < 12
    summary = run_job(spec, actor_cls=RolloutActor, progress=False)
    assert summary.complete and summary.units_skipped >= done_before
    assert summary.rollouts_ok == 24 and len(_commits(spec)) == 12
    assert steps_rows(spec).num_rows == 24 * 7
    assert_no_duplicate_steps(spec)


@pytest.mark.slow
def test_actor_killed_mid_unit(tmp_path: Path) -> None:
    make_seeds(tmp_path / "seeds", 12)
    spec = spec_from_data(job_data(
        tmp_path, str(tmp_path / "out"), rollouts={"steps": 6}, output={"previews": False},
        resources={"actors": 1, "rollouts_per_unit": 2, "batch_size": 2, "max_restarts": 2}))
    events: list = []
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(
        summary=run_job(spec, actor_cls=RolloutActor, progress=False, on_event=events.append)))
    thread.start()
    deadline = time.monotonic() + 120
    while not _commits(spec) and time.monotonic() < deadline:
        time.sleep(0.02)
    ray.kill(ray.get_actor(actor_name(spec.run.run_id, 0)), no_restart=False)
    thread.join(timeout=240)
    assert not thread.is_alive()
    summary = result["summary"]
    assert summary.complete and (summary.rollouts_ok, summary.rollouts_failed) == (24, 0)
    assert any(e.kind == "unit_retried" for e in events)
    assert steps_rows(spec).num_rows == 24 * 7
    assert_no_duplicate_steps(spec)


def test_bad_inputs_fail_before_any_actor(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    make_seeds(tmp_path / "seeds", 2)
    out = str(tmp_path / "out")
    cases = {
        "model.checkpoint: ": {"model": {"preset": None, "checkpoint": str(tmp_path / "nope")}},
        "seeds.source: no seeds found": {"seeds": {"source": str(tmp_path / "empty")}},
        "is not writable": {"output": {"root": str(tmp_path / "seeds" / "seed_00.png" / "o")}},
        "model.preset: unknown preset": {"model": {"preset": "huge"}},
    }
    (tmp_path / "empty").mkdir()
    for expected, sections in cases.items():
        spec = spec_from_data(job_data(tmp_path, out, **sections))
        with pytest.raises(UserError) as info:
            run_job(spec, actor_cls=RolloutActor, progress=False)
        message = str(info.value)
        assert expected in message, message
    # through the CLI: exit status 2, one clear line, no traceback
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(job_data(tmp_path, out, **cases["model.checkpoint: "])))
    assert cli_main(["run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "model.checkpoint" in err and "Traceback" not in err
    assert not Path(out).exists() or not any(Path(out).rglob("*.parquet"))


@pytest.mark.slow
def test_corrupt_seed_and_hostile_names(tmp_path: Path) -> None:
    seeds = make_seeds(tmp_path / "seeds", 3)
    (seeds / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (seeds / "odd name.png").write_bytes((DEMO / "scene_01.png").read_bytes())
    manifest = tmp_path / "seeds.csv"
    manifest.write_text("uri,seed_id\n"
                        "seeds/seed_00.png,../../escape me\n"
                        "seeds/odd name.png,\n"
                        "seeds/seed_01.png,..\n"
                        "seeds/broken.png,broken\n")
    root = tmp_path / "out"
    spec = spec_from_data(job_data(
        tmp_path, str(root), seeds={"source": str(manifest), "format": "manifest"},
        run={"max_failed_fraction": 0.3}, resources={"actors": 1}))
    summary = run_job(spec, actor_cls=RolloutActor, progress=False)
    assert summary.complete and (summary.rollouts_ok, summary.rollouts_failed) == (6, 2)
    assert summary.ok  # 2/8 failed is inside the 0.3 budget
    fs, base = open_storage(str(root)).arrow_fs()
    rollouts = ds.dataset(f"{base}/rollouts", filesystem=fs, partitioning="hive").to_table()
    failed = [r for r in rollouts.to_pylist() if r["status"] == "failed"]
    assert {r["seed_id"] for r in failed} == {"broken"}
    assert all("broken" in r["error"] for r in failed)
    for rid in rollouts.column("rollout_id").to_pylist():
        assert "/" not in rid and ".." not in rid.replace("...", "") and " " not in rid
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(p.is_relative_to(root) or p.is_relative_to(tmp_path / "seeds")
               or p in (manifest,) for p in written)
    # with a zero failure budget the same outputs make the CLI exit 1
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    assert cli_main(["run", str(config), "--quiet", "--set", "run.max_failed_fraction=0"]) == 1
