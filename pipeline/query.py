"""Reading outputs back with Apache Arrow: datasets over the hive-partitioned tables.

`open_table(root, "steps")` is a `pyarrow.dataset.Dataset` over every run under the root;
`run_date` and `run_id` come from the hive paths, so filtering on them only opens that
run's files. Runs of different models unify: `image_tokens` reads as a plain list.

What a query sees: by default everything on storage, including parts of units that are
still being written or whose commit marker is missing (a crash between the part and the
marker). Parts are written whole and a retried unit overwrites its own part, so a part
never holds half a unit or duplicates. Commit markers guard resume, not reads; pass
`committed_only=True` (CLI `--committed-only`) to see only committed units' parts.

`parse_where` turns a small filter language into a `pyarrow.compute.Expression` without
`eval`: clauses `column op value` (op: = == != < <= > >=), `column in (v1, v2)`,
`column is null`, `column is not null`, joined with `and` / `or` (`and` binds tighter).
Values are numbers, 'quoted' or "quoted" strings, true/false, or bare words (read as
strings for string columns).
"""

from __future__ import annotations

import datetime as dt
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline import layout
from pipeline.errors import UserError
from pipeline.storage import open_storage

_PART = re.compile(r"^part-(?P<unit>u\d+)\.parquet$")
FOOTER_READERS = 16  # parallel reads of part footers when checking schema versions


def _committed_units(storage: Any) -> set[tuple[str, str, str]]:
    """(run_date, run_id, unit_id) of every commit marker under the root."""
    found = set()
    for key in storage.list_keys(f"{layout.RUNS_DIR}/"):
        parsed = layout.parse_run_key(key)
        unit = layout.commit_unit_id(parsed[2]) if parsed else None
        if unit is not None:
            found.add((parsed[0], parsed[1], unit))
    return found


def check_versions(dataset: Any) -> None:
    """UserError if a run's parts were written with a newer schema than this code reads.

    One part per run folder is checked (a run is written by one version); its footer is
    read, so an unreadable part is reported by name here too.
    """
    import pyarrow as pa

    first: dict[str, Any] = {}
    for fragment in dataset.get_fragments():
        first.setdefault(fragment.path.rsplit("/", 1)[0], fragment)

    def version(fragment: Any) -> tuple[str, bytes | None]:
        try:
            metadata = fragment.physical_schema.metadata or {}
        except (pa.ArrowInvalid, OSError) as exc:
            raise UserError(f"table part {fragment.path} cannot be read ({exc})") from None
        return fragment.path, metadata.get(layout.SCHEMA_VERSION_KEY)

    with ThreadPoolExecutor(FOOTER_READERS) as pool:
        for path, found in pool.map(version, first.values()):
            if found is not None:
                layout.check_schema_version(found.decode(errors="replace"),
                                            where=f"table part {path}")


def open_table(
    root: str,
    table: str = layout.STEPS_TABLE,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    committed_only: bool = False,
) -> Any:
    """A pyarrow Dataset over one output table across all runs under `root`."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    schema = layout.query_schema(table)
    storage = open_storage(root, endpoint_url=endpoint_url, region=region)
    fs, base = storage.arrow_fs()
    path = f"{base}/{table}"
    partitioning = ds.partitioning(
        schema=pa.schema([schema.field(name) for name in layout.PARTITION_COLUMNS]), flavor="hive"
    )
    try:
        dataset = ds.dataset(
            path, filesystem=fs, format="parquet", partitioning=partitioning, schema=schema
        )
    except FileNotFoundError:
        raise UserError(
            f"no {table} table under {storage.uri} (nothing written there yet?)"
        ) from None
    check_versions(dataset)
    if not committed_only:
        return dataset
    committed = _committed_units(storage)
    keep = []
    for file in dataset.files:
        parts = file[len(path) + 1 :].split("/")
        values = dict(p.split("=", 1) for p in parts[:-1] if "=" in p)
        match = _PART.match(parts[-1])
        if match and (values.get("run_date"), values.get("run_id"), match["unit"]) in committed:
            keep.append(file)
    return ds.dataset(
        keep,
        filesystem=fs,
        format="parquet",
        partitioning=partitioning,
        schema=schema,
        partition_base_dir=path,
    )


# ------------------------------------------------------------------------- filter language

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>'(?:[^']|'')*'|"(?:[^"]|"")*")
      | (?P<op>==|!=|<=|>=|=|<|>|\(|\)|,)
      | (?P<word>[^\s()'",=!<>]+)
    )""",
    re.VERBOSE,
)


def _tokens(expr: str) -> list[tuple[str, str, int]]:
    out, pos = [], 0
    expr = expr.rstrip()
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if not match:
            raise UserError(f"--where: cannot read {expr[pos : pos + 20]!r} at character {pos + 1}")
        kind = match.lastgroup or "word"
        out.append((kind, match.group(kind), match.start(kind)))
        pos = match.end()
    return out


class _Parser:
    def __init__(self, expr: str, schema: Any) -> None:
        self.expr = expr
        self.schema = schema
        self.tokens = _tokens(expr)
        self.i = 0

    def _peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _next(self, what: str) -> tuple[str, str, int]:
        token = self._peek()
        if token is None:
            raise UserError(f"--where {self.expr!r}: expected {what} at the end")
        self.i += 1
        return token

    def _keyword(self, word: str) -> bool:
        token = self._peek()
        if token and token[0] == "word" and token[1].lower() == word:
            self.i += 1
            return True
        return False

    def parse(self) -> Any:
        result = self._or()
        if self._peek() is not None:
            _, text, pos = self._peek()
            raise UserError(f"--where {self.expr!r}: unexpected {text!r} at character {pos + 1}")
        return result

    def _or(self) -> Any:
        result = self._and()
        while self._keyword("or"):
            result = result | self._and()
        return result

    def _and(self) -> Any:
        result = self._clause()
        while self._keyword("and"):
            result = result & self._clause()
        return result

    def _clause(self) -> Any:
        import pyarrow.dataset as ds

        kind, name, pos = self._next("a column name")
        if kind != "word":
            raise UserError(f"--where {self.expr!r}: expected a column name at character {pos + 1}")
        if name not in self.schema.names:
            raise UserError(
                f"--where: unknown column {name!r}; columns: {', '.join(self.schema.names)}"
            )
        field = ds.field(name)
        if self._keyword("is"):
            negate = self._keyword("not")
            if not self._keyword("null"):
                raise UserError(f"--where: expected 'null' after '{name} is'")
            return ~field.is_null() if negate else field.is_null()
        if self._keyword("in"):
            if self._next("'('")[1] != "(":
                raise UserError(f"--where: expected '(' after '{name} in'")
            values = [self._value(name)]
            while (sep := self._next("',' or ')'")[1]) == ",":
                values.append(self._value(name))
            if sep != ")":
                raise UserError(f"--where: expected ',' or ')' in the list for {name!r}")
            return field.isin(values)
        kind, op, pos = self._next("an operator")
        if kind != "op" or op in "(),":
            raise UserError(f"--where: expected an operator after {name!r} at character {pos + 1}")
        value = self._value(name)
        return {
            "=": field == value,
            "==": field == value,
            "!=": field != value,
            "<": field < value,
            "<=": field <= value,
            ">": field > value,
            ">=": field >= value,
        }[op]

    def _value(self, column: str) -> Any:
        import pyarrow as pa

        kind, text, pos = self._next(f"a value for {column!r}")
        if kind == "op":
            raise UserError(f"--where: expected a value for {column!r} at character {pos + 1}")
        if kind == "string":
            text = text[1:-1].replace(text[0] * 2, text[0])
        col_type = self.schema.field(column).type
        try:
            if pa.types.is_boolean(col_type):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return text.lower() in ("true", "1")
            if pa.types.is_integer(col_type):
                return int(text)
            if pa.types.is_floating(col_type):
                return float(text)
            if pa.types.is_timestamp(col_type):
                stamp = dt.datetime.fromisoformat(text)
                return stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.UTC)
            if pa.types.is_string(col_type):
                return text
        except ValueError:
            raise UserError(
                f"--where: {text!r} is not a valid value for column {column!r} ({col_type})"
            ) from None
        raise UserError(f"--where: column {column!r} ({col_type}) cannot be compared")


def parse_where(expr: str, schema: Any) -> Any:
    """A filter string -> pyarrow.compute.Expression; UserError naming the problem."""
    if not expr.strip():
        raise UserError("--where: empty filter")
    return _Parser(expr, schema).parse()


def query(
    root: str,
    *,
    table: str = layout.STEPS_TABLE,
    run_id: str | None = None,
    where: str | None = None,
    columns: list[str] | None = None,
    limit: int | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
    committed_only: bool = False,
) -> Any:
    """Rows of one table as a pyarrow.Table (filtered, projected, limited)."""
    import pyarrow.dataset as ds

    dataset = open_table(
        root, table, endpoint_url=endpoint_url, region=region, committed_only=committed_only
    )
    if columns:
        unknown = [c for c in columns if c not in dataset.schema.names]
        if unknown:
            raise UserError(
                f"--columns: unknown column(s) {', '.join(unknown)}; "
                f"columns: {', '.join(dataset.schema.names)}"
            )
    flt = parse_where(where, dataset.schema) if where else None
    if run_id is not None:
        by_run = ds.field("run_id") == run_id
        flt = by_run if flt is None else flt & by_run
    if limit is not None:
        if limit < 0:
            raise UserError("--limit must be >= 0")
        return dataset.head(limit, columns=columns, filter=flt)
    return dataset.to_table(columns=columns, filter=flt)
