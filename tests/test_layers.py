"""The layering (docs/architecture.md) is data, checked here: import-linter's contracts in
`.importlinter`, and a check that the project's own imports sit at the top of modules."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "workers", "jobs")
CONFIG = ROOT / ".importlinter"


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint), "--config", str(cwd / ".importlinter"), "--no-cache"],
                          cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd)})


def test_import_contracts_hold() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("workers/wham/actions.py", "from pipeline.contracts.layout import SCHEMA_VERSION",
     "Imports only go down"),
    ("pipeline/driver/run.py", "from workers.actor.actor import RolloutActor",
     "never imports the actor side"),
    ("workers/wham/gpt.py", "import ray", "knows no Ray, storage"),
    ("pipeline/contracts/layout.py", "import ray", "The contracts know no Ray"),
    ("pipeline/dataset/reader.py", "from workers.actor.writer import OutputWriter",
     "never the actor or its writer"),
    ("pipeline/driver/lease.py", "from pipeline.driver import run", "No import cycles"),
])
def test_the_check_fails_on_a_wrong_import(tmp_path: Path, module: str, line: str,
                                           contract: str) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(CONFIG, tmp_path / ".importlinter")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, result.stdout


def _function_level_project_imports(path: Path) -> list[str]:
    """`file:line import` for every import of pipeline/workers/jobs (or a relative one)
    inside a function or class body."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for outer in ast.walk(tree):
        if not isinstance(outer, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        for node in ast.walk(outer):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else ["."]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            if any(n == "." or n.split(".")[0] in PACKAGES for n in names):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_project_imports_sit_at_the_top_of_modules() -> None:
    found = [hit for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
             for hit in _function_level_project_imports(path)]
    assert not found, "function-level imports of the project's own modules:\n" + "\n".join(found)
