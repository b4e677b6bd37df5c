"""Run a command with a small (or read-only) tmpfs mounted at a folder, in a private user
and mount namespace (`unshare`), so tests can fill a disk or make it read-only for real
without privileges on the machine. The mount exists only for that command."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                           capture_output=True, timeout=30, check=False)
    return probe.returncode == 0


def run_with_small_fs(mount: Path, script: str, *, size_kb: int, timeout: float = 300,
                      env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`script` (a shell script) with a `size_kb` tmpfs at `mount`; skips the test where
    user namespaces are not allowed."""
    if not _unshare_works():
        pytest.skip("unshare --user --mount is not allowed here (needed for a small tmpfs)")
    mount.mkdir(parents=True, exist_ok=True)
    body = f"mount -t tmpfs -o size={size_kb}k tmpfs {shlex.quote(str(mount))} && {script}"
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", body],
                          capture_output=True, text=True, timeout=timeout, check=False, env=env)
