"""RolloutActor called directly (no Ray): real tiny model, real writer, real files."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.contracts.errors import UserError
from pipeline.contracts.layout import commit_key, rollouts_part_key, steps_part_key
from pipeline.contracts.plan import make_plan
from pipeline.contracts.spec import JobSpec, spec_from_data
from pipeline.contracts.storage import open_storage
from pipeline.driver.discovery import discover_seeds
from workers.actor.actor import RolloutActor

DEMO = Path(__file__).resolve().parents[2] / "configs" / "seeds" / "demo"
DATE = "2026-01-02"


def make_spec(tmp_path: Path, **overrides: dict) -> JobSpec:
    data = {
        "run": {"name": "t", "run_id": "act", "run_date": DATE, "seed": 3},
        "model": {"preset": "tiny", "device": "cpu"},
        "seeds": {"source": str(tmp_path / "seeds")},
        "rollouts": {"steps": 3, "per_seed": 2},
        "resources": {"batch_size": 4, "rollouts_per_unit": 6},
        "output": {"root": str(tmp_path / "out"), "previews": True},
    }
    for key, value in overrides.items():
        data[key] = {**data[key], **value}
    return spec_from_data(data)


def seed_folder(tmp_path: Path, n: int = 3) -> Path:
    folder = tmp_path / "seeds"
    folder.mkdir()
    for p in sorted(DEMO.glob("*.png"))[:n]:
        shutil.copy(p, folder / p.name)
    return folder


def plan(spec: JobSpec):
    refs = discover_seeds(spec.seeds.source, format="images")
    return make_plan(refs, run_seed=spec.run.seed, per_seed=spec.rollouts.per_seed,
                     unit_size=spec.resources.unit_size())


def read(spec: JobSpec, key: str):
    return pq.read_table(io.BytesIO(open_storage(spec.output.root).get_bytes(key)))


def test_unit_is_generated_written_and_committed(tmp_path: Path) -> None:
    seed_folder(tmp_path)
    spec = make_spec(tmp_path, output={"frames": "png"})
    actor = RolloutActor(spec, worker="w0")
    info = actor.ready()
    assert info["model_id"] == "preset:tiny" and info["batch_size"] == 4
    (unit,) = plan(spec)
    receipt = actor.run_unit(unit)
    actor.close()
    assert (receipt.ok, receipt.failed, receipt.generated_frames) == (6, 0, 18)
    assert receipt.stored_frames == 6 * (1 + 3)  # context frames are stored too
    storage = open_storage(spec.output.root)
    assert storage.exists(commit_key(DATE, "act", unit.unit_id))
    rollouts = read(spec, rollouts_part_key(DATE, "act", unit.unit_id)).to_pylist()
    assert sorted(r["rollout_id"] for r in rollouts) == sorted(i.rollout_id for i in unit.items)
    assert all(r["status"] == "ok" and r["worker"] == "w0" for r in rollouts)
    steps = read(spec, steps_part_key(DATE, "act", unit.unit_id))
    assert steps.num_rows == 6 * (1 + 3)  # context step + generated steps
    rows = steps.to_pylist()
    assert {r["action_source"] for r in rows if not r["generated"]} == {"seed"}
    assert {r["action_source"] for r in rows if r["generated"]} == {"given"}
    for r in rows:
        png = Image.open(io.BytesIO(storage.get_bytes(r["frame_key"])))
        assert png.size == (16, 16)


def test_rollouts_do_not_depend_on_batching(tmp_path: Path) -> None:
    seed_folder(tmp_path)
    tokens = {}
    for batch in (1, 4):
        spec = make_spec(tmp_path, resources={"batch_size": batch},
                         output={"root": str(tmp_path / f"out{batch}")})
        actor = RolloutActor(spec, worker="w")
        (unit,) = plan(spec)
        actor.run_unit(unit)
        actor.close()
        table = read(spec, steps_part_key(DATE, "act", unit.unit_id)).sort_by(
            [("rollout_id", "ascending"), ("step", "ascending")])
        tokens[batch] = table.column("image_tokens").to_pylist()
    assert tokens[1] == tokens[4]


def test_corrupt_seed_fails_alone(tmp_path: Path) -> None:
    folder = seed_folder(tmp_path)
    (folder / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    spec = make_spec(tmp_path, resources={"rollouts_per_unit": 8})
    actor = RolloutActor(spec, worker="w0")
    receipts = [actor.run_unit(u) for u in plan(spec)]
    actor.close()
    assert sum(r.ok for r in receipts) == 6 and sum(r.failed for r in receipts) == 2
    assert any("zz_broken" in e for r in receipts for e in r.errors)
    failed = [row for u in plan(spec)
              for row in read(spec, rollouts_part_key(DATE, "act", u.unit_id)).to_pylist()
              if row["status"] == "failed"]
    assert {r["seed_id"] for r in failed} == {"zz_broken"} and all(r["error"] for r in failed)


def test_engine_failure_becomes_failed_rows_and_actor_goes_on(tmp_path: Path) -> None:
    seed_folder(tmp_path)
    spec = make_spec(tmp_path, resources={"batch_size": 2})
    actor = RolloutActor(spec, worker="w0")
    real = actor.model.engine.rollout
    calls = []

    def flaky(**kwargs):  # noqa: ANN003, ANN202 -- fault injection on the second batch
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device fell over")
        return real(**kwargs)

    actor.model.engine.rollout = flaky
    (unit,) = plan(spec)
    receipt = actor.run_unit(unit)
    assert (receipt.ok, receipt.failed) == (4, 2)
    assert receipt.errors == ["seed scene_01: RuntimeError: device fell over"]
    # the same actor keeps working
    again = actor.run_unit(unit)
    actor.close()
    assert again.ok == 6


@pytest.mark.parametrize("mode,actions", [("full", "random"),
                                          ("world_model", {"kind": "constant", "value":
                                                           [1] + [0] * 11 + [1, 0, 0, -1]})])
def test_modes_and_given_actions(tmp_path: Path, mode: str, actions: object) -> None:
    seed_folder(tmp_path, n=1)
    spec = make_spec(tmp_path, rollouts={"mode": mode, "actions": actions, "per_seed": 1},
                     output={"image_tokens": False, "previews": False})
    actor = RolloutActor(spec, worker="w0")
    (unit,) = plan(spec)
    assert actor.run_unit(unit).ok == 1
    actor.close()
    rows = read(spec, steps_part_key(DATE, "act", unit.unit_id)).to_pylist()
    generated = [r for r in rows if r["generated"]]
    assert len(generated) == 3 and all(r["image_tokens"] is None for r in rows)
    if mode == "full":
        assert {r["action_source"] for r in generated} == {"model"}
    else:
        assert all(r["action_bins"] == [1] + [0] * 11 + [10, 5, 5, 0] for r in generated)
        assert all(r["trigger_LT"] and r["left_stick_x"] == 1.0 for r in generated)


def test_batch_auto_on_cpu(tmp_path: Path) -> None:
    seed_folder(tmp_path, n=1)
    spec = make_spec(tmp_path, resources={"batch_size": "auto"})
    actor = RolloutActor(spec, worker="w0")
    assert actor.ready()["batch_size"] == 8
    actor.close()


def test_checkpoint_from_s3(tmp_path: Path, s3_bucket: str,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.driver import preflight
    from workers.wham import random_model, save_native

    seed_folder(tmp_path, n=1)
    folder = save_native(random_model("tiny", seed=5), tmp_path / "native")
    storage = open_storage(s3_bucket)
    for path in sorted(Path(folder).iterdir()):
        storage.put_bytes(f"models/tiny5/{path.name}", path.read_bytes())
    monkeypatch.setenv("WHAM_CACHE_DIR", str(tmp_path / "cache"))
    spec = make_spec(tmp_path, model={"preset": None, "checkpoint": f"{s3_bucket}/models/tiny5"})
    preflight(spec)  # the checkpoint is found
    actor = RolloutActor(spec, worker="w0")
    assert actor.ready()["sha256"] == random_model("tiny", seed=5).sha256
    (unit,) = plan(spec)
    assert actor.run_unit(unit).ok == 2
    actor.close()
    missing = make_spec(tmp_path, model={"preset": None, "checkpoint": f"{s3_bucket}/models/x"})
    with pytest.raises(UserError, match="model.checkpoint: .* not found"):
        preflight(missing)
