"""Queries over outputs written by the real writer, locally and on the S3 endpoint."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.contracts.storage import open_storage
from pipeline.driver.run_state import read_runs
from pipeline.query import open_table, query
from workers.actor.writer import OutputWriter, WriterSettings

RUNS = [("2026-11-29", "nightly-a"), ("2026-11-30", "nightly-b")]
NOW = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)


def rollout_row(rollout_id: str, *, status: str, error: str | None) -> dict:
    row = dict.fromkeys(layout.ROLLOUTS_SCHEMA.names)
    row.update(
        rollout_id=rollout_id,
        seed_id="s",
        seed_uri="s.png",
        rollout_index=0,
        mode="world_model",
        action_policy="random",
        context_steps=1,
        generated_steps=3,
        temperature=0.9,
        top_p=1.0,
        greedy=False,
        rng_seed=1,
        model_id="preset:tiny",
        model_sha256="x",
        status=status,
        error=error,
        worker="w",
        started_at=NOW,
        finished_at=NOW,
        generate_seconds=0.1,
    )
    return row


def frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (3, 16, 16), dtype=np.uint8)


def action(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.integers(0, 2, 12), rng.integers(0, 11, 4)])


def write_run(storage, run_date: str, run_id: str, *, units: int = 2, tokens: int | None = 16,
              frames: str = "none"):
    """`units` units of 2 rollouts x (1 context + 3 generated) steps, committed."""
    writer = OutputWriter(storage, WriterSettings(
        run_date=run_date,
        run_id=run_id,
        frame_mode=frames,
        image_tokens=tokens is not None,
        model_id="preset:tiny",
        threads=1,
        tokens_per_image=tokens,
    ))
    with writer:
        for u in range(units):
            unit_id = layout.unit_id_for(u)
            for r in range(2):
                rollout_id = f"seed{u}-r{r:03d}"
                for step in range(4):
                    gen = step > 0
                    writer.add_step(
                        unit_id,
                        rollout_id,
                        step=step,
                        image=frame(step),
                        action=action(step + r),
                        generated=gen,
                        action_source="model" if gen else "seed",
                        image_tokens=np.full(tokens, step) if gen and tokens else None,
                    )
                status = "failed" if (u, r) == (1, 1) else "ok"
                writer.finish_rollout(
                    unit_id,
                    rollout_row(
                        rollout_id, status=status, error="boom" if status != "ok" else None
                    ),
                )
            writer.finish_unit(unit_id)
    storage.put_bytes(
        layout.manifest_key(run_date, run_id), json.dumps({"run_id": run_id}).encode()
    )


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    uri = (
        str(tmp_path / "out") if request.param == "local" else request.getfixturevalue("s3_bucket")
    )
    storage = open_storage(uri)
    write_run(storage, *RUNS[0])
    write_run(storage, *RUNS[1], tokens=32)  # a different model: token lists of another size
    storage.put_bytes(layout.success_key(*RUNS[1]), b"")
    return uri


def test_tables_across_runs(root):
    steps = open_table(root, "steps").to_table()
    # Per run: 2 units, 3 ok rollouts x 4 steps.
    assert steps.num_rows == 2 * 12
    assert steps.schema.names[:2] == ["run_date", "run_id"]
    assert sorted(set(steps.column("run_id").to_pylist())) == ["nightly-a", "nightly-b"]
    lengths = {
        (r["run_id"], len(r["image_tokens"])) for r in steps.to_pylist() if r["image_tokens"]
    }
    assert lengths == {("nightly-a", 16), ("nightly-b", 32)}
    rollouts = open_table(root, "rollouts").to_table()
    assert rollouts.num_rows == 8
    assert rollouts.column("status").to_pylist().count("failed") == 2


def test_run_id_filter_uses_partitions(root):
    import pyarrow.dataset as ds

    dataset = open_table(root, "steps")
    fragments = list(dataset.get_fragments(filter=ds.field("run_id") == "nightly-b"))
    assert len(fragments) == 2 and all("run_id=nightly-b" in f.path for f in fragments)
    table = query(root, run_id="nightly-b", columns=["run_id", "step"])
    assert table.column_names == ["run_id", "step"] and set(table["run_id"].to_pylist()) == {
        "nightly-b"
    }
    assert query(root, run_id="no-such-run").num_rows == 0  # the CLI says it is unknown


def test_read_runs(root):
    runs = read_runs(open_storage(root))
    assert [(r["run_date"], r["run_id"]) for r in runs] == RUNS
    assert [r["units_committed"] for r in runs] == [2, 2]
    assert [r["success"] for r in runs] == [False, True]
    assert runs[0]["manifest"] == {"run_id": "nightly-a"}


def test_committed_only(tmp_path):
    storage = open_storage(str(tmp_path))
    write_run(storage, *RUNS[0])
    storage.delete_prefix(layout.commit_key(*RUNS[0], "u000001"))
    assert open_table(str(tmp_path), "steps").count_rows() == 12
    assert open_table(str(tmp_path), "steps", committed_only=True).count_rows() == 8
    assert query(str(tmp_path), table="rollouts", committed_only=True).num_rows == 2


EXPRESSIONS = [
    ("step >= 2", lambda r: r["step"] >= 2),
    ("step = 1 and button_A = true", lambda r: r["step"] == 1 and r["button_A"]),
    (
        "action_source = 'seed' or step > 2",
        lambda r: r["action_source"] == "seed" or r["step"] > 2,
    ),
    ("run_id = 'nightly-a' and step != 0",
     lambda r: r["run_id"] == "nightly-a" and r["step"] != 0),
    (
        "rollout_id in ('seed0-r000', 'seed1-r000')",
        lambda r: r["rollout_id"] in ("seed0-r000", "seed1-r000"),
    ),
    ("image_tokens is null", lambda r: r["image_tokens"] is None),
    (
        "image_tokens is not null AND left_stick_x < 0",
        lambda r: r["image_tokens"] is not None and r["left_stick_x"] < 0,
    ),
    (
        "timestamp_s <= 0.1 and run_date = '2026-11-30'",
        lambda r: r["timestamp_s"] <= 0.1 and r["run_date"] == "2026-11-30",
    ),
    # what the old filter language could not say
    ("not generated", lambda r: not r["generated"]),
    ("rollout_id like 'seed1%'", lambda r: r["rollout_id"].startswith("seed1")),
    ("step between 1 and 2", lambda r: 1 <= r["step"] <= 2),
    ("(step = 1 or step = 3) and not (run_id = 'nightly-b')",
     lambda r: r["step"] in (1, 3) and r["run_id"] != "nightly-b"),
]


@pytest.mark.parametrize("expr, check", EXPRESSIONS)
def test_where_matches_plain_python(tmp_path, expr, check):
    storage = open_storage(str(tmp_path))
    for run in RUNS:
        write_run(storage, *run)
    everything = open_table(str(tmp_path)).to_table().to_pylist()
    expected = sorted((r["run_id"], r["rollout_id"], r["step"]) for r in everything if check(r))
    got = query(str(tmp_path), where=expr).to_pylist()
    assert sorted((r["run_id"], r["rollout_id"], r["step"]) for r in got) == expected
    assert 0 < len(expected) < len(everything)  # the filter really filters


@pytest.mark.parametrize(
    "expr, match",
    [
        ("stp > 1", 'column "stp" not found'),
        ("step > 'one'", "Could not convert string 'one'"),
        ("step >", "syntax error"),
        ("step 3", "syntax error"),
        ("step > 1 and", "syntax error"),
        ("", "empty query"),
        ("1 = 1; COPY (SELECT 1) TO 'x.csv'", "syntax error|exactly one SELECT"),
        ("__import__('os') = 1", "__import__"),
    ],
)
def test_where_errors(tmp_path, expr, match):
    write_run(open_storage(str(tmp_path)), *RUNS[0], units=1)
    with pytest.raises(UserError, match=match):
        query(str(tmp_path), where=expr)


def test_missing_table_and_bad_columns(tmp_path):
    with pytest.raises(UserError, match="no steps table"):
        open_table(str(tmp_path / "empty"))
    storage = open_storage(str(tmp_path))
    write_run(storage, *RUNS[0], units=1)
    with pytest.raises(UserError, match="unknown column.*nope"):
        query(str(tmp_path), columns=["step", "nope"])
    with pytest.raises(UserError, match="unknown table"):
        open_table(str(tmp_path), "pictures")
    with pytest.raises(UserError, match="no frames table"):  # frames: none wrote no frames
        open_table(str(tmp_path), "frames")


# ---------------------------------------------------------------------------------- CLI


def test_cli_formats(root, tmp_path, capsys):
    base = ["query", root, "--table", "rollouts", "--run-id", "nightly-a"]
    assert main([*base, "--format", "json", "--columns", "rollout_id,status"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 4 and set(rows[0]) == {"rollout_id", "status"}

    assert main([*base, "--table", "steps", "--format", "csv", "--where", "step = 3"]) == 0
    parsed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(parsed) == 3 and json.loads(parsed[0]["action_bins"])[12] in range(11)
    assert len(json.loads(parsed[0]["image_tokens"])) == 16

    out = tmp_path / "q.parquet"
    assert main([*base, "--format", "parquet", "--out", str(out), "--limit", "2"]) == 0
    assert pq.read_table(out).num_rows == 2

    assert main([*base, "--where", "status = 'failed'"]) == 0
    text = capsys.readouterr().out
    assert "seed1-r001" in text and "(1 rows)" in text


def test_cli_table_default_limit(tmp_path, capsys):
    storage = open_storage(str(tmp_path))
    for u in range(3):
        write_run(storage, "2026-11-30", f"run{u}", units=3)  # 3 x 3 x 8 = 72 step rows
    assert main(["query", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "(50 rows; more not shown, use --limit)" in text
    assert main(["query", str(tmp_path), "--limit", "60"]) == 0
    assert "(60 rows)" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    assert main(["query", str(tmp_path / "nothing")]) == 2
    assert "no steps table" in capsys.readouterr().err
    storage = open_storage(str(tmp_path))
    write_run(storage, *RUNS[0], units=1)
    assert main(["query", str(tmp_path), "--where", "bogus = 1"]) == 2
    assert 'column "bogus" not found' in capsys.readouterr().err
    assert main(["query", str(tmp_path), "--format", "parquet"]) == 2
    assert "--out" in capsys.readouterr().err


def test_duckdb_reads_the_same_layout(tmp_path):
    """Other engines read the hive layout too; counts agree with the Arrow dataset."""
    duckdb = pytest.importorskip("duckdb")
    storage = open_storage(str(tmp_path))
    for run in RUNS:
        write_run(storage, *run)
    pattern = str(tmp_path / "steps" / "**" / "*.parquet")
    rows = duckdb.sql(
        f"select run_id, count(*) from read_parquet('{pattern}', hive_partitioning=true) "
        "where generated group by run_id order by run_id"
    ).fetchall()
    arrow = query(str(tmp_path), where="generated = true")
    expected = sorted(
        (r, arrow.column("run_id").to_pylist().count(r)) for r in {"nightly-a", "nightly-b"}
    )
    assert rows == expected == [("nightly-a", 9), ("nightly-b", 9)]


def test_parts_of_a_newer_schema_or_unreadable_parts_are_named(tmp_path):
    storage = open_storage(str(tmp_path / "out"))
    write_run(storage, *RUNS[0])
    key = layout.steps_part_key(*RUNS[0], "u000000")  # the part checked for the run
    table = pq.read_table(io.BytesIO(storage.get_bytes(key)))
    newer = table.replace_schema_metadata(
        {**table.schema.metadata, layout.SCHEMA_VERSION_KEY: str(layout.SCHEMA_VERSION + 1)})
    sink = io.BytesIO()
    pq.write_table(newer, sink)
    storage.put_bytes(key, sink.getvalue())
    with pytest.raises(UserError, match=r"newer than the \d+ this wham-batch reads"):
        query(str(tmp_path / "out"))
    storage.put_bytes(key, sink.getvalue()[: len(sink.getvalue()) // 2])  # truncated
    with pytest.raises(UserError, match="part-u000000.parquet is damaged"):
        query(str(tmp_path / "out"))


@pytest.mark.parametrize(("version", "ok"), [(1, True), ("1", True), (0, True),
                                             (layout.SCHEMA_VERSION + 1, False), ("x", False)])
def test_check_schema_version(version, ok):
    if ok:
        layout.check_schema_version(version, where="m")
    else:
        with pytest.raises(UserError, match="^m"):
            layout.check_schema_version(version, where="m")
