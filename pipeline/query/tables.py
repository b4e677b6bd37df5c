"""Arrow datasets over the hive-partitioned output tables.

`open_table(root, "steps")` is a `pyarrow.dataset.Dataset` over every run under the root;
`run_date` and `run_id` come from the hive paths, so filtering on them only opens that
run's files. Runs of different models unify: `image_tokens` reads as a plain list. Only
part files of the table (`<table>/run_date=.../run_id=.../part-uNNNNNN.parquet`) are read;
anything else under the table's folder is left out with a warning naming it, and a part
that cannot be read is an error naming the file.

What a query sees: by default everything on storage, including parts of units that are
still being written or whose commit marker is missing (a crash between the part and the
marker). Parts are written whole and a retried unit overwrites its own part, so a part
never holds half a unit or duplicates. Commit markers guard resume, not reads; pass
`committed_only=True` (CLI `--committed-only`) to see only committed units' parts.
"""


from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.contracts.parts import check_part
from pipeline.contracts.storage import open_storage

log = logging.getLogger("pipeline.query")
FOOTER_READERS = 16  # parallel reads of part footers when checking schema versions
#: Files in a warning about non-part files before the rest are only counted.
_SHOWN_FILES = 5


class NoTable(UserError):
    """The root has no such table (nothing written there yet)."""


def _committed_units(storage: Any) -> set[tuple[str, str, str]]:
    """(run_date, run_id, unit_id) of every commit marker under the root."""
    found = set()
    for key in storage.list_keys(f"{layout.RUNS_DIR}/"):
        parsed = layout.parse_run_key(key)
        unit = layout.commit_unit_id(parsed[2]) if parsed else None
        if unit is not None:
            found.add((parsed[0], parsed[1], unit))
    return found


def part_keys(storage: Any, table: str) -> tuple[list[str], list[str]]:
    """(part files of `table`, other files under its folder), from one listing."""
    parts, other = [], []
    for key in storage.list_keys(f"{table}/"):
        (parts if layout.parse_part_key(key) else other).append(key)
    return parts, other


def check_versions(dataset: Any, *, storage: Any, base: str) -> None:
    """UserError if a part was written with a newer schema than this code reads, or if it
    says it belongs elsewhere than where it stands (`pipeline.contracts.parts.check_part`:
    another table, run or unit). Every part's footer is read, in parallel (a scan reuses
    them), so an unreadable part is reported by name here too."""
    with ThreadPoolExecutor(FOOTER_READERS) as pool:
        for path, metadata in pool.map(_footer, dataset.get_fragments()):
            key = path.removeprefix(f"{base}/")
            check_part(key, metadata, shown=storage.key_uri(key))


def _footer(fragment: Any) -> tuple[str, dict[bytes, bytes]]:
    import pyarrow as pa

    try:
        metadata = fragment.physical_schema.metadata or {}
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"table part {fragment.path} cannot be read ({exc})") from None
    return fragment.path, metadata


def find_unreadable(dataset: Any) -> None:
    """UserError naming the first part of `dataset` whose footer cannot be read."""
    with ThreadPoolExecutor(FOOTER_READERS) as pool:
        list(pool.map(_footer, dataset.get_fragments()))


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
    try:
        keys, other = part_keys(storage, table)
    except OSError as exc:
        raise UserError(f"cannot list {storage.uri}/{table} ({exc})") from None
    if table == layout.FRAMES_TABLE:  # runs with output.frames: png keep their PNGs there
        other = [k for k in other if not k.endswith(".png")]
    if not keys and not other:
        raise NoTable(f"no {table} table under {storage.uri} (nothing written there yet?)")
    if other:
        shown = ", ".join(other[:_SHOWN_FILES])
        more = f" and {len(other) - _SHOWN_FILES} more" if len(other) > _SHOWN_FILES else ""
        log.warning("ignoring %d file(s) under %s/%s that are not part files of the table: "
                    "%s%s", len(other), storage.uri, table, shown, more)
    if committed_only:
        committed = _committed_units(storage)
        keys = [k for k in keys if (p := layout.parse_part_key(k)) and p[1:] in committed]
    partitioning = ds.partitioning(
        schema=pa.schema([schema.field(name) for name in layout.PARTITION_COLUMNS]), flavor="hive"
    )
    dataset = ds.dataset([f"{base}/{k}" for k in keys], filesystem=fs, format="parquet",
                         partitioning=partitioning, schema=schema,
                         partition_base_dir=f"{base}/{table}")
    check_versions(dataset, storage=storage, base=base)
    return dataset


