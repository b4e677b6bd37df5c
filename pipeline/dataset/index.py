"""Which rollouts a loader reads, grouped into shards: one shard per work unit.

The rollouts table is read once, on the driver, with the filters applied (run, status, a
`wham-batch query --where` expression on any rollouts column, the quality aggregates
included). A unit's rollouts live in one steps part and one frames part, so a shard is the
unit of reading: each part is fetched by exactly one reader, and splitting the shard list
between data-loader workers or Ray tasks never reads a window twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.contracts import layout
from pipeline.query import query


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

    def windows(self, *, window: int, stride: int, generated_only: bool = False) -> int:
        """How many windows the shard yields."""
        return sum(count_windows(n - (context if generated_only else 0), window=window,
                                 stride=stride) for _, n, context in self.rollouts)


def count_windows(steps: int, *, window: int, stride: int) -> int:
    return 0 if steps < window else (steps - window) // stride + 1


_COLUMNS = ["run_date", "run_id", "unit_id", "rollout_id", "context_steps", "generated_steps",
            "model_sha256"]


def select_shards(source: Source, *, run_id: str | list[str] | None = None,
                  status: str | None = "ok", where: str | None = None,
                  committed_only: bool = True) -> list[Shard]:
    """The shards of the rollouts that pass every filter, in (run_date, run_id, unit) order.
    `where` is an SQL condition on the rollouts columns, as `wham-batch query --where`."""
    conditions = [f"({where})"] if where else []
    for name, value in (("run_id", run_id), ("status", status)):
        if value is not None:
            values = [value] if isinstance(value, str) else list(value)
            quoted = ", ".join("'" + str(v).replace("'", "''") + "'" for v in values)
            conditions.append(f"{name} IN ({quoted})")
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
              model_sha256=group[0]["model_sha256"])
        for key, group in sorted(units.items())
    ]
