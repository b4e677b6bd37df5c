"""Finding the inputs of a run (driver side): the seeds and a scripted action table.

Discovery only lists names, so the driver stays light; actors read and decode each seed
(workers.actor.inputs). Seed ids are safe key segments (`storage.safe_segment`); ids of seeds whose
names differ only in extension get a hash of the full name appended. Two seeds that still
end up with one id (a name made safe or shortened can meet another) are refused, naming both.
A `demonstrator` seed is a folder (its id is the folder's name) and its ref names the
folder's `actions.json`, which the actor reads first.

A scripted action table (`rollouts.actions: {kind: file}`) is small and read once here, then
shipped to the actors: a CSV or Parquet table, one row per step, one column per action name
(`workers.wham.actions.ACTION_NAMES`); buttons 0/1 (or true/false), sticks as values in
[-1, 1] (binned like the official server) or, with `sticks="bins"`, as bins 0..10.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from pipeline.contracts.choices import SEED_FORMATS
from pipeline.contracts.errors import UserError
from pipeline.contracts.sources import DEMONSTRATOR_ACTIONS, SeedRef, actions_from_values
from pipeline.contracts.storage import open_storage, read_uri, safe_segment
from workers.wham.actions import ACTION_NAMES

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _default_patterns(format: str) -> tuple[str, ...]:
    return ("*.npz",) if format == "wham-npz" else tuple(f"*{ext}" for ext in IMAGE_EXTENSIONS)


def _matches(rel: str, patterns: tuple[str, ...], *, case_sensitive: bool) -> bool:
    name = rel if case_sensitive else rel.lower()
    return any(fnmatch.fnmatchcase(name, p if case_sensitive else p.lower()) for p in patterns)


def _list_relative(source: str, *, endpoint_url: str | None, region: str | None) -> list[str]:
    """Sorted relative names of the files under a folder or prefix, hidden ones skipped."""
    if not source.startswith("s3://") and not Path(source).is_dir():
        raise UserError(f"seeds.source: {source} is not a folder")
    names = open_storage(source, endpoint_url=endpoint_url, region=region).list_keys()
    return [n for n in names if not any(p.startswith(".") for p in n.split("/"))]


def _ids_for(stems: list[str], names: list[str]) -> list[str]:
    """Seed ids from names without extension, made safe; stems that clash (a.png, a.jpg)
    get a hash of their full name appended."""
    counts = Counter(stems)
    ids = []
    for name, stem in zip(names, stems, strict=True):
        if counts[stem] > 1:
            digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=4)
            ids.append(safe_segment(f"{safe_segment(stem)}-{digest.hexdigest()}"))
        else:
            ids.append(safe_segment(stem))
    return ids


def _check_unique_ids(refs: list[SeedRef], source: str) -> list[SeedRef]:
    """`refs`, or a UserError naming both seeds when two of them got the same id (ids are
    made safe and shortened, so distinct names can meet): their rollouts would share ids
    and overwrite each other's outputs."""
    first: dict[str, str] = {}
    for ref in refs:
        other = first.setdefault(ref.seed_id, ref.uri)
        if other != ref.uri:
            raise UserError(
                f"seeds.source {source}: seeds {other} and {ref.uri} both get the seed id "
                f"{ref.seed_id!r} (names are made safe and shortened for ids); rename one "
                "of them, or list the seeds in a manifest with distinct seed_id values")
    return refs


def _stem(name: str) -> str:
    return str(PurePosixPath(name).with_suffix(""))


def _join_uri(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel}" if root.startswith("s3://") else str(Path(root) / rel)


def read_table_file(
    uri: str,
    *,
    what: str,
    endpoint_url: str | None = None,
    region: str | None = None,
    string_columns: tuple[str, ...] = (),
    max_bytes: int | None = None,
) -> Any:
    """A small CSV or Parquet file (local or s3://) as a pyarrow Table.

    `what` starts every error message (e.g. "action script"); `string_columns` are read
    as strings from CSV whatever they look like.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        data = read_uri(uri, endpoint_url=endpoint_url, region=region, max_bytes=max_bytes)
    except FileNotFoundError:
        raise UserError(f"{what} {uri} does not exist") from None
    try:
        if uri.lower().endswith(".parquet"):
            table = pq.read_table(pa.BufferReader(data))
        elif uri.lower().endswith(".csv"):
            types = dict.fromkeys(string_columns, pa.string())
            options = pacsv.ConvertOptions(column_types=types)
            table = pacsv.read_csv(pa.BufferReader(data), convert_options=options)
        else:
            raise UserError(f"{what} {uri} must be a .csv or .parquet file")
    except pa.ArrowException as exc:
        raise UserError(f"{what} {uri} cannot be read ({exc})") from None
    names = table.column_names
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:  # pyarrow cannot pick a column by a name that appears twice
        raise UserError(f"{what} {uri}: column(s) {', '.join(repeated)} appear more than once")
    return table


def _read_manifest(source: str, *, endpoint_url: str | None, region: str | None,
                   max_bytes: int | None) -> list[SeedRef]:
    table = read_table_file(
        source,
        what="seeds.source: manifest",
        endpoint_url=endpoint_url,
        region=region,
        string_columns=("uri", "seed_id"),
        max_bytes=max_bytes,
    )
    if "uri" not in table.column_names:
        raise UserError(
            f"seeds.source: manifest {source} has no 'uri' column "
            f"(columns: {', '.join(table.column_names)})"
        )
    uris = table.column("uri").to_pylist()
    given = table.column("seed_id").to_pylist() if "seed_id" in table.column_names else None
    base = source.rsplit("/", 1)[0] if "/" in source else "."
    resolved = []
    for row, uri in enumerate(uris):
        if not isinstance(uri, str) or not uri.strip():
            raise UserError(f"seeds.source: manifest {source} row {row + 1}: empty 'uri'")
        uri = uri.strip()
        if not uri.startswith("s3://") and not os.path.isabs(uri):
            uri = _join_uri(base, uri)  # relative entries are relative to the manifest
        resolved.append(uri)
    derived = _ids_for([PurePosixPath(_stem(u)).name for u in resolved], resolved)
    rows_by_id: dict[str, int] = {}
    refs = []
    for row, uri in enumerate(resolved):
        seed_id = safe_segment(given[row]) if given and given[row] else derived[row]
        if seed_id in rows_by_id:
            raise UserError(
                f"seeds.source: manifest {source} rows {rows_by_id[seed_id] + 1} and {row + 1} "
                f"both give seed id {seed_id!r}; set distinct seed_id values"
            )
        rows_by_id[seed_id] = row
        refs.append(SeedRef(seed_id=seed_id, uri=uri))
    return refs


def discover_seeds(
    source: str,
    *,
    format: str = "images",
    glob: str | None = None,
    limit: int | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
    max_bytes: int | None = None,
) -> list[SeedRef]:
    """Find the seeds under `source` (a folder, an s3:// prefix, or a manifest file).

    `glob` selects files by relative name (fnmatch; `*` also crosses '/'); by default
    `*.png`, `*.jpg`, `*.jpeg` (any case) for images and `*.npz` for clips. Results are in
    sorted order of the relative name (manifest: file order); `limit` keeps the first N.
    A manifest larger than `max_bytes` is an error (it is not read whole).
    """
    if format not in SEED_FORMATS:
        raise UserError(f"seeds.format {format!r} is not one of {', '.join(SEED_FORMATS)}")
    if limit is not None and limit < 1:
        raise UserError(f"seeds.limit must be at least 1, got {limit}")
    source = os.fspath(source)
    if format == "demonstrator":
        return _check_unique_ids(_demonstrator_folders(
            source, glob=glob, endpoint_url=endpoint_url, region=region)[:limit], source)
    if format == "manifest":
        refs = _read_manifest(source, endpoint_url=endpoint_url, region=region,
                              max_bytes=max_bytes)
        if glob:
            refs = [r for r in refs if _matches(r.uri, (glob,), case_sensitive=True)]
        return _check_unique_ids(refs[:limit], source)
    root = source.rstrip("/") if source.startswith("s3://") else str(Path(source).absolute())
    if not source.startswith("s3://") and Path(source).is_file():
        names, root = [Path(source).name], str(Path(source).absolute().parent)
    else:
        names = _list_relative(root, endpoint_url=endpoint_url, region=region)
    patterns = (glob,) if glob else _default_patterns(format)
    names = [n for n in names if _matches(n, patterns, case_sensitive=bool(glob))]
    # Ids come from every match before the limit, so a seed's id does not depend on it.
    ids = _ids_for([_stem(n) for n in names], names)
    return _check_unique_ids([
        SeedRef(seed_id=seed_id, uri=_join_uri(root, name), root=root)
        for seed_id, name in zip(ids, names, strict=True)
    ][:limit], source)


def _demonstrator_folders(source: str, *, glob: str | None, endpoint_url: str | None,
                          region: str | None) -> list[SeedRef]:
    """One seed per folder under `source` that holds files (sorted by name; `glob` selects
    folder names), or `source` itself when `actions.json` lies directly in it. A folder
    without its `actions.json` is still a seed: its rollouts fail naming the missing file."""
    is_s3 = source.startswith("s3://")
    root = source.rstrip("/") if is_s3 else str(Path(source).absolute())
    names = _list_relative(root, endpoint_url=endpoint_url, region=region)
    if DEMONSTRATOR_ACTIONS in names:
        folder = root.rsplit("/", 1)[-1] if is_s3 else Path(root).name
        return [SeedRef(seed_id=safe_segment(folder),
                        uri=_join_uri(root, DEMONSTRATOR_ACTIONS), root=root)]
    folders = sorted({name.split("/", 1)[0] for name in names if "/" in name})
    if glob:
        folders = [f for f in folders if _matches(f, (glob,), case_sensitive=True)]
    return [SeedRef(seed_id=safe_segment(folder), root=_join_uri(root, folder),
                    uri=_join_uri(root, f"{folder}/{DEMONSTRATOR_ACTIONS}"))
            for folder in folders]


def _column_floats(table: Any, name: str, *, where: str) -> np.ndarray:
    """One table column as float64 with NaN for nulls; names the first non-number."""
    import pyarrow as pa

    column = table.column(name)
    if (
        pa.types.is_boolean(column.type)
        or pa.types.is_integer(column.type)
        or pa.types.is_floating(column.type)
    ):
        return column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    out = np.empty(len(column), dtype=np.float64)
    for row, item in enumerate(column.to_pylist()):
        text = "" if item is None else str(item).strip().lower()
        if text in ("true", "false"):
            out[row] = float(text == "true")
            continue
        try:
            out[row] = float(text) if text else np.nan
        except ValueError:
            raise UserError(
                f"{where}: row {row + 1}, column {name}: {item!r} is not a number"
            ) from None
    return out


def load_action_script(
    uri: str,
    *,
    sticks: str = "values",
    endpoint_url: str | None = None,
    region: str | None = None,
) -> np.ndarray:
    """Read a scripted action table (CSV or Parquet) -> int64 (N, 16) in model form.

    Every problem raises UserError naming the file, the (1-based data) row and the column.
    """
    if sticks not in ("values", "bins"):
        raise UserError(f"action script: sticks must be 'values' or 'bins', got {sticks!r}")
    where = f"action script {uri}"
    table = read_table_file(uri, what="action script", endpoint_url=endpoint_url, region=region)
    missing = [name for name in ACTION_NAMES if name not in table.column_names]
    if missing:
        raise UserError(
            f"{where}: missing column(s) {', '.join(missing)}; "
            f"the columns are {', '.join(ACTION_NAMES)}"
        )
    if table.num_rows == 0:
        raise UserError(f"{where}: has no rows")
    values = np.stack([_column_floats(table, n, where=where) for n in ACTION_NAMES], axis=1)
    return actions_from_values(values, where=where, sticks=sticks)
