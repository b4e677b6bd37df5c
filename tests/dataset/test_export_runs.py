"""Exports of several runs as one dataset: selection by id, date and glob, episodes
numbered across runs, one action encoding in both formats, LeRobot's statistics shapes,
output folders that are never overwritten by surprise, quiet output, damaged parts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import NIGHTS, _two_seeds, run_in_process

from pipeline.cli import main as cli_main
from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.dataset import RolloutWindows
from pipeline.query import query
from workers.actor.replica import load_replica

datasets = pytest.importorskip("datasets")
pytest.importorskip("av")


def _export(root: Path, out: Path, fmt: str, *args: str) -> int:
    return cli_main(["export", str(root), str(out), "--format", fmt, *args])


def _hf_runs(out: Path) -> dict[int, str]:
    """episode_index -> run_id of an HF export (checked one run per episode)."""
    data = datasets.load_from_disk(str(out))
    runs: dict[int, set[str]] = {}
    for episode, run_id in zip(data["episode_index"], data["run_id"], strict=True):
        runs.setdefault(episode, set()).add(run_id)
    assert all(len(r) == 1 for r in runs.values())
    return {e: r.pop() for e, r in sorted(runs.items())}


@pytest.mark.parametrize(("selection", "expected"), [
    (["--run-id", "night-a", "--run-id", "night-b"], ["night-a", "night-b"]),
    (["--run-id", "night-*"], ["night-a", "night-b"]),
    (["--run-date", "2026-02-04"], ["night-b", "other"]),
    (["--run-id", "night-*", "--run-date", "2026-02-0[4-9]"], ["night-b"]),
])
def test_hf_export_of_several_runs(three_runs, tmp_path, selection, expected):
    out = tmp_path / "hf"
    assert _export(three_runs, out, "hf", *selection) == 0
    runs = _hf_runs(out)
    assert list(runs) == list(range(4 * len(expected)))  # numbered across the runs
    assert [runs[e] for e in range(0, len(runs), 4)] == expected  # runs in (date, id) order
    data = datasets.load_from_disk(str(out))
    dates = dict(zip(data["run_id"], data["run_date"], strict=True))
    assert dates == {run_id: date for date, run_id in NIGHTS if run_id in expected}


def test_lerobot_export_of_several_runs(three_runs, tmp_path, capsys):
    out = tmp_path / "lerobot"
    assert _export(three_runs, out, "lerobot", "--run-id", "night-*") == 0
    assert "wrote 8 episodes, 32 frames of 2 runs (night-a, night-b)" in capsys.readouterr().out
    info = json.loads((out / "meta/info.json").read_text())
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (8, 32, 2)
    assert info["wham_batch"]["runs"] == [{"run_date": "2026-02-03", "run_id": "night-a"},
                                          {"run_date": "2026-02-04", "run_id": "night-b"}]
    episodes = pd.read_parquet(out / "meta/episodes/chunk-000/file-000.parquet")
    assert list(episodes["episode_index"]) == list(range(8))
    assert list(episodes["run_id"]) == ["night-a"] * 4 + ["night-b"] * 4
    tasks = pd.read_parquet(out / "meta/tasks.parquet")
    data = pd.read_parquet(out / "data/chunk-000/file-000.parquet")
    for _, ep in episodes.iterrows():
        rows = data[data["episode_index"] == ep["episode_index"]]
        task = tasks.loc[f"WHAM rollouts of run {ep['run_id']} ({ep['run_date']})", "task_index"]
        assert set(rows["task_index"]) == {task} and ep["tasks"] == [tasks.index[task]]
    assert list(data["index"]) == list(range(32))


def test_one_action_encoding_in_both_formats(three_runs, tmp_path):
    """`action` is the game pad's values (floats: buttons 0/1, sticks in [-1, 1]) and
    `action_bins` the model form, in both exports and as the steps table has them."""
    assert _export(three_runs, tmp_path / "hf", "hf", "--run-id", "night-a") == 0
    assert _export(three_runs, tmp_path / "lr", "lerobot", "--run-id", "night-a") == 0
    hf = datasets.load_from_disk(str(tmp_path / "hf")).with_format("numpy")
    lr = pd.read_parquet(tmp_path / "lr" / "data/chunk-000/file-000.parquet")
    assert len(hf) == len(lr) == 16
    table = {(r["rollout_id"], r["step"]): r
             for r in query(str(three_runs), run_id="night-a").to_pylist()}
    names = list(json.loads((tmp_path / "lr/meta/info.json").read_text())
                 ["features"]["action"]["names"])
    for i in range(16):
        row = table[(hf[i]["rollout_id"], int(hf[i]["step"]))]
        floats = [float(row[name]) for name in names]
        np.testing.assert_allclose(hf[i]["action"], floats)
        np.testing.assert_allclose(lr["action"][i], floats)
        assert hf[i]["action"].dtype == np.float32
        assert list(hf[i]["action_bins"]) == list(lr["action_bins"][i]) == row["action_bins"]
    assert np.abs(np.stack(lr["action"])).max() <= 1.0
    assert np.stack(lr["action_bins"]).max() > 1  # bins, not floats


def test_lerobot_stats_have_lerobot_shapes(three_runs, tmp_path):
    out = tmp_path / "lerobot"
    assert _export(three_runs, out, "lerobot", "--run-id", "night-a") == 0
    stats = json.loads((out / "meta/stats.json").read_text())
    features = json.loads((out / "meta/info.json").read_text())["features"]
    data = pd.read_parquet(out / "data/chunk-000/file-000.parquet")
    for name, feature in features.items():
        shape = (3, 1, 1) if feature["dtype"] == "video" else tuple(feature["shape"])
        for key in ("min", "max", "mean", "std"):
            assert np.shape(stats[name][key]) == shape, (name, key)
        assert stats[name]["count"] == [16], name
    assert stats["timestamp"]["max"] == [pytest.approx(0.3)]
    np.testing.assert_allclose(stats["action"]["mean"], np.stack(data["action"]).mean(axis=0),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["hf", "lerobot"])
def test_output_folders_are_never_overwritten_by_surprise(three_runs, tmp_path, capsys, fmt):
    run = ["--run-id", "night-a"]
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    for flags in ([], ["--overwrite"]):
        assert _export(three_runs, kept, fmt, *run, *flags) == 2
        assert (kept / "notes.txt").read_text() == "mine" and len(list(kept.iterdir())) == 1
    err = capsys.readouterr().err
    assert "kept is not empty" in err and "pass --overwrite" in err
    assert "holds files that are not a dataset export" in err
    # an output root, a folder inside it, a folder holding it: refused, root untouched
    (three_runs / "dataset_info.json").write_text("{}")
    before = sorted(p.relative_to(three_runs) for p in three_runs.rglob("*"))
    for out in (three_runs, three_runs / "export", three_runs.parent):
        assert _export(three_runs, out, fmt, *run, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "is an output root" in err and "is inside the output root" in err
    assert "holds the output root" in err
    assert sorted(p.relative_to(three_runs) for p in three_runs.rglob("*")) == before
    assert (three_runs / "dataset_info.json").read_text() == "{}"
    # an earlier export is replaced only with --overwrite, and then wholly
    out = tmp_path / "export"
    assert _export(three_runs, out, fmt, *run) == 0
    assert _export(three_runs, out, fmt, *run) == 2
    stale = out / ("data/chunk-000/file-009.parquet" if fmt == "lerobot"
                   else "data-00001-of-00002.arrow")
    stale.write_text("old")
    assert _export(three_runs, out, fmt, "--run-id", "night-*", "--overwrite") == 0
    assert not stale.exists()
    assert "8 episodes" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "kept"]  # nothing staged


def test_export_is_quiet_unless_verbose(three_runs, tmp_path, capsys):
    assert _export(three_runs, tmp_path / "a", "hf", "--run-id", "night-a") == 0
    quiet = capsys.readouterr()
    assert quiet.err == "" and quiet.out.count("\n") == 1, quiet
    assert _export(three_runs, tmp_path / "b", "hf", "--run-id", "night-a", "--verbose") == 0
    assert "Saving the dataset" in capsys.readouterr().err


def test_selection_mistakes_are_messages(three_runs, two_models, tmp_path, capsys):
    for args in ([], ["--run-id", "night-a", "--run-id", "nope"], ["--run-id", "zz-*"],
                 ["--run-id", "bad id"], ["--run-date", "2026-13-01"]):
        assert _export(three_runs, tmp_path / "x", "hf", *args) == 2
    err = capsys.readouterr().err
    for expected in ("name the runs to export", "no committed ok rollouts of run 'nope'",
                     "no committed ok rollouts of run 'zz-*'", "run_id 'bad id'",
                     "run_date '2026-13-01'"):
        assert expected in err, err
    assert _export(two_models, tmp_path / "x", "lerobot", "--run-id", "run-*") == 2
    err = capsys.readouterr().err
    assert "models of different shapes" in err and "--run-id run-tiny" in err
    assert not (tmp_path / "x").exists()


def _damage_png(part: Path) -> None:
    data = bytearray(part.read_bytes())
    at = data.index(b"IDAT") + 12  # inside the first frame's image data (stored uncompressed)
    data[at] ^= 0xFF
    part.write_bytes(bytes(data))


@pytest.mark.parametrize("fmt", ["hf", "lerobot"])
def test_damaged_parts_are_named_and_called_damaged(three_runs, tmp_path, capsys, fmt):
    root = tmp_path / "root"
    shutil.copytree(three_runs, root)
    frames = root / layout.frames_part_key("2026-02-03", "night-a", "u000000")
    _damage_png(frames)
    assert _export(root, tmp_path / "out", fmt, "--run-id", "night-a") == 2
    err = capsys.readouterr().err
    assert f"in {frames} is damaged (not a readable PNG" in err, err
    assert "storage or network failure" not in err and "resumes" not in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="is damaged"):
        list(RolloutWindows(str(root), window=2, run_id="night-a").iter_windows())
    steps = root / layout.steps_part_key("2026-02-04", "night-b", "u000000")
    steps.write_bytes(steps.read_bytes()[:-20])  # a cut footer
    assert _export(root, tmp_path / "out", fmt, "--run-id", "night-b") == 2
    err = capsys.readouterr().err
    assert f"{steps} is damaged (not a readable Parquet file" in err, err


def test_image_tokens_that_do_not_decode_are_named_as_damaged(tmp_path):
    """A tokens-only run whose steps part holds a token its model does not have, or a step
    with fewer tokens than the others: the loader's error named neither the file nor
    damage (the model's own "values must lie in [0, 64)", or numpy's "inhomogeneous
    shape")."""
    seeds = _two_seeds(tmp_path / "seeds")
    root = tmp_path / "out"
    run_in_process(seeds, root, run_id="tok", run_date=NIGHTS[0][0], previews=False,
                   frames="none")
    decoder = load_replica(checkpoint=None, preset="tiny", device="cpu", dtype="float32")
    part = root / layout.steps_part_key(NIGHTS[0][0], "tok", "u000000")
    whole = pq.read_table(part)
    column = whole.schema.get_field_index("image_tokens")
    for damage in (lambda tokens: tokens.__setitem__(0, 65535), lambda tokens: tokens.pop()):
        rows = whole.column("image_tokens").to_pylist()
        damage(rows[1])
        pq.write_table(whole.set_column(column, whole.schema.field(column),
                                        pa.array(rows, whole.schema.field(column).type)), part)
        with pytest.raises(UserError, match=f"{part} is damaged .*image tokens"):
            list(RolloutWindows(str(root), window=2, decoder=decoder).iter_windows())
