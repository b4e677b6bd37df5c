"""The training-data loader over real runs in every frame mode: windows equal the tables'
rows, frames agree across modes, sharding yields every window once, filters select."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import DATE, MODES, RUN_ID, RUNS
from PIL import Image

from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.contracts.storage import open_storage
from pipeline.dataset import RolloutWindows
from pipeline.query import open_table, query
from workers.wham.actions import ACTION_NAMES, BUTTON_NAMES


def _key(item) -> tuple[str, str, int]:
    return (item["run_id"], item["rollout_id"], int(item["start"]))


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)


def _stored_frames(root: str) -> dict[tuple[str, int], np.ndarray]:
    """(rollout_id, step) -> frame, read the obvious way: from the frames table, or the PNG
    objects the steps rows name."""
    steps = query(root, columns=["rollout_id", "step", "frame_key"])
    if steps.column("frame_key").to_pylist()[0].endswith(".parquet"):
        frames = open_table(root, "frames").to_table()
        return {(r["rollout_id"], r["step"]): _png(r["png"]) for r in frames.to_pylist()}
    storage = open_storage(root)
    return {(r["rollout_id"], r["step"]): _png(storage.get_bytes(r["frame_key"]))
            for r in steps.to_pylist()}


@pytest.mark.parametrize("mode", MODES)
def test_windows_equal_the_tables_rows(mode_roots, mode):
    root = mode_roots[mode]
    windows = RolloutWindows(root, window=3, stride=2, run_id=RUN_ID)
    items = list(windows.iter_windows())
    # 6 rollouts x 6 steps: windows start at steps 0, 2 (4 would need steps 4..6)
    assert len(items) == len(windows) == 12 and windows.num_rollouts == 6
    rows = {(r["rollout_id"], r["step"]): r for r in query(root, run_id=RUN_ID).to_pylist()}
    stored = _stored_frames(root) if mode != "none" else None
    for item in items:
        assert item["frames"].dtype == np.uint8 and item["frames"].shape == (3, 3, 16, 16)
        for t in range(3):
            row = rows[(item["rollout_id"], item["start"] + t)]
            assert item["step"][t] == row["step"] and item["generated"][t] == row["generated"]
            assert item["actions"][t].tolist() == row["action_bins"]
            for name in ACTION_NAMES:
                assert item[name][t] == row[name]
            assert item["image_tokens"][t].tolist() == row["image_tokens"]
            for name in layout.STEP_QUALITY_COLUMNS:
                value = row[name]
                assert (np.isnan(item[name][t]) if value is None
                        else item[name][t] == pytest.approx(value))
            if stored is not None:
                np.testing.assert_array_equal(item["frames"][t],
                                              stored[(item["rollout_id"], item["start"] + t)])
        assert item["button_A"].dtype == np.bool_ and item["left_stick_x"].dtype == np.float32
        assert set(BUTTON_NAMES) < set(item)


def test_frames_agree_across_modes(mode_roots):
    """png and parquet hold the same PNGs; none decodes the same generated frames from the
    tokens (watermark included); its context frames are the tokenizer's reconstruction."""
    frames = {mode: {_key(w): w for w in RolloutWindows(mode_roots[mode], window=6)
                     .iter_windows()} for mode in MODES}
    assert frames["png"].keys() == frames["parquet"].keys() == frames["none"].keys()
    for key, png in frames["png"].items():
        np.testing.assert_array_equal(png["frames"], frames["parquet"][key]["frames"])
        none = frames["none"][key]
        np.testing.assert_array_equal(png["image_tokens"], none["image_tokens"])
        generated = png["generated"]
        diff = np.abs(png["frames"][generated].astype(int) - none["frames"][generated])
        assert diff.max() <= 1, diff.max()  # decoded in another batch shape: rounding at most
        assert not np.array_equal(png["frames"][~generated], none["frames"][~generated])


@pytest.mark.parametrize("mode", ["parquet", "none"])
def test_dataloader_workers_split_without_duplicates(mode_roots, mode):
    windows = RolloutWindows(mode_roots[mode], window=2, stride=1)
    expected = sorted(_key(w) for w in windows.iter_windows())
    assert len(expected) == 6 * 5 == len(windows)
    loader = torch.utils.data.DataLoader(windows.torch(shuffle=True, seed=3), batch_size=4,
                                         num_workers=2)
    seen = [(run, rollout, int(start)) for batch in loader
            for run, rollout, start in zip(batch["run_id"], batch["rollout_id"], batch["start"],
                                           strict=True)]
    assert sorted(seen) == expected  # each window once, across both workers
    batch = next(iter(loader))
    assert batch["frames"].dtype == torch.uint8 and batch["frames"].shape[1:] == (2, 3, 16, 16)
    assert batch["actions"].dtype == torch.int64 and batch["image_tokens"].shape[1:] == (2, 16)
    # ranks x workers: every consumer's share is disjoint and together they cover all
    shares = [[_key(w) for w in windows.iter_windows(index=i, count=3, shuffle=True, seed=1)]
              for i in range(3)]
    assert sorted(k for share in shares for k in share) == expected


def test_ray_dataset_of_windows(mode_roots):
    windows = RolloutWindows(mode_roots["parquet"], window=2, stride=2)
    expected = sorted(_key(w) for w in windows.iter_windows())
    dataset = windows.ray(shuffle=True)
    rows = dataset.take_all()
    assert sorted(_key(r) for r in rows) == expected
    halves = dataset.split(2)
    keys = [sorted(_key(r) for r in half.take_all()) for half in halves]
    assert sorted(keys[0] + keys[1]) == expected and not set(keys[0]) & set(keys[1])
    numeric = dataset.drop_columns(["run_date", "run_id", "rollout_id"])  # torch has no str
    batch = next(iter(numeric.iter_torch_batches(batch_size=4)))
    assert batch["frames"].dtype == torch.uint8 and batch["frames"].shape == (4, 2, 3, 16, 16)
    assert batch["image_tokens"].shape == (4, 2, 16)


def test_filters_by_run_status_and_quality(mode_roots):
    root = mode_roots["png"]
    rollouts = query(root, table="rollouts").to_pylist()
    cut = float(np.median([r["mean_logprob"] for r in rollouts]))
    good = RolloutWindows(root, window=6, where=f"mean_logprob > {cut}")
    want = {r["rollout_id"] for r in rollouts if r["mean_logprob"] > cut}
    assert {w["rollout_id"] for w in good.iter_windows()} == want and 0 < len(want) < 6
    with pytest.raises(UserError, match="run_id=other: no such run"):
        RolloutWindows(root, window=6, run_id="other")
    assert len(RolloutWindows(root, window=6, status="failed")) == 0
    only_generated = RolloutWindows(root, window=5, generated_only=True, frames=False)
    items = list(only_generated.iter_windows())
    assert len(items) == 6 and all(w["generated"].all() and "frames" not in w for w in items)
    with pytest.raises(UserError, match="nope"):
        RolloutWindows(root, window=2, where="nope > 1")


def test_a_wrong_decoder_is_refused(mode_roots):
    from workers.wham import random_model

    other = random_model("tiny", seed=99)
    windows = RolloutWindows(mode_roots["none"], window=2, decoder=other)
    with pytest.raises(UserError, match="sha256"):
        next(windows.iter_windows())
    assert DATE in windows.shards[0].run_date


def test_a_root_of_two_models_is_refused_naming_its_runs(two_models):
    """Windows of two models (16x16 frames with 16 tokens, 10x18 with 15) cannot share a
    batch: the loader says so when it is built, not the collate function mid-epoch."""
    with pytest.raises(UserError) as refused:
        RolloutWindows(str(two_models), window=2)
    message = str(refused.value)
    for expected in ("run-tiny (2026-02-03)", "run-vit (2026-02-03)",
                     "model preset:tiny-vit (sha256 ", "frames 3x16x16, 16 image tokens",
                     "frames 3x10x18, 15 image tokens", "run_id=['run-"):
        assert expected in message, message
    for run_id, (_, tokens) in RUNS.items():  # one model's runs load, as the message says
        windows = RolloutWindows(str(two_models), window=2, run_id=run_id)
        batches = list(torch.utils.data.DataLoader(windows.torch(), batch_size=3))
        assert sum(len(b["run_id"]) for b in batches) == len(windows) == 4 * 2
        assert {b["image_tokens"].shape[-1] for b in batches} == {tokens}
    globbed = RolloutWindows(str(two_models), window=2, run_id="run-t*", frames=False)
    assert {s.run_id for s in globbed.shards} == {"run-tiny"}


def test_a_run_id_that_names_no_run_is_refused(two_models):
    """A typo in a run id gave an empty epoch, silently; a filter that selects nothing of a
    run that exists still gives one."""
    for run_id in ("run-tinyy", ["run-tiny", "run-tinyy"]):
        with pytest.raises(UserError, match=r"run_id=run-tinyy: no such run under .*"
                           r"runs there: run-tiny, run-vit"):
            RolloutWindows(str(two_models), window=2, run_id=run_id)
    assert len(RolloutWindows(str(two_models), window=2, run_id="run-tiny",
                              where="mean_logprob > 1000")) == 0
    assert len(RolloutWindows(str(two_models), window=2, run_id="zz-*")) == 0  # a glob too
