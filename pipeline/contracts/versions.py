"""The software a run used: wham-batch, torch, Ray, pyarrow, Python and the git commit.

Every run manifest records them (docs/reliability.md asks to keep them with the outputs) and
`wham-batch --version` prints them. Nothing here imports torch or Ray: versions come from
the installed packages' metadata. The commit comes from WHAM_BATCH_GIT_COMMIT (set by
`wham-batch submit`, since the folder a cluster job runs in has no .git) or from `git` in the
project folder; without either it is None, never an error.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import pipeline

GIT_COMMIT_ENV = "WHAM_BATCH_GIT_COMMIT"
PACKAGES = ("torch", "ray", "pyarrow")
PROJECT_DIR = Path(pipeline.__file__).resolve().parents[1]
_GIT_TIMEOUT_S = 5.0


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    if shutil.which("git") is None or not (PROJECT_DIR / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(PROJECT_DIR), *args], capture_output=True,
                              text=True, timeout=_GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> dict[str, Any] | None:
    """{"commit": sha, "dirty": bool | None} of the project's code, or None if unknown."""
    given = os.environ.get(GIT_COMMIT_ENV, "").strip()
    if given:
        sha, _, state = given.partition("+")
        return {"commit": sha, "dirty": state == "dirty"}
    sha = _git("rev-parse", "HEAD")
    if not sha:
        return None
    changes = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": sha, "dirty": None if changes is None else bool(changes)}


@lru_cache(maxsize=1)
def software_versions() -> dict[str, Any]:
    """What this process runs: package versions, Python, and the git commit (or None)."""
    return {
        "wham_batch": pipeline.__version__,
        **{name: _installed(name) for name in PACKAGES},
        "python": platform.python_version(),
        "git": git_commit(),
    }


def version_line() -> str:
    """One line for `wham-batch --version`."""
    v = software_versions()
    parts = [f"{name} {v[name] or 'not installed'}" for name in PACKAGES]
    git = v["git"]
    commit = (f", commit {git['commit'][:12]}{' (modified)' if git['dirty'] else ''}"
              if git else "")
    return f"wham-batch {v['wham_batch']} ({', '.join(parts)}, python {v['python']}{commit})"
