"""The real actor behind a gate, and helpers to drive runs into exact states: tests start a
driver (in a child process or in-process), hold or open units with files in a control
folder (`<output.root>.ctl/`), kill the driver, and compare the final state with an
uninterrupted run's rows."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import ray

from pipeline.contracts import layout
from pipeline.contracts.plan import UnitReceipt, WorkUnit
from pipeline.contracts.spec import JobSpec, spec_from_data
from pipeline.contracts.storage import open_storage
from pipeline.driver import actor_name, run_job
from pipeline.driver.verify import verify_run
from workers.actor.actor import RolloutActor

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]
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


def missing_frames(spec: JobSpec, rows: list[dict]) -> list[str]:
    """Frame keys the rows name that storage does not hold (one listing of the run)."""
    storage = open_storage(spec.output.root)
    held = set(storage.list_keys(layout.run_prefix(layout.FRAMES_DIR, DATE, spec.run.run_id)))
    return sorted(r["frame_key"] for r in rows if r["frame_key"] and r["frame_key"] not in held)


def assert_same_final_state(spec: JobSpec, reference: list[dict]) -> None:
    """The reference rows, no duplicates, every row's frame present, `wham-batch verify`'s
    check clean, `_SUCCESS` and a complete manifest, and no lease left behind."""
    rows = steps_table(spec)
    ids = [(r["rollout_id"], r["step"]) for r in rows]
    assert len(ids) == len(set(ids)), "duplicate (rollout_id, step) rows"
    assert rows == reference
    assert missing_frames(spec, rows) == []
    storage = open_storage(spec.output.root)
    check = verify_run(storage, run_date=DATE, run_id=spec.run.run_id)
    assert check.ok and check.units_checked == 6, check.lines()
    assert storage.exists(layout.success_key(DATE, spec.run.run_id))
    assert not storage.exists(layout.lease_key(DATE, spec.run.run_id))
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


def wait_actor_gone(run_id: str) -> None:
    def gone() -> bool:
        try:
            ray.get_actor(actor_name(run_id, 0))
        except ValueError:
            return True
        return False

    wait_for(f"actor of run {run_id} to go away", gone, timeout=60)


def spawn_driver(config: Path) -> subprocess.Popen:
    """`run_job` with GatedActor in a child process attached to the test's Ray instance."""
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/..'];"
            "from support.gated import GatedActor;"
            "from pipeline.contracts.spec import load_spec; from pipeline.driver import run_job;"
            "s = run_job(load_spec(sys.argv[2]), actor_cls=GatedActor, progress=False);"
            "print(s.line())")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.Popen([sys.executable, "-c", code, str(TESTS), str(config)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_driver(proc: subprocess.Popen, spec: JobSpec) -> None:
    """SIGKILL the driver, then wait until Ray has taken its actors down too (an actor
    process outliving its driver could still finish the unit it holds)."""
    assert proc.poll() is None, "the driver ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    wait_actor_gone(spec.run.run_id)
    pids = {int(p.name.rsplit("-", 1)[1]) for p in ctl(spec).glob("waiting-*")}
    wait_for("the killed driver's actor processes to exit",
             lambda: not any(alive(pid) for pid in pids), timeout=60)
