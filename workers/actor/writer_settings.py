"""The settings of one run's output writer, built from the job's `output` section in one
place (`WriterSettings.from_output`)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pipeline.contracts import layout
from pipeline.contracts.choices import FRAME_MODES
from pipeline.contracts.spec import OutputSection
from workers.actor.encode import auto_preview_scale


@dataclass(frozen=True, slots=True)
class WriterSettings:
    """What one run's writer writes and how (built from the job's `output` section by
    `from_output`; tests build it directly)."""

    run_date: str
    run_id: str
    model_id: str  # recorded in every PNG's provenance text
    frame_mode: str = "parquet"  # output.frames: parquet | png | none
    video: bool = False
    previews: bool = False
    preview_scale: int = 1
    image_tokens: bool = True
    tokens_per_image: int | None = None  # checked on every step when given
    watermark: bool = True
    threads: int = 4
    max_pending: int | None = None  # jobs queued at most (default 8 per thread)

    def __post_init__(self) -> None:
        if self.preview_scale < 1 or self.threads < 1:
            raise ValueError("preview_scale and threads must be >= 1")
        if self.frame_mode not in FRAME_MODES:
            raise ValueError(f"output.frames must be one of {FRAME_MODES}, "
                             f"got {self.frame_mode!r}")
        object.__setattr__(self, "run_date", layout.run_date_str(self.run_date))
        layout.check_run_id(self.run_id)

    @classmethod
    def from_output(cls, output: OutputSection, *, run_date: str | dt.date, run_id: str,
                    model_id: str, image_size: tuple[int, int],
                    tokens_per_image: int | None) -> WriterSettings:
        """The settings of a job's `output` section for a model of `image_size` (H, W)."""
        scale = output.preview_scale
        return cls(
            run_date=layout.run_date_str(run_date), run_id=run_id, model_id=model_id,
            frame_mode=output.frames, video=output.video, previews=output.previews,
            preview_scale=auto_preview_scale(*image_size) if scale == "auto" else scale,
            image_tokens=output.image_tokens,
            tokens_per_image=tokens_per_image if output.image_tokens else None,
            watermark=output.watermark, threads=output.writer_threads)
