"""Run progress: a tqdm bar on a terminal, periodic log lines otherwise, and event hooks.

The driver reports every unit receipt here. Hooks (`on_event`) see the same events, so a
metrics exporter or a job dashboard can follow a run without touching the driver loop.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.plan import UnitReceipt

log = logging.getLogger("pipeline.driver")
LOG_EVERY_S = 30.0


@dataclass(slots=True)
class Totals:
    rollouts_total: int = 0
    rollouts_ok: int = 0
    rollouts_failed: int = 0
    frames: int = 0
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
        self.frames += receipt.frames
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
    _bar: Any = None
    _started: float = field(default_factory=time.monotonic)
    _last_log: float = field(default_factory=time.monotonic)
    _frames_at_start: int = 0

    def emit(self, kind: str, *, unit_id: str | None = None,
             receipt: UnitReceipt | None = None, detail: str = "") -> None:
        event = RunEvent(kind=kind, run_id=self.run_id, totals=asdict(self.totals),
                         unit_id=unit_id, receipt=receipt, detail=detail)
        for hook in self.hooks:
            try:
                hook(event)
            except Exception:  # a broken observer must not stop the run
                log.exception("progress hook %r failed on %s", hook, kind)

    def start(self) -> None:
        self._started = self._last_log = time.monotonic()
        self._frames_at_start = self.totals.frames
        if self.show and sys.stderr.isatty():
            from tqdm import tqdm

            done = self.totals.rollouts_ok + self.totals.rollouts_failed
            self._bar = tqdm(total=self.totals.rollouts_total, initial=done, unit="rollout",
                             desc=self.run_id, dynamic_ncols=True)
        self.emit("started")

    def unit_done(self, receipt: UnitReceipt) -> None:
        self.totals.add(receipt)
        if self._bar is not None:
            self._bar.update(receipt.ok + receipt.failed)
            self._bar.set_postfix(frames=self.totals.frames, fps=f"{self.rate():.1f}",
                                  failed=self.totals.rollouts_failed, refresh=False)
        elif self.show and time.monotonic() - self._last_log >= LOG_EVERY_S:
            self._last_log = time.monotonic()
            self.log_line()
        self.emit("unit_committed", unit_id=receipt.unit_id, receipt=receipt)

    def rate(self) -> float:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        return (self.totals.frames - self._frames_at_start) / elapsed

    def log_line(self) -> None:
        t = self.totals
        done = t.rollouts_ok + t.rollouts_failed
        rate = self.rate()
        per_rollout = (t.frames - self._frames_at_start) / max(done, 1)
        eta = (t.rollouts_total - done) * per_rollout / rate if rate > 0 else float("nan")
        log.info("%s: %d/%d rollouts (%d failed), %d frames, %.1f frames/s, eta %.0fs",
                 self.run_id, done, t.rollouts_total, t.rollouts_failed, t.frames, rate, eta)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
