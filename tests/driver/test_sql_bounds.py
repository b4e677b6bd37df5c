"""A query runs within bounds: a deadline, a memory limit, and Ctrl-C / SIGTERM stop it; a
damaged part is named as damaged. Every runaway query here ends in seconds (those that
could run away without the bounds run in a child process with its own deadline)."""

from __future__ import annotations

import io
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_query import RUNS, write_run

from pipeline.cli import main
from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.contracts.storage import open_storage
from pipeline.query import query, sql
from pipeline.query.bounds import MAX_DEFAULT_MEMORY, QueryBounds, available_memory, parse_size

REPO = Path(__file__).resolve().parents[2]
#: Runs until stopped, in constant memory: a recursive CTE (the case that ignored SIGTERM).
RUNAWAY = ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) "
           "SELECT count(*) FROM r")
#: Builds one list of two billion numbers (16 GB) unless a memory limit stops it.
HUNGRY = "SELECT list(x) FROM range(2000000000) t(x)"
#: Address space of a child that runs a query (DuckDB and pyarrow take about 1 GB).
CHILD_BYTES = 3 * 2**30


@pytest.fixture
def root(tmp_path) -> str:
    uri = str(tmp_path / "out")
    write_run(open_storage(uri), *RUNS[0], units=1)
    return uri


def _cli(root: str, *args: str) -> subprocess.Popen:
    """`wham-batch query ROOT ARGS` in a child process with bounded address space."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, "
            f"({CHILD_BYTES}, {CHILD_BYTES})); from pipeline.cli import main; "
            "print('ready', file=sys.stderr, flush=True); sys.exit(main(sys.argv[1:]))")
    return subprocess.Popen([sys.executable, "-c", code, "query", root, *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def _finish(child: subprocess.Popen, within_s: float) -> tuple[int, str]:
    try:
        _, err = child.communicate(timeout=within_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        pytest.fail(f"the query was still running {within_s:g} s later")
    return child.returncode, err


def test_a_runaway_query_stops_at_its_deadline(root):
    start = time.monotonic()
    with pytest.raises(UserError, match=r"stopped after 1.5 s, the query's time limit "
                       r"\(--timeout\)"):
        sql(root, RUNAWAY, bounds=QueryBounds(timeout_s=1.5))
    assert time.monotonic() - start < 15
    child = _cli(root, "--sql", RUNAWAY, "--timeout", "1.5")
    code, err = _finish(child, within_s=60)
    assert code == 2 and "(--timeout)" in err and "Traceback" not in err, err


@pytest.mark.parametrize("signum, code, said", [(signal.SIGTERM, 143, "stopped (SIGTERM)"),
                                                (signal.SIGINT, 130, "interrupted")])
def test_sigterm_and_ctrl_c_stop_a_running_query(root, signum, code, said):
    child = _cli(root, "--sql", RUNAWAY, "--timeout", "600")
    ready, _, _ = select.select([child.stderr], [], [], 120)
    assert ready and child.stderr.readline() == "ready\n"
    time.sleep(3)  # inside the query: its tables open in well under a second
    assert child.poll() is None
    sent = time.monotonic()
    child.send_signal(signum)
    got, err = _finish(child, within_s=30)
    assert (got, said in err) == (code, True), err
    assert time.monotonic() - sent < 15


def test_memory_is_bounded_in_the_query_and_in_its_result(root):
    with pytest.raises(UserError, match="it needs more than the query's memory limit of "
                       r"256 MiB \(--memory-limit"):
        sql(root, HUNGRY, bounds=QueryBounds(memory_bytes=256 * 2**20))
    with pytest.raises(UserError, match="its result is more than the query's memory limit"):
        sql(root, "SELECT * FROM range(100000000) t(x)",
            bounds=QueryBounds(memory_bytes=128 * 2**20))
    # from the command line, the default limit: the child's address space is enough for it
    code, err = _finish(_cli(root, "--sql", HUNGRY, "--memory-limit", "256MiB"), within_s=120)
    assert code == 2 and "memory limit of 256 MiB" in err, err


def test_the_default_memory_limit_is_a_share_of_free_memory_and_a_few_gib_at_most(root):
    limit = QueryBounds().memory()
    assert limit <= min(MAX_DEFAULT_MEMORY, available_memory())
    shown = sql(root, "SELECT current_setting('memory_limit') AS m").column("m")[0].as_py()
    value, unit = shown.split()
    assert float(value) * {"MiB": 2**20, "GiB": 2**30}[unit] <= MAX_DEFAULT_MEMORY * 1.001
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("512 mb") == 512 * 10**6
    for bad in ("lots", "-1G", "2 parsecs"):
        with pytest.raises(ValueError, match="not a size like 512MiB"):
            parse_size(bad)
    with pytest.raises(SystemExit):
        main(["query", root, "--memory-limit", "lots"])
    with pytest.raises(UserError, match="--memory-limit must be at least"):
        sql(root, "SELECT 1", bounds=QueryBounds(memory_bytes=1000))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_damaged_part_is_named_as_damaged(tmp_path, request, capsys, where):
    uri = (str(tmp_path / "out") if where == "local"
           else request.getfixturevalue("s3_bucket"))
    storage = open_storage(uri)
    write_run(storage, *RUNS[0])
    key = layout.steps_part_key(*RUNS[0], "u000001")
    data = bytearray(storage.get_bytes(key))
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    column = meta.row_group(0).column(3)  # a data page header, deep inside the file
    data[column.data_page_offset + 20] ^= 0xFF
    storage.put_bytes(key, bytes(data))
    for args in (["--format", "json"], ["--sql", "SELECT * FROM steps", "--format", "csv"]):
        assert main(["query", uri, *args]) == 2
        err = capsys.readouterr().err
        assert f"table part {storage.key_uri(key)} is damaged" in err, err
        assert "storage or network failure" not in err and "resumes" not in err
    with pytest.raises(UserError, match="part-u000001.parquet is damaged"):
        query(uri, run_id=RUNS[0][1])


def test_bounds_beyond_any_machine_are_messages(root, capsys):
    """A deadline a million years away overflowed the wait (OverflowError), and a memory
    limit past DuckDB's range was its ParserException, both as tracebacks."""
    for args, said in ((["--timeout", "1e12"], "--timeout must be at most"),
                       (["--memory-limit", "99999999999999999999999TiB"],
                        "more than this machine's memory")):
        assert main(["query", root, "--sql", "SELECT 1", *args]) == 2
        assert said in capsys.readouterr().err
    with pytest.raises(UserError, match="--timeout must be at most"):
        sql(root, "SELECT 1", bounds=QueryBounds(timeout_s=1e12))


def test_a_mistake_in_the_query_text_is_reported_as_it_is(tmp_path):
    """A query whose text names a column "parquet" (or a table "magic") gets DuckDB's own
    error; its error used to send the query side reading every part of the root whole,
    looking for a damaged one, and then blame one that was. A part that is damaged is found
    from its footer, which every query checks before it runs, and named as damaged."""
    uri = str(tmp_path / "out")
    storage = open_storage(uri)
    write_run(storage, *RUNS[0])
    mistakes = (("SELECT parquet FROM steps", 'Referenced column "parquet" not found'),
                ("SELECT * FROM magic", "Table with name magic does not exist"))
    for text, said in mistakes:
        with pytest.raises(UserError, match=said):
            sql(uri, text)
    key = layout.steps_part_key(*RUNS[0], "u000001")
    storage.put_bytes(key, storage.get_bytes(key)[:-20])  # a cut footer: damaged
    for text, _ in mistakes:
        with pytest.raises(UserError, match=r"part-u000001\.parquet is damaged"):
            sql(uri, text)
