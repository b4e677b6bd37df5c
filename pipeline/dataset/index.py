"""Which rollouts a loader reads, grouped into shards: one shard per work unit.

The rollouts table is read once, on the driver, with the filters applied (runs by id or
date, exact or as globs like `nightly-*` and `2026-12-*`, status, a `wham-batch query
--where` expression on any rollouts column, the quality aggregates included). A unit's
rollouts live in one steps part and one frames part, so a shard is the unit of reading:
each part is fetched by exactly one reader, and splitting the shard list between
data-loader workers or Ray tasks never reads a window twice.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.query import query

#: Characters that make a run id or run date a glob (neither ever contains them).
_GLOB = re.compile(r"[*?\[]")
#: What a glob may hold besides its wildcards: the characters of run ids and dates.
_GLOB_TEXT = re.compile(r"^[A-Za-z0-9._*?\[\]!-]{1,128}$")


@dataclass(frozen=True, slots=True)
class Source:
    """Where the outputs are and how to reach them (plain data: it travels to workers)."""

    root: str
    endpoint_url: str | None = None
    region: str | None = None


@dataclass(frozen=True, slots=True)
class Shard:
    """The selected rollouts of one work unit, and how many steps each has."""

    run_date: str
    run_id: str
    unit_id: str
    rollouts: tuple[tuple[str, int, int], ...]  # (rollout_id, steps, context steps), sorted
    model_sha256: str
    model_id: str = ""

    def windows(self, *, window: int, stride: int, generated_only: bool = False) -> int:
        """How many windows the shard yields."""
        return sum(count_windows(n - (context if generated_only else 0), window=window,
                                 stride=stride) for _, n, context in self.rollouts)


def count_windows(steps: int, *, window: int, stride: int) -> int:
    return 0 if steps < window else (steps - window) // stride + 1


_COLUMNS = ["run_date", "run_id", "unit_id", "rollout_id", "context_steps", "generated_steps",
            "model_sha256", "model_id"]


def _quoted(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def as_list(value: str | Sequence[str] | None) -> list[str] | None:
    """A run id or date, or several, as a list (None stays None)."""
    return None if value is None else [value] if isinstance(value, str) else list(value)


def is_glob(value: str) -> bool:
    """Whether a run id or date names several (`nightly-*`, `2026-12-0?`)."""
    return bool(_GLOB.search(value))


def run_condition(name: str, values: list[str]) -> str:
    """SQL that selects rows whose `name` (run_id or run_date) equals one of `values` or
    matches one of them used as a glob (`*`, `?`, `[...]`). UserError for a value that is
    neither a run id (a date) nor a glob."""
    exact, globs = [], []
    for value in values:
        if is_glob(str(value)):
            if not _GLOB_TEXT.match(value):
                raise UserError(f"{name} pattern {value!r} may only use the characters of "
                                "run ids and dates and the wildcards * ? [ ]")
            globs.append(value)
        else:
            exact.append(layout.check_run_id(value) if name == "run_id"
                         else layout.run_date_str(value))
    terms = [f"{name} IN ({', '.join(_quoted(v) for v in exact)})"] if exact else []
    terms += [f"{name} GLOB {_quoted(g)}" for g in globs]
    return "(" + " OR ".join(terms or ["FALSE"]) + ")"


def select_shards(source: Source, *, run_id: str | Sequence[str] | None = None,
                  run_date: str | Sequence[str] | None = None, status: str | None = "ok",
                  where: str | None = None, committed_only: bool = True) -> list[Shard]:
    """The shards of the rollouts that pass every filter, in (run_date, run_id, unit) order.
    `run_id` / `run_date`: one or a list, each exact or a glob (`nightly-*`, `2026-12-*`);
    `where` is an SQL condition on the rollouts columns, as `wham-batch query --where`."""
    conditions = [f"({where})"] if where else []
    for name, value in (("run_id", run_id), ("run_date", run_date)):
        values = as_list(value)
        if values is not None:
            conditions.append(run_condition(name, values))
    if status is not None:
        conditions.append(f"status = {_quoted(status)}")
    rows = query(source.root, table=layout.ROLLOUTS_TABLE, columns=_COLUMNS,
                 where=" AND ".join(conditions) or None, endpoint_url=source.endpoint_url,
                 region=source.region, committed_only=committed_only).to_pylist()
    rows = [r for r in rows if r["generated_steps"] > 0]  # failed rollouts wrote no steps
    units: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        units.setdefault((row["run_date"], row["run_id"], row["unit_id"]), []).append(row)
    return [
        Shard(run_date=key[0], run_id=key[1], unit_id=key[2],
              rollouts=tuple(sorted((r["rollout_id"], r["context_steps"] + r["generated_steps"],
                                     r["context_steps"]) for r in group)),
              model_sha256=group[0]["model_sha256"], model_id=group[0]["model_id"])
        for key, group in sorted(units.items())
    ]
