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
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import ray
import yaml
from support.faultproxy import record_figures
from support.procs import free_port, session_pids

from pipeline import layout
from pipeline.driver import actor_name, run_job
from pipeline.errors import UserError
from pipeline.plan import UnitReceipt, WorkUnit
from pipeline.spec import JobSpec, spec_from_data
from pipeline.storage import open_storage
from workers.actor import RolloutActor

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DEMO = REPO / "configs" / "seeds" / "demo"
DATE = "2026-05-06"
GATE_TIMEOUT_S = 120.0
WAIT_S = 120.0
HOLD_ENV = "WHAM_TEST_HOLD_UNITS"  # set on a node: its actors hold every unit until killed


class GatedActor(RolloutActor):
    """The real actor, but a unit waits at a gate when `<root>.ctl/hold` exists (or when
    the node's environment says so), units wait for a held unit elsewhere when
    `<root>.ctl/after-held` exists, and every unit that runs is logged."""

    def run_unit(self, unit: WorkUnit) -> UnitReceipt:
        ctl = Path(self.spec.output.root + ".ctl")
        deadline = time.monotonic() + GATE_TIMEOUT_S
        node_hold = os.environ.get(HOLD_ENV) == "1"
        if node_hold or (ctl / "hold").exists():
            (ctl / f"waiting-{unit.unit_id}-{os.getpid()}").touch()  # one per actor process
        while (node_hold or (ctl / "hold").exists()) and time.monotonic() < deadline:
            if (ctl / f"open-{unit.unit_id}").exists():
                break
            time.sleep(0.05)
        while (not node_hold and (ctl / "after-held").exists() and not any(ctl.glob("waiting-*"))
               and time.monotonic() < deadline):
            time.sleep(0.05)  # let another node's actor take (and hold) a unit first
        with open(ctl / "ran.log", "a") as fh:
            fh.write(f"{unit.unit_id}\n")
        return super().run_unit(unit)


def make_job(tmp_path: Path, *, run_id: str, **resources: object) -> dict:
    seeds = tmp_path / "seeds"
    if not seeds.exists():
        seeds.mkdir()
        for i, picture in enumerate(sorted(DEMO.glob("*.png"))[:6]):
            shutil.copyfile(picture, seeds / f"seed_{i}.png")
    out = tmp_path / run_id
    (tmp_path / f"{run_id}.ctl").mkdir(exist_ok=True)
    return {
        "run": {"name": "night", "run_id": run_id, "run_date": DATE, "seed": 3},
        "model": {"preset": "tiny", "device": "cpu", "dtype": "float32"},
        "seeds": {"source": str(seeds)},
        "rollouts": {"steps": 3, "per_seed": 2},
        "resources": {"actors": 1, "cpus_per_actor": 0.5, "batch_size": 2,
                      "rollouts_per_unit": 2, "units_in_flight": 1, **resources},
        "output": {"root": str(out), "previews": False},
    }


def ctl(spec: JobSpec) -> Path:
    return Path(spec.output.root + ".ctl")


def wait_for(what: str, check, timeout: float = WAIT_S) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def commits(spec: JobSpec) -> list[str]:
    return list(open_storage(spec.output.root).list_keys(
        layout.commits_prefix(DATE, spec.run.run_id)))


def steps_table(spec: JobSpec) -> list[dict]:
    fs, base = open_storage(spec.output.root).arrow_fs()
    rows = ds.dataset(f"{base}/steps", filesystem=fs, partitioning="hive").to_table(
        filter=ds.field("run_id") == spec.run.run_id).drop_columns(["run_id", "run_date"])
    return sorted(rows.to_pylist(), key=lambda r: (r["rollout_id"], r["step"]))


def assert_same_final_state(spec: JobSpec, reference: list[dict]) -> None:
    rows = steps_table(spec)
    ids = [(r["rollout_id"], r["step"]) for r in rows]
    assert len(ids) == len(set(ids)), "duplicate (rollout_id, step) rows"
    assert rows == reference
    storage = open_storage(spec.output.root)
    assert storage.exists(layout.success_key(DATE, spec.run.run_id))
    manifest = json.loads(storage.get_bytes(layout.manifest_key(DATE, spec.run.run_id)))
    assert manifest["status"] == "complete" and manifest["counts"]["rollouts_ok"] == 12


@pytest.fixture(scope="module")
def reference_rows(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> list[dict]:
    """Steps rows of one uninterrupted run (12 rollouts x 4 steps)."""
    tmp = tmp_path_factory.mktemp("reference")
    spec = spec_from_data(make_job(tmp, run_id="night"))
    summary = run_job(spec, progress=False, actor_cls=GatedActor)
    assert summary.complete
    rows = steps_table(spec)
    assert len(rows) == 12 * 4
    return rows


def _wait_actor_gone(run_id: str) -> None:
    def gone() -> bool:
        try:
            ray.get_actor(actor_name(run_id, 0))
        except ValueError:
            return True
        return False

    wait_for(f"actor of run {run_id} to go away", gone, timeout=60)


def _driver(config: Path) -> subprocess.Popen:
    """`run_job` with GatedActor in a child process attached to the test's Ray instance."""
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/..'];"
            "from test_interruptions import GatedActor;"
            "from pipeline.spec import load_spec; from pipeline.driver import run_job;"
            "s = run_job(load_spec(sys.argv[2]), actor_cls=GatedActor, progress=False);"
            "print(s.line())")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.Popen([sys.executable, "-c", code, str(HERE), str(config)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_driver(proc: subprocess.Popen, spec: JobSpec) -> None:
    """SIGKILL the driver, then wait until Ray has taken its actors down too (an actor
    process outliving its driver could still finish the unit it holds)."""
    assert proc.poll() is None, "the driver ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    _wait_actor_gone(spec.run.run_id)
    pids = {int(p.name.rsplit("-", 1)[1]) for p in ctl(spec).glob("waiting-*")}
    wait_for("the killed driver's actor processes to exit",
             lambda: not any(_alive(pid) for pid in pids), timeout=60)


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
    proc = _driver(config)
    try:
        wait_for("the first unit to start", lambda: any(gate.glob("waiting-u000000-*")))
        assert commits(spec) == []
        _kill_driver(proc, spec)
        kills += 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not open_storage(spec.output.root).exists(layout.success_key(DATE, "night"))
    # 2. mid-run: two units may commit, the third is held
    for uid in ("u000000", "u000001"):
        (gate / f"open-{uid}").touch()
    proc = _driver(config)
    try:
        wait_for("two commits and a held unit", lambda: len(commits(spec)) == 2
                 and any(gate.glob("waiting-u000002-*")))
        _kill_driver(proc, spec)
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
    _wait_actor_gone("night")
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
                "from pipeline.spec import load_spec; from pipeline.driver import run_job;"
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
