"""Run progress: a tqdm bar on a terminal, a log line every few seconds otherwise, a
status line while Ray and the actors start, and event hooks.

The driver reports every unit receipt here, and the scheduler calls `tick` at least once a
second, so a run that is still starting (Ray, actors loading their model) shows that it is
alive. Hooks (`on_event`) see the same events, so a metrics exporter or a job dashboard can
follow a run without touching the driver loop.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any, TextIO

from pipeline.contracts.plan import UnitReceipt

log = logging.getLogger("pipeline.driver")
#: Off a terminal, the longest gap between two progress lines.
LOG_EVERY_S = 5.0
_SPINNER = "|/-\\"
_SPIN_S = 0.2


@dataclass(slots=True)
class Totals:
    """A run's counts. Two kinds of frames, never mixed: `generated_frames` (ok rollouts x
    rollouts.steps, what the model made) and `stored_frames` (frames physically stored,
    the seeds' context frames included)."""

    rollouts_total: int = 0
    rollouts_ok: int = 0
    rollouts_failed: int = 0
    generated_frames: int = 0
    stored_frames: int = 0
    tokens: int = 0
    units_total: int = 0
    units_skipped: int = 0
    units_done: int = 0
    units_retried: int = 0
    units_lost: int = 0
    generate_seconds: float = 0.0
    write_seconds: float = 0.0

    def add(self, receipt: UnitReceipt) -> None:
        self.rollouts_ok += receipt.ok
        self.rollouts_failed += receipt.failed
        self.generated_frames += receipt.generated_frames
        self.stored_frames += receipt.stored_frames
        self.tokens += receipt.tokens
        self.generate_seconds += receipt.generate_seconds
        self.write_seconds += receipt.write_seconds
        self.units_done += 1


@dataclass(frozen=True, slots=True)
class RunEvent:
    """kind: started | actor_ready | unit_committed | unit_retried | unit_lost | finished."""

    kind: str
    run_id: str
    totals: dict[str, Any]
    unit_id: str | None = None
    receipt: UnitReceipt | None = None
    detail: str = ""


EventHook = Callable[[RunEvent], None]


@dataclass
class Progress:
    run_id: str
    totals: Totals
    show: bool = True
    hooks: list[EventHook] = field(default_factory=list)
    log_every_s: float | None = None  # None: LOG_EVERY_S
    clock: Callable[[], float] = time.monotonic
    tty: bool | None = None  # None: whether stderr is a terminal
    actors_total: int = 0
    actors_ready: int = 0
    #: How the seeds were made to fit the model, summed over receipts ("resized 96x64 ->
    #: 32x32": seeds).
    adaptations: Counter[str] = field(default_factory=Counter)
    _bar: Any = None
    _started: float = 0.0
    _last_log: float = 0.0
    _frames_at_start: int = 0
    _done_at_start: int = 0

    def emit(self, kind: str, *, unit_id: str | None = None,
             receipt: UnitReceipt | None = None, detail: str = "") -> None:
        event = RunEvent(kind=kind, run_id=self.run_id, totals=asdict(self.totals),
                         unit_id=unit_id, receipt=receipt, detail=detail)
        for hook in self.hooks:
            try:
                hook(event)
            except Exception:  # a broken observer must not stop the run
                log.exception("progress hook %r failed on %s", hook, kind)

    def _on_terminal(self) -> bool:
        return sys.stderr.isatty() if self.tty is None else self.tty

    def start(self, *, actors: int = 0) -> None:
        self._started = self._last_log = self.clock()
        self._frames_at_start, self._done_at_start = self.totals.generated_frames, self._done()
        self.actors_total, self.actors_ready = actors, 0
        if self.show and self._on_terminal():
            from tqdm import tqdm

            self._bar = tqdm(total=self.totals.rollouts_total, initial=self._done(),
                             unit="rollout", desc=self.run_id, dynamic_ncols=True)
        self.tick(force=True)
        self.emit("started")

    def actor_ready(self, name: str) -> None:
        self.actors_ready += 1
        self.emit("actor_ready", detail=name)
        self.tick(force=True)

    def unit_done(self, receipt: UnitReceipt) -> None:
        self.totals.add(receipt)
        self.adaptations.update(receipt.adaptations)
        if self._bar is not None:
            self._bar.update(receipt.ok + receipt.failed)
        self.tick()
        self.emit("unit_committed", unit_id=receipt.unit_id, receipt=receipt)

    def unit_retried(self, unit_id: str, why: str) -> None:
        """A unit came back without a receipt and goes back on the queue."""
        self.totals.units_retried += 1
        self.emit("unit_retried", unit_id=unit_id, detail=why)

    def unit_lost(self, unit_id: str, why: str) -> None:
        """A unit came back without a receipt once too often: it stays uncommitted."""
        self.totals.units_lost += 1
        self.emit("unit_lost", unit_id=unit_id, detail=why)

    def tick(self, *, force: bool = False) -> None:
        """Called at least once a second: refresh the bar, or log a line when due."""
        if not self.show:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=True)
        elif force or self.clock() - self._last_log >= (
                LOG_EVERY_S if self.log_every_s is None else self.log_every_s):
            self.log_line()

    def _done(self) -> int:
        return self.totals.rollouts_ok + self.totals.rollouts_failed

    def _starting(self) -> str:
        return f"starting actors (loading the model): {self.actors_ready}/{self.actors_total} " \
               "ready"

    def _postfix(self) -> str:
        if self.actors_ready == 0 and self.actors_total:
            return self._starting()
        return (f"generated_frames={self.totals.generated_frames - self._frames_at_start}, "
                f"fps={self.rate():.1f}, failed={self.totals.rollouts_failed}")

    def rate(self) -> float:
        """Frames per second generated by this attempt."""
        elapsed = max(self.clock() - self._started, 1e-9)
        return (self.totals.generated_frames - self._frames_at_start) / elapsed

    def log_line(self) -> None:
        self._last_log = self.clock()
        t = self.totals
        elapsed = self._last_log - self._started
        if self.actors_ready == 0 and self.actors_total:
            log.info("%s: %s, %.0fs", self.run_id, self._starting(), elapsed)
            return
        done = self._done()
        done_now = done - self._done_at_start
        eta = (t.rollouts_total - done) * elapsed / done_now if done_now else None
        log.info("%s: %d/%d rollouts (%d failed), %d generated frames this attempt, "
                 "%.1f frames/s, %s", self.run_id, done, t.rollouts_total, t.rollouts_failed,
                 t.generated_frames - self._frames_at_start, self.rate(),
                 f"eta {eta:.0f}s" if eta is not None else f"{elapsed:.0f}s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class StatusLine:
    """While a blocking step runs (starting Ray): a spinner on a terminal, else a log line at
    the start and every `log_every_s` seconds. Nothing when `show` is False."""

    def __init__(self, what: str, *, show: bool = True, log_every_s: float = LOG_EVERY_S,
                 stream: TextIO | None = None) -> None:
        self.what = what
        self.show = show
        self.log_every_s = log_every_s
        self.stream = stream or sys.stderr
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StatusLine:
        if self.show:
            tty = self.stream.isatty()
            if not tty:
                log.info("%s ...", self.what)
            self._thread = threading.Thread(target=self._loop, args=(tty,), daemon=True,
                                            name="wham-status-line")
            self._thread.start()
        return self

    def _loop(self, tty: bool) -> None:
        start = last = time.monotonic()
        for frame in itertools.cycle(_SPINNER):
            if self._stop.wait(_SPIN_S if tty else 0.5):
                break
            now = time.monotonic()
            if tty:
                self.stream.write(f"\r{frame} {self.what} {now - start:.0f}s")
                self.stream.flush()
            elif now - last >= self.log_every_s:
                last = now
                log.info("%s, %.0fs ...", self.what, now - start)
        if tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
