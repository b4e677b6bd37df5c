"""The reliability table of docs/reliability.md, computed from what the tests recorded.

    python benchmarks/reliability_report.py [--load-seeds 2000] [--skip-multinode]
        [--write-docs] [--records DIR]

Runs the reliability tests (`TEST_FILES`) with `WHAM_RELIABILITY_FIGURES` naming a file in a
scratch folder, where each test appends one JSON line of what it injected, tried and found
(`tests/support/faultproxy.py: record_figures`), and with pytest's JUnit XML report beside
it. Every cell of the table is computed from those records; the count of tests, their
outcome and time come from the JUnit report. If any test failed or errored, or none ran, the
script prints the failures instead of a table and exits 1. `--records DIR` summarises a
folder of an earlier run (`figures.jsonl`, `junit.xml`) under the same rule; `--write-docs`
replaces "## The table" of docs/reliability.md.

A test adds a row of its own without touching this script by recording a `row`:
`record_figures(name, row="what was tried", tried=N, survived=M, survived_means="...",
rows_lost=K)` (numbers of several records with the same `row` are added up; `rows_lost`
may be left out, shown as "-").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import command_line, provenance, replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "reliability.md"
SECTION = "## The table"
TEST_FILES = ("tests/reliability", "tests/driver/test_sql.py", "tests/driver/test_lease.py",
              "tests/contracts/test_storage_guards.py")
FIGURES, JUNIT = "figures.jsonl", "junit.xml"


class TestsFailed(Exception):
    """Some test failed: there is no table to print."""


def run_tests(folder: Path, *, load_seeds: int, skip_multinode: bool) -> int:
    env = {**os.environ, "WHAM_RELIABILITY_FIGURES": str(folder / FIGURES),
           "WHAM_LOAD_SEEDS": str(load_seeds)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           f"--junitxml={folder / JUNIT}", *TEST_FILES]
    if skip_multinode:
        cmd += ["-k", "not worker_node"]
    return subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode


def outcomes(junit: Path) -> dict:
    """Counts and failures of a pytest JUnit XML report; raises TestsFailed when a test
    failed or errored, or when the report is missing or holds no test."""
    if not junit.is_file():
        raise TestsFailed(f"no test report at {junit}: the tests did not run to the end")
    cases = list(ET.parse(junit).getroot().iter("testcase"))
    failed = [f"{c.get('classname')}::{c.get('name')}: {kind}" for c in cases
              for kind in ("failure", "error") if c.find(kind) is not None]
    skipped = sum(c.find("skipped") is not None for c in cases)
    if failed or not cases:
        raise TestsFailed("\n".join(failed) or "no test ran")
    return {"tests": len(cases), "passed": len(cases) - skipped, "skipped": skipped,
            "seconds": sum(float(c.get("time", 0)) for c in cases)}


def _sum(lines: list[dict], key: str) -> int:
    return sum(int(x.get(key, 0)) for x in lines)


def _lost(lines: list[dict]) -> str:
    """Rows lost as the tests counted them; "-" where none counted any."""
    counted = [x["rows_lost"] for x in lines if "rows_lost" in x]
    return str(sum(counted)) if counted else "-"


def fault_rows(by_test: dict[str, list[dict]]) -> list[str]:
    rows = []
    lines = [x for n in ("storage_faults", "multipart_faults") for x in by_test[n]]
    if lines:
        faults: Counter[str] = Counter()
        for line in lines:
            faults.update(line["faults"])
        errors = sum(v for k, v in faults.items() if k != "delay")
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(faults.items()))
        rows.append(f"| S3 faults injected into storage calls ({kinds}) | {errors} errors + "
                    f"{faults['delay']} delays | {_sum(lines, 'intact')} of "
                    f"{_sum(lines, 'objects')} objects read back byte-identical | - |")
    for line in by_test["pipeline_faults"]:
        injected = ", ".join(f"{k} {v}" for k, v in sorted(line["faults"].items()))
        rows.append(f"| pipeline run through faults ({injected}) | {line['requests']} "
                    f"requests, {line['objects']} objects | {line['keys_present']} of "
                    f"{line['objects']} keys of a clean run present, {line['identical_frames']} "
                    f"of {line['frames']} frames byte-identical; slowdown "
                    f"{line['slowdown']}x ({line['faulty_wall_s']} s vs {line['clean_wall_s']}"
                    f" s clean) | {line['rows_lost']} |")
    kills = {n: by_test[n] for n in ("driver_kills", "actor_kills", "node_kill")}
    every = [x for lines in kills.values() for x in lines]
    if every:
        rows.append(f"| interruptions (driver {_sum(kills['driver_kills'], 'interruptions')}, "
                    f"actor {_sum(kills['actor_kills'], 'interruptions')}, worker node "
                    f"{_sum(kills['node_kill'], 'interruptions')}) | "
                    f"{_sum(every, 'interruptions')} | {_sum(every, 'recovered')} runs resumed "
                    f"to the uninterrupted rows | {_lost(every)} |")
    return rows


BAD_INPUTS = (("hostile_yaml", "job YAML (fuzzed, via `wham-batch validate`)", "yaml_cases",
               "yaml_rejected"),
              ("hostile_seeds", "seed files (odd formats, names)", "tried", "rejected"),
              ("hostile_clip_actions", "clip actions", "tried", "rejected"),
              ("hostile_constant_actions", "constant actions", "tried", "rejected"),
              ("hostile_action_scripts", "action scripts", "tried", "rejected"),
              ("hostile_safetensors", "safetensors files", "tried", "rejected"),
              ("hostile_pickles", "code-running pickles", "tried", "rejected"))


def input_rows(by_test: dict[str, list[dict]]) -> list[str]:
    return [f"| bad input: {label} | {_sum(by_test[name], tried)} | "
            f"{_sum(by_test[name], rejected)} rejected with a clear error (the rest are valid "
            "and load) | - |" for name, label, tried, rejected in BAD_INPUTS if by_test[name]]


GUARDS = (("second_driver", "second driver on a running run (`--fresh`, other settings, "
           "plain, CLI)", "refused, naming the holder; the first completes"),
          ("changed_plan_without_manifest", "changed plan with manifest.json deleted or "
           "garbled", "refused from the commit markers' fingerprints"),
          ("symlink_in_root", "symlink planted at a run's frames folder",
           "run stopped naming the link; 0 files outside the root"),
          ("bounded_inputs", "inputs that would exhaust the machine (per_seed 1e9, run_id "
           "width 1e8, plan of 1.2M rollouts, 40 actors x 0.01 CPU, 4 GiB seed)",
           "refused at validation / before planning / as failed rows"),
          ("hostile_queries", "hostile or oversized queries (files, URLs, COPY, ATTACH, 3000 "
           "ORs, deep nesting, huge --limit, bad SQL)",
           "refused with a clear error (the rest answer, e.g. `step = 2^63` with 0 rows)"))


def guard_rows(by_test: dict[str, list[dict]]) -> list[str]:
    """Rows of the `_SUCCESS`-means-complete cases (tests/reliability/test_run_guards.py)."""
    rows = [f"| {what} | {_sum(lines, 'tried')} | "
            f"{_sum(lines, 'refused') + _sum(lines, 'rejected')} {outcome} | {_lost(lines)} |"
            for name, what, outcome in GUARDS if (lines := by_test.get(name))]
    for line in by_test.get("damaged_outputs", []):
        rows.append(f"| outputs damaged under `_SUCCESS` ({line['frames_deleted']} frames, a "
                    f"steps part, a truncated marker) | {line['damaged']} units | found by "
                    f"`wham-batch verify`; {line['redone']} units redone, run complete | "
                    f"{_lost([line])} |")
    for line in by_test.get("deleted_mid_run", []):
        rows.append(f"| frames deleted from the bucket mid-run | {line['deleted']} objects | "
                    f"{line['redone']} unit redone before `_SUCCESS` | {_lost([line])} |")
    for line in by_test.get("storage_full", []):
        rows.append(f"| output disk read-only, then full mid-run (tmpfs) | {line['tried']} | "
                    f"{line['stopped_cleanly']} stopped with a message naming the root; "
                    f"{line['resumed']} resumed to a verified run | {_lost([line])} |")
    return rows


def run_rows(by_test: dict[str, list[dict]]) -> list[str]:
    rows = []
    for line in by_test["load"]:
        rows.append(f"| load: {line['seeds']} seeds x 2 rollouts, {line['units']} units | "
                    f"{line['rollouts']} rollouts | {line['rows']} of {line['rows_expected']} "
                    f"steps rows; {line['rollouts_per_s']} rollouts/s, driver RSS peak "
                    f"{line['rss_peak_mib']} MiB, growth after warm-up "
                    f"{line['rss_growth_after_warmup_mib']} MiB, max units in flight "
                    f"{line['max_units_in_flight']}/{line['in_flight_limit']}, check of every "
                    f"unit against storage {line['verify_s']} s | "
                    f"{line['rows_expected'] - line['rows']} |")
    for line in by_test["secrets_run"]:
        rows.append(f"| credential markers searched | {line['files_searched']} files and "
                    f"objects | {line['leaks']} leaks | - |")
    for line in by_test["determinism"]:
        rows.append(f"| determinism (`--fresh` reruns) | {line['runs']} runs, "
                    f"{line['frames']} frames | {line['identical_reruns']} rerun with identical "
                    f"tokens and actions; {line['frames_off_by_one_at_batch_1']} frames off by "
                    "one grey level at batch size 1 | - |")
    return rows


def generic_rows(lines: list[dict]) -> list[str]:
    """Rows the tests describe themselves (records with a `row`), numbers added up."""
    grouped: dict[str, list[dict]] = defaultdict(list)
    for line in lines:
        if "row" in line:
            grouped[line["row"]].append(line)
    return [f"| {row} | {_sum(group, 'tried')} | {_sum(group, 'survived')} "
            f"{group[0].get('survived_means', 'survived')} | {_lost(group)} |"
            for row, group in grouped.items()]


def summarise(lines: list[dict]) -> str:
    by_test: dict[str, list[dict]] = defaultdict(list)
    for line in lines:
        by_test[line["test"]].append(line)
    rows = ["| what | tried | survived / rejected cleanly | rows lost |", "|---|---|---|---|",
            *fault_rows(by_test), *input_rows(by_test), *guard_rows(by_test),
            *run_rows(by_test), *generic_rows(lines)]
    return "\n".join(rows)


def report(folder: Path) -> tuple[dict, str]:
    """(test outcomes, table) of a records folder; raises TestsFailed."""
    counts = outcomes(folder / JUNIT)
    path = folder / FIGURES
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] \
        if path.is_file() else []
    return counts, summarise(lines)


def write_docs(counts: dict, table: str, *, prov: str) -> None:
    skipped = f", {counts['skipped']} skipped" if counts["skipped"] else ""
    lines = [SECTION, "", textwrap.fill(prov, 92), "", table, "",
             textwrap.fill(f"{counts['passed']} of {counts['tests']} tests passed{skipped}, "
                           f"{counts['seconds']:.0f} s of test time in that run. Wall times "
                           "and rates depend on the machine's load; the slowdown is the ratio "
                           "of two runs measured one after the other in the same process.", 92)]
    replace_section(DOCS, "\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--load-seeds", type=int, default=2000)
    parser.add_argument("--skip-multinode", action="store_true")
    parser.add_argument("--records", type=Path, help="summarise this folder of an earlier run")
    parser.add_argument("--write-docs", action="store_true", help=f"replace '{SECTION}'")
    args = parser.parse_args()
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    folder = args.records or Path(tempfile.mkdtemp(prefix="wham-reliability-"))
    code = 0 if args.records else run_tests(folder, load_seeds=args.load_seeds,
                                            skip_multinode=args.skip_multinode)
    try:
        counts, table = report(folder)
    except TestsFailed as exc:
        print(f"tests failed, so there is no table (records in {folder}):\n{exc}",
              file=sys.stderr)
        return 1
    if code != 0:
        print(f"pytest exited {code}, so there is no table (records in {folder})",
              file=sys.stderr)
        return 1
    print(table)
    if args.write_docs:
        write_docs(counts, table, prov=provenance(
            command_line(), load=(load0, os.getloadavg()[0]), seconds=time.perf_counter() - t0,
            note="tiny model preset, a moto S3 server and every Ray process on 127.0.0.1"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
