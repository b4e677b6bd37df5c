"""Charts as inline SVG: histograms of the quality signals and throughput over time.

Plain SVG elements and text only (no script, no web fonts), so the page stays one file
that any browser draws offline.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from html import escape
from typing import Any

import numpy as np

WIDTH, HEIGHT = 380, 180
LEFT, RIGHT, TOP, BOTTOM = 44, 10, 24, 30  # margins around the plot area
BAR_COLOUR = "#3b6ea8"
HISTOGRAM_BINS = 20
THROUGHPUT_BINS = 30


def _number(x: float) -> str:
    return f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3e}"


def bar_chart(heights: Sequence[float], *, title: str, x_labels: tuple[str, str],
              y_label: str, tips: Sequence[str] | None = None) -> str:
    """Bars of `heights`, left to right over the plot width, with the title above, the
    x range's ends below and the largest height on the y axis."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    top = max(max(heights, default=0.0), 1e-12)
    step = plot_w / max(len(heights), 1)
    bars = []
    for i, h in enumerate(heights):
        bar_h = plot_h * h / top
        tip = f"<title>{escape(tips[i])}</title>" if tips else ""
        bars.append(f'<rect x="{LEFT + i * step + 0.5:.1f}" y="{TOP + plot_h - bar_h:.1f}" '
                    f'width="{max(step - 1, 0.5):.1f}" height="{bar_h:.1f}" '
                    f'fill="{BAR_COLOUR}">{tip}</rect>')
    base = TOP + plot_h
    return (
        f'<svg width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">'
        f'<text x="{LEFT}" y="15" class="t">{escape(title)}</text>'
        f'<line x1="{LEFT}" y1="{base}" x2="{WIDTH - RIGHT}" y2="{base}" stroke="#888"/>'
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{base}" stroke="#888"/>'
        f'<text x="{LEFT - 4}" y="{TOP + 8}" text-anchor="end" class="a">'
        f'{_number(top) if heights else ""}</text>'
        f'<text x="{LEFT - 4}" y="{base}" text-anchor="end" class="a">0</text>'
        f'<text x="{LEFT}" y="{base + 14}" class="a">{escape(x_labels[0])}</text>'
        f'<text x="{WIDTH - RIGHT}" y="{base + 14}" text-anchor="end" class="a">'
        f'{escape(x_labels[1])}</text>'
        f'<text x="{LEFT + plot_w / 2}" y="{base + 26}" text-anchor="middle" class="a">'
        f'{escape(y_label)}</text>' + "".join(bars) + "</svg>")


def histogram(values: Sequence[float | None], *, title: str) -> str:
    """A histogram of the values that are numbers (nulls and NaN left out, and counted)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    left_out = len(values) - len(finite)
    note = f", {left_out} without" if left_out else ""
    if not finite:
        return bar_chart([], title=f"{title}: no values{note}", x_labels=("", ""),
                         y_label="rollouts")
    lo, hi = min(finite), max(finite)
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(finite, bins=HISTOGRAM_BINS, range=(lo, hi))
    tips = [f"{_number(a)} .. {_number(b)}: {int(c)} rollouts"
            for a, b, c in zip(edges[:-1], edges[1:], counts, strict=True)]
    return bar_chart([float(c) for c in counts], title=f"{title} ({len(finite)}{note})",
                     x_labels=(_number(lo), _number(hi)), y_label="rollouts per bin",
                     tips=tips)


def _clock(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S")


def throughput(rows: Sequence[dict[str, Any]]) -> str:
    """Generated frames per second over the run's wall-clock time (UTC): each ok rollout's
    generated frames spread evenly over the time it ran (rollouts of a batch run side by
    side, so their rates add up); gaps between attempts show as empty stretches."""
    done = [r for r in rows if r["status"] == "ok" and r.get("finished_at") is not None]
    if not done:
        return bar_chart([], title="generated frames/s: no rollouts yet", x_labels=("", ""),
                         y_label="frames/s")
    start = min(r["started_at"] for r in done)
    end = max(r["finished_at"] for r in done)
    width = max((end - start).total_seconds() / THROUGHPUT_BINS, 1.0)
    edges = np.arange(THROUGHPUT_BINS + 1) * width
    frames = np.zeros(THROUGHPUT_BINS)
    for r in done:
        lo = (r["started_at"] - start).total_seconds()
        hi = max((r["finished_at"] - start).total_seconds(), lo + 1e-3)
        overlap = np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0.0, None)
        frames += r["generated_steps"] * overlap / (hi - lo)
    rates = frames / width
    tips = [f"{_clock(start + dt.timedelta(seconds=float(t)))}: {rate:.3g} frames/s"
            for t, rate in zip(edges[:-1], rates, strict=True)]
    title = (f"generated frames/s over time ({round(frames.sum())} frames, "
             f"{width:.3g} s per bar)")
    return bar_chart(rates.tolist(), title=title, x_labels=(_clock(start), _clock(end) + " UTC"),
                     y_label="frames/s", tips=tips)
