"""What a new user meets first: paths that mean the same from any folder, `validate` that
checks them, a schema, `--version`, a Ray connection that fails fast and stops on SIGTERM,
quiet and honest run output, and one rule for the exit status, `runs` and `_SUCCESS`."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from support.procs import free_port

from pipeline.cli import main as cli_main
from pipeline.contracts.layout import manifest_key, success_key
from pipeline.contracts.spec import load_spec
from pipeline.contracts.storage import open_storage
from pipeline.driver.run_state import list_runs

REPO = Path(__file__).resolve().parents[2]
DEMO_SEEDS = REPO / "configs" / "seeds" / "demo"
DATE = "2026-01-02"
CLI_TIMEOUT_S = 180.0


def wham_batch(*args: str, cwd: Path, env: dict[str, str] | None = None,
               timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`wham-batch ARGS` in a child process with no cluster named in its environment."""
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd,
                          env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def write_job(folder: Path, *, seeds: int = 2, broken: int = 0, **output: object) -> Path:
    """A tiny-model job YAML with relative paths (seeds/, out/) in `folder`."""
    seed_dir = folder / "seeds"
    seed_dir.mkdir(parents=True, exist_ok=True)
    pictures = sorted(DEMO_SEEDS.glob("*.png"))
    for i in range(seeds):
        (seed_dir / f"s{i:02d}.png").write_bytes(pictures[i % len(pictures)].read_bytes())
    for i in range(broken):
        (seed_dir / f"zz_broken_{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    data = {
        "run": {"name": "ux", "run_id": "ux-{date}", "run_date": DATE},
        "model": {"preset": "tiny", "device": "cpu"},
        "seeds": {"source": "seeds"},
        "rollouts": {"steps": 2, "per_seed": 1},
        "resources": {"actors": 1, "cpus_per_actor": 1, "batch_size": 4,
                      "rollouts_per_unit": 1},
        "output": {"root": "out", "previews": False, **output},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------- paths


def test_yaml_paths_are_relative_to_the_yaml_and_set_paths_to_the_current_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_job(tmp_path / "project")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = load_spec(config)
    assert spec.seeds.source == str(tmp_path / "project" / "seeds")
    assert spec.output.root == str(tmp_path / "project" / "out")
    spec = load_spec(config, ["output.root=mine", "seeds.source=s3://bucket/seeds"])
    assert spec.output.root == str(elsewhere / "mine")
    assert spec.seeds.source == "s3://bucket/seeds"


def test_the_demo_config_and_eval_demo_work_from_any_folder(tmp_path: Path) -> None:
    validated = wham_batch("validate", str(REPO / "configs" / "demo.yaml"), cwd=tmp_path)
    assert validated.returncode == 0, validated.stderr
    spec = yaml.safe_load(validated.stdout)
    assert spec["model"]["checkpoint"] == str(REPO / "models" / "demo")
    assert spec["output"]["root"] == str(REPO / "out" / "demo")
    evaluated = wham_batch("eval-demo", "--clips", "1", "--context", "2", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "| 1 |" in evaluated.stdout


# ---------------------------------------------------------------- validate, schema, version


def test_validate_checks_local_paths_and_suggests_close_keys(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_job(tmp_path)
    assert cli_main(["validate", str(config)]) == 0
    missing = ["model.checkpoint=no-such-model", "model.preset=null",
               "seeds.source=no-seeds"]
    assert cli_main(["validate", str(config), *[a for m in missing for a in ("--set", m)]]) == 2
    err = capsys.readouterr().err
    assert f"model.checkpoint: {Path.cwd() / 'no-such-model'} does not exist" in err
    assert "seeds.source:" in err and "Traceback" not in err
    assert cli_main(["validate", str(config), "--no-path-check", "--set", missing[2]]) == 0
    assert cli_main(["validate", str(config), "--set", "seeds.source=s3://b/seeds"]) == 0
    assert "seeds.source not checked (s3://)" in capsys.readouterr().err
    assert cli_main(["validate", str(config), "--set", "output.previw=true",
                     "--set", "run.max_failed_fracton=0.1"]) == 2
    err = capsys.readouterr().err
    assert "output.previw: unknown key; did you mean `output.previews`?" in err
    assert "did you mean `run.max_failed_fraction`?" in err


def test_validate_schema_is_a_json_schema_of_the_job_yaml(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["validate", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema["required"]) >= {"run", "model", "seeds", "rollouts", "output"}
    output = schema["$defs"]["OutputSection"]["properties"]
    assert output["previews"]["default"] is True
    assert output["preview_scale"]["default"] == "auto"
    assert all("description" in field for field in output.values())


def test_previews_default_to_auto_scale(tmp_path: Path) -> None:
    spec = load_spec(write_job(tmp_path))
    assert spec.output.preview_scale == "auto"
    data = yaml.safe_load((tmp_path / "job.yaml").read_text())
    del data["output"]["previews"]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    assert load_spec(tmp_path / "job.yaml").output.previews is True


def test_version_names_the_software_and_never_needs_git(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline
    from pipeline.contracts import versions

    shown = wham_batch("--version", cwd=tmp_path)
    assert shown.returncode == 0
    assert shown.stdout.startswith(f"wham-batch {pipeline.__version__} (torch ")
    for name in ("ray ", "pyarrow ", "python "):
        assert name in shown.stdout
    no_git = wham_batch("--version", cwd=tmp_path, env={"PATH": str(tmp_path)})
    assert no_git.returncode == 0 and "commit" not in no_git.stdout
    monkeypatch.setenv(versions.GIT_COMMIT_ENV, "abc123+dirty")
    assert versions.git_commit() == {"commit": "abc123", "dirty": True}


# ---------------------------------------------------------------- Ray connection


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port whose accept queue is full: a connection there never completes,
    like an address whose packets are dropped."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        filler = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            yield port
        finally:
            filler.close()


def test_run_against_an_unreachable_address_fails_within_its_timeout(
        tmp_path: Path, silent_port: int) -> None:
    config = write_job(tmp_path)
    start = time.monotonic()
    result = wham_batch("run", str(config), "--address", f"127.0.0.1:{silent_port}",
                        "--connect-timeout", "3", cwd=tmp_path)
    took = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    assert f"cannot reach the Ray cluster at 127.0.0.1:{silent_port} (--address): no answer " \
           "within 3s" in result.stderr
    assert "Traceback" not in result.stderr
    assert took < 60  # Ray's own retries take 10+ minutes against such an address
    closed = wham_batch("run", str(config), cwd=tmp_path,
                        env={"RAY_ADDRESS": f"127.0.0.1:{free_port()}"})
    assert closed.returncode == 2 and "(RAY_ADDRESS)" in closed.stderr
    dashboard = wham_batch("run", str(config), "--address", "http://127.0.0.1:8265",
                           cwd=tmp_path)
    assert dashboard.returncode == 2
    assert "wham-batch submit CONFIG --address http://127.0.0.1:8265" in dashboard.stderr


def test_sigterm_stops_a_run_waiting_for_its_cluster(tmp_path: Path, silent_port: int) -> None:
    config = write_job(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", str(config), "--address",
         f"127.0.0.1:{silent_port}", "--connect-timeout", "300"], cwd=tmp_path,
        stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    try:
        waiting = ""
        while "connecting to the Ray cluster" not in waiting:
            line = proc.stderr.readline()
            assert line, f"the run ended before it waited: {waiting}"
            waiting += line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
        assert "stopped (SIGTERM)" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


# ---------------------------------------------------------------- run output and exit status


@pytest.mark.usefixtures("ray_local")
def test_resumed_run_reports_this_attempt_and_the_run_totals_apart(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_job(tmp_path, seeds=2)
    assert cli_main(["run", str(config)]) == 0
    out = capsys.readouterr().out
    assert "run ux-2026-01-02 complete: 2 rollouts ok, 0 failed, 4 generated frames (6 " \
           "frames stored, context included) in" in out
    (tmp_path / "out" / f"_runs/run_date={DATE}/run_id=ux-2026-01-02/commits/u000001.json"
     ).unlink()
    assert cli_main(["run", str(config)]) == 0
    out = capsys.readouterr().out
    assert "run ux-2026-01-02 complete: this attempt 1 rollout, 2 generated frames in" in out
    assert "(1 of 2 units were committed before); run total 2 rollouts ok, 0 failed, " \
           "4 generated frames" in out
    assert out.count("complete") == 1  # one summary, not a log line and a print
    assert cli_main(["run", str(config), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "nothing left to generate (2 of 2 units were committed before)" in captured.out
    assert "try:" not in captured.out and " INFO " not in captured.err
    assert "WHAM_LOG_LEVEL" not in os.environ  # quiet actors get it through Ray, not from us
    manifest = json.loads((tmp_path / "out" / manifest_key(DATE, "ux-2026-01-02")).read_text())
    assert manifest["attempt"] == {"rollouts": 0, "generated_frames": 0, "stored_frames": 0,
                                   "units": 0}
    assert (manifest["counts"]["generated_frames"], manifest["counts"]["stored_frames"]) == (4, 6)
    software = manifest["software"]
    assert {"wham_batch", "torch", "ray", "pyarrow", "python", "git"} <= set(software)
    assert software["ray"] and software["python"].startswith("3.")


@pytest.mark.usefixtures("ray_local")
def test_exit_status_runs_and_success_marker_agree(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_job(tmp_path, seeds=2, broken=1)
    root = str(tmp_path / "out")
    code = cli_main(["run", str(config), "--set", "run.max_failed_fraction=0"])
    captured = capsys.readouterr()
    assert code == 1
    assert "run ux-2026-01-02 FAILED (1 of 3 rollouts failed, more than " \
           "run.max_failed_fraction=0)" in captured.out
    assert "rollouts failed: seed zz_broken_0:" in captured.err  # the bad seed, with its error
    assert "{'" not in captured.err  # no dict reprs (actor start-up, receipts)
    (run,) = list_runs(root)
    assert run.status == "failed"
    storage = open_storage(root)
    assert not storage.exists(success_key(DATE, "ux-2026-01-02"))
    # A rerun finds every unit committed and the same verdict; --fresh after a fix works.
    assert cli_main(["run", str(config), "--set", "run.max_failed_fraction=0"]) == 1
    (tmp_path / "seeds" / "zz_broken_0.png").unlink()
    assert cli_main(["run", str(config), "--fresh"]) == 0
    (run,) = list_runs(root)
    assert run.status == "complete" and storage.exists(success_key(DATE, "ux-2026-01-02"))
    # Within the budget a failed rollout still makes a complete run that exits 0.
    write_job(tmp_path, seeds=2, broken=1)
    assert cli_main(["run", str(config), "--fresh", "--set", "run.max_failed_fraction=0.5"]) == 0
    assert list_runs(root)[0].status == "complete"
    # A query for a run id that is not there says so instead of printing no rows.
    capsys.readouterr()
    assert cli_main(["query", root, "--table", "rollouts", "--run-id", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--run-id nope: no such run" in err and "ux-2026-01-02" in err
    assert cli_main(["query", root, "--table", "rollouts", "--run-id", "ux-2026-01-02",
                     "--columns", "seed_id,status"]) == 0


# ---------------------------------------------------------------- watermark


def test_dream_gif_marks_small_frames_like_the_pipeline_previews(tmp_path: Path) -> None:
    from workers.actor.encode import auto_preview_scale, encode_gif

    clip = REPO / "configs" / "seeds" / "toygame" / "clip_1000000.npz"
    result = wham_batch("dream", "--checkpoint", str(REPO / "models" / "demo"), "--context",
                        str(clip), "--steps", "1", "--greedy", "--out", "d.npz", "--gif",
                        "d.gif", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    generated = np.load(tmp_path / "d.npz")["images"][0, 0]  # (3,32,32) uint8
    assert generated.shape == (3, 32, 32)
    with Image.open(tmp_path / "d.gif") as gif:
        gif.seek(gif.n_frames - 1)
        dreamt = np.asarray(gif.convert("RGB")).astype(int)
    scale = auto_preview_scale(32, 32)
    assert scale > 1 and dreamt.shape == (32 * scale, 32 * scale, 3)
    # The same frame as a pipeline preview (preview_scale: auto) with and without the mark.
    marked, plain = (np.asarray(Image.open(io.BytesIO(encode_gif(
        [(generated, True)], scale=scale, watermark=w, comment=""))).convert("RGB")).astype(int)
        for w in (True, False))
    mark = np.abs(marked - plain).max(axis=2) > 60
    in_dream = np.abs(dreamt - plain).max(axis=2) > 60  # GIF palettes differ by a few levels
    assert mark.any(), "the mark must be visible"
    np.testing.assert_array_equal(in_dream, mark)  # dream marks exactly where the pipeline does
    ys, xs = np.nonzero(mark)
    assert mark.mean() < 0.1  # a corner mark, not a third of the frame
    assert ys.min() > dreamt.shape[0] * 0.8 and xs.min() > dreamt.shape[1] * 0.25


# ---------------------------------------------------------------- progress off a terminal


def test_progress_off_a_terminal_logs_at_least_every_five_seconds(
        caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.contracts.plan import UnitReceipt
    from pipeline.driver.progress import LOG_EVERY_S, Progress, StatusLine, Totals

    assert LOG_EVERY_S <= 5
    now = [0.0]
    prog = Progress(run_id="r", totals=Totals(rollouts_total=4), tty=False,
                    clock=lambda: now[0])
    with caplog.at_level("INFO", logger="pipeline.driver"):
        prog.start(actors=2)
        for second in range(1, 12):  # the scheduler ticks about once a second
            now[0] = float(second)
            prog.tick()
        starting = [r.getMessage() for r in caplog.records]
        assert len(starting) == 3  # at 0 s, 5 s and 10 s
        assert starting[-1] == "r: starting actors (loading the model): 0/2 ready, 10s"
        prog.actor_ready("actor-000")
        prog.unit_done(UnitReceipt(unit_id="u000000", ok=1, failed=1, generated_frames=3, tokens=0,
                                   generate_seconds=0.1, write_seconds=0.0, worker="w"))
        now[0] = 16.0
        prog.tick()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1].startswith("r: 2/4 rollouts (1 failed), 3 generated frames this attempt")
    # A blocking step (Ray starting) logs too, from its own thread.
    caplog.clear()
    with caplog.at_level("INFO", logger="pipeline.driver"), \
            StatusLine("starting something", log_every_s=0.1, stream=io.StringIO()):
        deadline = time.monotonic() + 20
        while len(caplog.records) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "starting something ..."
    assert messages[1].startswith("starting something, ") and messages[1].endswith("s ...")


def test_a_storage_failure_is_a_clean_error_without_credentials(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli.command import failure_status

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-0123456789")
    status = failure_status(OSError("PUT https://bucket/key?sig=s3cr3t-value-0123456789: "
                                    "SlowDown after 5 attempts"))
    err = capsys.readouterr().err
    assert status == 2 and "storage or network failure" in err and "SlowDown" in err
    assert "s3cr3t-value" not in err and "Traceback" not in err and "resumes" in err
