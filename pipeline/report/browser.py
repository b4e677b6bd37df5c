"""A page rendered to a PNG by headless Chromium, the way a person would see it.

Used to make the report's screenshot in the docs (`scripts/report_screenshot.py`) and by the
tests, which check the picture's pixels. Chromium runs with no network of its own (no
background requests, updates or sync), a fresh profile in a temporary folder, and a
deadline: past it, its whole process group is killed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from pipeline.contracts.errors import UserError

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--disable-quic", "--force-color-profile=srgb",
         # the picture of a settled page: every compositor stage runs before the capture, and
         # the capture waits for the page to go idle (virtual time, not wall time)
         "--run-all-compositor-stages-before-draw", "--virtual-time-budget=5000")
SCREENSHOT_TIMEOUT_S = 90.0


def find_browser() -> str | None:
    """The path of an installed Chromium, or None."""
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def screenshot(page: Path, png: Path, *, width: int = 1280, height: int = 2000,
               timeout_s: float = SCREENSHOT_TIMEOUT_S) -> Path:
    """Render the local HTML file `page` into `png` (width x height pixels)."""
    browser = find_browser()
    if browser is None:
        raise UserError("no Chromium found (install the `chromium` package)")
    with tempfile.TemporaryDirectory(prefix="wham-chromium-") as profile:
        command = [browser, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
                   f"--window-size={width},{height}", page.resolve().as_uri()]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.communicate()
            raise UserError(f"Chromium did not render {page} within {timeout_s:.0f} s") from None
        _kill_group(proc.pid)  # a renderer or GPU process that outlived the browser
    if proc.returncode != 0 or not png.is_file():
        tail = output.decode(errors="replace")[-2000:]
        raise UserError(f"Chromium could not render {page} (exit {proc.returncode}): {tail}")
    return png


def _kill_group(pgid: int) -> None:
    """Kill the process group Chromium was started in (its own session: nothing else)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
