"""`wham-batch query`: read the steps, rollouts and frames tables of an output root, with
SQL."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.cli.command import Command
from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.query.bounds import (
    DEFAULT_TIMEOUT_S,
    MAX_DEFAULT_MEMORY,
    QueryBounds,
    parse_size,
    show_size,
)
from pipeline.query.sql import MAX_LIMIT, query, sql
from pipeline.query.tables import check_runs_exist

FORMATS = ("table", "csv", "json", "parquet")
#: Rows the text table shows when no --limit is given.
TABLE_DEFAULT_ROWS = 50
_CELL_CHARS = 40


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_LIMIT}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT", help="output root: a local folder or s3://bucket/prefix")
    p.add_argument(
        "--sql", metavar="QUERY",
        help="one SQL SELECT over the tables `steps`, `rollouts` and `frames`, e.g. "
        "\"SELECT rollout_id, count(*) FROM steps JOIN rollouts USING (run_id, rollout_id) "
        "WHERE status = 'ok' GROUP BY rollout_id\" (instead of --table/--where/--columns/--run-id)")
    p.add_argument("--table", choices=layout.TABLES, default=None,
                   help="the table to read without --sql (default steps)")
    p.add_argument("--run-id", help="only this run")
    p.add_argument(
        "--where", metavar="CONDITION",
        help="SQL condition on the table's columns, e.g. \"generated and step < 5\" or "
        "\"status <> 'ok'\"")
    p.add_argument("--columns", metavar="A,B", help="comma-separated columns to keep")
    p.add_argument("--limit", type=_limit, metavar="N", help="at most N rows")
    p.add_argument("--format", choices=FORMATS, default="table",
                   help="output format; json is JSON Lines (one JSON object per row, one per "
                   "line)")
    p.add_argument("--out", metavar="FILE", help="write to FILE instead of standard output")
    p.add_argument(
        "--committed-only",
        action="store_true",
        help="only parts of committed units (default: everything on storage)",
    )
    p.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help=f"stop a query that runs longer (default {DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--memory-limit", type=_size, metavar="SIZE",
                   help="memory a query may use, e.g. 512MiB or 2GiB (default half the free "
                   f"memory, at most {show_size(MAX_DEFAULT_MEMORY)})")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: AWS or AWS_ENDPOINT_URL_S3)")
    p.add_argument("--region", help="S3 region")


def _cell(value: Any) -> str:
    if value is None:
        text = ""
    elif isinstance(value, float):
        text = f"{value:.6g}"  # float32 columns would otherwise print 0.8500000238418579
    elif isinstance(value, list):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text if len(text) <= _CELL_CHARS else text[: _CELL_CHARS - 3] + "..."


def format_table(table: Any, *, more: bool) -> str:
    """A plain aligned text table (long cells shortened)."""
    names = table.column_names
    rows = [[_cell(v) for v in row.values()] for row in table.to_pylist()]
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    footer = f"({table.num_rows} rows{'; more not shown, use --limit' if more else ''})"
    return "\n".join([*lines, footer]) + "\n"


def _flatten_lists(table: Any) -> Any:
    """CSV cannot hold list columns (written as JSON text) nor bytes that are not text (the
    frames table's PNGs: written as base64)."""
    import base64

    import pyarrow as pa

    for i, field in enumerate(table.schema):
        if pa.types.is_list(field.type) or pa.types.is_fixed_size_list(field.type):
            text = [None if v is None else json.dumps(v) for v in table.column(i).to_pylist()]
            table = table.set_column(i, field.name, pa.array(text, pa.string()))
        elif pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            text = [None if v is None else base64.b64encode(v).decode("ascii")
                    for v in table.column(i).to_pylist()]
            table = table.set_column(i, f"{field.name}_base64", pa.array(text, pa.string()))
    return table


def _encode(table: Any, fmt: str) -> bytes:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt == "json":
        lines = [json.dumps(row, default=str, ensure_ascii=False) for row in table.to_pylist()]
        return ("\n".join(lines) + ("\n" if lines else "")).encode()
    sink = pa.BufferOutputStream()
    if fmt == "csv":
        pacsv.write_csv(_flatten_lists(table), sink)
    else:
        pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _read(args: argparse.Namespace, limit: int | None) -> Any:
    common = dict(endpoint_url=args.endpoint_url, region=args.region,
                  committed_only=args.committed_only,
                  bounds=QueryBounds(timeout_s=args.timeout, memory_bytes=args.memory_limit))
    if args.sql is not None:
        clash = [flag for flag, value in (("--table", args.table), ("--where", args.where),
                                          ("--columns", args.columns), ("--run-id", args.run_id))
                 if value is not None]
        if clash:
            raise UserError(f"--sql cannot be combined with {', '.join(clash)}: put them in "
                            "the query (FROM, WHERE, SELECT)")
        return sql(args.root, args.sql, limit=limit, **common)
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    return query(args.root, table=args.table or "steps", run_id=args.run_id, where=args.where,
                 columns=columns, limit=limit, **common)


def run_query(args: argparse.Namespace) -> int:
    if args.format == "parquet" and not args.out:
        raise UserError("--format parquet writes binary data: pass --out FILE")
    limit = args.limit
    if args.format == "table" and limit is None:
        limit = TABLE_DEFAULT_ROWS + 1  # one extra row tells whether more exist
    table = _read(args, limit)
    if table.num_rows == 0 and args.run_id:
        check_runs_exist(args.root, [args.run_id], option="--run-id ",
                         endpoint_url=args.endpoint_url, region=args.region)
    if args.format == "table":
        more = args.limit is None and table.num_rows > TABLE_DEFAULT_ROWS
        data = format_table(
            table.slice(0, TABLE_DEFAULT_ROWS) if more else table, more=more
        ).encode()
    else:
        data = _encode(table, args.format)
    if args.out:
        try:
            Path(args.out).write_bytes(data)
        except OSError as exc:
            raise UserError(f"--out: cannot write {args.out} ({exc.strerror or exc})") from None
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return 0


QUERY = Command(
    "query", "query the steps, rollouts and frames tables of an output root (SQL)", _arguments,
    run_query,
    description="Read the output tables across runs. --sql runs one read-only SQL SELECT "
    "(DuckDB) over the tables steps, rollouts and frames (joined with USING (run_id, "
    "rollout_id), frames also on step); "
    "--table/--where/--columns/--run-id build a simple one for you (--where is an SQL "
    "condition such as \"step >= 10 and action_source = 'model'\" or \"error is not "
    "null\"). Filters on run_id and run_date only open that run's files. Queries read "
    "nothing outside the root and write nothing (but --out).")
