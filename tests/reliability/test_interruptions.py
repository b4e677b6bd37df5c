"""Interrupted nights: the driver killed at several points, actors killed past their restart
budget, and a worker node of a two-node cluster killed mid-run.

Each time the final state is compared with an uninterrupted run of the same spec: the same
(rollout_id, step) rows with the same values, no duplicates, and `_SUCCESS` only once every
unit is committed. Actors are the real `RolloutActor` (tiny model) with a gate in front of
`run_unit`, so the test decides exactly where a unit is when the kill comes.
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
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import yaml
from support.faultproxy import record_figures
from support.gated import (
    DATE,
    HOLD_ENV,
    REPO,
    WAIT_S,
    GatedActor,
    assert_same_final_state,
    commits,
    ctl,
    kill_driver,
    make_job,
    spawn_driver,
    wait_actor_gone,
    wait_for,
)
from support.procs import free_port, session_pids

from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.contracts.spec import spec_from_data
from pipeline.contracts.storage import open_storage
from pipeline.driver import actor_name, run_job

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_driver_killed_before_first_commit_mid_run_and_before_success(
        tmp_path: Path, reference_rows: list[dict]) -> None:
    data = make_job(tmp_path, run_id="night")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    spec = spec_from_data(data)
    gate = ctl(spec)
    kills = 0
    # 1. before the first commit: the first unit is held at its gate
    (gate / "hold").touch()
    proc = spawn_driver(config)
    try:
        wait_for("the first unit to start", lambda: any(gate.glob("waiting-u000000-*")))
        assert commits(spec) == []
        kill_driver(proc, spec)
        kills += 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not open_storage(spec.output.root).exists(layout.success_key(DATE, "night"))
    # 2. mid-run: two units may commit, the third is held
    for uid in ("u000000", "u000001"):
        (gate / f"open-{uid}").touch()
    proc = spawn_driver(config)
    try:
        wait_for("two commits and a held unit", lambda: len(commits(spec)) == 2
                 and any(gate.glob("waiting-u000002-*")))
        kill_driver(proc, spec)
        kills += 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert len(commits(spec)) == 2
    assert not open_storage(spec.output.root).exists(layout.success_key(DATE, "night"))
    # rerun to completion: only the four uncommitted units run again
    (gate / "hold").unlink()
    (gate / "ran.log").write_text("")
    summary = run_job(spec, progress=False, actor_cls=GatedActor)
    assert summary.complete and summary.units_skipped == 2
    assert sorted((gate / "ran.log").read_text().split()) == [f"u00000{i}" for i in range(2, 6)]
    assert_same_final_state(spec, reference_rows)
    # 3. every unit committed, then killed before `_SUCCESS` and the final manifest: the
    # state is all commit markers plus a "running" manifest; the rerun restores both
    # without generating anything again.
    storage = open_storage(spec.output.root)
    manifest = json.loads(storage.get_bytes(layout.manifest_key(DATE, "night")))
    storage.put_bytes(layout.manifest_key(DATE, "night"),
                      json.dumps({**manifest, "status": "running"}).encode())
    storage.delete_prefix(layout.success_key(DATE, "night"))
    kills += 1
    before = {k: storage.get_bytes(k) for k in storage.list_keys("steps/")}
    (gate / "ran.log").write_text("")
    again = run_job(spec, progress=False, actor_cls=GatedActor)
    assert again.complete and again.units_skipped == 6 and again.rollouts_ok == 12
    assert (gate / "ran.log").read_text() == ""
    assert {k: storage.get_bytes(k) for k in storage.list_keys("steps/")} == before
    assert_same_final_state(spec, reference_rows)
    record_figures("driver_kills", interruptions=kills, recovered=kills, rows_lost=0)


@pytest.mark.slow
def test_actor_killed_more_often_than_it_may_restart(tmp_path: Path,
                                                      reference_rows: list[dict]) -> None:
    spec = spec_from_data(make_job(tmp_path, run_id="night", max_restarts=2,
                                   max_unit_attempts=10))
    gate = ctl(spec)
    (gate / "hold").touch()
    (gate / "open-u000000").touch()
    result: dict = {}

    def drive() -> None:
        try:
            result["summary"] = run_job(spec, progress=False, actor_cls=GatedActor)
        except UserError as exc:
            result["error"] = exc

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    kills = 0
    killed: set[Path] = set()

    def held_by_a_new_process() -> bool:
        return bool(set(gate.glob("waiting-u000001-*")) - killed)

    try:
        for _ in range(3):  # max_restarts + 1: the last kill leaves the actor dead
            # each restart is a new process that holds the retried unit again
            wait_for("the unit to be held by a new actor process", held_by_a_new_process)
            killed |= set(gate.glob("waiting-u000001-*"))
            ray.kill(ray.get_actor(actor_name("night", 0)), no_restart=False)
            kills += 1
        thread.join(timeout=WAIT_S)
        assert not thread.is_alive(), "the driver hangs after its actor died for good"
    finally:
        (gate / "hold").unlink(missing_ok=True)
        thread.join(timeout=WAIT_S)
    # a clear failure, not a hang; the committed unit stays, no _SUCCESS
    assert "summary" not in result
    assert "every actor failed" in str(result["error"])
    assert commits(spec) == [layout.commit_key(DATE, "night", "u000000")]
    assert not open_storage(spec.output.root).exists(layout.success_key(DATE, "night"))
    wait_actor_gone("night")
    summary = run_job(spec, progress=False, actor_cls=GatedActor)
    assert summary.complete and summary.units_skipped == 1
    assert_same_final_state(spec, reference_rows)
    record_figures("actor_kills", interruptions=kills, recovered=1, rows_lost=0)


# ---------------------------------------------------------------- two nodes on one machine


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a `ray start --block` child and everything in its session, by pid."""
    for pid in [proc.pid, *session_pids(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _ray_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    venv_bin = Path(sys.executable).parent
    env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(tmp),
                "PATH": f"{venv_bin}{os.pathsep}{env.get('PATH', '')}", **extra})
    return env


# `ray start` for a second node. The head runs with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 so it
# binds loopback only, which also makes `ray start --address` refuse to join unless the
# variable is 1 -- and with 1 the CLI rewrites a 127.0.0.1 address to the machine's external
# address. So the joining node runs the same CLI with that rewrite turned off.
_JOIN_ON_LOOPBACK = ("import sys, ray._private.services as s; "
                     "s.resolve_ip_for_localhost = lambda host: host; "
                     "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()")


@contextlib.contextmanager
def two_node_cluster() -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """A head (1 CPU) and a worker node (1 CPU, holds its units) as `ray start` children;
    yields (GCS address, worker process, temp dir)."""
    tmp = Path(tempfile.mkdtemp(prefix="wnode-"))  # short: Ray's socket paths are limited
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    try:
        head_log = open(tmp / "head.log", "wb")  # noqa: SIM115 - closed with the head
        procs.append(subprocess.Popen(
            [ray_bin, "start", "--head", "--num-cpus=1", "--num-gpus=0",
             "--node-ip-address=127.0.0.1", "--include-dashboard=false", f"--port={port}",
             f"--ray-client-server-port={free_port()}", "--block"],
            env=_ray_env(tmp / "h"), stdout=head_log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=REPO))
        worker_log = open(tmp / "worker.log", "wb")  # noqa: SIM115
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _JOIN_ON_LOOPBACK, "start", f"--address={address}",
             "--num-cpus=1", "--num-gpus=0", "--node-ip-address=127.0.0.1", "--block"],
            env=_ray_env(tmp / "w", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", **{HOLD_ENV: "1"}),
            stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO))
        yield address, procs[1], tmp
    finally:
        for proc in reversed(procs):
            _kill_session(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def _cluster_cpus(address: str, tmp: Path) -> float:
    code = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False);"
            "print(ray.cluster_resources().get('CPU', 0))")
    out = subprocess.run([sys.executable, "-c", code, address], env=_ray_env(tmp / "c"),
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0.0


@pytest.mark.slow
def test_worker_node_killed_mid_run_completes_on_the_head(
        tmp_path: Path, reference_rows: list[dict]) -> None:
    data = make_job(tmp_path, run_id="night", actors=2, cpus_per_actor=1)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    spec = spec_from_data(data)
    gate = ctl(spec)
    (gate / "after-held").touch()
    with two_node_cluster() as (address, worker, tmp):
        wait_for("both nodes", lambda: _cluster_cpus(address, tmp) >= 2, timeout=90)
        code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/..'];"
                "from test_interruptions import GatedActor;"
                "from pipeline.contracts.spec import load_spec;"
                "from pipeline.driver import run_job;"
                "s = run_job(load_spec(sys.argv[2]), actor_cls=GatedActor, progress=False);"
                "print(s.line()); sys.exit(0 if s.complete else 1)")
        log = tmp / "driver.log"
        with open(log, "wb") as out:
            driver = subprocess.Popen(
                [sys.executable, "-c", code, str(HERE), str(config)], cwd=REPO,
                env=_ray_env(tmp / "d", RAY_ADDRESS=address), stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # the worker node's actor holds its unit; the head's actor commits meanwhile
            wait_for("a unit held on the worker node and a commit on the head",
                     lambda: any(gate.glob("waiting-*")) and len(commits(spec)) >= 1)
            _kill_session(worker)
            code = driver.wait(timeout=WAIT_S)
        finally:
            _kill_session(driver)
        text = log.read_text()
    assert code == 0, text[-3000:]
    assert "run night complete: 12 rollouts ok, 0 failed" in text, text[-3000:]
    assert_same_final_state(spec, reference_rows)
    record_figures("node_kill", interruptions=1, recovered=1, rows_lost=0)
