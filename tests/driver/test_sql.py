"""SQL over the output tables (DuckDB on the Arrow datasets), locally and on the S3
endpoint: joins, the lock-down (no files, URLs or writes), bounded input, clean errors,
and what a query does with stray or broken files under a table."""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.faultproxy import record_figures
from test_query import RUNS, write_run

from pipeline.cli import main
from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.contracts.storage import open_storage
from pipeline.query import open_table, query, sql
from pipeline.query.sql import MAX_BOOLEAN_TERMS, _tables_named

JOIN = ("SELECT run_id, status, count(*) AS n FROM steps JOIN rollouts "
        "USING (run_id, rollout_id) WHERE generated GROUP BY run_id, status "
        "ORDER BY run_id, status")


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    uri = (str(tmp_path / "out") if request.param == "local"
           else request.getfixturevalue("s3_bucket"))
    storage = open_storage(uri)
    for run in RUNS:
        write_run(storage, *run)
    return uri


def test_join_matches_plain_python(root):
    steps = open_table(root, "steps").to_table().to_pylist()
    rollouts = {(r["run_id"], r["rollout_id"]): r["status"]
                for r in open_table(root, "rollouts").to_table().to_pylist()}
    expected = Counter((s["run_id"], rollouts[(s["run_id"], s["rollout_id"])])
                       for s in steps if s["generated"])
    table = sql(root, JOIN)
    assert isinstance(table, pa.Table)  # for notebooks: an Arrow table
    got = {(r["run_id"], r["status"]): r["n"] for r in table.to_pylist()}
    assert got == dict(expected) == {("nightly-a", "ok"): 9, ("nightly-b", "ok"): 9}


def test_sql_from_the_command_line(root, capsys):
    assert main(["query", root, "--sql", JOIN, "--format", "json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == [{"run_id": "nightly-a", "status": "ok", "n": 9},
                    {"run_id": "nightly-b", "status": "ok", "n": 9}]
    failed = "SELECT rollout_id, error FROM rollouts WHERE status <> 'ok' ORDER BY rollout_id"
    assert main(["query", root, "--sql", failed]) == 0
    assert "seed1-r001  boom" in capsys.readouterr().out
    assert main(["query", root, "--sql", "SELECT 1", "--where", "step > 1"]) == 2
    assert "cannot be combined with --where" in capsys.readouterr().err


def test_run_filter_and_limit(root):
    table = sql(root, "SELECT * FROM steps WHERE run_id = 'nightly-b' ORDER BY rollout_id, step",
                limit=5)
    assert table.num_rows == 5 and set(table["run_id"].to_pylist()) == {"nightly-b"}
    assert sql(root, "SELECT * FROM steps WHERE run_id = 'nope'").num_rows == 0


HOSTILE = [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM 'https://example.com/x.parquet'",
    "COPY (SELECT * FROM steps) TO '{tmp}/stolen.csv'",
    "ATTACH '{tmp}/x.duckdb' AS other",
    "INSTALL httpfs",
    "SET enable_external_access = true",
    "SELECT 1; COPY (SELECT 1) TO '{tmp}/two.csv'",
    "CREATE TABLE t AS SELECT 1",
    "SELECT * FROM read_parquet('{root}/steps/**/*.parquet')",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_queries_read_nothing_outside_the_tables_and_write_nothing(tmp_path, text):
    root = tmp_path / "out"
    write_run(open_storage(str(root)), *RUNS[0], units=1)
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(UserError) as err:
        sql(str(root), text.format(tmp=tmp_path, root=root))
    message = str(err.value)
    assert "root:" not in message  # nothing of /etc/passwd
    assert "Permission" in message or "exactly one SELECT" in message
    assert sorted(p for p in tmp_path.rglob("*")) == before
    record_figures("hostile_queries", tried=1, rejected=1)


def test_thousands_of_or_clauses_are_a_clear_error(tmp_path, capsys):
    root = tmp_path / "out"
    write_run(open_storage(str(root)), *RUNS[0], units=1)
    many = " or ".join(f"step = {i}" for i in range(3001))
    with pytest.raises(UserError, match=f"3000 AND/OR/NOT operators.*{MAX_BOOLEAN_TERMS}"):
        query(str(root), where=many)
    assert main(["query", str(root), "--sql", f"SELECT * FROM steps WHERE {many}"]) == 2
    assert "write `column IN (a, b, ...)`" in capsys.readouterr().err
    # the same filter as IN runs; operators inside strings do not count
    values = ", ".join(str(i) for i in range(5000))
    assert query(str(root), where=f"step IN ({values})").num_rows == 8  # 2 rollouts x 4
    assert sql(str(root), "SELECT '" + " or " * 2000 + "' AS s").num_rows == 1
    with pytest.raises(UserError, match="nested 150 deep"):
        query(str(root), where="(" * 150 + "step = 1" + ")" * 150)
    with pytest.raises(UserError, match="characters, more than"):
        query(str(root), where="step = 1 " + " " * 70_000)
    record_figures("hostile_queries", tried=4, rejected=4)


def test_numbers_out_of_range_and_huge_limits_are_clean(tmp_path, capsys):
    root = str(tmp_path / "out")
    write_run(open_storage(root), *RUNS[0], units=1)
    assert query(root, where="step = 9223372036854775808").num_rows == 0
    assert main(["query", root, "--where", "step = 9223372036854775808"]) == 0
    assert "(0 rows)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage_error:  # argparse: usage line and the reason
        main(["query", root, "--limit", str(10**30)])
    assert usage_error.value.code == 2
    assert "--limit: must be between 0 and" in capsys.readouterr().err
    with pytest.raises(UserError, match="--limit must be between"):
        sql(root, "SELECT 1", limit=-1)
    assert main(["query", root, "--sql", "SELECT nope FROM steps"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --sql:") and 'column "nope" not found' in err
    assert "Traceback" not in err
    assert main(["query", root, "--sql", "SELEC 1"]) == 2
    assert "syntax error" in capsys.readouterr().err
    record_figures("hostile_queries", tried=5, rejected=4)  # the big number: 0 rows, exit 0


def test_stray_files_are_ignored_with_a_warning_and_a_truncated_part_is_named(
        tmp_path, caplog):
    root = tmp_path / "out"
    storage = open_storage(str(root))
    write_run(storage, *RUNS[0])
    run_dir = f"steps/run_date={RUNS[0][0]}/run_id={RUNS[0][1]}"
    for stray in (f"{run_dir}/notes.txt", f"{run_dir}/part-u000000.parquet.crc",
                  "steps/_SUCCESS", f"{run_dir}/old/part-u000009.parquet"):
        storage.put_bytes(stray, b"not parquet")
    with caplog.at_level(logging.WARNING, logger="pipeline.query"):
        assert query(str(root)).num_rows == 12
    assert "ignoring 4 file(s)" in caplog.text and "notes.txt" in caplog.text
    assert sql(str(root), "SELECT count(*) AS n FROM steps").to_pylist() == [{"n": 12}]
    # the second part of the run is cut short: the first one is what the version check reads
    key = layout.steps_part_key(*RUNS[0], "u000001")
    data = storage.get_bytes(key)
    storage.put_bytes(key, data[: len(data) // 2])
    for run in (lambda: query(str(root)), lambda: sql(str(root), "SELECT * FROM steps")):
        with pytest.raises(UserError, match="part-u000001.parquet is damaged"):
            run()


def test_parts_of_schema_version_1_read_with_nulls_for_new_columns(tmp_path):
    root = tmp_path / "out"
    storage = open_storage(str(root))
    write_run(storage, *RUNS[0], units=1)
    key = layout.rollouts_part_key(*RUNS[0], "u000000")
    table = pq.read_table(io.BytesIO(storage.get_bytes(key))).drop_columns(["greedy"])
    old = table.replace_schema_metadata({**table.schema.metadata,
                                         layout.SCHEMA_VERSION_KEY: b"1"})
    sink = io.BytesIO()
    pq.write_table(old, sink)
    storage.put_bytes(key, sink.getvalue())
    rows = sql(str(root), "SELECT rollout_id, greedy FROM rollouts").to_pylist()
    assert len(rows) == 2 and all(r["greedy"] is None for r in rows)


def test_no_tables_is_a_clear_error(tmp_path: Path):
    with pytest.raises(UserError, match="no output tables"):
        sql(str(tmp_path), "SELECT 1")


def test_the_readmes_queries_run_on_any_date(tmp_path):
    """The README's SQL examples pick the latest run themselves: no date in them."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Querying the outputs", 1)[1].split("\n## ", 1)[0]
    texts = [t for t in re.findall(r'--sql "(.*?)"', section, re.DOTALL) if "SELECT" in t]
    texts += re.findall(r'sql\("out/demo", """(.*?)"""\)', section, re.DOTALL)
    wheres = re.findall(r'--where "(.*?)"', section)
    assert len(texts) == 2 and len(wheres) == 1 and not re.search(r"20\d\d-\d\d-\d\d", section)
    root = tmp_path / "out"
    storage = open_storage(str(root))
    for run in RUNS:
        write_run(storage, *run)
    for text in texts:
        rows = sql(str(root), text).to_pylist()
        assert rows and all(r.get("run_id", "nightly-b") == "nightly-b" for r in rows)
    assert query(str(root), where=wheres[0]).num_rows >= 0


def test_frames_table_in_sql_and_as_csv(tmp_path, capsys):
    root = str(tmp_path / "out")
    write_run(open_storage(root), "2026-02-01", "framed", units=1, frames="parquet")
    text = ("SELECT rollout_id, step, png FROM frames JOIN steps USING (run_id, rollout_id, "
            "step) WHERE generated ORDER BY rollout_id, step")
    rows = sql(root, text).to_pylist()
    assert len(rows) == 2 * 3 and all(r["png"].startswith(b"\x89PNG") for r in rows)
    assert main(["query", root, "--sql", text, "--format", "csv"]) == 0
    parsed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [base64.b64decode(r["png_base64"]) for r in parsed] == [r["png"] for r in rows]


def test_a_query_opens_only_the_tables_it_names():
    assert _tables_named("SELECT count(*) FROM steps") == ("steps",)
    assert _tables_named("select * from ROLLOUTS join steps using (rollout_id)") == (
        "steps", "rollouts")
    assert _tables_named("SELECT png FROM frames") == ("frames",)
    assert _tables_named("SELECT 1") == layout.TABLES  # nothing named: all, as before
