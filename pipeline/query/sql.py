"""SQL over the output tables: `sql(root, "SELECT ... FROM steps JOIN rollouts USING (run_id,
rollout_id) ...")` runs one query with DuckDB over the tables it names (the Arrow datasets of
`pipeline.query.tables`, so local folders and s3:// roots work alike) and returns a
`pyarrow.Table`. The connection is locked down once the tables are registered: no file, URL
or extension can be read, nothing can be written (no COPY, ATTACH, spilling), settings cannot
be changed back, and only one SELECT runs. Its text is bounded (`MAX_SQL_CHARS`,
`MAX_BOOLEAN_TERMS`, `MAX_NESTING`), since a filter of thousands of OR clauses makes the
planner run for minutes. It runs within `QueryBounds` (a deadline and a memory limit, see
`pipeline.query.bounds`), and Ctrl-C or SIGTERM stops it. A part whose bytes do not read is
named as damaged. `query(...)` is the same with a WHERE clause, column list and run id
filled in for you.
"""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa

from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.query.bounds import MAX_DEFAULT_MEMORY, QueryBounds, run_bounded, show_size
from pipeline.query.tables import NoTable, find_damaged, open_table

#: Longest SQL text (or --where filter) accepted.
MAX_SQL_CHARS = 64 * 1024
#: Most AND / OR / NOT operators in one query: the planner slows down sharply past a few
#: thousand (100,000 ORs run for minutes).
MAX_BOOLEAN_TERMS = 1000
#: Deepest nesting of parentheses and of expressions.
MAX_NESTING = 100
#: Largest --limit; more rows than this do not fit in memory anyway.
MAX_LIMIT = 1_000_000_000
#: Rows per Arrow batch of a result (its size is counted batch by batch).
RESULT_BATCH_ROWS = 64 * 1024
_SQL_SKIP = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/", re.DOTALL)
_BOOLEAN = re.compile(r"\b(?:and|or|not)\b", re.IGNORECASE)
#: Locks applied to a query connection after the tables are registered (order matters:
#: the lock comes last).
_LOCKDOWN = (
    "SET temp_directory = ''",  # never spill to disk
    "SET python_enable_replacements = false",  # no reading of the caller's variables
    "SET enable_external_access = false",  # no files, URLs, ATTACH, COPY or extensions
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET allow_community_extensions = false",
    f"SET max_expression_depth = {MAX_NESTING}",
    "SET lock_configuration = true",
)


def check_sql(text: str, *, what: str = "--sql") -> str:
    """`text` if it is within the size and nesting bounds, else a UserError saying which."""
    if not text.strip():
        raise UserError(f"{what}: empty query")
    if len(text) > MAX_SQL_CHARS:
        raise UserError(f"{what}: {len(text)} characters, more than the {MAX_SQL_CHARS} "
                        "accepted; filter on fewer values (e.g. `IN (...)` or a range)")
    code = _SQL_SKIP.sub(" ", text)  # operators inside strings and comments do not count
    terms = len(_BOOLEAN.findall(code))
    if terms > MAX_BOOLEAN_TERMS:
        raise UserError(f"{what}: {terms} AND/OR/NOT operators, more than the "
                        f"{MAX_BOOLEAN_TERMS} accepted; write `column IN (a, b, ...)` "
                        "instead of a long chain of ORs")
    depth = deepest = 0
    for ch in code:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        deepest = max(deepest, depth)
    if deepest > MAX_NESTING:
        raise UserError(f"{what}: parentheses nested {deepest} deep, more than the "
                        f"{MAX_NESTING} accepted")
    return text


def check_limit(limit: int | None) -> int | None:
    if limit is not None and not 0 <= limit <= MAX_LIMIT:
        raise UserError(f"--limit must be between 0 and {MAX_LIMIT}, got {limit}")
    return limit


class _Tables:
    """The output tables of a root, registered in a locked-down DuckDB connection."""

    def __init__(self, root: str, *, endpoint_url: str | None, region: str | None,
                 committed_only: bool, bounds: QueryBounds,
                 names: tuple[str, ...] = layout.TABLES) -> None:
        import duckdb  # a second to import: only commands that query pay it

        self.root, self.endpoint_url, self.region = root, endpoint_url, region
        self.bounds, self.memory = bounds, bounds.memory()
        self.datasets: dict[str, Any] = {}
        missing = []
        for table in names:
            try:
                self.datasets[table] = open_table(root, table, endpoint_url=endpoint_url,
                                                  region=region, committed_only=committed_only)
            except NoTable as exc:
                missing.append(exc)
        if not self.datasets:
            raise missing[0] if len(missing) == 1 else NoTable(
                f"no output tables under {root} (nothing written there yet?)")
        self.con = duckdb.connect(":memory:")
        for table in layout.TABLES:
            empty = layout.query_schema(table).empty_table()
            self.con.register(table, self.datasets.get(table, empty))
        self.con.execute(f"SET memory_limit = '{self.memory}B'")
        for statement in _LOCKDOWN:
            self.con.execute(statement)

    def run(self, text: str, *, limit: int | None, what: str) -> Any:
        """The result of one SELECT as a pyarrow Table; UserError for anything else."""
        import duckdb

        try:
            statements = self.con.extract_statements(text)
            if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
                kinds = ", ".join(s.type.name for s in statements) or "none"
                raise UserError(f"{what}: exactly one SELECT query is run, read-only "
                                f"(found: {kinds})")
            return run_bounded(lambda: self._fetch(text, limit=limit, what=what),
                               interrupt=self.con.interrupt,
                               timeout_s=self.bounds.timeout_s, what=what)
        except duckdb.OutOfMemoryException:
            raise self._out_of_memory(what) from None
        except duckdb.Error as exc:
            # An error about the text itself read nothing: looking for a damaged part would
            # read every part whole, for a typo.
            about_text = (duckdb.ParserException, duckdb.SyntaxException,
                          duckdb.BinderException, duckdb.CatalogException)
            if not isinstance(exc, about_text) and _reading_failed(exc):
                self._name_damaged_part()
            raise UserError(f"{what}: {_first_lines(str(exc))}") from None
        except (pa.ArrowException, OSError) as exc:
            self._name_damaged_part()
            if isinstance(exc, OSError):
                raise  # every part reads whole: the storage or the network failed
            raise UserError(f"{what}: reading the tables failed ({exc})") from None

    def _fetch(self, text: str, *, limit: int | None, what: str) -> Any:
        """The result, batch by batch, never more bytes than the memory limit."""
        relation = self.con.sql(text)
        if limit is not None:
            relation = relation.limit(limit)
        reader = relation.to_arrow_reader(RESULT_BATCH_ROWS)
        batches, size = [], 0
        for batch in reader:
            size += batch.nbytes
            if size > self.memory:
                raise self._out_of_memory(what, result=True)
            batches.append(batch)
        return pa.Table.from_batches(batches, schema=reader.schema)

    def _out_of_memory(self, what: str, *, result: bool = False) -> UserError:
        part = "its result is" if result else "it needs"
        return UserError(
            f"{what}: stopped: {part} more than the query's memory limit of "
            f"{show_size(self.memory)} (--memory-limit; default half the free memory, at "
            f"most {show_size(MAX_DEFAULT_MEMORY)}); aggregate or filter more, add --limit, or "
            "raise the limit")

    def _name_damaged_part(self) -> None:
        """UserError naming the part that broke a query as damaged, if a part did; a read
        that failed for another reason (storage, network) is left to the caller."""
        for dataset in self.datasets.values():
            find_damaged(self.root, dataset, endpoint_url=self.endpoint_url,
                         region=self.region)


def _reading_failed(exc: Exception) -> bool:
    """Whether DuckDB failed while reading a table (not on the query's own text)."""
    text = str(exc).lower()
    return any(word in text for word in ("stream registered", "parquet", "ioerror",
                                         "magic", "footer", "thrift", "arrow"))


def _first_lines(message: str, n: int = 3) -> str:
    lines = [line for line in message.splitlines() if line.strip()]
    return "\n  ".join(lines[:n])


def sql(
    root: str,
    text: str,
    *,
    limit: int | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
    committed_only: bool = False,
    bounds: QueryBounds | None = None,
) -> Any:
    """One read-only SQL SELECT over the `steps`, `rollouts` and `frames` tables of `root`
    (a folder or s3:// prefix), as a pyarrow Table; UserError for bad or oversized SQL,
    and for a query past its `bounds` (default: `QueryBounds()`)."""
    check_sql(text)
    check_limit(limit)
    tables = _Tables(root, endpoint_url=endpoint_url, region=region,
                     committed_only=committed_only, bounds=bounds or QueryBounds(),
                     names=_tables_named(text))
    return tables.run(text, limit=limit, what="--sql")


def _tables_named(text: str) -> tuple[str, ...]:
    """The tables whose name appears in `text` (a table left out is registered empty): a
    query over steps does not list a root's frames. A name that appears only inside a
    string costs an extra listing, nothing more."""
    lowered = text.lower()
    named = tuple(t for t in layout.TABLES if re.search(rf"\b{t}\b", lowered))
    return named or layout.TABLES


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


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
    bounds: QueryBounds | None = None,
) -> Any:
    """Rows of one table as a pyarrow.Table: `where` is an SQL condition (the WHERE clause
    of `sql`), `columns` a projection, `run_id` one run."""
    schema = layout.query_schema(table)  # UserError for an unknown table
    if columns:
        unknown = [c for c in columns if c not in schema.names]
        if unknown:
            raise UserError(f"--columns: unknown column(s) {', '.join(unknown)}; "
                            f"columns: {', '.join(schema.names)}")
    if where is not None:
        check_sql(where, what="--where")
    check_limit(limit)
    conditions = [f"({where})"] if where else []
    if run_id is not None:
        conditions.append(f"run_id = '{run_id.replace(chr(39), chr(39) * 2)}'")
    text = (f"SELECT {', '.join(_quote(c) for c in columns) if columns else '*'} "
            f"FROM {table}" + (f" WHERE {' AND '.join(conditions)}" if conditions else ""))
    tables = _Tables(root, endpoint_url=endpoint_url, region=region,
                     committed_only=committed_only, bounds=bounds or QueryBounds(),
                     names=(table,))
    return tables.run(text, limit=limit, what="--where" if where else "query")
