"""Reading outputs back: Arrow datasets over the hive-partitioned tables (`open_table`,
`pipeline.query.tables`), and SQL over them (`sql`, `query`, `pipeline.query.sql`)."""

from pipeline.query.bounds import QueryBounds
from pipeline.query.sql import check_limit, check_sql, query, sql
from pipeline.query.tables import (
    DamagedPart,
    NoTable,
    check_runs_exist,
    open_table,
    part_keys,
)

__all__ = ["DamagedPart", "NoTable", "QueryBounds", "check_limit", "check_runs_exist",
           "check_sql", "open_table", "part_keys", "query", "sql"]
