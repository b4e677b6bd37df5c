"""A run's state on storage: its manifest, its fingerprint, its commit markers' totals.

Everything here reads or writes the `_runs/run_date=.../run_id=.../` folder of the layout
(docs/outputs.md, "Output layout"). The driver writes the manifest when a run starts and
ends; `runs` and the nightly entry point read it back. Markers are read in parallel, since a
resumed S3 run may have thousands, and checked (`pipeline.contracts.markers.read_marker`): a marker
that does not parse or whose checksum does not match is reported and counts as absent.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.contracts.markers import MAX_MARKER_BYTES, MarkerProblem, read_marker
from pipeline.contracts.plan import WorkUnit, plan_fingerprint
from pipeline.contracts.spec import JobSpec
from pipeline.contracts.storage import Storage, open_storage
from pipeline.contracts.storage.base import ObjectTooLarge
from pipeline.contracts.versions import software_versions
from pipeline.driver.lease import live_holder
from pipeline.driver.progress import Totals

MARKER_READERS = 16  # parallel reads of commit markers
OUTPUT_FOLDERS = (layout.STEPS_TABLE, layout.ROLLOUTS_TABLE, layout.FRAMES_DIR,
                  layout.VIDEOS_DIR, layout.PREVIEWS_DIR, layout.RUNS_DIR)


def read_json(storage: Storage, key: str) -> dict[str, Any] | None:
    """The JSON object at `key`; None if absent, {} if unreadable or not an object."""
    try:
        data = json.loads(storage.get_bytes(key))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def run_fingerprint(spec: JobSpec, units: Sequence[WorkUnit]) -> str:
    """The plan plus every setting that changes what a unit writes: a resumed run must
    match it, or its old and new units would disagree."""
    settings = {
        "plan": plan_fingerprint(units),
        "model": spec.model.model_dump(mode="json", include={"checkpoint", "preset"}),
        "seeds": spec.seeds.model_dump(mode="json", include={"format", "context_steps"}),
        "rollouts": spec.rollouts.model_dump(mode="json"),
        "output": spec.output.model_dump(mode="json", include={"frames", "image_tokens",
                                                               "watermark"}),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Throughput:
    """Generated frames and the wall seconds of the attempts that generated them, summed
    over a run's attempts: its frames per second, which a resume that finds nothing to do
    does not dilute."""

    generated_frames: int = 0
    seconds: float = 0.0

    @property
    def frames_per_second(self) -> float | None:
        return self.generated_frames / self.seconds if self.seconds > 0 else None

    def plus(self, generated_frames: int, seconds: float) -> Throughput:
        """With one more attempt (counted only when it generated frames)."""
        if generated_frames <= 0:
            return self
        return Throughput(self.generated_frames + generated_frames, self.seconds + seconds)

    @classmethod
    def of_manifest(cls, manifest: dict[str, Any]) -> Throughput:
        """What a manifest records; one written before `throughput` gives its last attempt."""
        try:
            if isinstance(manifest.get("throughput"), dict):
                t = manifest["throughput"]
                return cls(int(t["generated_frames"]), float(t["seconds"]))
            frames = int((manifest.get("attempt") or {}).get("frames", 0))
            return cls().plus(frames, float(manifest.get("wall_seconds") or 0.0))
        except (KeyError, TypeError, ValueError):
            return cls()


def manifest_bytes(spec: JobSpec, *, status: str, fingerprint: str, totals: Totals,
                   model: dict[str, Any], started_at: float, wall: float,
                   attempt: dict[str, int], throughput: Throughput, seed_scope: str) -> bytes:
    """The run manifest: `counts` over every attempt, `attempt` what this one added (its
    wall time and frames per second are this attempt's), `throughput` over the attempts
    that generated frames, the seed scope its plan used, and the software that ran it."""
    body = {
        "schema_version": layout.SCHEMA_VERSION,
        "status": status,
        "run_id": spec.run.run_id,
        "run_date": spec.run.run_date.isoformat(),
        "plan_fingerprint": fingerprint,
        "seed_scope": seed_scope,
        "model": model,
        "counts": asdict(totals),
        "attempt": attempt,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
        "wall_seconds": round(wall, 3),
        "frames_per_second": (round(attempt["generated_frames"] / wall, 3) if wall > 0
                              else 0.0),
        "throughput": {"generated_frames": throughput.generated_frames,
                       "seconds": round(throughput.seconds, 3),
                       "frames_per_second": _rounded(throughput.frames_per_second)},
        "software": software_versions(),
        "spec": spec.public_dict(),
    }
    return json.dumps(body, indent=2).encode()


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def delete_run(storage: Storage, *, run_date: str, run_id: str) -> int:
    """Delete every object of one run but its lease (the caller holds it).

    `_SUCCESS` goes first and the commit markers next, so a delete cut short never leaves a
    run that claims data it no longer has."""
    lease = layout.lease_key(run_date, run_id)
    success = layout.success_key(run_date, run_id)
    # Folder prefixes end with "/": run `exp1` must not take `exp10`'s objects with it.
    state = [k for k in storage.list_keys(layout.run_prefix(layout.RUNS_DIR, run_date, run_id)
                                          + "/")
             if k not in (lease, success)]
    removed = 0
    for key in [success, *state]:
        if key == success and not storage.exists(key):
            continue
        storage.delete(key)
        removed += 1
    data = (f for f in OUTPUT_FOLDERS if f != layout.RUNS_DIR)
    return removed + sum(storage.delete_prefix(layout.run_prefix(folder, run_date, run_id) + "/")
                         for folder in data)


@dataclass(slots=True)
class Markers:
    """A run's commit markers: those that can be trusted, by unit id, and those that
    cannot, with the reason."""

    good: dict[str, dict[str, Any]] = field(default_factory=dict)
    bad: dict[str, str] = field(default_factory=dict)


def _read_one(storage: Storage, key: str, unit_id: str) -> dict[str, Any] | str | None:
    try:
        return read_marker(storage.get_bytes(key, max_bytes=MAX_MARKER_BYTES), unit_id=unit_id)
    except FileNotFoundError:
        return None  # removed since the listing
    except ObjectTooLarge:
        return f"larger than the {MAX_MARKER_BYTES} bytes a marker ever holds"
    except MarkerProblem as exc:
        return str(exc)


def _commit_keys(run_date: str, run_id: str, names: Iterable[str]) -> dict[str, str]:
    """unit id -> marker key of the files listed under commits/ that are named like a
    unit's marker; any other file there is no marker and is left out."""
    out = {}
    for name in names:
        uid = name.removesuffix(".json")
        if name.endswith(".json") and "/" not in name:
            try:
                out[uid] = layout.commit_key(run_date, run_id, uid)
            except UserError:  # not a unit id
                continue
    return out


def read_markers(storage: Storage, *, run_date: str, run_id: str,
                 unit_ids: Iterable[str] | None = None) -> Markers:
    """The run's markers (those of `unit_ids`, or all from one listing), checked. Files under
    commits/ that are not named like a unit's marker are not markers: they are skipped."""
    if unit_ids is None:
        prefix = layout.commits_prefix(run_date, run_id)
        listed = _commit_keys(run_date, run_id,
                              (k.removeprefix(prefix) for k in storage.list_keys(prefix)))
        ids, keys = list(listed), list(listed.values())
    else:
        ids = list(unit_ids)
        keys = [layout.commit_key(run_date, run_id, uid) for uid in ids]
    with ThreadPoolExecutor(MARKER_READERS) as pool:
        found = list(pool.map(lambda kv: _read_one(storage, *kv), zip(keys, ids, strict=True)))
    out = Markers()
    for uid, marker in zip(ids, found, strict=True):
        if isinstance(marker, dict):
            out.good[uid] = marker
        elif isinstance(marker, str):
            out.bad[uid] = marker
    return out


@dataclass(slots=True)
class MarkerTotals:
    """Sums over commit markers: rollouts ok and failed, step rows, frames generated (ok
    rollouts x steps; None when unknown) and frames stored (context included)."""

    units: int = 0
    ok: int = 0
    failed: int = 0
    steps: int = 0
    generated_frames: int | None = 0
    stored_frames: int = 0


def marker_totals(storage: Storage, *, run_date: str, run_id: str,
                  unit_ids: Iterable[str] | None = None,
                  steps: int | None = None) -> MarkerTotals:
    """Totals of the given units' trusted commit markers (all of the run's by default)."""
    markers = read_markers(storage, run_date=run_date, run_id=run_id, unit_ids=unit_ids)
    return totals_of(markers.good.values(), steps=steps)


def totals_of(markers: Iterable[dict[str, Any]], *, steps: int | None = None) -> MarkerTotals:
    """Sums over `markers`. A marker's generated frames are its own count, else its ok
    rollouts x `steps` (rollouts.steps; None: unknown); its stored frames are
    `stored_frames`, called `frames` in markers written before the two were named apart."""
    out = MarkerTotals()
    for marker in markers:
        ok = int(marker.get("ok", 0))
        out.units += 1
        out.ok += ok
        out.failed += int(marker.get("failed", 0))
        out.steps += int(marker.get("steps", 0))
        out.stored_frames += int(marker.get("stored_frames", marker.get("frames", 0)))
        generated = marker.get("generated_frames")
        if generated is None and steps is not None:
            generated = ok * steps
        out.generated_frames = (None if generated is None or out.generated_frames is None
                                else out.generated_frames + int(generated))
    return out


def retryable_units(markers: dict[str, dict[str, Any]]) -> set[str]:
    """Units whose marker counts rollouts a rerun may complete (the model endpoint kept
    failing, a seed store refused a read)."""
    return {uid for uid, marker in markers.items() if int(marker.get("retryable", 0)) > 0}


def reopen_retryable_units(storage: Storage, *, run_date: str, run_id: str,
                           markers: dict[str, dict[str, Any]]) -> set[str]:
    """The `retryable_units` of `markers`, with their markers removed so the units run
    again; their ids."""
    reopened = retryable_units(markers)
    for uid in sorted(reopened):
        storage.delete(layout.commit_key(run_date, run_id, uid))
    return reopened


# ---------------------------------------------------------------- every run under a root


def read_runs(storage: Storage) -> list[dict[str, Any]]:
    """One entry per run under the root: run_date, run_id, units_committed, success,
    manifest (None when absent or unreadable), oldest first."""
    runs: dict[tuple[str, str], dict[str, Any]] = {}
    for key in storage.list_keys(f"{layout.RUNS_DIR}/"):
        parsed = layout.parse_run_key(key)
        if parsed is None:
            continue
        run_date, run_id, rest = parsed
        run = runs.setdefault((run_date, run_id), {
            "run_date": run_date, "run_id": run_id, "units_committed": 0, "success": False,
            "manifest": None,
        })
        if layout.commit_unit_id(rest) is not None:
            run["units_committed"] += 1
        elif rest == "_SUCCESS":
            run["success"] = True
        elif rest == "manifest.json":
            run["manifest"] = read_json(storage, key) or None
    return [runs[k] for k in sorted(runs)]


def _run_status(*, running: bool, success: bool, manifest: dict[str, Any]) -> str:
    """running (a driver holds the run's lease), complete (_SUCCESS), failed (every unit
    committed, failure budget exceeded: the manifest says so) or partial; the same rule as
    the driver's exit status."""
    if running:
        return "running"
    if success:
        return "complete"
    return "failed" if manifest.get("status") == "failed" else "partial"


@dataclass
class RunInfo:
    run_date: str
    run_id: str
    status: str  # running | complete | failed (too many failed rollouts) | partial
    units_committed: int
    units_planned: int | None
    rollouts_ok: int
    rollouts_failed: int
    generated_frames: int | None  # ok rollouts x rollouts.steps (None: unknown)
    stored_frames: int  # frames physically stored, context included
    #: Wall seconds of the run's attempts that generated frames, and their frames/s.
    wall_seconds: float | None
    frames_per_second: float | None
    started_at: str | None


def _counts(storage: Storage, run: dict[str, Any], manifest: dict[str, Any]) -> MarkerTotals:
    """A run's counts: a complete run's manifest has them (when it names both kinds of
    frames); any other run's come from its commit markers."""
    counts = manifest.get("counts") or {}
    if run["success"] and "stored_frames" in counts:
        return MarkerTotals(ok=int(counts.get("rollouts_ok", 0)),
                            failed=int(counts.get("rollouts_failed", 0)),
                            generated_frames=int(counts.get("generated_frames", 0)),
                            stored_frames=int(counts["stored_frames"]))
    steps = ((manifest.get("spec") or {}).get("rollouts") or {}).get("steps")
    return marker_totals(storage, run_date=run["run_date"], run_id=run["run_id"],
                         steps=int(steps) if isinstance(steps, int) else None)


def list_runs(root: str, *, endpoint_url: str | None = None, region: str | None = None,
              run_date: str | None = None) -> list[RunInfo]:
    """Every run under `root`'s `_runs/` (optionally of one date), oldest first.

    A run is running while a driver holds its lease (`lease.live_holder`), complete when
    `_SUCCESS` exists, failed when its units are all committed but its failed rollouts
    exceed its budget, partial otherwise. A complete run's counts come from its manifest,
    any other's from its commit markers; frames per second are those of the run's own
    attempts that generated frames (a resume with nothing to do does not count).
    """
    wanted = layout.run_date_str(run_date) if run_date is not None else None
    storage = open_storage(root, endpoint_url=endpoint_url, region=region)
    out = []
    for run in read_runs(storage):
        date, run_id = run["run_date"], run["run_id"]
        if wanted is not None and date != wanted:
            continue
        manifest = run["manifest"] or {}
        sums = _counts(storage, run, manifest)
        throughput = Throughput.of_manifest(manifest)
        running = live_holder(storage, run_date=date, run_id=run_id) is not None
        planned = (manifest.get("counts") or {}).get("units_total")
        out.append(RunInfo(
            run_date=date, run_id=run_id,
            status=_run_status(running=running, success=bool(run["success"]),
                               manifest=manifest),
            units_committed=int(run["units_committed"]),
            units_planned=int(planned) if planned is not None else None,
            rollouts_ok=sums.ok, rollouts_failed=sums.failed,
            generated_frames=sums.generated_frames, stored_frames=sums.stored_frames,
            wall_seconds=round(throughput.seconds, 3) if throughput.seconds else None,
            frames_per_second=_rounded(throughput.frames_per_second),
            started_at=manifest.get("started_at"),
        ))
    return out
