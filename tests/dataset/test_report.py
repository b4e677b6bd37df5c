"""`wham-batch report`: one self-contained HTML page of a run, looked at in a real browser
(headless Chromium) and checked by the pixels of its screenshot."""

from __future__ import annotations

import base64
import datetime as dt
import io
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import DATE, REPO, RUN_ID, run_in_process
from PIL import Image, ImageSequence

from jobs.nightly import main as nightly_main
from pipeline.cli import main as cli_main
from pipeline.contracts import layout
from pipeline.contracts.storage import open_storage
from pipeline.dataset import RolloutWindows
from pipeline.query import query
from pipeline.report import write_report
from pipeline.report.browser import find_browser, screenshot
from pipeline.report.charts import throughput
from pipeline.report.gather import MAX_PICTURE_BYTES, RunData, worst_first
from pipeline.report.page import MAX_ERRORS_COUNTED, render

needs_browser = pytest.mark.skipif(find_browser() is None,
                                   reason="Chromium is not installed (.ci/run installs it)")
#: A 1x1 transparent GIF: the page with every picture blanked, its layout unchanged.
BLANK = "data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"
_PICTURE = re.compile(r'(<img [^>]*src=")data:image/(?:gif|png);base64,([^"]+)(")')
TILE_PX = 160  # the side of a preview in the page, in CSS pixels


def _pictures(html: str) -> list[bytes]:
    return [base64.b64decode(m.group(2)) for m in _PICTURE.finditer(html)]


def _colours(images: list[bytes]) -> set[tuple[int, int, int]]:
    """Every colour of every frame of the images (GIF frames included)."""
    found: set[tuple[int, int, int]] = set()
    for data in images:
        with Image.open(io.BytesIO(data)) as img:
            for frame in ImageSequence.Iterator(img):
                found.update(map(tuple, np.asarray(frame.convert("RGB")).reshape(-1, 3)))
    return found


def _shot(html: str, tmp_path: Path, name: str) -> np.ndarray:
    page = tmp_path / f"{name}.html"
    page.write_text(html)
    png = screenshot(page, tmp_path / f"{name}.png", width=1280, height=1400)
    return np.asarray(Image.open(png).convert("RGB"))


def _check_pictures_on_screen(html: str, tmp_path: Path, *, area: int) -> None:
    """The screenshot differs from the same page with blanked pictures over at least
    `area` pixels, nearly all of them in the pictures' own colours, in one band of the page
    (the grid): the browser shows the pictures, not only their tags."""
    full = _shot(html, tmp_path, "full")
    blank = _shot(_PICTURE.sub(rf"\g<1>{BLANK}\g<3>", html), tmp_path, "blank")
    changed = np.any(full != blank, axis=-1)
    assert changed.sum() >= area, (changed.sum(), area)
    palette = _colours(_pictures(html))
    shown = full[changed]
    ours = np.fromiter((tuple(c) in palette for c in shown), bool, len(shown))
    assert ours.mean() > 0.95, ours.mean()
    rows = np.nonzero(changed.any(axis=1))[0]
    assert rows.min() > 80 and rows.max() - rows.min() < 2 * (TILE_PX + 120)


def _self_contained(html: str) -> None:
    """No element or style that loads anything: every reference is a data URI."""
    body = re.sub(r"data:[^\"']+", "data:", html)  # a data URI's bytes are not references
    assert not re.search(r"<(?:script|link|iframe|object|embed|base)\b|url\(|@import", body,
                         re.I)
    refs = re.findall(r"""\b(?:src|href|srcset|action)\s*=\s*["']?([^"'\s>]+)""", body, re.I)
    assert refs and all(r == "data:" for r in refs), refs


@needs_browser
def test_report_of_a_run_with_previews_in_a_browser(mode_roots, tmp_path, capsys):
    root = mode_roots["png"]
    out = tmp_path / "report.html"
    assert cli_main(["report", root, "--run-id", RUN_ID, "--out", str(out)]) == 0
    assert f"to {out}" in capsys.readouterr().out
    html = out.read_text()
    _self_contained(html)
    rollouts = query(root, table="rollouts", run_id=RUN_ID).to_pylist()
    order = [r["rollout_id"] for r in sorted(rollouts, key=worst_first)]
    assert re.findall(r'<img alt="([^"]+)"', html) == order  # worst first
    assert _pictures(html) == [
        open_storage(root).get_bytes(layout.preview_key(DATE, RUN_ID, r)) for r in order]
    for text in ("complete", "Quality signals", "mean_logprob (6)", "Throughput",
                 "Failures</h2><p>none", "rollouts.steps</th><td>5", "frames_per_second"):
        assert text in html, text
    assert html.count("<svg") == 6  # five signal histograms and the throughput
    _check_pictures_on_screen(html, tmp_path, area=6 * TILE_PX * TILE_PX // 2)


def test_report_is_written_beside_success_on_s3(mode_roots, capsys):
    root = mode_roots["parquet"]
    assert cli_main(["report", root, "--run-id", RUN_ID]) == 0
    key = layout.report_key(DATE, RUN_ID)
    assert f"to {root}/{key}" in capsys.readouterr().out
    html = open_storage(root).get_bytes(key).decode()
    assert "complete" in html and len(_pictures(html)) == 6
    assert cli_main(["report", root, "--run-id", "nope"]) == 2
    assert "no run 'nope'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def no_previews(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run without previews whose third seed is no picture: 4 ok rollouts, 2 failed."""
    base = tmp_path_factory.mktemp("no-previews")
    seeds = base / "seeds"
    seeds.mkdir()
    for p in sorted((REPO / "configs" / "seeds" / "demo").glob("*.png"))[:2]:
        shutil.copy(p, seeds / p.name)
    (seeds / "zz-broken.png").write_bytes(b"<not a png>")
    run_in_process(seeds, base / "out", run_id="plain", run_date=DATE, previews=False)
    return base / "out"


@needs_browser
def test_report_without_previews_shows_frames_and_failures(no_previews, tmp_path):
    out = tmp_path / "report.html"
    assert cli_main(["report", str(no_previews), "--run-id", "plain", "--out", str(out)]) == 0
    html = out.read_text()
    _self_contained(html)
    assert "first generated and last frames" in html and "no manifest yet" in html
    windows = {w["rollout_id"]: w["frames"]
               for w in RolloutWindows(str(no_previews), window=4).iter_windows()}
    pictures = [np.asarray(Image.open(io.BytesIO(p)).convert("RGB")).transpose(2, 0, 1)
                for p in _pictures(html)]
    assert len(pictures) == 2 * 4
    for rollout_id, first, last in zip(re.findall(r'<img alt="([^"]+)"', html)[::2],
                                       pictures[::2], pictures[1::2], strict=True):
        np.testing.assert_array_equal(first, windows[rollout_id][1])  # first generated
        np.testing.assert_array_equal(last, windows[rollout_id][-1])
    failures = html[html.index("<h2>Failures"):]
    assert "2 failed rollouts" in failures and "zz-broken-r000" in failures
    assert "zz-broken.png" in failures  # the error names the seed
    _check_pictures_on_screen(html, tmp_path, area=8 * 79 * 79 // 2)


def test_worst_first_order():
    rows = [{"rollout_id": "fine", "mean_logprob": -0.1, "frozen": False},
            {"rollout_id": "low", "mean_logprob": -3.0, "frozen": False},
            {"rollout_id": "frozen", "mean_logprob": -0.05, "frozen": True},
            {"rollout_id": "late", "mean_logprob": -0.2, "collapse_step": 9},
            {"rollout_id": "early", "mean_logprob": -0.2, "collapse_step": 2},
            {"rollout_id": "endpoint", "mean_logprob": None}]
    assert [r["rollout_id"] for r in sorted(rows, key=worst_first)] == [
        "early", "late", "frozen", "low", "fine", "endpoint"]


@pytest.mark.usefixtures("keep_logging_config")
def test_the_nightly_writes_the_report_beside_success(ray_local, seeds, tmp_path, capsys):
    root = tmp_path / "out"
    small = ["rollouts.per_seed=1", "rollouts.steps=2", "resources.rollouts_per_unit=2",
             f"seeds.source={seeds}", "run.run_id=nightly-{date}", f"output.root={root}"]
    sets = [arg for item in small for arg in ("--set", item)]
    config = str(REPO / "configs" / "demo.yaml")
    assert nightly_main(["--config", config, "--date", "2026-03-01", "--quiet",
                         "--no-report", *sets]) == 0
    assert not (root / layout.report_key("2026-03-01", "nightly-2026-03-01")).exists()
    assert nightly_main(["--config", config, "--date", "2026-03-02", "--quiet", *sets]) == 0
    report = root / layout.report_key("2026-03-02", "nightly-2026-03-02")
    assert (root / layout.success_key("2026-03-02", "nightly-2026-03-02")).exists()
    assert f"report: {report}" in capsys.readouterr().out
    html = report.read_text()
    assert "nightly-2026-03-02" in html and len(_pictures(html)) == 3  # 3 seeds' previews


def test_throughput_spreads_frames_over_the_time_they_took():
    t0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)

    def rollout(start_s: float, end_s: float, frames: int) -> dict:
        return {"status": "ok", "generated_steps": frames,
                "started_at": t0 + dt.timedelta(seconds=start_s),
                "finished_at": t0 + dt.timedelta(seconds=end_s)}

    # two attempts: two rollouts side by side for 30 s, then a 30 s gap, then one for 30 s
    rows = [rollout(0, 30, 60), rollout(0, 30, 60), rollout(60, 90, 30),
            {"status": "failed", "generated_steps": 0, "started_at": t0, "finished_at": t0}]
    svg = throughput(rows)
    rates = [float(x) for x in re.findall(r": ([0-9.e+-]+) frames/s</title>", svg)]
    assert len(rates) == 30 and "(150 frames, 3 s per bar)" in svg
    assert rates[:10] == pytest.approx([4.0] * 10)  # 120 frames in 30 s
    assert rates[10:20] == pytest.approx([0.0] * 10)  # the gap between the attempts
    assert rates[20:] == pytest.approx([1.0] * 10)


def test_a_page_of_many_long_errors_stays_small_and_inert():
    """Thousands of failed rollouts, each with its own long error (a root written by
    anyone), and markup in every text: the page keeps to a bounded size, and nothing in it
    is a script or an element handler."""
    markup = '</script><script>alert(1)</script>"><img src=x onerror=alert(1)>'
    t0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
    rows = [{"rollout_id": f"r{i:05d}", "unit_id": "u000000", "seed_id": markup,
             "status": "failed", "error": f"error {i}: {markup}" + "x" * 20_000,
             "generated_steps": 0, "started_at": t0, "finished_at": t0}
            for i in range(3000)]
    data = RunData(root="/out", run_date=DATE, run_id="run", manifest={"spec": {
                   "run": {"name": markup * 10_000}}}, status={"status": markup},
                   rollouts=rows, tiles=[])
    html = render(data)
    assert len(html) < 1_000_000, len(html)
    assert "error 0: &lt;/script&gt;" in html and "more characters" in html
    assert f"and {3000 - MAX_ERRORS_COUNTED} other errors" in html
    tags: list[tuple[str, list]] = []
    parser = HTMLParser()
    parser.handle_starttag = lambda tag, attrs: tags.append((tag, attrs))
    parser.feed(html)
    assert not [t for t, attrs in tags
                if t == "script" or any(k.startswith("on") for k, _ in attrs)]


def test_previews_fill_the_page_only_up_to_its_budget(three_runs, tmp_path):
    """Previews of long rollouts run to megabytes each, and a page embeds them: 300 tiles of
    8 MB made a page of gigabytes. Past the page's budget, a tile shows its rollout's first
    generated and last frames instead, as for a run without previews."""
    root = tmp_path / "root"
    shutil.copytree(three_runs, root)
    folder = root / layout.run_prefix(layout.PREVIEWS_DIR, "2026-02-03", "night-a")
    budget = 2**20
    for gif in sorted(folder.iterdir()):
        gif.write_bytes(gif.read_bytes() + b"\0" * (budget // 3))  # two fit, two do not
    out = tmp_path / "report.html"
    write_report(str(root), run_id="night-a", out=str(out), max_picture_bytes=budget)
    html = out.read_text()
    assert len(html) < budget * 4 // 3 + 2**17, len(html)
    kinds = re.findall(r'<img alt="[^"]+" src="data:image/(gif|png)', html)
    assert sorted(kinds) == ["gif"] * 2 + ["png"] * 4, kinds  # 2 previews, 2 pairs of frames
    assert "did not fit the page" in html
    assert MAX_PICTURE_BYTES <= 64 * 2**20  # what the command line gets


def test_a_manifest_nested_past_the_recursion_limit_is_unreadable_not_a_crash(three_runs,
                                                                               tmp_path):
    root = tmp_path / "root"
    shutil.copytree(three_runs, root)
    (root / layout.manifest_key("2026-02-03", "night-a")).write_bytes(b"[" * 60_000)
    out = tmp_path / "report.html"
    assert cli_main(["report", str(root), "--run-id", "night-a", "--out", str(out)]) == 0
    assert cli_main(["runs", str(root)]) == 0
    assert "no manifest yet" in out.read_text()
