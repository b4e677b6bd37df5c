"""benchmarks/reliability_report.py: its table comes from what the tests recorded, and a
failing test leaves no table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "benchmarks" / "reliability_report.py"
TESTS = '''
from support.faultproxy import record_figures

def test_guarded():
    record_figures("second_driver", tried=3, refused=3, rows_lost=0)

def test_own_row():
    record_figures("mine", row="a case of my own", tried=5, survived=4,
                   survived_means="came through", rows_lost=1)

def test_broken():
    assert {outcome}
'''


def _run_tests(tmp_path: Path, *, passing: bool) -> Path:
    """A real pytest run of a small test file with the variables the report sets."""
    folder = tmp_path / "records"
    folder.mkdir()
    test = tmp_path / "test_small.py"
    test.write_text(TESTS.format(outcome=passing))
    env = {"WHAM_RELIABILITY_FIGURES": str(folder / "figures.jsonl"), "PATH": "/usr/bin"}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    f"--rootdir={tmp_path}", f"--junitxml={folder / 'junit.xml'}",
                    "-o", f"pythonpath={ROOT / 'tests'}", str(test)], env=env, check=False,
                   capture_output=True, cwd=tmp_path)
    return folder


def _report(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPORT), "--records", str(folder)],
                          capture_output=True, text=True, check=False, cwd=ROOT)


def test_a_failing_test_leaves_no_table(tmp_path: Path) -> None:
    result = _report(_run_tests(tmp_path, passing=False))
    assert result.returncode == 1
    assert "|" not in result.stdout
    assert "test_broken" in result.stderr


def test_cells_come_from_the_records(tmp_path: Path) -> None:
    folder = _run_tests(tmp_path, passing=True)
    result = _report(folder)
    assert result.returncode == 0, result.stderr
    assert "| second driver on a running run" in result.stdout
    assert "| 3 | 3 refused, naming the holder; the first completes | 0 |" in result.stdout
    assert "| a case of my own | 5 | 4 came through | 1 |" in result.stdout
    # another record changes the cells: nothing in the table is fixed text
    with open(folder / "figures.jsonl", "a") as fh:
        fh.write(json.dumps({"test": "second_driver", "tried": 2, "refused": 1,
                             "rows_lost": 4}) + "\n")
    assert "| 5 | 4 refused, naming the holder; the first completes | 4 |" in \
        _report(folder).stdout


def test_no_test_report_is_a_failure(tmp_path: Path) -> None:
    (tmp_path / "figures.jsonl").write_text("")
    result = _report(tmp_path)
    assert result.returncode == 1 and "|" not in result.stdout
