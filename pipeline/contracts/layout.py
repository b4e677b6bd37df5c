"""The output layout and table schemas, schema version 3 (a public contract).

```
steps/run_date=YYYY-MM-DD/run_id=<run_id>/part-<unit>.parquet     one row per step
rollouts/run_date=YYYY-MM-DD/run_id=<run_id>/part-<unit>.parquet  one row per rollout
frames/run_date=YYYY-MM-DD/run_id=<run_id>/part-<unit>.parquet    output.frames: parquet
frames/run_date=YYYY-MM-DD/run_id=<run_id>/<rollout_id>/<step:06d>.png   output.frames: png
videos/run_date=YYYY-MM-DD/run_id=<run_id>/<rollout_id>.mp4       output.video (optional)
previews/run_date=YYYY-MM-DD/run_id=<run_id>/<rollout_id>.gif
_runs/run_date=YYYY-MM-DD/run_id=<run_id>/manifest.json
_runs/run_date=YYYY-MM-DD/run_id=<run_id>/commits/<unit>.json
_runs/run_date=YYYY-MM-DD/run_id=<run_id>/objects/<unit>.json     the unit's other objects' sums
_runs/run_date=YYYY-MM-DD/run_id=<run_id>/lease.json
_runs/run_date=YYYY-MM-DD/run_id=<run_id>/_SUCCESS
_runs/run_date=YYYY-MM-DD/run_id=<run_id>/report.html     `wham-batch report` (optional)
```

The writer and the query side both use this module, so the two never disagree. Schemas
here leave out the partition columns `run_date` and `run_id`: they live in the hive paths
and the query side adds them back (`query_schema`). Every stored type is the same for every
model (image tokens are a variable-size list), so parts of different models under one root
unify in any Parquet reader. Changing anything here means bumping SCHEMA_VERSION.
"""

from __future__ import annotations

import datetime as dt
import re

import pyarrow as pa

from pipeline.contracts.errors import UserError
from workers.wham.actions import ACTION_DIM, BUTTON_NAMES, STICK_NAMES

#: 3: commit markers record every object's size and SHA-256 (pipeline.contracts.checksums)
#: and name frame counts `generated_frames` / `stored_frames`; parts carry their run, unit
#: and plan in their metadata (pipeline.contracts.parts); the rollouts table records each
#: rollout's `decoding`.
SCHEMA_VERSION = 3
STEPS_TABLE = "steps"
ROLLOUTS_TABLE = "rollouts"
#: The frames table (output.frames: parquet) shares its folder with per-frame PNGs
#: (output.frames: png); a run writes one or the other.
FRAMES_TABLE = "frames"
TABLES = (STEPS_TABLE, ROLLOUTS_TABLE, FRAMES_TABLE)
FRAMES_DIR = FRAMES_TABLE
VIDEOS_DIR = "videos"
PREVIEWS_DIR = "previews"
RUNS_DIR = "_runs"
PARTITION_COLUMNS = ("run_date", "run_id")
#: Steps per second of game time (WHAM models 10 Hz); timestamp_s = step / STEP_RATE_HZ.
STEP_RATE_HZ = 10.0
ACTION_SOURCES = ("seed", "model", "given")
ROLLOUT_STATUSES = ("ok", "failed")
#: Key of the schema metadata entry holding SCHEMA_VERSION.
SCHEMA_VERSION_KEY = b"wham_batch.schema_version"

_RUN_KEY = re.compile(
    rf"^{RUNS_DIR}/run_date=(?P<run_date>[^/]+)/run_id=(?P<run_id>[^/]+)/(?P<rest>.+)$"
)
_PART_KEY = re.compile(r"^(?P<table>[^/]+)/run_date=(?P<run_date>[^/]+)/run_id=(?P<run_id>[^/]+)/"
                       r"part-(?P<unit>u\d+)\.parquet$")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_UNIT_ID = re.compile(r"^u\d{6,}$")
_ROLLOUT_ID = re.compile(r"^[\w.-]{1,200}$")


def _with_version(schema: pa.Schema, table: str) -> pa.Schema:
    return schema.with_metadata(
        {SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode(), b"wham_batch.table": table.encode()}
    )


#: list<uint16> (codebooks hold at most 65536 entries). A variable-size list, not a fixed-size
#: one: the length depends on the model, and a fixed size would make two models' parts
#: disagree on the column's type. Child fields are named "element", as Parquet names them,
#: so schemas survive a round trip.
IMAGE_TOKENS_TYPE = pa.list_(pa.field("element", pa.uint16()))
#: Per-step quality signals (pipeline/contracts/quality.py): null for context steps, and for the
#: token kind a mode does not sample (actions in world_model, images in policy).
STEP_QUALITY_COLUMNS = (
    "image_logprob", "image_entropy", "action_logprob", "action_entropy", "changed_fraction",
)
#: Per-rollout aggregates of the step signals (pipeline/contracts/quality.py); null for failed
#: rollouts.
ROLLOUT_QUALITY_FIELDS = (
    pa.field("mean_logprob", pa.float32(), nullable=True),
    pa.field("min_logprob", pa.float32(), nullable=True),
    pa.field("mean_entropy", pa.float32(), nullable=True),
    pa.field("mean_changed_fraction", pa.float32(), nullable=True),
    pa.field("frozen", pa.bool_(), nullable=True),
    pa.field("collapse_step", pa.int32(), nullable=True),
)


def _steps_schema() -> pa.Schema:
    fields = [
        pa.field("rollout_id", pa.string(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("generated", pa.bool_(), nullable=False),
        *(pa.field(name, pa.bool_(), nullable=False) for name in BUTTON_NAMES),
        *(pa.field(name, pa.float32(), nullable=False) for name in STICK_NAMES),
        pa.field(
            "action_bins", pa.list_(pa.field("element", pa.uint8()), ACTION_DIM), nullable=False
        ),
        pa.field("action_source", pa.string(), nullable=False),
        pa.field("image_tokens", IMAGE_TOKENS_TYPE, nullable=True),
        pa.field("frame_key", pa.string(), nullable=True),
        pa.field("timestamp_s", pa.float64(), nullable=False),
        *(pa.field(name, pa.float32(), nullable=True) for name in STEP_QUALITY_COLUMNS),
    ]
    return _with_version(pa.schema(fields), STEPS_TABLE)


#: A steps part. `image_tokens` holds every step's tokens (context steps too), null only
#: when `output.image_tokens` is off; `frame_key` names the object holding the frame: the
#: PNG (frames: png), the unit's frames part (frames: parquet), or null (frames: none).
STEPS_SCHEMA = _steps_schema()


_TIMESTAMP = pa.timestamp("ms", tz="UTC")
ROLLOUTS_SCHEMA = _with_version(
    pa.schema(
        [
            pa.field("rollout_id", pa.string(), nullable=False),
            pa.field("unit_id", pa.string(), nullable=False),
            pa.field("seed_id", pa.string(), nullable=False),
            pa.field("seed_uri", pa.string(), nullable=False),
            pa.field("rollout_index", pa.int32(), nullable=False),
            pa.field("mode", pa.string(), nullable=False),
            pa.field("action_policy", pa.string(), nullable=False),
            pa.field("context_steps", pa.int32(), nullable=False),
            pa.field("generated_steps", pa.int32(), nullable=False),
            pa.field("temperature", pa.float32(), nullable=False),
            pa.field("top_k", pa.int32(), nullable=True),
            pa.field("top_p", pa.float32(), nullable=False),
            # version 2: greedy rollouts took the likeliest token (temperature and top_*
            # did not apply), so they can be told apart from sampled ones.
            pa.field("greedy", pa.bool_(), nullable=False),
            # version 3: how the image tokens were sampled (workers.wham.modes.DECODINGS);
            # null in older parts and for an endpoint's rollouts (it decodes as started).
            pa.field("decoding", pa.string(), nullable=True),
            pa.field("rng_seed", pa.int64(), nullable=False),
            pa.field("model_id", pa.string(), nullable=False),
            pa.field("model_sha256", pa.string(), nullable=False),
            pa.field("status", pa.string(), nullable=False),
            pa.field("error", pa.string(), nullable=True),
            pa.field("worker", pa.string(), nullable=False),
            pa.field("started_at", _TIMESTAMP, nullable=False),
            pa.field("finished_at", _TIMESTAMP, nullable=False),
            pa.field("generate_seconds", pa.float64(), nullable=False),
            *ROLLOUT_QUALITY_FIELDS,
        ]
    ),
    ROLLOUTS_TABLE,
)
#: A frames part (output.frames: parquet): one row per stored frame of a unit, the PNG as
#: the writer would have uploaded it (watermark and provenance included).
FRAMES_SCHEMA = _with_version(
    pa.schema(
        [
            pa.field("rollout_id", pa.string(), nullable=False),
            pa.field("step", pa.int32(), nullable=False),
            pa.field("png", pa.binary(), nullable=False),
        ]
    ),
    FRAMES_TABLE,
)
_SCHEMAS = {STEPS_TABLE: STEPS_SCHEMA, ROLLOUTS_TABLE: ROLLOUTS_SCHEMA, FRAMES_TABLE: FRAMES_SCHEMA}


def query_schema(table: str) -> pa.Schema:
    """The schema the query side reads a table with, across runs: partition columns first.
    Version-1 parts (fixed-size token lists, no quality columns) read with it too."""
    base = _SCHEMAS.get(table)
    if base is None:
        raise UserError(f"unknown table {table!r}; choose one of {', '.join(TABLES)}")
    partitions = [pa.field("run_date", pa.string()), pa.field("run_id", pa.string())]
    return pa.schema(partitions + list(base), metadata=base.metadata)


def run_date_str(run_date: str | dt.date) -> str:
    """Normalise a run date to 'YYYY-MM-DD'; UserError if it is not a real date."""
    if isinstance(run_date, dt.datetime):
        run_date = run_date.date()
    if isinstance(run_date, dt.date):
        return run_date.isoformat()
    try:
        return dt.date.fromisoformat(str(run_date)).isoformat()
    except ValueError:
        raise UserError(f"run_date {run_date!r} is not a date of the form YYYY-MM-DD") from None


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise UserError(
            f"run_id {run_id!r} must start with a letter or digit and use only letters, "
            "digits, '.', '_' and '-' (at most 128 characters)"
        )
    return run_id


def _check(value: str, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or not pattern.match(value) or value.startswith("."):
        raise UserError(f"{what} {value!r} is not a valid {what}")
    return value


def unit_id_for(index: int) -> str:
    """'u000012' for unit index 12."""
    if index < 0:
        raise ValueError(f"unit index must be >= 0, got {index}")
    return f"u{index:06d}"


def rollout_id_for(safe_seed_id: str, rollout_index: int) -> str:
    """'{seed}-r003': the seed id must already be a safe segment (`storage.safe_segment`)."""
    return f"{safe_seed_id}-r{rollout_index:03d}"


def _run_part(run_date: str | dt.date, run_id: str) -> str:
    return f"run_date={run_date_str(run_date)}/run_id={check_run_id(run_id)}"


def run_prefix(table: str, run_date: str | dt.date, run_id: str) -> str:
    """'steps/run_date=2026-11-30/run_id=nightly' (for any top-level folder of the layout)."""
    if table not in (*TABLES, FRAMES_DIR, VIDEOS_DIR, PREVIEWS_DIR, RUNS_DIR):
        raise UserError(f"unknown layout folder {table!r}")
    return f"{table}/{_run_part(run_date, run_id)}"


def part_key(table: str, run_date: str | dt.date, run_id: str, unit_id: str) -> str:
    """One unit's part of `table` (steps, rollouts or frames)."""
    if table not in TABLES:
        raise UserError(f"unknown table {table!r}")
    unit = _check(unit_id, _UNIT_ID, "unit id")
    return f"{run_prefix(table, run_date, run_id)}/part-{unit}.parquet"


def steps_part_key(run_date: str | dt.date, run_id: str, unit_id: str) -> str:
    return part_key(STEPS_TABLE, run_date, run_id, unit_id)


def rollouts_part_key(run_date: str | dt.date, run_id: str, unit_id: str) -> str:
    return part_key(ROLLOUTS_TABLE, run_date, run_id, unit_id)


def frames_part_key(run_date: str | dt.date, run_id: str, unit_id: str) -> str:
    return part_key(FRAMES_TABLE, run_date, run_id, unit_id)


def video_key(run_date: str | dt.date, run_id: str, rollout_id: str) -> str:
    rollout = _check(rollout_id, _ROLLOUT_ID, "rollout id")
    return f"{run_prefix(VIDEOS_DIR, run_date, run_id)}/{rollout}.mp4"


def frame_key(run_date: str | dt.date, run_id: str, rollout_id: str, step: int) -> str:
    rollout = _check(rollout_id, _ROLLOUT_ID, "rollout id")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"{run_prefix(FRAMES_DIR, run_date, run_id)}/{rollout}/{step:06d}.png"


def preview_key(run_date: str | dt.date, run_id: str, rollout_id: str) -> str:
    rollout = _check(rollout_id, _ROLLOUT_ID, "rollout id")
    return f"{run_prefix(PREVIEWS_DIR, run_date, run_id)}/{rollout}.gif"


def manifest_key(run_date: str | dt.date, run_id: str) -> str:
    return f"{run_prefix(RUNS_DIR, run_date, run_id)}/manifest.json"


def commits_prefix(run_date: str | dt.date, run_id: str) -> str:
    return f"{run_prefix(RUNS_DIR, run_date, run_id)}/commits/"


def unit_objects_key(run_date: str | dt.date, run_id: str, unit_id: str) -> str:
    """The list of a unit's objects other than its table parts (PNG frames, previews,
    videos) with their sizes and checksums; its commit marker records the list's own."""
    unit = _check(unit_id, _UNIT_ID, "unit id")
    return f"{run_prefix(RUNS_DIR, run_date, run_id)}/objects/{unit}.json"


def lease_key(run_date: str | dt.date, run_id: str) -> str:
    """The run lease: which driver holds the run (pipeline.driver.lease)."""
    return f"{run_prefix(RUNS_DIR, run_date, run_id)}/lease.json"


def commit_key(run_date: str | dt.date, run_id: str, unit_id: str) -> str:
    unit = _check(unit_id, _UNIT_ID, "unit id")
    return f"{commits_prefix(run_date, run_id)}{unit}.json"


def parse_part_key(key: str) -> tuple[str, str, str, str] | None:
    """(table, run_date, run_id, unit_id) of a table part's key, e.g.
    'steps/run_date=2026-11-30/run_id=nightly/part-u000003.parquet'; None for any other key."""
    match = _PART_KEY.match(key)
    return (match["table"], match["run_date"], match["run_id"], match["unit"]) if match else None


def parse_run_key(key: str) -> tuple[str, str, str] | None:
    """(run_date, run_id, rest) of a key under `_runs/`, e.g. rest = 'commits/u000003.json';
    None for any other key."""
    match = _RUN_KEY.match(key)
    return (match["run_date"], match["run_id"], match["rest"]) if match else None


def commit_unit_id(rest: str) -> str | None:
    """The unit id of a `parse_run_key` rest that names a commit marker, else None."""
    if rest.startswith("commits/") and rest.endswith(".json") and rest.count("/") == 1:
        return rest[len("commits/"):-len(".json")]
    return None


def check_schema_version(version: object, *, where: str) -> None:
    """UserError when `where` (a manifest, marker or table part) was written by a newer
    wham-batch than this one reads; versions at or below SCHEMA_VERSION are read."""
    try:
        found = int(version)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise UserError(f"{where}: schema version {version!r} is not a number") from None
    if found > SCHEMA_VERSION:
        raise UserError(
            f"{where} has schema version {found}, newer than the {SCHEMA_VERSION} this "
            "wham-batch reads; upgrade wham-batch to read it"
        )


def success_key(run_date: str | dt.date, run_id: str) -> str:
    return f"{run_prefix(RUNS_DIR, run_date, run_id)}/_SUCCESS"


def report_key(run_date: str | dt.date, run_id: str) -> str:
    """The run's HTML report (pipeline.report), beside its `_SUCCESS`."""
    return f"{run_prefix(RUNS_DIR, run_date, run_id)}/report.html"
