"""Action sources: random, constant, scripted files (CSV/Parquet, local/S3) and replay."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.contracts.errors import UserError
from pipeline.contracts.sources import NEUTRAL_ACTION, SeedData, SeedError, constant_action
from pipeline.contracts.storage import open_storage
from pipeline.driver.discovery import load_action_script
from workers.actor.inputs import make_actions
from workers.wham.actions import (
    ACTION_NAMES,
    BUTTON_NAMES,
    STICK_BIN_CENTRES,
    STICK_NAMES,
    validate_actions,
)


def test_random_is_valid_and_depends_only_on_rng_seed():
    a = make_actions("random", steps=500, rng_seed=7, button_prob=0.3)
    assert a.shape == (500, 16) and a.dtype == np.int64
    validate_actions(a)
    np.testing.assert_array_equal(a, make_actions("random", steps=500, rng_seed=7, button_prob=0.3))
    assert not np.array_equal(a, make_actions("random", steps=500, rng_seed=8, button_prob=0.3))
    # Every bin is reached and buttons are pressed at about the requested rate.
    assert set(np.unique(a[:, 12:])) == set(range(11))
    assert 0.25 < a[:, :12].mean() < 0.35
    # The first steps do not depend on how many steps were asked for.
    np.testing.assert_array_equal(
        make_actions("random", steps=10, rng_seed=7, button_prob=0.3), a[:10]
    )


def test_constant_from_numbers_and_mapping():
    value = [0] * 12 + [0.0, 0.0, 1.0, -1.0]
    value[2] = 1  # button_A
    one = constant_action(value)
    assert one.tolist() == [0, 0, 1] + [0] * 9 + [5, 5, 10, 0]
    named = constant_action({"buttons": ["button_A"], "right_stick_x": 1.0, "right_stick_y": -1.0})
    np.testing.assert_array_equal(one, named)
    actions = make_actions("constant", steps=4, rng_seed=0, constant=value)
    assert actions.shape == (4, 16) and (actions == one).all()
    assert constant_action({}).tolist() == NEUTRAL_ACTION.tolist()


@pytest.mark.parametrize(
    "value, match",
    [
        ([0] * 15, "16 numbers"),
        ([2] + [0] * 15, "trigger_LT.*not 0 or 1"),
        ([0] * 12 + [0, 0, 0, 1.5], "right_stick_y.*outside"),
        ([0] * 12 + [0, float("nan"), 0, 0], "left_stick_y.*not a number"),
        ({"buttons": ["jump"]}, "unknown button"),
        ({"left_stick": 0.2}, "unknown key"),
    ],
)
def test_constant_errors(value, match):
    with pytest.raises(UserError, match=match):
        constant_action(value)


def script_rows(n: int) -> dict[str, list]:
    rng = np.random.default_rng(n)
    rows: dict[str, list] = {name: rng.integers(0, 2, n).tolist() for name in BUTTON_NAMES}
    for name in STICK_NAMES:
        rows[name] = rng.uniform(-1, 1, n).round(3).tolist()
    return rows


def expected_from(rows: dict[str, list]) -> np.ndarray:
    # Slow, obvious binning: the bin whose interval holds the value.
    edges = [-1.05, -0.95, -0.75, -0.5, -0.25, -0.05, 0.05, 0.25, 0.5, 0.75, 0.95, 1.05]
    out = []
    for i in range(len(rows[BUTTON_NAMES[0]])):
        buttons = [int(rows[n][i]) for n in BUTTON_NAMES]
        sticks = [max(k for k in range(11) if edges[k] <= rows[n][i]) for n in STICK_NAMES]
        out.append(buttons + sticks)
    return np.array(out, dtype=np.int64)


def write_csv(path, rows: dict[str, list]) -> None:
    names = list(rows)
    lines = [",".join(names)]
    lines += [",".join(str(rows[n][i]) for n in names) for i in range(len(rows[names[0]]))]
    path.write_text("\n".join(lines) + "\n")


def test_script_csv_and_parquet_local_and_s3(tmp_path, s3_bucket):
    rows = script_rows(20)
    write_csv(tmp_path / "s.csv", rows)
    pq.write_table(pa.table(rows), tmp_path / "s.parquet")
    expected = expected_from(rows)
    for path in ("s.csv", "s.parquet"):
        np.testing.assert_array_equal(load_action_script(str(tmp_path / path)), expected)
    storage = open_storage(s3_bucket)
    storage.put_bytes("scripts/s.csv", (tmp_path / "s.csv").read_bytes())
    script = load_action_script(storage.key_uri("scripts/s.csv"))
    np.testing.assert_array_equal(script, expected)
    np.testing.assert_array_equal(
        make_actions("file", steps=5, rng_seed=0, script=script), expected[:5]
    )
    with pytest.raises(UserError, match="20 rows; rollouts need 21"):
        make_actions("file", steps=21, rng_seed=0, script=script)


def test_script_stick_bins_and_booleans(tmp_path):
    rows = {name: ["true", "false"] for name in BUTTON_NAMES}
    rows |= {name: [0, 10] for name in STICK_NAMES}
    write_csv(tmp_path / "bins.csv", rows)
    got = load_action_script(str(tmp_path / "bins.csv"), sticks="bins")
    assert got.tolist() == [[1] * 12 + [0] * 4, [0] * 12 + [10] * 4]
    # The same file read as stick values: 0 is centred, 10 is out of range.
    with pytest.raises(UserError, match=r"row 2, column left_stick_x.*outside \[-1, 1\]"):
        load_action_script(str(tmp_path / "bins.csv"))
    # Values survive the trip: a stick at a bin centre comes back as that bin.
    rows = {name: [0] * 11 for name in BUTTON_NAMES}
    rows |= {name: [float(c) for c in STICK_BIN_CENTRES] for name in STICK_NAMES}
    write_csv(tmp_path / "centres.csv", rows)
    got = load_action_script(str(tmp_path / "centres.csv"))
    assert got[:, 12].tolist() == list(range(11))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda r: r.pop("skill_2"), "missing column.*skill_2"),
        (lambda r: r["button_B"].__setitem__(3, 2), "row 4, column button_B: 2"),
        (lambda r: r["left_stick_x"].__setitem__(0, 1.2), "row 1, column left_stick_x"),
        (lambda r: r["right_stick_x"].__setitem__(5, "nan"), "row 6, column right_stick_x"),
        (lambda r: r["dpad_up"].__setitem__(2, "up"), "row 3, column dpad_up: 'up'"),
        (lambda r: r["dpad_up"].__setitem__(2, ""), "row 3, column dpad_up"),
    ],
)
def test_script_errors_name_file_row_and_column(tmp_path, mutate, match):
    rows = script_rows(8)
    mutate(rows)
    write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(UserError, match=match) as info:
        load_action_script(str(tmp_path / "bad.csv"))
    assert "bad.csv" in str(info.value)


def test_script_file_problems(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_action_script(str(tmp_path / "none.csv"))
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(UserError, match=r"\.csv or \.parquet"):
        load_action_script(str(tmp_path / "a.txt"))
    (tmp_path / "empty.csv").write_text(",".join(ACTION_NAMES) + "\n")
    with pytest.raises(UserError, match="no rows"):
        load_action_script(str(tmp_path / "empty.csv"))
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="cannot be read"):
        load_action_script(str(tmp_path / "junk.parquet"))


def seed_with(future: np.ndarray | None) -> SeedData:
    return SeedData(
        seed_id="clip",
        uri="clip.npz",
        context_images=np.zeros((1, 3, 4, 4), np.uint8),
        context_actions=None,
        future_images=None,
        future_actions=future,
        source_size=(4, 4),
    )


def test_replay():
    future = make_actions("random", steps=9, rng_seed=3)
    np.testing.assert_array_equal(
        make_actions("replay", steps=6, rng_seed=0, seed=seed_with(future)), future[:6]
    )
    with pytest.raises(SeedError, match="clip.*needs 10.*has 9"):
        make_actions("replay", steps=10, rng_seed=0, seed=seed_with(future))
    with pytest.raises(SeedError, match="has 0"):
        make_actions("replay", steps=1, rng_seed=0, seed=seed_with(None))


def test_unknown_kind():
    with pytest.raises(UserError, match="unknown action source"):
        make_actions("telepathy", steps=1, rng_seed=0)
