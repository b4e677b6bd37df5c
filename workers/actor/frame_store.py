"""Where a unit's frames go: one handler per `output.frames` mode.

The writer encodes every frame to a PNG on its pool and hands it to the run's handler:

- `PngObjects` (`png`): one object per frame, uploaded at once; a step's `frame_key` names it.
- `ParquetPart` (`parquet`): the PNGs wait in memory until `finish_unit`, then go out as the
  unit's one frames part (`part`; the writer writes it beside the steps and rollouts
  parts); every step's `frame_key` names that part.
- `NoFrames` (`none`): nothing is encoded or stored; the steps keep their image tokens.

`UnitFrames` is what a handler keeps for one unit; `stored` counts the frames it stored
(PNG objects, or rows of the frames part).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pipeline.contracts import layout
from workers.actor.tables import StepRow, frames_table

#: Writes (key, data, content type) with the writer's retries.
Put = Callable[[str, bytes, str], None]


@dataclass(slots=True)
class UnitFrames:
    """One unit's frames as a handler keeps them."""

    pngs: dict[tuple[str, int], bytes] = field(default_factory=dict)  # parquet: until finish
    stored: int = 0  # frames stored: PNG objects, or rows of the frames part
    lock: threading.Lock = field(default_factory=threading.Lock)


class FrameStore(Protocol):
    """How frames of one storage mode are named and stored."""

    mode: str

    def key(self, unit_id: str, rollout_id: str, step: int) -> str | None:
        """The key a step's `frame_key` names; None: the frame is not stored (nor encoded)."""
        ...

    def keep(self, frames: UnitFrames, put: Put, *, key: str, rollout_id: str, step: int,
             png: bytes) -> None:
        """Store one encoded frame (runs on the writer's pool)."""
        ...

    def part(self, frames: UnitFrames, *, rows: list[tuple[str, StepRow]]) -> Any | None:
        """The unit's frames part (a pyarrow Table) once its uploads are done, or None when
        the mode writes none; `rows` are the steps of its ok rollouts."""
        ...


@dataclass(frozen=True, slots=True)
class _OfRun:
    """A handler of one run's frames."""

    run_date: str
    run_id: str


@dataclass(frozen=True, slots=True)
class PngObjects(_OfRun):
    mode: ClassVar[str] = "png"

    def key(self, unit_id: str, rollout_id: str, step: int) -> str | None:
        return layout.frame_key(self.run_date, self.run_id, rollout_id, step)

    def keep(self, frames: UnitFrames, put: Put, *, key: str, rollout_id: str, step: int,
             png: bytes) -> None:
        put(key, png, "image/png")
        with frames.lock:
            frames.stored += 1

    def part(self, frames: UnitFrames, *, rows: list[tuple[str, StepRow]]) -> Any | None:
        return None  # every frame is an object of its own, stored already


@dataclass(frozen=True, slots=True)
class ParquetPart(_OfRun):
    mode: ClassVar[str] = "parquet"

    def key(self, unit_id: str, rollout_id: str, step: int) -> str | None:
        return layout.frames_part_key(self.run_date, self.run_id, unit_id)

    def keep(self, frames: UnitFrames, put: Put, *, key: str, rollout_id: str, step: int,
             png: bytes) -> None:
        with frames.lock:
            frames.pngs[(rollout_id, step)] = png

    def part(self, frames: UnitFrames, *, rows: list[tuple[str, StepRow]]) -> Any | None:
        table = frames_table(rows, frames.pngs)
        frames.stored = table.num_rows
        return table


@dataclass(frozen=True, slots=True)
class NoFrames(_OfRun):
    mode: ClassVar[str] = "none"

    def key(self, unit_id: str, rollout_id: str, step: int) -> str | None:
        return None

    def keep(self, frames: UnitFrames, put: Put, *, key: str, rollout_id: str, step: int,
             png: bytes) -> None:
        raise AssertionError("frames: none encodes no frames")

    def part(self, frames: UnitFrames, *, rows: list[tuple[str, StepRow]]) -> Any | None:
        return None  # nothing is stored


_STORES: dict[str, type[PngObjects] | type[ParquetPart] | type[NoFrames]] = {
    "png": PngObjects, "parquet": ParquetPart, "none": NoFrames}


def frame_store(mode: str, *, run_date: str, run_id: str) -> FrameStore:
    """The handler of storage mode `mode` (one of `choices.FRAME_MODES`)."""
    return _STORES[mode](run_date=run_date, run_id=run_id)
