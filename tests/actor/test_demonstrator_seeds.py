"""`seeds.format: demonstrator`: folders laid out like the WHAM Demonstrator's examples and
saved timelines (300x180 frames `image0.png`, ... plus `actions.json`), discovered, loaded
at the model's size, binned as the official server bins sticks, and rolled out; bad folders
become failed rollouts naming the file."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from pipeline.contracts import layout
from pipeline.contracts.plan import make_plan
from pipeline.contracts.sources import SeedError
from pipeline.contracts.spec import spec_from_data
from pipeline.contracts.storage import open_storage
from pipeline.driver.discovery import discover_seeds
from workers.actor.actor import RolloutActor
from workers.actor.inputs import load_seed

DEMO_MODEL = Path(__file__).resolve().parents[2] / "models" / "demo"
SIZE = (18, 30)  # (H, W): a model size with the Demonstrator's aspect, for the loader tests
#: Stick values as the Demonstrator writes them (float32 bin centres) and others, with the
#: bin the official server gives each: np.digitize over the edges -1.05, -0.95, -0.75, -0.5,
#: -0.25, -0.05, 0.05, 0.25, 0.5, 0.75, 0.95, 1.05, minus one; written out by hand.
STICK_BINS = [(-1.0, 0), (-0.97, 0), (-0.95, 1), (-0.8500000238418579, 1), (-0.6, 2),
              (-0.3, 3), (-0.15000000596046448, 4), (-0.05, 5), (0.0, 5), (0.05, 6),
              (0.15000000596046448, 6), (0.25, 7), (0.375, 7), (0.5, 8), (0.625, 8),
              (0.8500000238418579, 9), (0.95, 10), (1.0, 10)]


def frame(index: int) -> Image.Image:
    """A 300x180 game-like frame, different for every index."""
    img = Image.new("RGB", (300, 180), (20 + 9 * index, 60, 120))
    draw = ImageDraw.Draw(img)
    draw.rectangle([10 + 20 * index, 40, 60 + 20 * index, 120], fill=(230, 200, 40))
    draw.ellipse([200, 10 + 10 * index, 260, 70 + 10 * index], fill=(40, 220, 90))
    return img


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def action_values(index: int) -> tuple[list[float], list[int]]:
    """(16 values as in actions.json, the model-form action the official server makes)."""
    buttons = [float((index + b) % 3 == 0) for b in range(12)]
    picks = [STICK_BINS[(index + 5 * s) % len(STICK_BINS)] for s in range(4)]
    return buttons + [v for v, _ in picks], [int(b) for b in buttons] + [k for _, k in picks]


def write_example(storage, folder: str, frames: int) -> np.ndarray:  # noqa: ANN001
    """An example folder of `frames` frames; returns the expected model-form actions."""
    table, expected = {}, []
    for i in range(frames):
        storage.put_bytes(f"{folder}/image{i}.png", png(frame(i)))
        table[f"image{i}.png"], model_form = action_values(i)
        expected.append(model_form)
    # The Demonstrator writes its keys in frame order; here they are shuffled, so the order
    # has to come from the names (image2 before image10), not from the file.
    keys = sorted(table, reverse=True)
    storage.put_bytes(f"{folder}/actions.json", json.dumps({k: table[k] for k in keys}).encode())
    return np.asarray(expected, dtype=np.int64)


def resized(i: int) -> np.ndarray:
    img = frame(i).resize((SIZE[1], SIZE[0]), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


@pytest.fixture(params=["local", "s3"])
def examples(request: pytest.FixtureRequest, tmp_path):
    """(storage of an Examples folder, its URI)."""
    if request.param == "local":
        (tmp_path / "Examples").mkdir()
        return open_storage(str(tmp_path / "Examples")), str(tmp_path / "Examples")
    uri = request.getfixturevalue("s3_bucket") + "/Examples"
    return open_storage(uri), uri


def test_example_folders_load_in_numeric_order_with_official_bins(examples) -> None:
    storage, source = examples
    expected = write_example(storage, "0_sample-junkyard", 12)
    write_example(storage, "0_facility_map", 3)
    storage.put_bytes("README.txt", b"not a folder")  # files beside the folders are ignored
    refs = discover_seeds(source, format="demonstrator")
    assert [r.seed_id for r in refs] == ["0_facility_map", "0_sample-junkyard"]
    assert refs[1].uri.endswith("0_sample-junkyard/actions.json")
    seed = load_seed(refs[1], image_size=SIZE, context_steps=10, future_steps=2)
    assert seed.source_size == (180, 300)
    np.testing.assert_array_equal(seed.context_images, np.stack([resized(i) for i in range(10)]))
    np.testing.assert_array_equal(seed.future_images, np.stack([resized(10), resized(11)]))
    np.testing.assert_array_equal(seed.context_actions, expected[:10])
    np.testing.assert_array_equal(seed.future_actions, expected[10:12])
    assert seed.context_actions.dtype == np.int64
    short = load_seed(refs[0], image_size=SIZE, context_steps=10, future_steps=5)
    assert short.context_images.shape == (3, 3, *SIZE)  # a short folder gives what it has
    assert short.future_actions.shape == (0, 16)
    assert [r.seed_id for r in discover_seeds(source, format="demonstrator",
                                              glob="0_f*")] == ["0_facility_map"]


def test_every_stick_value_gets_the_official_bin(tmp_path) -> None:
    storage = open_storage(str(tmp_path))
    table = {f"image{i}.png": [0.0] * 12 + [v, -v, 0.0, v] for i, (v, _) in enumerate(STICK_BINS)}
    for name in table:
        storage.put_bytes(f"f/{name}", png(frame(0)))
    storage.put_bytes("f/actions.json", json.dumps(table).encode())
    (ref,) = discover_seeds(str(tmp_path), format="demonstrator")
    seed = load_seed(ref, image_size=SIZE, context_steps=1, future_steps=len(STICK_BINS))
    bins = np.concatenate([seed.context_actions, seed.future_actions])[:, 12]
    assert bins.tolist() == [k for _, k in STICK_BINS]


def test_a_single_example_folder_is_one_seed(tmp_path) -> None:
    storage = open_storage(str(tmp_path / "my timeline"))
    for i in range(4):
        storage.put_bytes(f"image{i}.png", png(frame(i)))
    storage.put_bytes("actions.json", json.dumps(
        {f"image{i}.png": action_values(i)[0] for i in range(4)}).encode())
    (ref,) = discover_seeds(str(tmp_path / "my timeline"), format="demonstrator")
    assert ref.seed_id.startswith("my_timeline")
    assert load_seed(ref, image_size=SIZE, context_steps=4).context_images.shape == (4, 3, *SIZE)


def bad_folders(storage) -> dict[str, str]:  # noqa: ANN001
    """Folder -> what its error must name."""
    write_example(storage, "no-actions", 2)
    storage.delete("no-actions/actions.json")
    write_example(storage, "missing-image", 3)
    storage.delete("missing-image/image2.png")
    write_example(storage, "short-action", 2)
    table = {"image0.png": [0.0] * 16, "image1.png": [0.0] * 15}
    storage.put_bytes("short-action/actions.json", json.dumps(table).encode())
    write_example(storage, "half-pressed", 2)
    table = {"image0.png": [0.0] * 16, "image1.png": [0.0, 0.5] + [0.0] * 14}
    storage.put_bytes("half-pressed/actions.json", json.dumps(table).encode())
    write_example(storage, "stick-too-far", 1)
    storage.put_bytes("stick-too-far/actions.json",
                      json.dumps({"image0.png": [0.0] * 12 + [1.5, 0, 0, 0]}).encode())
    write_example(storage, "escape", 1)
    storage.put_bytes("escape/actions.json",
                      json.dumps({"../no-actions/image0.png": [0.0] * 16}).encode())
    write_example(storage, "not-json", 1)
    storage.put_bytes("not-json/actions.json", b"{image0.png: [0, 0]")
    write_example(storage, "not-an-image", 1)
    storage.put_bytes("not-an-image/image0.png", b"GIF89a garbage")
    return {
        "no-actions": "no-actions/actions.json does not exist",
        "missing-image": "missing-image/image2.png is named in",
        "short-action": "image1.png: expected 16 numbers (12 buttons, then 4 sticks), got 15",
        "half-pressed": "image1.png, column trigger_RT: 0.5 is not 0 or 1",
        "stick-too-far": "image0.png, column left_stick_x: 1.5 is outside [-1, 1]",
        "escape": "'../no-actions/image0.png' is not a file name in the folder",
        "not-json": "not-json/actions.json: not valid JSON",
        "not-an-image": "not-an-image/image0.png): not a readable image",
    }


def test_bad_folders_raise_seed_errors_naming_the_file(examples) -> None:
    storage, source = examples
    expected = bad_folders(storage)
    refs = {r.seed_id: r for r in discover_seeds(source, format="demonstrator")}
    assert sorted(refs) == sorted(expected)
    for folder, message in expected.items():
        with pytest.raises(SeedError, match="seed " + folder) as info:
            load_seed(refs[folder], image_size=SIZE, context_steps=3)
        assert message in str(info.value), (folder, str(info.value))


def test_a_job_rolls_out_good_folders_and_fails_bad_ones_by_name(tmp_path) -> None:
    """Discovery, plan and the actor on the demo model: replayed actions from a good folder,
    failed rollouts (with the file in the error) from the bad ones."""
    source = tmp_path / "Examples"
    storage = open_storage(str(source))
    expected = write_example(storage, "0_good", 6)
    failures = bad_folders(storage)
    spec = spec_from_data({
        "run": {"name": "t", "run_id": "demo", "run_date": "2026-01-02", "seed": 1},
        "model": {"checkpoint": str(DEMO_MODEL), "device": "cpu"},
        "seeds": {"source": str(source), "format": "demonstrator", "context_steps": 4},
        "rollouts": {"steps": 2, "per_seed": 1, "mode": "world_model",
                     "actions": {"kind": "replay"}},
        "resources": {"batch_size": 4, "rollouts_per_unit": 16},
        "output": {"root": str(tmp_path / "out"), "previews": False},
    })
    refs = discover_seeds(str(source), format="demonstrator")
    (unit,) = make_plan(refs, run_seed=1, per_seed=1, unit_size=spec.resources.unit_size())
    actor = RolloutActor(spec, worker="w0")
    try:
        receipt = actor.run_unit(unit)
    finally:
        actor.close()
    assert (receipt.ok, receipt.failed) == (1, len(failures))
    out = open_storage(spec.output.root)
    rows = pq.read_table(io.BytesIO(out.get_bytes(layout.rollouts_part_key(
        "2026-01-02", "demo", unit.unit_id)))).to_pylist()
    by_seed = {r["seed_id"]: r for r in rows}
    assert by_seed["0_good"]["status"] == "ok"
    for folder, message in failures.items():
        assert by_seed[folder]["status"] == "failed"
        assert message in by_seed[folder]["error"], by_seed[folder]["error"]
    steps = pq.read_table(io.BytesIO(out.get_bytes(layout.steps_part_key(
        "2026-01-02", "demo", unit.unit_id)))).to_pylist()
    good = sorted((r for r in steps if r["rollout_id"] == by_seed["0_good"]["rollout_id"]),
                  key=lambda r: r["step"])
    # the 4 context frames with their recorded actions, then 2 generated steps driven by the
    # recorded actions after them (replay), all binned as the official server bins them
    assert [r["generated"] for r in good] == [False] * 4 + [True] * 2
    assert [r["action_bins"] for r in good] == expected[:6].tolist()
