"""The actor's background output writer: frames, previews, videos, Parquet parts, commit
markers.

The actor hands over each step as soon as the engine yields it (`add_step`) and goes on
computing; PNG encoding and uploads run on a small thread pool (Pillow's encoder and boto3
release the GIL). A bounded number of pending jobs keeps memory bounded: `add_step` blocks
when the pool falls behind.

Frames are stored as `output.frames` says, by that mode's handler
(workers/actor/frame_store.py): `png` uploads one PNG per frame while the unit runs;
`parquet` encodes the same PNGs on the pool and keeps them until the unit's frames part is
written (one object per unit); `none` stores nothing but the steps' image tokens. What to
write comes in one `WriterSettings`, built from the job's `output` section.

Per work unit, in this order (docs/outputs.md, "Output layout"):
1. frames, previews and videos are uploaded while the unit runs;
2. `finish_unit` waits for them, then writes the unit's frames part (parquet mode), then its
   steps and rollouts Parquet parts;
3. the commit marker goes last. A failed upload fails the whole unit (WriteError), so the
   driver retries it; names are deterministic, so the retry overwrites.

Steps of failed rollouts are not written (their rollouts row says why); PNGs they already
uploaded stay and are overwritten by a retry; their frames never reach a frames part.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.contracts import layout
from pipeline.contracts.checksums import ObjectSum, sum_of, with_s3_checksum
from pipeline.contracts.errors import UserError
from pipeline.contracts.markers import marker_bytes, object_list_bytes
from pipeline.contracts.metrics import Metrics
from pipeline.contracts.parts import part_metadata
from pipeline.contracts.storage import Storage, StorageFatalError, backoff_delay
from workers.actor.encode import encode_gif, encode_mp4, encode_png, provenance_text
from workers.actor.frame_store import UnitFrames, frame_store
from workers.actor.tables import StepRow, ok_steps, parquet_bytes, rollouts_table, steps_table
from workers.actor.writer_settings import WriterSettings
from workers.wham.actions import ACTION_DIM, validate_actions

#: Longest wait for one unit's uploads (and for a free upload slot) before the unit fails.
FLUSH_TIMEOUT_S = 600.0
#: Tries of one object write; transient errors between them wait `backoff_delay`.
WRITE_ATTEMPTS = 4
PARQUET_TYPE = "application/vnd.apache.parquet"
_REQUIRED_ROLLOUT_KEYS = tuple(
    f.name for f in layout.ROLLOUTS_SCHEMA if not f.nullable and f.name != "unit_id"
)


class WriteError(RuntimeError):
    """Outputs of a unit could not be written; the unit has to be retried."""


@dataclass(frozen=True, slots=True)
class UnitWriteResult:
    unit_id: str
    rollouts: int
    ok: int
    failed: int
    steps: int
    generated_frames: int  # frames the model generated: ok rollouts x steps
    stored_frames: int  # frames stored: PNG objects, or rows of the frames part
    previews: int
    write_seconds: float  # time finish_unit spent waiting for uploads and writing parts
    committed: bool  # False if an earlier attempt had already written the marker
    retryable: int = 0  # failed rollouts a rerun may complete


@dataclass
class _Unit:
    steps: dict[str, dict[int, StepRow]] = field(default_factory=dict)
    rollouts: dict[str, dict[str, Any]] = field(default_factory=dict)
    retryable: set[str] = field(default_factory=set)  # failed rollouts a rerun may complete
    preview_frames: dict[str, list[tuple[np.ndarray, bool]]] = field(default_factory=dict)
    frames: UnitFrames = field(default_factory=UnitFrames)
    objects: dict[str, ObjectSum] = field(default_factory=dict)  # key -> what was written
    futures: list[Future[Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    error: BaseException | None = None
    previews: int = 0


class OutputWriter:
    """Writes one actor's outputs for one run; thread-safe across units."""

    def __init__(self, storage: Storage, settings: WriterSettings) -> None:
        # Inside a Ray actor every put's latency goes to the run's upload histogram.
        self.storage = Metrics(settings.run_id).timed(storage)
        self.settings = settings
        self.run_date, self.run_id = settings.run_date, settings.run_id
        self.frame_store = frame_store(settings.frame_mode, run_date=settings.run_date,
                                       run_id=settings.run_id)
        self.tokens_per_image = settings.tokens_per_image if settings.image_tokens else None
        self._pool = ThreadPoolExecutor(settings.threads, thread_name_prefix="wham-writer")
        self._slots = threading.BoundedSemaphore(settings.max_pending or 8 * settings.threads)
        self._units: dict[str, _Unit] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ intake

    def _unit(self, unit_id: str) -> _Unit:
        with self._lock:
            return self._units.setdefault(unit_id, _Unit())

    def _submit(self, unit: _Unit, fn: Any, *args: Any) -> None:
        if not self._slots.acquire(timeout=FLUSH_TIMEOUT_S):
            raise WriteError(f"no upload finished within {FLUSH_TIMEOUT_S:.0f} s")
        try:
            future = self._pool.submit(fn, *args)
        except BaseException:
            self._slots.release()
            raise

        def done(f: Future[Any]) -> None:
            self._slots.release()
            if f.exception() is not None:
                with unit.lock:
                    unit.error = unit.error or f.exception()

        future.add_done_callback(done)
        with unit.lock:
            unit.futures.append(future)

    def add_step(
        self,
        unit_id: str,
        rollout_id: str,
        *,
        step: int,
        image: np.ndarray | None,
        action: np.ndarray,
        generated: bool,
        action_source: str,
        image_tokens: np.ndarray | None = None,
        quality: Mapping[str, float] | None = None,
    ) -> None:
        """Record one step of one rollout and queue its frame's encoding and upload.

        `image` uint8 (3,H,W) (copied, so the caller may reuse its buffer); `action` model
        form (16,); `image_tokens` (n,) or None; `quality` the step's signals
        (`layout.STEP_QUALITY_COLUMNS`, NaN where absent). Blocks only when too many jobs
        are pending; raises WriteError if an earlier upload of this unit failed.
        """
        unit = self._unit(unit_id)
        if unit.error is not None:
            raise WriteError(f"unit {unit_id}: an upload failed: {unit.error}") from unit.error
        if action_source not in layout.ACTION_SOURCES:
            raise ValueError(f"action_source must be one of {layout.ACTION_SOURCES}")
        action = validate_actions(np.asarray(action).reshape(ACTION_DIM), name="action")
        key = None
        if image is not None:
            image = np.array(image, dtype=np.uint8, copy=True)
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"image must be uint8 (3,H,W), got shape {image.shape}")
            key = self._queue_frame(unit, unit_id, image, rollout_id, step, generated)
            if self.settings.previews or self.settings.video:
                unit.preview_frames.setdefault(rollout_id, []).append((image, generated))
        unit.steps.setdefault(rollout_id, {})[step] = StepRow(
            step=step,
            generated=generated,
            action=action,
            source=action_source,
            tokens=self._checked_tokens(image_tokens),
            frame_key=key,
            quality={k: float(v) for k, v in (quality or {}).items()
                     if k in layout.STEP_QUALITY_COLUMNS},
        )

    def _checked_tokens(self, image_tokens: np.ndarray | None) -> np.ndarray | None:
        if not self.settings.image_tokens or image_tokens is None:
            return None
        tokens = np.asarray(image_tokens).reshape(-1)
        if self.tokens_per_image is not None and tokens.size != self.tokens_per_image:
            raise ValueError(f"expected {self.tokens_per_image} image tokens, got {tokens.size}")
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.uint16).max):
            raise ValueError("image tokens must fit in uint16")
        return tokens

    def _queue_frame(self, unit: _Unit, unit_id: str, image: np.ndarray, rollout_id: str,
                     step: int, generated: bool) -> str | None:
        """Queue the frame's encoding and storage as the frame store says; the key that the
        step's `frame_key` names (None: frames are not stored)."""
        key = self.frame_store.key(unit_id, rollout_id, step)
        if key is not None:
            self._submit(unit, self._write_frame, unit, key, image, rollout_id, step, generated)
        return key

    def finish_rollout(self, unit_id: str, row: Mapping[str, Any], *,
                       retryable: bool = False) -> None:
        """Record a rollout's row (rollouts columns except unit_id); queues its preview and
        video. `retryable`: a failed rollout a rerun may complete (the marker counts them,
        and the driver reopens their unit)."""
        missing = [k for k in _REQUIRED_ROLLOUT_KEYS if row.get(k) is None]
        if missing:
            raise ValueError(f"rollout row is missing {', '.join(missing)}")
        if row["status"] not in layout.ROLLOUT_STATUSES:
            raise ValueError(f"rollout status must be one of {layout.ROLLOUT_STATUSES}")
        unit = self._unit(unit_id)
        rollout_id = row["rollout_id"]
        unit.rollouts[rollout_id] = {**row, "unit_id": unit_id}
        if retryable and row["status"] != "ok":
            unit.retryable.add(rollout_id)
        else:
            unit.retryable.discard(rollout_id)
        frames = unit.preview_frames.pop(rollout_id, None)
        if row["status"] != "ok" or not frames:
            return
        if self.settings.previews:
            key = layout.preview_key(self.run_date, self.run_id, rollout_id)
            self._submit(unit, self._write_preview, unit, key, frames, rollout_id)
        if self.settings.video:
            key = layout.video_key(self.run_date, self.run_id, rollout_id)
            self._submit(unit, self._write_video, unit, key, frames, rollout_id)

    # ------------------------------------------------------------------ workers

    @staticmethod
    def _retrying(write: Any) -> Any:
        """`write()`, retried with backoff on transient errors (not three tries in one
        second); a store that is full, read-only or refuses the key fails at once."""
        for attempt in range(WRITE_ATTEMPTS - 1):
            try:
                return write()
            except UserError:
                raise
            except OSError:
                time.sleep(backoff_delay(attempt))
        return write()

    def _put(self, unit: _Unit, key: str, data: bytes, content_type: str) -> None:
        """Write one object of `unit` (retried) and record its size and checksum for the
        unit's commit."""
        reported = self._retrying(lambda: self.storage.put_with_checksum(
            key, data, content_type=content_type))
        written = with_s3_checksum(sum_of(data), reported)
        with unit.lock:
            unit.objects[key] = written

    def _provenance(self, rollout_id: str, step: int | None = None,
                    generated: bool | None = None) -> dict[str, str]:
        return provenance_text(model_id=self.settings.model_id, run_id=self.run_id,
                               rollout_id=rollout_id, step=step, generated=generated)

    def _write_frame(
        self, unit: _Unit, key: str, image: np.ndarray, rollout_id: str, step: int, generated: bool
    ) -> None:
        data = encode_png(image, text=self._provenance(rollout_id, step, generated),
                          watermark=self.settings.watermark and generated)
        self.frame_store.keep(unit.frames, functools.partial(self._put, unit), key=key,
                              rollout_id=rollout_id, step=step, png=data)

    def _write_preview(
        self, unit: _Unit, key: str, frames: list[tuple[np.ndarray, bool]], rollout_id: str
    ) -> None:
        comment = "; ".join(f"{k}={v}" for k, v in self._provenance(rollout_id).items())
        data = encode_gif(
            frames, scale=self.settings.preview_scale, watermark=self.settings.watermark,
            comment=comment
        )
        self._put(unit, key, data, "image/gif")
        with unit.lock:
            unit.previews += 1

    def _write_video(self, unit: _Unit, key: str, frames: list[tuple[np.ndarray, bool]],
                     rollout_id: str) -> None:
        comment = "; ".join(f"{k}={v}" for k, v in self._provenance(rollout_id).items())
        data = encode_mp4(frames, watermark=self.settings.watermark, comment=comment)
        self._put(unit, key, data, "video/mp4")

    # ------------------------------------------------------------------ commit

    def _wait(self, unit_id: str, unit: _Unit) -> None:
        with unit.lock:
            futures = list(unit.futures)
        _, pending = wait(futures, timeout=FLUSH_TIMEOUT_S)
        if pending:
            raise WriteError(
                f"unit {unit_id}: {len(pending)} uploads still running after "
                f"{FLUSH_TIMEOUT_S:.0f} s"
            )
        errors = [f.exception() for f in futures if f.exception() is not None]
        fatal = [e for e in errors if isinstance(e, StorageFatalError)]
        if fatal:
            raise fatal[0]  # as it is: the driver stops the run on it, naming the root
        if errors:
            raise WriteError(
                f"unit {unit_id}: {len(errors)} of {len(futures)} uploads failed; "
                f"first: {errors[0]}"
            ) from errors[0]

    def _put_part(self, unit: _Unit, table_name: str, unit_id: str, table: Any, *,
                  plan_fingerprint: str) -> None:
        """One of the unit's table parts, saying in its metadata whose part it is."""
        meta = part_metadata(table_name, run_date=self.run_date, run_id=self.run_id,
                             unit_id=unit_id, plan_fingerprint=plan_fingerprint)
        key = layout.part_key(table_name, self.run_date, self.run_id, unit_id)
        self._put(unit, key, parquet_bytes(table, metadata=meta), PARQUET_TYPE)

    def finish_unit(self, unit_id: str, *, plan_fingerprint: str = "") -> UnitWriteResult:
        """Wait for the unit's uploads, write its Parquet parts and its object list, then
        its commit marker (which records `plan_fingerprint`, the run's plan, the size and
        checksum of every object written, and its own checksum).

        Raises WriteError if any upload failed (the unit is then not committed) and
        ValueError if a rollout has steps but no `finish_rollout` row.
        """
        t0 = time.perf_counter()
        with self._lock:
            unit = self._units.pop(unit_id, _Unit())
        self._wait(unit_id, unit)
        orphans = sorted(set(unit.steps) - set(unit.rollouts))
        if orphans:
            raise ValueError(f"unit {unit_id}: rollouts {orphans[:3]} have steps but no row")
        rows = ok_steps(unit.steps, unit.rollouts)
        others = dict(unit.objects)  # frames, previews, videos: listed, not in the marker
        parts = {layout.FRAMES_TABLE: self.frame_store.part(unit.frames, rows=rows),
                 layout.STEPS_TABLE: steps_table(rows),
                 layout.ROLLOUTS_TABLE: rollouts_table(unit.rollouts)}
        for name, table in parts.items():
            if table is not None:
                self._put_part(unit, name, unit_id, table, plan_fingerprint=plan_fingerprint)
        if others:
            self._put(unit, layout.unit_objects_key(self.run_date, self.run_id, unit_id),
                      object_list_bytes(run_id=self.run_id, unit_id=unit_id, objects=others),
                      "application/json")
        ok = sum(r["status"] == "ok" for r in unit.rollouts.values())
        result = {
            "unit_id": unit_id, "rollouts": len(unit.rollouts), "ok": ok,
            "failed": len(unit.rollouts) - ok, "retryable": len(unit.retryable),
            "steps": parts[layout.STEPS_TABLE].num_rows,
            "generated_frames": sum(s.generated for _, s in rows),
            "stored_frames": unit.frames.stored, "previews": unit.previews,
        }
        vouched = {k: v for k, v in unit.objects.items() if k not in others}
        marker = marker_bytes(run_date=self.run_date, run_id=self.run_id, unit_id=unit_id,
                              plan_fingerprint=plan_fingerprint, counts=result,
                              objects=vouched)
        key = layout.commit_key(self.run_date, self.run_id, unit_id)
        committed = self._retrying(lambda: self.storage.create_if_absent(key, marker))
        return UnitWriteResult(
            **result, write_seconds=time.perf_counter() - t0, committed=committed
        )

    def abort_unit(self, unit_id: str) -> None:
        """Forget a unit's buffered rows; waits (bounded) for its uploads, ignoring errors."""
        with self._lock:
            unit = self._units.pop(unit_id, None)
        if unit is not None:
            with unit.lock:
                futures = list(unit.futures)
            wait(futures, timeout=FLUSH_TIMEOUT_S)

    def close(self) -> None:
        """Finish queued uploads and stop the threads (unfinished units are not committed)."""
        self._pool.shutdown(wait=True)

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

