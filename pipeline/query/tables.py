"""Arrow datasets over the hive-partitioned output tables.

`open_table(root, "steps")` is a `pyarrow.dataset.Dataset` over every run under the root;
`run_date` and `run_id` come from the hive paths, so filtering on them only opens that
run's files. Runs of different models unify: `image_tokens` reads as a plain list. Only
part files of the table (`<table>/run_date=.../run_id=.../part-uNNNNNN.parquet`) are read;
anything else under the table's folder is left out with a warning naming it. A part whose
bytes do not read as Parquet is an error naming the file as damaged; a read that failed
for another reason (the storage or the network, after retries) is reported as such.

What a query sees: by default everything on storage, including parts of units that are
still being written or whose commit marker is missing (a crash between the part and the
marker). Parts are written whole and a retried unit overwrites its own part, so a part
never holds half a unit or duplicates. Commit markers guard resume, not reads; pass
`committed_only=True` (CLI `--committed-only`) to see only committed units' parts.
"""


from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.contracts.parts import DamagedPart, check_part
from pipeline.contracts.storage import Storage, open_storage

log = logging.getLogger("pipeline.query")
FOOTER_READERS = 16  # parallel reads of part footers when checking schema versions
#: Parallel whole-part reads when looking for the part that broke a read (each in memory).
PART_READERS = 4
#: Files in a warning about non-part files before the rest are only counted.
_SHOWN_FILES = 5


class NoTable(UserError):
    """The root has no such table (nothing written there yet)."""


#: What a damaged part or frame is told to do: the run's check finds it, a rerun redoes it.
DAMAGED_HINT = ("`wham-batch verify` checks the run, and rerunning its run id redoes the "
                "units that fail the check")


def damaged(where: str, what: str) -> DamagedPart:
    """The error for stored bytes at `where` that cannot be what they claim to be."""
    return DamagedPart(f"{where} is damaged ({what}); {DAMAGED_HINT}")


def _committed_units(storage: Any) -> set[tuple[str, str, str]]:
    """(run_date, run_id, unit_id) of every commit marker under the root."""
    found = set()
    for key in storage.list_keys(f"{layout.RUNS_DIR}/"):
        parsed = layout.parse_run_key(key)
        unit = layout.commit_unit_id(parsed[2]) if parsed else None
        if unit is not None:
            found.add((parsed[0], parsed[1], unit))
    return found


def check_runs_exist(root: str, run_ids: Sequence[str], *, option: str,
                     endpoint_url: str | None = None, region: str | None = None) -> None:
    """UserError naming the ids in `run_ids` that name no run under `root`: a selection that
    came back without them would hide a typo. It lists all of `_runs/`, so ask only about
    ids a selection came back without."""
    storage = open_storage(root, endpoint_url=endpoint_url, region=region)
    runs = sorted({parsed[1] for key in storage.list_keys(f"{layout.RUNS_DIR}/")
                   if (parsed := layout.parse_run_key(key)) is not None})
    missing = [r for r in run_ids if r not in runs]
    if missing:
        listed = ", ".join(runs[-10:]) if runs else "none"
        raise UserError(f"{option}{', '.join(missing)}: no such run under {root} (runs there: "
                        f"{listed}; `wham-batch runs {root}` lists them)")


def part_keys(storage: Any, table: str) -> tuple[list[str], list[str]]:
    """(part files of `table`, other files under its folder), from one listing."""
    parts, other = [], []
    for key in storage.list_keys(f"{table}/"):
        (parts if layout.parse_part_key(key) else other).append(key)
    return parts, other


def check_versions(dataset: Any, storage: Storage) -> None:
    """UserError if a part was written with a newer schema than this code reads, and
    DamagedPart if it says it belongs elsewhere than where it stands (another table, run
    or unit: `pipeline.contracts.parts.check_part`). Every part's footer is read, in
    parallel (a scan reuses them), so a damaged part is reported by name here too."""
    with ThreadPoolExecutor(FOOTER_READERS) as pool:
        for key, metadata in pool.map(lambda f: _footer(f, storage), dataset.get_fragments()):
            check_part(key, metadata, shown=storage.key_uri(key))


def _footer(fragment: Any, storage: Storage) -> tuple[str, dict[bytes, bytes]]:
    """The storage key and key-value metadata of a dataset file."""
    try:
        metadata = fragment.physical_schema.metadata or {}
    except (pa.ArrowInvalid, OSError) as exc:
        _raise_if_damaged(storage, _key(storage, fragment.path))
        raise UserError(f"table part {fragment.path} cannot be read now ({exc}); its bytes "
                        "are whole, so try again") from None
    return _key(storage, fragment.path), metadata


def _key(storage: Storage, path: str) -> str:
    """The storage key of a dataset file path (`<base>/<key>`)."""
    return path[len(storage.arrow_fs()[1]) + 1:]


def _raise_if_damaged(storage: Storage, key: str) -> None:
    """DamagedPart naming `key` when its bytes do not read whole as Parquet. They are read
    through the storage, whose retries tell a failing transport (TransientStorageError)
    from bytes that are wrong."""
    data = storage.get_bytes(key)
    try:
        pq.read_table(pa.BufferReader(data))  # every page decoded
    except (pa.ArrowException, OSError) as exc:
        raise damaged(f"table part {storage.key_uri(key)}",
                      f"its bytes do not read as Parquet: {_first_line(exc)}") from None


def find_damaged(root: str, dataset: Any, *, endpoint_url: str | None,
                 region: str | None) -> None:
    """DamagedPart naming the first part of `dataset` (a table of `root`) whose bytes do
    not read; returns when every part reads whole."""
    storage = open_storage(root, endpoint_url=endpoint_url, region=region)

    def check(fragment: Any) -> None:
        key = _key(storage, fragment.path)
        _raise_if_damaged(storage, key)
        try:
            fragment.to_table(schema=dataset.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            raise damaged(f"table part {storage.key_uri(key)}",
                          f"its columns do not fit the table: {_first_line(exc)}") from None

    with ThreadPoolExecutor(PART_READERS) as pool:
        list(pool.map(check, dataset.get_fragments()))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_table(
    root: str,
    table: str = layout.STEPS_TABLE,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    committed_only: bool = False,
) -> Any:
    """A pyarrow Dataset over one output table across all runs under `root`."""
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
    check_versions(dataset, storage)
    return dataset


