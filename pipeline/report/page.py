"""The report's HTML: one page with everything inline (pictures as data URIs, charts as
SVG, the style sheet in the head), no script and no reference to anything outside the file,
so it opens from a bucket download, a mail attachment or a CI artefact alike. Its size is
bounded whatever the run holds: at most `MAX_PREVIEWS` tiles and `MAX_PICTURE_BYTES` of
previews (`pipeline.report.gather`), `MAX_ERRORS_COUNTED` distinct errors and
`MAX_FAILURES_LISTED` failed rollouts, and every text cut at `MAX_TEXT_CHARS`."""

from __future__ import annotations

import base64
import json
from collections import Counter
from html import escape
from typing import Any

from pipeline.contracts import layout
from pipeline.report.charts import histogram, throughput
from pipeline.report.gather import RunData, Tile

STYLE = """
body { font: 14px/1.4 sans-serif; margin: 16px 24px; color: #222; background: #fff; }
h1 { font-size: 20px; margin: 0 0 6px; } h2 { font-size: 16px; margin: 22px 0 8px; }
.status { display: inline-block; padding: 1px 8px; border-radius: 3px; color: #fff; }
.complete { background: #2e7d32; } .failed { background: #c62828; }
.partial { background: #b26a00; } .running { background: #1565c0; }
table { border-collapse: collapse; } td, th { padding: 2px 10px 2px 0; text-align: left;
  vertical-align: top; } th { color: #555; font-weight: normal; }
.grid { display: flex; flex-wrap: wrap; gap: 8px; }
.tile { margin: 0; width: 168px; border: 1px solid #ddd; padding: 4px; }
.tile img { width: 160px; height: 160px; object-fit: contain; image-rendering: pixelated;
  background: #eee; display: block; }
.tile img + img { margin-top: 2px; }
.tile.pair img { width: 79px; height: 79px; display: inline-block; }
.tile figcaption { font-size: 11px; overflow-wrap: anywhere; }
.bad { color: #c62828; font-weight: bold; }
.facts { display: flex; flex-wrap: wrap; gap: 4px 14px; margin: 6px 0; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
.charts svg { border: 1px solid #eee; } .t { font-size: 12px; } .a { font-size: 10px; fill: #555; }
pre { white-space: pre-wrap; margin: 0; font-size: 12px; }
"""
#: Failed rollouts listed one by one.
MAX_FAILURES_LISTED = 200
#: Distinct errors counted, the most frequent first (the others are summed in one line):
#: errors that name their seed differ for every rollout.
MAX_ERRORS_COUNTED = 50
#: Characters of one text shown (an error, a setting); the rest is left out, saying so.
MAX_TEXT_CHARS = 2000
_QUALITY = [f.name for f in layout.ROLLOUT_QUALITY_FIELDS]


def _clip(text: str) -> str:
    if len(text) <= MAX_TEXT_CHARS:
        return text
    return f"{text[:MAX_TEXT_CHARS]} ... ({len(text) - MAX_TEXT_CHARS} more characters)"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else _clip(str(v))


def _rows(items: list[tuple[str, Any]]) -> str:
    return "<table>" + "".join(f"<tr><th>{escape(k)}</th><td>{escape(_value(v))}</td></tr>"
                               for k, v in items) + "</table>"


def render(data: RunData) -> str:
    """The whole page."""
    title = f"wham-batch run {data.run_id} ({data.run_date})"
    body = [_summary(data), _grid(data), _charts(data), _failures(data), _settings(data)]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
            + "".join(body) + "</body></html>\n")


def _summary(data: RunData) -> str:
    status = str(data.status.get("status", "unknown"))
    facts = "".join(f'<span class="fact">{escape(k.replace("_", " "))} <b>'
                    f"{escape(_value(v))}</b></span>" for k, v in data.status.items()
                    if k not in ("run_id", "run_date", "status"))
    return (f"<h1>Run {escape(data.run_id)} <small>{escape(data.run_date)}</small> "
            f'<span class="status {escape(status)}">{escape(status)}</span></h1>'
            f'<div class="facts">{facts}</div>'
            f"<div>root {escape(data.root)}; {len(data.rollouts)} committed rollouts</div>")


def _caption(row: dict[str, Any]) -> str:
    flags = []
    if row.get("collapse_step") is not None:
        flags.append(f'<span class="bad">collapsed at step {row["collapse_step"]}</span>')
    if row.get("frozen"):
        flags.append('<span class="bad">frozen</span>')
    signals = ", ".join(f"{name.replace('_', ' ')} {_value(row.get(name))}"
                        for name in ("mean_logprob", "min_logprob", "mean_entropy")
                        if row.get(name) is not None)
    return (f"<figcaption><b>{escape(row['rollout_id'])}</b><br>seed "
            f"{escape(str(row.get('seed_id', '')))}<br>{escape(signals)}"
            + ("<br>" + " ".join(flags) if flags else "") + "</figcaption>")


def _tile(tile: Tile) -> str:
    images = "".join(
        f'<img alt="{escape(tile.row["rollout_id"])}" src="data:{mime};base64,'
        f'{base64.b64encode(data).decode()}">' for mime, data in tile.images)
    pair = " pair" if len(tile.images) > 1 else ""
    return f'<figure class="tile{pair}">{images or "no picture"}{_caption(tile.row)}</figure>'


def _grid(data: RunData) -> str:
    ok = sum(1 for r in data.rollouts if r["status"] == "ok")
    what = ("GIF previews" if any(m == "image/gif" for t in data.tiles for m, _ in t.images)
            else "first generated and last frames")
    if data.over_budget:
        what += (f"; first generated and last frames of {data.over_budget} whose previews did "
                 "not fit the page")
    head = (f"<h2>Rollouts, worst first</h2><p>{len(data.tiles)} of {ok} ok rollouts ({what})"
            "; order: collapsed (earliest first), then frozen, then by mean log-probability"
            " (lowest first).</p>")
    problems = "".join(f"<p class=bad>{escape(_clip(p))}</p>" for p in data.problems)
    return (head + problems + '<div class="grid" id="grid">'
            + "".join(_tile(t) for t in data.tiles) + "</div>")


def _charts(data: RunData) -> str:
    ok = [r for r in data.rollouts if r["status"] == "ok"]
    charts = [histogram([r.get(name) for r in ok], title=name) for name in _QUALITY
              if name != "frozen"]
    frozen = sum(1 for r in ok if r.get("frozen"))
    return ("<h2>Quality signals</h2>"
            f"<p>{frozen} of {len(ok)} ok rollouts frozen.</p>"
            '<div class="charts">' + "".join(charts) + "</div>"
            "<h2>Throughput</h2>" + throughput(data.rollouts))


def _failures(data: RunData) -> str:
    failed = [r for r in data.rollouts if r["status"] != "ok"]
    if not failed:
        return "<h2>Failures</h2><p>none</p>"
    by_error = Counter(str(r.get("error") or "(no error recorded)") for r in failed)
    counted = by_error.most_common(MAX_ERRORS_COUNTED)
    summary = "".join(f"<tr><td>{n}</td><td><pre>{escape(_value(e))}</pre></td></tr>"
                      for e, n in counted)
    if len(by_error) > len(counted):
        rest = len(failed) - sum(n for _, n in counted)
        summary += (f"<tr><td>{rest}</td><td>and {len(by_error) - len(counted)} other "
                    "errors</td></tr>")
    listed = "".join(
        f"<tr><td>{escape(_value(r['rollout_id']))}</td>"
        f"<td>{escape(_value(r.get('unit_id')))}</td>"
        f"<td><pre>{escape(_value(r.get('error')))}</pre></td></tr>"
        for r in sorted(failed, key=lambda r: r["rollout_id"])[:MAX_FAILURES_LISTED])
    more = (f"<p>and {len(failed) - MAX_FAILURES_LISTED} more</p>"
            if len(failed) > MAX_FAILURES_LISTED else "")
    return (f"<h2>Failures</h2><p>{len(failed)} failed rollouts</p>"
            "<table><tr><th>rollouts</th><th>error</th></tr>" + summary + "</table>"
            "<h2>Failed rollouts</h2><table><tr><th>rollout</th><th>unit</th><th>error</th>"
            "</tr>" + listed + "</table>" + more)


def _flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [item for k, v in value.items()
                for item in _flatten(f"{prefix}.{k}" if prefix else str(k), v)]
    return [(prefix, json.dumps(value) if isinstance(value, list) else value)]


def _settings(data: RunData) -> str:
    m = data.manifest
    if not m:
        return ("<h2>Settings</h2><p>no manifest yet: the run's driver writes it when the "
                "run starts and ends</p>")
    facts = [(k, m.get(k)) for k in ("status", "started_at", "wall_seconds",
                                     "frames_per_second", "plan_fingerprint",
                                     "schema_version") if k in m]
    facts += _flatten("counts", m.get("counts") or {}) + _flatten("attempt", m.get("attempt")
                                                                   or {})
    return ("<h2>Manifest</h2>" + _rows(facts)
            + "<h2>Settings</h2>" + _rows(_flatten("", m.get("spec") or {}))
            + "<h2>Model and software</h2>"
            + _rows(_flatten("model", m.get("model") or {})
                    + _flatten("software", m.get("software") or {})))
