"""Batch runs whose model is a Muse endpoint: (d) the demo job through `wham-batch serve`,
(e) a faulty endpoint retried, rollouts failed, and a rerun completing them; plus the
client's retry rules on their own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support.muse import SERVER_KEY, MuseStub, ServeProcess

from pipeline.contracts.layout import commit_key, success_key
from pipeline.contracts.plan import rng_seed_for
from pipeline.contracts.sources import NEUTRAL_ACTION
from pipeline.contracts.spec import load_spec, spec_from_data
from pipeline.contracts.storage import open_storage
from pipeline.driver import run_job
from workers.actor.actor import RolloutActor
from workers.actor.endpoint import EndpointBackend, EndpointError, RolloutJob, step_seed

REPO = Path(__file__).resolve().parents[2]
SEEDS = REPO / "configs" / "seeds" / "toygame"
DATE = "2026-03-04"
RUN_TIMEOUT_S = 300
DEMO_SEEDS, DEMO_STEPS = 3, 5
pytestmark = pytest.mark.slow


def _table(root: Path, name: str):
    table = ds.dataset(root / name, partitioning="hive").to_table()
    keys = [("rollout_id", "ascending")] + ([("step", "ascending")] if name == "steps" else [])
    return table.sort_by(keys)


def _parts(root: Path, name: str) -> list[Path]:
    return sorted((root / name).rglob("*.parquet"))


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _demo_overrides(root: Path) -> list[str]:
    # One PNG per frame, so the two runs' frames compare file by file. Three seeds of 5
    # steps instead of the demo's 6 x 20: still two batches of the demo's batch size, at a
    # sixth of the endpoint calls.
    return [f"seeds.source={SEEDS}", f"output.root={root}", f"run.run_date={DATE}",
            "run.run_id=demo-endpoint", "output.frames=png", f"seeds.limit={DEMO_SEEDS}",
            f"rollouts.steps={DEMO_STEPS}"]


# ---------------------------------------------------------------- (d)


def test_d_demo_job_through_the_server_matches_a_local_run(
        muse_server: ServeProcess, tmp_path: Path, ray_local: None) -> None:
    """configs/demo.yaml with model.endpoint: complete tables with the local run's schema
    and (greedy sampling) the local run's tokens, actions and frames; the key is nowhere."""
    remote, local = tmp_path / "remote", tmp_path / "local"
    ray_tmp = Path(tempfile.mkdtemp(prefix="wend-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(MUSE_API_KEY=SERVER_KEY, RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", WHAM_LOG_LEVEL="DEBUG")
    command = [str(Path(sys.executable).with_name("wham-batch")), "run", "configs/demo.yaml",
               "--quiet", "--set", "model.checkpoint=null",
               "--set", f"model.endpoint={muse_server.url}/score"]
    for item in _demo_overrides(remote):
        command += ["--set", item]
    try:
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True,
                              timeout=RUN_TIMEOUT_S)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
        session = {p: p.read_bytes() for p in ray_tmp.rglob("*")
                   if p.is_file() and not p.is_symlink()}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    spec = load_spec(REPO / "configs" / "demo.yaml",
                     [f"model.checkpoint={REPO / 'models' / 'demo'}", *_demo_overrides(local)])
    assert run_job(spec, actor_cls=RolloutActor, progress=False).ok

    assert (remote / success_key(DATE, "demo-endpoint")).exists()
    for name in ("steps", "rollouts"):
        schemas = {pq.read_schema(p).remove_metadata()  # each part names its own unit
                   for p in _parts(remote, name) + _parts(local, name)}
        assert len(schemas) == 1, f"{name}: parts differ in schema"
    steps_r, steps_l = _table(remote, "steps"), _table(local, "steps")
    assert steps_r.num_rows == steps_l.num_rows == DEMO_SEEDS * 2 * (1 + DEMO_STEPS)
    for column in ("rollout_id", "step", "generated", "action_bins", "action_source",
                   "left_stick_x", "button_A"):
        assert steps_r[column].to_pylist() == steps_l[column].to_pylist(), column
    # Generated frames' tokens come back from the endpoint; a local replica also stores the
    # context frames' tokens (it has the tokenizer), an endpoint run cannot.
    generated = steps_l["generated"].to_pylist()
    tokens_r, tokens_l = steps_r["image_tokens"].to_pylist(), steps_l["image_tokens"].to_pylist()
    assert [t for t, g in zip(tokens_r, generated, strict=True) if g] == \
        [t for t, g in zip(tokens_l, generated, strict=True) if g]
    assert all(t is None for t, g in zip(tokens_r, generated, strict=True) if not g)
    for key_r, key_l in zip(steps_r["frame_key"].to_pylist(), steps_l["frame_key"].to_pylist(),
                            strict=True):
        assert np.array_equal(_pixels(remote / key_r), _pixels(local / key_l))
    rollouts = _table(remote, "rollouts")
    assert set(rollouts["status"].to_pylist()) == {"ok"}
    assert set(rollouts["model_id"].to_pylist()) == {f"{muse_server.url}/score"}
    searched = {**{str(p): p.read_bytes() for p in remote.rglob("*") if p.is_file()},
                **{str(p): data for p, data in session.items()},
                "stdout": proc.stdout, "stderr": proc.stderr}
    assert any(name.endswith((".out", ".err", ".log")) for name in map(str, session))
    assert [name for name, data in searched.items() if SERVER_KEY.encode() in data] == []


# ---------------------------------------------------------------- (e)


def _faulty_job(root: Path, stub: MuseStub) -> dict:
    return {
        "run": {"name": "faulty", "run_id": "faulty", "run_date": DATE},
        "model": {"endpoint": stub.url, "api_key_env": None, "max_concurrency": 4,
                  "timeout_s": 1.0, "max_attempts": 4, "backoff_s": 0.05},
        "seeds": {"source": str(SEEDS), "glob": "*.png", "limit": 3},
        "rollouts": {"steps": 4, "per_seed": 2, "mode": "full",
                     "sampling": {"greedy": True}},
        "resources": {"actors": 1, "batch_size": 2},
        "output": {"root": str(root)},
    }


def test_e_faulty_endpoint_retries_fails_rollouts_and_a_rerun_completes_them(
        muse_server: ServeProcess, tmp_path: Path, ray_local: None) -> None:
    root = tmp_path / "out"
    poisoned = "clip_1000001"  # both rollouts of this seed always get 500
    seeds = {step_seed(rng_seed_for(0, poisoned, i, run_id="faulty"), 0) for i in range(2)}
    with MuseStub(f"{muse_server.url}/score", key=SERVER_KEY, seed=3, max_faults=2,
                  hang_s=2.5, poisoned_seeds=seeds) as stub:
        spec = spec_from_data(_faulty_job(root, stub))
        first = run_job(spec, actor_cls=RolloutActor, progress=False)
        assert first.complete and (first.rollouts_ok, first.rollouts_failed) == (4, 2)
        assert not first.ok  # over max_failed_fraction: the exit status says so
        for kind in ("429", "500", "garbage", "hang", "poisoned", "forwarded"):
            assert stub.counts[kind] > 0, stub.counts
        rollouts = _table(root, "rollouts")
        failed = [r for r in rollouts.to_pylist() if r["status"] == "failed"]
        assert {r["seed_id"] for r in failed} == {poisoned} and len(failed) == 2
        assert all("failed 4 times" in r["error"] and "HTTP 500" in r["error"] for r in failed)
        storage = open_storage(str(root))
        unit = failed[0]["unit_id"]
        assert b'"retryable": 2' in storage.get_bytes(commit_key(DATE, "faulty", unit))

        stub.healthy = True
        second = run_job(spec, actor_cls=RolloutActor, progress=False)
    assert second.ok and (second.rollouts_ok, second.rollouts_failed) == (6, 0)
    assert second.units_skipped == 2  # only the unit with the failed rollouts ran again
    assert storage.exists(success_key(DATE, "faulty"))
    rollouts = _table(root, "rollouts")
    assert rollouts.num_rows == 6 and set(rollouts["status"].to_pylist()) == {"ok"}
    steps = _table(root, "steps")
    assert steps.num_rows == 6 * 5
    assert len(set(zip(steps["rollout_id"].to_pylist(), steps["step"].to_pylist(),
                       strict=True))) == steps.num_rows


# ---------------------------------------------------------------- the client's rules


@pytest.fixture
def backend_and_stub(muse_server: ServeProcess):
    with MuseStub(f"{muse_server.url}/score", key=SERVER_KEY) as stub:
        stub.healthy = True
        backend = EndpointBackend(url=stub.url, api_key_env=None, max_concurrency=2,
                                  timeout_s=5.0, max_attempts=3, backoff_s=0.0,
                                  sampling={"temperature": 0.9, "top_k": None, "top_p": 1.0})
        try:
            yield backend, stub
        finally:
            backend.close()


def _job() -> RolloutJob:
    return RolloutJob(context_images=np.zeros((1, 3, 32, 32), np.uint8),
                      context_actions=NEUTRAL_ACTION[None], actions=None, rng_seed=5)


def test_the_probe_learns_the_endpoints_frame_size_and_token_count(backend_and_stub) -> None:
    backend, _ = backend_and_stub
    assert backend.image_size == (32, 32) and backend.tokens_per_image == 16
    assert backend.model_id == backend.url and backend.tokens_per_step == 32


def test_retry_after_is_honoured(backend_and_stub) -> None:
    backend, stub = backend_and_stub
    stub.retry_after = "1"
    stub.forced.extend(["429"])
    start = len(stub.arrivals)
    [(_, records)] = list(backend.rollouts([_job()], steps=1, mode="full"))
    assert len(records) == 1
    first, second = stub.arrivals[start:start + 2]
    assert second - first >= 0.9  # backoff_s is 0: only Retry-After can explain the wait


def test_a_client_error_fails_the_rollout_at_once(backend_and_stub) -> None:
    backend, stub = backend_and_stub
    stub.forced.extend(["400"])
    start = len(stub.arrivals)
    [(_, outcome)] = list(backend.rollouts([_job()], steps=2, mode="full"))
    assert isinstance(outcome, EndpointError) and not outcome.retryable
    assert "HTTP 400" in str(outcome) and len(stub.arrivals) - start == 1


def test_world_model_mode_takes_the_given_actions(backend_and_stub) -> None:
    backend, _ = backend_and_stub
    given = np.tile(np.array([1] * 12 + [0, 10, 3, 7]), (3, 1))
    job = RolloutJob(context_images=np.zeros((1, 3, 32, 32), np.uint8),
                     context_actions=NEUTRAL_ACTION[None], actions=given, rng_seed=1)
    [(_, records)] = list(backend.rollouts([job], steps=3, mode="world_model"))
    assert [r.source for r in records] == ["given"] * 3
    assert all(np.array_equal(r.action, given[0]) for r in records)
    assert all(r.image.shape == (3, 32, 32) and len(r.tokens) == 16 for r in records)

