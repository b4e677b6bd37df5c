"""Submitting jobs to a real Ray head (a `ray start --head` child process) writing to S3.

One head serves the whole module: it runs in a private RAY_TMPDIR on free loopback ports,
inherits the loopback S3 endpoint and dummy credentials from `s3_server` (the way a real
cluster gets them from its own environment), and is stopped by its session at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.procs import free_port, session_pids

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
HEAD_START_TIMEOUT_S = 90.0
CLI_TIMEOUT_S = 180.0
# Small enough for two CPUs: 2 seeds x 1 rollout x 2 generated steps of the tiny model.
SMALL_RUN = ["rollouts.per_seed=1", "rollouts.steps=2", "seeds.limit=2",
             "output.previews=false"]


def _stop_head(proc: subprocess.Popen) -> None:
    # Ray's workers live in their own process groups but in the head's session: stop the
    # group first (lets Ray clean up), then anything left in the session, all by pid.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=2)
    for pid in session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    if proc.poll() is None:
        proc.wait(timeout=10)


def _head_env(tmp: Path, *, auth: str = "disabled", token: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE=auth,
        RAY_USAGE_STATS_ENABLED="0",
        RAY_TMPDIR=str(tmp),
        # Export custom metrics quickly so the test sees them within seconds.
        RAY_metrics_report_interval_ms="500",
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        VIRTUAL_ENV=str(VENV_BIN.parent),
    )
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    return env


@contextlib.contextmanager
def running_head(*, auth: str = "disabled", token: str | None = None) -> Iterator[dict]:
    """A head in its own short temp dir (Ray's socket paths must stay under 108 bytes);
    yields {address (dashboard URL), metrics_port, gcs_port, tmp} once the Jobs API
    answers, stops it afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="wray-"))
    try:
        proc, head = _start_head(tmp, auth=auth, token=token)
        try:
            yield head
        finally:
            _stop_head(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _start_head(tmp: Path, *, auth: str, token: str | None) -> tuple[subprocess.Popen, dict]:
    dashboard, metrics, gcs = free_port(), free_port(), free_port()
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--num-cpus=2", "--num-gpus=0",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}", f"--port={gcs}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={metrics}", "--block",
    ]
    log = open(tmp / "head.log", "wb")  # noqa: SIM115 - lives as long as the head
    proc = subprocess.Popen(cmd, env=_head_env(tmp, auth=auth, token=token), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    probe = urllib.request.Request(f"{url}/api/version", headers={
        "Authorization": f"Bearer {token}"} if token else {})
    while True:
        try:
            with urllib.request.urlopen(probe, timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_head(proc)
            raise RuntimeError(f"ray head did not start:\n{(tmp / 'head.log').read_text()[-3000:]}")
        time.sleep(0.3)
    return proc, {"address": url, "metrics_port": metrics, "gcs_port": gcs, "tmp": tmp}


@pytest.fixture(scope="module")
def ray_head(s3_server: str) -> Iterator[dict]:
    with running_head() as head:
        yield head


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT_S
        ) -> subprocess.CompletedProcess:
    """Run `wham-batch ARGS` in a child process, from the project folder."""
    base = {k: v for k, v in os.environ.items()
            if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH")}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT,
                          env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def wb(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess:
    """Run `wham-batch ARGS` in this process (cheaper than a child for quick commands)."""
    from pipeline.cli import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out.out, out.err)


def scrape(port: int, name: str, run_id: str) -> dict[str, float]:
    """Prometheus series `name` of `run_id` from a node's metrics endpoint: labels -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    series = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and f'run_id="{run_id}"' in line:
            labels, _, value = line.rpartition(" ")
            series[labels] = float(value)
    return series


def wait_for_metric(port: int, name: str, run_id: str, *, total: float,
                    timeout_s: float = 30.0) -> dict[str, float]:
    """Series of `name` once their values add up to `total` (export is periodic)."""
    deadline = time.monotonic() + timeout_s
    while True:
        series = scrape(port, name, run_id)
        if sum(series.values()) == total or time.monotonic() > deadline:
            return series
        time.sleep(0.5)


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _client(address: str):  # noqa: ANN202 - ray's client type, imported lazily
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


# ---------------------------------------------------------------- without a cluster


def test_env_passthrough_refuses_secrets() -> None:
    from pipeline.contracts.errors import UserError
    from pipeline.submit import job_env_vars

    environ = {"AWS_REGION": "eu-west-1", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
               "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "MY_FLAG": "1", "HOME": "/home/x"}
    env = job_env_vars(["MY_FLAG", "OTHER=2"], environ=environ)
    assert env == {"AWS_REGION": "eu-west-1", "MY_FLAG": "1", "OTHER": "2"}
    for bad in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "RAY_AUTH_TOKEN=x",
                "GITHUB_TOKEN=y", "DB_PASSWORD=z"):
        with pytest.raises(UserError, match="secret"):
            job_env_vars([bad], environ=environ)
    with pytest.raises(UserError, match="not set"):
        job_env_vars(["NOT_THERE"], environ=environ)


def test_credentials_in_set_values_are_refused() -> None:
    from pipeline.contracts.errors import UserError
    from pipeline.submit import build_submission

    with pytest.raises(UserError, match="credentials"):
        build_submission(ROOT / "configs" / "demo.yaml", working_dir=ROOT, overrides=[
            "output.endpoint_url=http://minio:s3cr3t@127.0.0.1:9000"])


def test_auth_headers_follow_ray_token_sources(tmp_path: Path) -> None:
    from pipeline.contracts.errors import UserError
    from pipeline.submit import auth_headers

    home = tmp_path / "home"
    assert auth_headers({"HOME": str(home)}) == {}
    assert auth_headers({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "t1"}) == {}
    assert auth_headers({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "t1"}) == {
        "Authorization": "Bearer t1"}
    token_file = tmp_path / "token"
    token_file.write_text("t2\n")
    assert auth_headers({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}) == {
        "Authorization": "Bearer t2"}
    with pytest.raises(UserError, match="no token found"):
        auth_headers({"RAY_AUTH_MODE": "token", "HOME": str(home)})
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("t3")
    assert auth_headers({"RAY_AUTH_MODE": "token", "HOME": str(home)}) == {
        "Authorization": "Bearer t3"}



def test_a_ray_token_file_is_read_like_a_key_file(tmp_path: Path) -> None:
    """A token file that is a FIFO blocked the command for good, and one of 5,000 bytes (or
    /dev/zero, without end) was read whole and sent as the token."""
    from pipeline.contracts.errors import UserError
    from pipeline.submit import auth_headers

    big = tmp_path / "big"
    big.write_bytes(b"t" * 5000)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, said in ((big, "larger than 4096 bytes"), (fifo, "not a regular file")):
        got: list[object] = []

        def read(path: Path = path, got: list = got) -> None:
            try:
                got.append(auth_headers({"RAY_AUTH_TOKEN_PATH": str(path)}))
            except UserError as exc:
                got.append(exc)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout=10)
        if reader.is_alive():  # blocked on the FIFO: let it go before failing
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            pytest.fail(f"reading the token file {path} blocked")
        assert isinstance(got[0], UserError) and said in str(got[0]), got
        assert f"RAY_AUTH_TOKEN_PATH {path}" in str(got[0])

def test_submission_layout_for_project_outside_and_image_configs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.contracts.errors import UserError
    from pipeline.submit import build_submission

    monkeypatch.chdir(ROOT / "configs")  # a --set path is relative to the current folder
    inside = build_submission(ROOT / "configs" / "demo.yaml", working_dir=ROOT, overrides=[
        "rollouts.steps=3", "output.root=s3://bucket/out", "seeds.source=seeds/demo"])
    assert inside.runtime_env["working_dir"] == str(ROOT)
    assert {".venv", ".git", "out"} <= set(inside.runtime_env["excludes"])
    # The uploaded seeds are re-sent relative to the project folder, where the job starts;
    # the demo's checkpoint (relative to its YAML) needs nothing.
    assert inside.entrypoint.startswith(
        "python -m jobs.run configs/demo.yaml --set rollouts.steps=3 --set "
        "output.root=s3://bucket/out --set seeds.source=seeds/demo --set "
        "seeds.source=configs/seeds/demo --set run.run_date=")
    assert "model.checkpoint" not in inside.entrypoint
    assert inside.output_root == "s3://bucket/out"
    outside_cfg = tmp_path / "my job.yaml"
    shutil.copy(ROOT / "configs" / "demo.yaml", outside_cfg)
    outside = build_submission(outside_cfg, working_dir=ROOT, absolute_paths=True)
    try:
        staged = Path(outside.runtime_env["working_dir"])
        assert sorted(p.name for p in staged.iterdir()) == ["my job.yaml"]
        assert outside.runtime_env["py_modules"] == [str(ROOT / n) for n in
                                                     ("pipeline", "workers", "jobs")]
        assert "'my job.yaml'" in outside.entrypoint
        # Its relative paths meant files next to it here: they go as absolute paths.
        for field, path in (("model.checkpoint", tmp_path.parent / "models" / "demo"),
                            ("seeds.source", tmp_path / "seeds" / "toygame"),
                            ("output.root", tmp_path.parent / "out" / "demo")):
            assert f"--set {field}={path}" in outside.entrypoint.replace("'", "")
    finally:
        outside.remove_staging()
    assert not staged.exists()
    # A config the upload would leave out is refused instead of failing on the cluster.
    project = tmp_path / "project"
    for name in ("pipeline", "workers", "jobs"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").touch()
    (project / "out").mkdir()
    shutil.copy(ROOT / "configs" / "demo.yaml", project / "out" / "job.yaml")
    with pytest.raises(UserError, match="would not be uploaded"):
        build_submission(project / "out" / "job.yaml", working_dir=project)
    image = build_submission(ROOT / "configs" / "demo.yaml", image_has_package=True,
                             absolute_paths=True)
    image.remove_staging()
    assert "py_modules" not in image.runtime_env and "excludes" not in image.runtime_env
    assert f"--set model.checkpoint={ROOT / 'models' / 'demo'}" in image.entrypoint


def test_relative_output_root_or_lost_input_is_refused_with_what_to_use(tmp_path: Path) -> None:
    from pipeline.contracts.errors import UserError
    from pipeline.submit import build_submission

    with pytest.raises(UserError) as refused:  # the demo writes to ../out/demo
        build_submission(ROOT / "configs" / "demo.yaml", working_dir=ROOT)
    message = str(refused.value)
    assert "output.root: '../out/demo' is a relative path" in message
    assert "Ray's temporary copy of the upload" in message
    assert "--set output.root=s3://bucket/prefix" in message and "--absolute-paths" in message
    assert "model.checkpoint" not in message  # travels with the project folder
    outside = tmp_path / "job.yaml"
    shutil.copy(ROOT / "configs" / "demo.yaml", outside)
    with pytest.raises(UserError) as refused:
        build_submission(outside, working_dir=ROOT, overrides=["output.root=s3://b/p"])
    message = str(refused.value)
    assert "model.checkpoint: '../models/demo' is a relative path and it is not uploaded" \
        in message
    assert "seeds.source: 'seeds/toygame'" in message and "output.root" not in message


def test_status_without_a_cluster_fails_fast_with_a_message(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # RAY_ADDRESS as `ray.init` users set it (a GCS HOST:PORT): Ray's job client would look
    # the dashboard up through the GCS and wait ~40 s before a raw RpcError traceback.
    start = time.monotonic()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    closed = wb(capsys, "status")
    assert closed.returncode == 2 and "cannot reach the Ray dashboard" in closed.stderr
    assert "Traceback" not in closed.stderr and time.monotonic() - start < 30
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    gcs = wb(capsys, "status")
    assert gcs.returncode == 2 and "not a Ray dashboard address" in gcs.stderr
    monkeypatch.delenv("RAY_ADDRESS")
    client = wb(capsys, "logs", "raysubmit_x", "--address", "ray://127.0.0.1:10001")
    assert client.returncode == 2 and "http://HEAD:8265" in client.stderr


# ---------------------------------------------------------------- on the Ray head


def test_submit_wait_then_query_logs_status_runs(
        ray_head: dict, s3_bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    address = ray_head["address"]
    sets = [*SMALL_RUN, f"output.root={s3_bucket}", "run.run_id=cluster-{date}"]
    result = cli("submit", "configs/demo.yaml", "--address", address, "--wait",
                 "--timeout", "150", *_sets(sets))
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = result.stdout.splitlines()[0].strip()
    assert "SUCCEEDED" in result.stdout
    assert " INFO " not in result.stderr  # Ray's upload lines only with --verbose

    info = _client(address).get_job_info(job_id)
    run_id = info.metadata["wham_batch_run_id"]
    assert run_id.startswith("cluster-")
    # The job wrote to S3 with the cluster's own credentials; none travelled with it.
    sent = json.dumps(info.runtime_env)
    assert "test-secret" not in sent and "AWS_SECRET_ACCESS_KEY" not in sent
    assert "AWS_ACCESS_KEY_ID" not in sent

    status = wb(capsys, "status", job_id, "--address", address, "--json")
    assert status.returncode == 0, status.stderr
    row = json.loads(status.stdout)
    assert row["status"] == "SUCCEEDED" and row["job_id"] == job_id

    logs = wb(capsys, "logs", job_id, "--address", address)
    assert logs.returncode == 0 and f"run {run_id} complete" in logs.stdout

    query = wb(capsys, "query", s3_bucket, "--run-id", run_id, "--table", "rollouts", "--format",
                "json")
    assert query.returncode == 0, query.stderr
    rows = [json.loads(line) for line in query.stdout.splitlines() if line.strip()]
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}

    runs = wb(capsys, "runs", s3_bucket, "--json")
    assert runs.returncode == 0, runs.stderr
    (run,) = [json.loads(line) for line in runs.stdout.splitlines()]
    assert run["run_id"] == run_id and run["status"] == "complete"
    assert run["rollouts_ok"] == 2 and run["generated_frames"] == 4
    assert run["stored_frames"] == 2 * (1 + 2)  # the context frames are stored too

    # The run's metrics reached the node's Prometheus endpoint, tagged with its run id.
    port = ray_head["metrics_port"]
    frames = wait_for_metric(port, "ray_wham_frames_generated_total", run_id, total=4)
    assert sum(frames.values()) == 4 and all('worker="actor-000"' in k for k in frames)
    rollouts = wait_for_metric(port, "ray_wham_rollouts_total", run_id, total=2)
    assert [k for k in rollouts if 'status="ok"' in k] and sum(rollouts.values()) == 2
    units = wait_for_metric(port, "ray_wham_units_committed_total", run_id, total=1)
    assert sum(units.values()) == 1
    # Every put of the actor's writer was timed: the frames part, 2 table parts, 1 marker.
    uploads = scrape(port, "ray_wham_upload_seconds_count", run_id)
    assert sum(uploads.values()) >= 4


def test_invalid_config_never_reaches_the_cluster(
        ray_head: dict, capsys: pytest.CaptureFixture[str]) -> None:
    address = ray_head["address"]
    before = len(_client(address).list_jobs())
    result = wb(capsys, "submit", "configs/demo.yaml", "--address", address, "--wait",
                *_sets(["rollouts.steps=0", "output.colour=blue", "resources.actors=-1"]))
    assert result.returncode == 2
    for path in ("rollouts.steps", "output.colour", "resources.actors"):
        assert path in result.stderr
    assert len(_client(address).list_jobs()) == before


def test_outside_config_follow_and_failing_job(ray_head: dict, s3_bucket: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    address = ray_head["address"]
    # A config outside the project travels alone; the package goes as py_modules.
    # Its inputs are named by absolute paths, which this head (on this machine) can read.
    config = tmp_path / "configs" / "elsewhere.yaml"
    config.parent.mkdir()
    config.write_text((ROOT / "configs" / "demo.yaml").read_text().replace(
        "../models/demo", str(ROOT / "models" / "demo")).replace(
        "seeds/toygame", str(ROOT / "configs" / "seeds" / "toygame")))
    sets = [*SMALL_RUN, f"output.root={s3_bucket}", "run.run_id=outside"]
    result = cli("submit", str(config), "--address", address, "--follow", "--timeout", "150",
                 *_sets(sets))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "run outside complete" in result.stdout  # the driver's log, streamed
    # Quiet by default: none of Ray's INFO lines (packaging, the job's runtime env set-up).
    assert "INFO packaging.py" not in result.stderr and "Uploading package" not in result.stderr
    assert "Runtime env is setting up" not in result.stdout

    # Valid spec, but the job itself fails (no seeds there): --wait reports it, exit 1.
    # Sent in image mode: only the config travels and the driver imports the installed
    # package (this head's environment plays the image), so its error names the field.
    failing = [*SMALL_RUN, f"output.root={s3_bucket}", f"seeds.source={tmp_path / 'none'}"]
    result = cli("submit", "configs/demo.yaml", "--address", address, "--wait",
                 "--image-has-package", "--absolute-paths", "--timeout", "120", *_sets(failing))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED" in result.stdout and "seeds.source" in result.stderr
    job_id = result.stdout.splitlines()[0].strip()
    sent = _client(address).get_job_info(job_id).runtime_env
    assert "py_modules" not in sent and "excludes" not in sent
    # `status` agrees with `submit --wait`: a FAILED job exits 1.
    status = wb(capsys, "status", job_id, "--address", address)
    assert status.returncode == 1 and "FAILED" in status.stdout


def test_stop_a_running_job_leaves_a_partial_run(
        ray_head: dict, s3_bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.contracts.layout import manifest_key
    from pipeline.contracts.storage import open_storage

    address = ray_head["address"]
    long_run = ["rollouts.per_seed=2", "rollouts.steps=5000", "seeds.limit=2",
                "resources.rollouts_per_unit=1", "output.previews=false",
                f"output.root={s3_bucket}", "run.run_id=stopped"]
    result = wb(capsys, "submit", "configs/demo.yaml", "--address", address,
                *_sets(long_run))
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.splitlines()[0].strip()
    # Stop once the driver has planned the run (its manifest is on S3).
    storage = open_storage(s3_bucket)
    key = manifest_key(_client(address).get_job_info(job_id).metadata["wham_batch_run_date"],
                       "stopped")
    deadline = time.monotonic() + 90
    while not storage.exists(key):
        assert time.monotonic() < deadline, "the job never wrote its manifest"
        time.sleep(0.5)
    stop = wb(capsys, "stop", job_id, "--address", address, "--wait", "--timeout", "60")
    assert stop.returncode == 0, stop.stderr
    assert f"job {job_id} STOPPED" in stop.stdout
    assert json.loads(wb(capsys, "status", job_id, "--address", address, "--json").stdout)[
        "status"] == "STOPPED"
    runs = wb(capsys, "runs", s3_bucket, "--json")
    (run,) = [json.loads(line) for line in runs.stdout.splitlines()]
    assert run["run_id"] == "stopped" and run["status"] == "partial"
    assert run["units_planned"] == 4 and run["units_committed"] < 4
    again = wb(capsys, "stop", job_id, "--address", address)
    assert again.returncode == 0 and "already STOPPED" in again.stdout


def test_unknown_job_and_unreachable_cluster_are_clear_errors(
        ray_head: dict, capsys: pytest.CaptureFixture[str]) -> None:
    result = wb(capsys, "status", "raysubmit_doesnotexist", "--address", ray_head["address"])
    assert result.returncode == 2 and "no job" in result.stderr
    result = wb(capsys, "status", "--address", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2 and "cannot reach the Ray dashboard" in result.stderr


def test_wait_rides_out_an_unreachable_dashboard_until_its_deadline(ray_head: dict) -> None:
    from pipeline.submit import ClusterUnreachable, connect, wait_for_job

    client = connect(ray_head["address"])
    # The head goes away (here: the client now points at a closed port).
    client._address = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(ClusterUnreachable, match="cannot reach"):
        wait_for_job(client, "raysubmit_any", timeout_s=1.5, poll_s=0.2)
    assert 1.5 <= time.monotonic() - start < 15


def _relative_job(folder: Path) -> Path:
    """A job YAML whose seeds and output root are relative to it, with one broken seed."""
    seeds = folder / "seeds"
    seeds.mkdir(parents=True)
    for i, picture in enumerate(sorted((ROOT / "configs" / "seeds" / "demo").glob("*.png"))[:2]):
        shutil.copy(picture, seeds / f"s{i}.png")
    (seeds / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    config = folder / "job.yaml"
    config.write_text(
        "run: {name: rel, run_id: \"rel-{date}\", max_failed_fraction: 0.5}\n"
        "model: {preset: tiny, device: cpu}\n"
        "seeds: {source: seeds}\n"
        "rollouts: {steps: 2}\n"
        "resources: {actors: 1, batch_size: 4}\n"
        "output: {root: out, previews: false}\n")
    return config


def test_relative_root_on_a_head_is_refused_or_lands_where_the_user_looks(
        ray_head: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    address = ray_head["address"]
    config = _relative_job(tmp_path / "job")
    before = len(_client(address).list_jobs())
    refused = wb(capsys, "submit", str(config), "--address", address, "--wait")
    assert refused.returncode == 2
    assert "output.root: 'out' is a relative path" in refused.stderr
    assert "s3://" in refused.stderr and "--absolute-paths" in refused.stderr
    assert len(_client(address).list_jobs()) == before  # nothing was sent

    result = cli("submit", str(config), "--address", address, "--wait", "--absolute-paths",
                 "--timeout", "150")
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "job" / "out"
    assert f"outputs: {out}" in result.stdout
    assert f"wham-batch query {out} --run-id rel-" in result.stdout
    run_id = result.stdout.split("--run-id ", 1)[1].split()[0]
    rows = wb(capsys, "query", str(out), "--run-id", run_id, "--table", "rollouts",
              "--format", "json")
    assert rows.returncode == 0, rows.stderr
    statuses = sorted(json.loads(line)["status"] for line in rows.stdout.splitlines())
    assert statuses == ["failed", "ok", "ok"]
    runs = wb(capsys, "runs", str(out), "--json")
    assert json.loads(runs.stdout)["status"] == "complete"
    # Nothing went to Ray's copy of the upload, and the job's log names the bad seed.
    assert not [p for p in Path(ray_head["tmp"]).rglob(f"run_id={run_id}")]
    job_id = result.stdout.splitlines()[0].strip()
    logs = wb(capsys, "logs", job_id, "--address", address)
    assert "rollouts failed: seed zz_broken:" in logs.stdout


def test_run_joins_only_the_cluster_it_is_given(ray_head: dict, tmp_path: Path) -> None:
    config = _relative_job(tmp_path / "job")
    (config.parent / "seeds" / "zz_broken.png").unlink()
    small = _sets(["seeds.limit=1", "rollouts.steps=1"])
    loopback = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    joined = cli("run", str(config), "--address", f"127.0.0.1:{ray_head['gcs_port']}",
                 *small, env=loopback)
    assert joined.returncode == 0, joined.stderr
    assert f"joined the Ray cluster at 127.0.0.1:{ray_head['gcs_port']} (--address)" \
        in joined.stderr
    # A plain run, even where Ray would find that head on its own (its RAY_TMPDIR), starts a
    # private instance instead of joining whatever cluster happens to run.
    private = cli("run", str(config), "--fresh", *small,
                  env={**loopback, "RAY_TMPDIR": str(ray_head["tmp"])})
    assert private.returncode == 0, private.stderr
    assert "started a private local Ray instance" in private.stderr
    assert "joined" not in private.stderr


def test_token_authenticated_cluster(s3_server: str, tmp_path: Path) -> None:
    import secrets

    token = secrets.token_hex(16)
    with running_head(auth="token", token=token) as head:
        address = head["address"]
        refused = cli("status", "--address", address)
        assert refused.returncode == 2
        assert "RAY_AUTH_MODE=token" in refused.stderr and token not in refused.stderr
        wrong = cli("status", "--address", address,
                    env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"})
        assert wrong.returncode == 2 and "refused" in wrong.stderr
        token_file = tmp_path / "token"
        token_file.write_text(token)
        allowed = cli("status", "--address", address, "--json",
                      env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)})
        assert allowed.returncode == 0, allowed.stderr
        assert allowed.stdout == ""  # a fresh cluster has no jobs
