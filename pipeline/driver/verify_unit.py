"""One committed unit against storage: what its commit marker vouches for must be there.

A marker of schema version 3 records the size and SHA-256 of every object its unit
wrote (pipeline/contracts/markers.py). Each is compared with storage (`Objects.problem`): the
steps and rollouts parts are read whole anyway (their rows are checked too) and hashed;
any other object (the frames part, the object list's PNG frames, previews and videos) is
compared by the checksum S3 keeps beside it (one HEAD, no download), or hashed where the
store keeps none (a local folder) or with `deep` (`wham-batch verify --deep`: every byte
read and hashed again). The steps and rollouts parts must also say in their metadata that
they are this unit's parts of this run and plan (`pipeline.contracts.parts.check_part`),
hold the rows the marker records, and every steps row must have a frame or image tokens.
A frames part whose bytes are the ones its unit wrote holds the frames its rows name, as
written; it is opened (its metadata, rows and (rollout_id, step) columns) when its bytes
differ, to say what is wrong, and with `deep`.

Markers before version 3 record counts only: their units are checked by counts
(pipeline/driver/verify_counts.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.contracts import layout
from pipeline.contracts.checksums import ObjectSum, hash_stream, stored_matches, sum_of
from pipeline.contracts.errors import UserError
from pipeline.contracts.markers import MarkerProblem, read_object_list
from pipeline.contracts.parts import DamagedPart, check_part
from pipeline.contracts.storage import Storage

#: Smallest bound on a whole read of a part or object list (see `_read_bound`).
MIN_READ_BOUND = 16 * 2**20


@dataclass(slots=True)
class UnitCheck:
    unit_id: str
    rows: int = 0  # steps rows found
    stored_frames: int = 0  # frames its rows name
    by_counts: bool = False  # its marker records no sums (schema version < 3)
    problems: list[str] = field(default_factory=list)


class Objects:
    """Reads a root's objects for the check: whole through the root's Storage (so the
    same retries apply as to the writes), or streamed and ranged through pyarrow's
    filesystem (so a frames part's PNGs are not held in memory)."""

    def __init__(self, storage: Storage, *, deep: bool = False) -> None:
        self.storage = storage
        self.deep = deep
        self._fs: tuple[Any, str] | None = None

    def _arrow(self) -> tuple[Any, str]:
        if self._fs is None:
            self._fs = self.storage.arrow_fs()
        return self._fs

    def parquet(self, key: str, data: bytes | None = None) -> Any:
        """The part as a `pyarrow.parquet.ParquetFile`: from `data`, or opened for ranged
        reads (only its footer and the columns read later move)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if data is not None:
            source = pa.BufferReader(data)
        else:
            fs, base = self._arrow()
            source = fs.open_input_file(f"{base}/{key}")  # FileNotFoundError
        try:
            return pq.ParquetFile(source)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"{key} is not a readable Parquet file ({exc})") from None

    def hash(self, key: str) -> ObjectSum:
        fs, base = self._arrow()
        with fs.open_input_stream(f"{base}/{key}") as stream:  # FileNotFoundError
            return hash_stream(stream)

    def problem(self, key: str, expected: ObjectSum, *, what: str) -> str | None:
        """None when the object at `key` is the one `expected` records, else what is wrong
        (FileNotFoundError when it is missing). By the store's own checksum when it keeps
        one (and not `deep`), else by hashing."""
        try:
            if not self.deep:
                head = self.storage.head(key)
                if head.size != expected.size:
                    return (f"{what} {key} holds {head.size} bytes, its commit marker records "
                            f"{expected.size}")
                if head.sha256 is not None and stored_matches(expected, head.sha256):
                    return None
            found = self.hash(key)
        except FileNotFoundError:
            raise
        except OSError as exc:  # storage still failing after its retries
            return f"{what} {key} could not be read ({exc})"
        return _mismatch(key, found, expected, what=what)


def _read_bound(expected: ObjectSum) -> int:
    """Most bytes read of an object the check reads whole: room for another unit's part
    in its place (to say whose it is), never an unbounded read."""
    return max(4 * expected.size, MIN_READ_BOUND)


def _mismatch(key: str, found: ObjectSum, expected: ObjectSum, *, what: str) -> str | None:
    if (found.size, found.sha256) == (expected.size, expected.sha256):
        return None
    return (f"{what} {key} is not what its commit marker records (found {found.describe()}, "
            f"the marker records {expected.describe()})")


@dataclass(slots=True)
class _Rows:
    """What a unit's steps rows name."""

    in_part: set[tuple[str, int]]  # (rollout_id, step) of rows whose frame is in the part
    pngs: set[str]  # frame objects the rows name, inside the run


def open_part(objects: Objects, key: str, check: UnitCheck, *, what: str,
               data: bytes | None = None, plan: str | None = None) -> Any:
    """The part, its metadata checked against where it stands; None (and a problem) when
    it is missing, unreadable or misplaced."""
    try:
        part = objects.parquet(key, data)
        check_part(key, part.schema_arrow.metadata, plan_fingerprint=plan)
    except FileNotFoundError:
        check.problems.append(f"{what} part {key} is missing")
    except ValueError as exc:
        check.problems.append(f"{what} part: {exc}")
    except DamagedPart as exc:
        check.problems.append(str(exc))
    except UserError as exc:  # a newer schema version
        check.problems.append(str(exc))
    except OSError as exc:
        check.problems.append(f"{what} part {key} could not be read ({exc})")
    else:
        return part
    return None


def rows_match(part: Any, key: str, expect: Any, *, what: str, check: UnitCheck) -> None:
    rows = part.metadata.num_rows
    if expect is not None and rows != int(expect):
        check.problems.append(f"{what} part {key} holds {rows} rows, its marker records {expect}")


def steps_rows(part: Any, *, run_date: str, run_id: str, unit_id: str,
                check: UnitCheck) -> _Rows | None:
    """Check the steps rows (each has a frame or image tokens, none names a frame outside
    the run) and say which frames they name."""
    columns = [c for c in ("rollout_id", "step", "frame_key", "image_tokens")
               if c in part.schema_arrow.names]
    lacking = [c for c in ("rollout_id", "step", "frame_key") if c not in columns]
    if lacking:
        check.problems.append(f"steps part of {unit_id} has no {', '.join(lacking)} column "
                              "(not a wham-batch steps part)")
        return None
    try:
        table = part.read(columns=columns)
    except Exception as exc:  # a part whose footer reads but whose data does not
        check.problems.append(f"steps part of {unit_id} cannot be read ({exc})")
        return None
    check.rows = table.num_rows
    names = table.column("frame_key").to_pylist()
    tokens = (table.column("image_tokens").is_valid().to_pylist()
              if "image_tokens" in columns else [False] * len(names))
    version = (part.schema_arrow.metadata or {}).get(layout.SCHEMA_VERSION_KEY)
    bare = sum(1 for name, has in zip(names, tokens, strict=True) if name is None and not has)
    if bare and version != b"1":  # version 1 wrote neither with `frames: false`
        check.problems.append(f"{bare} rows have neither a frame nor image tokens")
    part_key = layout.frames_part_key(run_date, run_id, unit_id)
    in_part = {(r, s) for r, s, k in zip(table.column("rollout_id").to_pylist(),
                                          table.column("step").to_pylist(), names, strict=True)
               if k == part_key}
    pngs = {k for k in names if k is not None and k != part_key}
    check.stored_frames = len(pngs) + len(in_part)
    frames_prefix = layout.run_prefix(layout.FRAMES_DIR, run_date, run_id) + "/"
    outside = sorted(k for k in pngs if not k.startswith(frames_prefix))
    if outside:
        check.problems.append(f"{len(outside)} rows name frames outside the run, e.g. "
                              f"{outside[0]!r}")
    return _Rows(in_part=in_part, pngs=pngs - set(outside))


def frames_part_covers(part: Any, key: str, wanted: set[tuple[str, int]],
                        check: UnitCheck) -> None:
    """The frames part holds a frame for every steps row that names it."""
    try:
        table = part.read(columns=["rollout_id", "step"])
    except Exception as exc:
        check.problems.append(f"frames part {key} cannot be read ({exc})")
        return
    held = set(zip(table.column("rollout_id").to_pylist(), table.column("step").to_pylist(),
                   strict=True))
    missing = sorted(wanted - held)
    if missing:
        check.problems.append(f"{len(missing)} of {len(wanted)} frames its rows name are "
                              f"missing from {key}, e.g. {missing[0][0]} step {missing[0][1]}")


def check_by_sums(objects: Objects, *, run_date: str, run_id: str, unit_id: str,
                  marker: dict[str, Any], sums: dict[str, ObjectSum]) -> UnitCheck:
    """One committed unit against the sums its marker records (`marker_objects`)."""
    return _SumsCheck(objects, run_date=run_date, run_id=run_id, unit_id=unit_id,
                      marker=marker, sums=sums).run()


class _SumsCheck:
    """One unit whose marker records the sum of every object it wrote."""

    def __init__(self, objects: Objects, *, run_date: str, run_id: str, unit_id: str,
                 marker: dict[str, Any], sums: dict[str, ObjectSum]) -> None:
        self.objects, self.marker, self.sums = objects, marker, sums
        self.run_date, self.run_id, self.unit_id = run_date, run_id, unit_id
        self.plan = str(marker.get("plan_fingerprint", ""))
        self.check = UnitCheck(unit_id)
        self.keys = {t: layout.part_key(t, run_date, run_id, unit_id) for t in layout.TABLES}
        self.list_key = layout.unit_objects_key(run_date, run_id, unit_id)

    def run(self) -> UnitCheck:
        check = self.check
        strangers = sorted(set(self.sums) - set(self.keys.values()) - {self.list_key})
        if strangers:
            check.problems.append(f"its commit marker vouches for {strangers[0]}, which is no "
                                  "object of this unit")
        rollouts = self._whole_part(layout.ROLLOUTS_TABLE)
        if rollouts is not None:
            rows_match(rollouts, self.keys[layout.ROLLOUTS_TABLE], self.marker.get("rollouts"),
                        what="rollouts", check=check)
        steps = self._whole_part(layout.STEPS_TABLE)
        if steps is None:
            return check
        rows_match(steps, self.keys[layout.STEPS_TABLE], self.marker.get("steps"),
                    what="steps", check=check)
        rows = steps_rows(steps, run_date=self.run_date, run_id=self.run_id,
                           unit_id=self.unit_id, check=check)
        if rows is not None:
            self._frames_part(rows.in_part)
            self._listed_objects(rows.pngs)
        return check

    def _whole_part(self, table: str) -> Any:
        """A steps or rollouts part, read whole and hashed; None (and a problem) when it is
        missing, unreadable or misplaced."""
        key, check = self.keys[table], self.check
        expected = self.sums.get(key)
        if expected is None:
            check.problems.append(f"its commit marker records no checksum for its {table} part")
            return None
        try:
            data = self.objects.storage.get_bytes(key, max_bytes=_read_bound(expected))
        except FileNotFoundError:
            check.problems.append(f"{table} part {key} is missing")
            return None
        except UserError:  # far larger than the marker records: not read whole
            check.problems.append(f"{table} part {key} is far larger than the "
                                  f"{expected.size} bytes its commit marker records")
            return None
        except OSError as exc:
            check.problems.append(f"{table} part {key} could not be read ({exc})")
            return None
        wrong = _mismatch(key, sum_of(data), expected, what=f"{table} part")
        if wrong:  # the rows are still checked: they may say what happened to it
            check.problems.append(wrong)
        return open_part(self.objects, key, check, what=table, data=data, plan=self.plan)

    def _frames_part(self, wanted: set[tuple[str, int]]) -> None:
        key, check = self.keys[layout.FRAMES_TABLE], self.check
        expected = self.sums.get(key)
        if expected is None:
            if wanted:
                check.problems.append(f"its rows name the frames part {key}, but its commit "
                                      "marker records no checksum for it")
            return
        try:
            wrong = self.objects.problem(key, expected, what="frames part")
        except FileNotFoundError:
            check.problems.append(f"frames part {key} is missing")
            return
        if wrong:
            check.problems.append(wrong)
        elif not self.objects.deep:
            return  # the bytes its unit wrote, with its rows: nothing more to read
        part = open_part(self.objects, key, check, what="frames", plan=self.plan)
        if part is None:
            return
        rows_match(part, key, self.marker.get("stored_frames"), what="frames", check=check)
        frames_part_covers(part, key, wanted, check)

    def _listed_objects(self, pngs: set[str]) -> None:
        """The unit's object list (PNG frames, previews, videos): its own bytes as the
        marker records, every frame the rows name listed, every listed object as listed."""
        expected, check = self.sums.get(self.list_key), self.check
        if expected is None:
            if pngs:
                check.problems.append(f"its rows name {len(pngs)} frame objects, but its commit "
                                      "marker records no object list")
            return
        try:
            data = self.objects.storage.get_bytes(self.list_key,
                                                  max_bytes=_read_bound(expected))
            wrong = _mismatch(self.list_key, sum_of(data), expected, what="object list")
            listed = {} if wrong else read_object_list(data, unit_id=self.unit_id)
        except FileNotFoundError:
            wrong = f"object list {self.list_key} is missing"
        except (UserError, OSError, MarkerProblem) as exc:
            wrong = f"object list {self.list_key} cannot be used ({exc})"
        if wrong:
            check.problems.append(wrong)
            return
        unlisted = sorted(pngs - set(listed))
        if unlisted:
            check.problems.append(f"{len(unlisted)} frames its rows name are not in its object "
                                  f"list, e.g. {unlisted[0]}")
        ours = tuple(layout.run_prefix(folder, self.run_date, self.run_id) + "/"
                     for folder in (layout.FRAMES_DIR, layout.PREVIEWS_DIR, layout.VIDEOS_DIR))
        bad = [f"its object list names {k}, outside the run's frames, previews and videos"
               for k in sorted(listed) if not k.startswith(ours)]
        missing = []
        for key, expected in sorted(listed.items()):
            try:
                if key.startswith(ours) and (wrong := self.objects.problem(key, expected,
                                                                           what="object")):
                    bad.append(wrong)
            except FileNotFoundError:
                missing.append(key)
        named = sorted(pngs.intersection(missing))
        if named:
            check.problems.append(f"{len(named)} of {len(pngs)} frames its rows name are "
                                  f"missing, e.g. {named[0]}")
        elif missing:
            bad.append(f"object {missing[0]} of its object list is missing")
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            check.problems.append(bad[0] + more)
