"""Exports read back by their own libraries, and `decode` for tokens-only runs."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import RUN_ID
from PIL import Image

from pipeline.cli import main as cli_main
from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.dataset import RolloutWindows
from pipeline.export.decode import decode_run
from pipeline.export.episodes import float_actions
from pipeline.query import open_table
from workers.wham import random_model


def _loader_frames(root: str) -> dict[tuple[str, int], np.ndarray]:
    return {(w["rollout_id"], int(s)): f for w in RolloutWindows(root, window=6).iter_windows()
            for s, f in zip(w["step"], w["frames"], strict=True)}


@pytest.mark.parametrize("mode", ["png", "none"])
def test_hf_export_reads_back_with_datasets(mode_roots, tmp_path, mode):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "hf"
    assert cli_main(["export", mode_roots[mode], "--run-id", RUN_ID, "--format", "hf",
                     str(out)]) == 0
    data = datasets.load_from_disk(str(out))
    assert isinstance(data.features["image"], datasets.Image) and data.num_rows == 36
    frames = _loader_frames(mode_roots[mode])
    for row in data:
        np.testing.assert_array_equal(np.asarray(row["image"]).transpose(2, 0, 1),
                                      frames[(row["rollout_id"], row["step"])])
        assert row["timestamp"] == pytest.approx(row["step"] / 10)
        assert len(row["action"]) == 16 and len(row["image_tokens"]) == 16
    assert sorted(set(data["episode_index"])) == list(range(6))
    generated = data.filter(lambda r: r["generated"])
    assert generated.num_rows == 30 and all(v < 0 for v in generated["image_logprob"])


def test_lerobot_export_follows_the_v3_layout(mode_roots, tmp_path):
    datasets = pytest.importorskip("datasets")
    av = pytest.importorskip("av")
    import pandas as pd

    out = tmp_path / "lerobot"
    root = mode_roots["parquet"]
    assert cli_main(["export", root, "--run-id", RUN_ID, "--format", "lerobot", str(out)]) == 0
    info = json.loads((out / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 10
    assert (info["total_episodes"], info["total_frames"]) == (6, 36)
    assert info["features"]["observation.image"]["dtype"] == "video"
    assert info["features"]["action"]["shape"] == [16]
    # The data files, read the way LeRobot reads them: with `datasets`.
    data = datasets.load_dataset("parquet", data_files=str(out / "data/*/*.parquet"),
                                 split="train")
    assert data.num_rows == 36 and data["index"] == list(range(36))
    episodes = pd.read_parquet(out / "meta/episodes/chunk-000/file-000.parquet")
    tasks = pd.read_parquet(out / "meta/tasks.parquet")
    assert tasks.loc["WHAM rollouts of run modes (2026-02-03)", "task_index"] == 0
    assert list(episodes["length"]) == [6] * 6
    stats = json.loads((out / "meta/stats.json").read_text())
    assert len(stats["action"]["mean"]) == 16 and stats["observation.image"]["count"] == [36]
    frames = _loader_frames(root)
    video = out / info["video_path"].format(video_key="observation.image", chunk_index=0,
                                            file_index=0)
    with av.open(str(video)) as container:
        decoded = [(float(f.time), f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    assert len(decoded) == 36
    for _, ep in episodes.iterrows():
        rows = data.select(range(ep["dataset_from_index"], ep["dataset_to_index"]))
        assert set(rows["episode_index"]) == {ep["episode_index"]}
        for row in rows:
            t = ep["videos/observation.image/from_timestamp"] + row["timestamp"]
            picture = next(p for time, p in decoded if abs(time - t) < 1e-6)
            expected = frames[(ep["rollout_id"], row["frame_index"])].transpose(1, 2, 0)
            assert np.abs(picture.astype(int) - expected).mean() < 48  # H.264 on 16x16 noise
    steps = open_table(root).to_table().to_pylist()
    first = min((s for s in steps if s["rollout_id"] == episodes["rollout_id"][0]),
                key=lambda s: s["step"])
    np.testing.assert_allclose(data[0]["action"],
                               float_actions(np.array([first["action_bins"]]))[0])


def test_decode_a_tokens_only_run(mode_roots, tmp_path):
    none_root = tmp_path / "none"
    shutil.copytree(mode_roots["none"], none_root)
    wrong = random_model("tiny", seed=99)
    with pytest.raises(UserError, match="sha256"):
        next(RolloutWindows(str(none_root), window=2, decoder=wrong).iter_windows())
    expected = _loader_frames(str(none_root))
    report = decode_run(str(none_root), run_id=RUN_ID)
    assert (report.units, report.frames, report.objects) == (3, 36, 3)
    frames = open_table(str(none_root), "frames").to_table().to_pylist()
    assert len(frames) == 36
    for row in frames:
        with Image.open(io.BytesIO(row["png"])) as png:
            assert png.text["run_id"] == RUN_ID and png.text["step"] == str(row["step"])
            np.testing.assert_array_equal(np.asarray(png).transpose(2, 0, 1),
                                          expected[(row["rollout_id"], row["step"])])
    # Now the loader reads the parts instead of decoding: no decoder is needed any more.
    windows = RolloutWindows(str(none_root), window=6, decoder=wrong)
    assert len(list(windows.iter_windows())) == 6
    # PNGs into another root
    other = tmp_path / "pngs"
    assert cli_main(["decode", str(none_root), "--run-id", RUN_ID, "--format", "png",
                     "--out", str(other)]) == 0
    assert len(list(other.rglob("*.png"))) == 36
    key = layout.frame_key("2026-02-03", RUN_ID, frames[0]["rollout_id"], frames[0]["step"])
    assert (other / key).read_bytes() == frames[0]["png"]


def test_mistakes_are_messages(mode_roots, tmp_path, capsys):
    with pytest.raises(UserError, match="stored its frames already"):
        decode_run(mode_roots["png"], run_id=RUN_ID)
    assert cli_main(["export", mode_roots["png"], "--run-id", "nope", "--format", "hf",
                     str(tmp_path / "x")]) == 2
    assert "no committed ok rollouts of run 'nope'" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("x")
    assert cli_main(["export", mode_roots["png"], "--run-id", RUN_ID, "--format", "lerobot",
                     str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert Path(tmp_path / "full" / "a").read_text() == "x"
    (tmp_path / "afile").write_text("keep")
    assert cli_main(["export", mode_roots["png"], "--run-id", RUN_ID, "--format", "lerobot",
                     str(tmp_path / "afile")]) == 2
    assert "is a file; export into a new folder" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "keep"
