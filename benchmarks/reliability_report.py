"""The reliability table of docs/reliability.md, produced by running the tests that prove it.

    python benchmarks/reliability_report.py [--load-seeds 2000] [--skip-multinode]

Runs the fault, interruption, run-guard, determinism, hostile-input, secrets and load tests
(and the SQL and lease tests of the driver) with
WHAM_RELIABILITY_FIGURES pointing at a scratch file (each test appends one JSON line of what
it injected and what survived), then prints the Markdown table. The tests assert the
outcome; this script only adds the figures up. Exits non-zero if any test failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_FILES = ("tests/reliability", "tests/driver/test_sql.py", "tests/driver/test_lease.py",
              "tests/contracts/test_storage_guards.py")


def run_tests(figures: Path, *, load_seeds: int, skip_multinode: bool) -> int:
    env = {**os.environ, "WHAM_RELIABILITY_FIGURES": str(figures),
           "WHAM_LOAD_SEEDS": str(load_seeds)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_FILES]
    if skip_multinode:
        cmd += ["-k", "not worker_node"]
    return subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode


def summarise(lines: list[dict]) -> str:
    by_test: dict[str, list[dict]] = defaultdict(list)
    for line in lines:
        by_test[line["test"]].append(line)
    faults: Counter[str] = Counter()
    fault_lines = [x for n in ("storage_faults", "multipart_faults", "pipeline_faults")
                   for x in by_test[n]]
    for line in fault_lines:
        faults.update(line["faults"])
    injected = sum(v for k, v in faults.items() if k != "delay")
    rows = [
        "| what | tried | survived / rejected cleanly | rows lost |",
        "|---|---|---|---|",
        f"| S3 faults injected ({', '.join(f'{k} {v}' for k, v in sorted(faults.items()))}) "
        f"| {injected} errors + {faults['delay']} delays | {injected} (every run and object "
        f"complete) | {sum(x['rows_lost'] for x in fault_lines)} |",
    ]
    kills = {n: sum(x["interruptions"] for x in by_test[n])
             for n in ("driver_kills", "actor_kills", "node_kill")}
    rows.append(f"| interruptions (driver {kills['driver_kills']}, actor "
                f"{kills['actor_kills']}, worker node {kills['node_kill']}) | "
                f"{sum(kills.values())} | every run resumed to the uninterrupted rows | "
                f"{sum(x['rows_lost'] for n in kills for x in by_test[n])} |")
    bad = {
        "job YAML (fuzzed, via `wham-batch validate`)": (
            sum(x["yaml_cases"] for x in by_test["hostile_yaml"]),
            sum(x["yaml_rejected"] for x in by_test["hostile_yaml"])),
        "seed files (odd formats, names)": (
            sum(x["tried"] for x in by_test["hostile_seeds"]),
            sum(x["rejected"] for x in by_test["hostile_seeds"])),
    }
    for name, label in (("hostile_clip_actions", "clip actions"),
                        ("hostile_constant_actions", "constant actions"),
                        ("hostile_action_scripts", "action scripts"),
                        ("hostile_safetensors", "safetensors files"),
                        ("hostile_pickles", "code-running pickles")):
        bad[label] = (sum(x["tried"] for x in by_test[name]),
                      sum(x["rejected"] for x in by_test[name]))
    for label, (tried, rejected) in bad.items():
        rows.append(f"| bad input: {label} | {tried} | {rejected} rejected with a clear "
                    f"error (the rest are valid and load) | - |")
    rows += guard_rows(by_test)
    for line in by_test["pipeline_faults"]:
        injected_here = ", ".join(f"{k} {v}" for k, v in sorted(line["faults"].items()))
        rows.append(f"| pipeline run through faults ({injected_here}) | "
                    f"{line['requests']} requests, {line['objects']} objects | "
                    f"slowdown {line['slowdown']}x ({line['faulty_wall_s']} s vs "
                    f"{line['clean_wall_s']} s clean) | {line['rows_lost']} |")
    for line in by_test["load"]:
        rows.append(f"| load: {line['seeds']} seeds x 2 rollouts, {line['units']} units | "
                    f"{line['rollouts']} rollouts | {line['rollouts_per_s']} rollouts/s, "
                    f"driver RSS peak {line['rss_peak_mib']} MiB, growth after warm-up "
                    f"{line['rss_growth_after_warmup_mib']} MiB, max units in flight "
                    f"{line['max_units_in_flight']}/{line['in_flight_limit']}, check of "
                    f"every unit against storage {line.get('verify_s', '?')} s | 0 |")
    for line in by_test["secrets_run"]:
        rows.append(f"| credential markers searched | {line['files_searched']} files and "
                    f"objects | {line['leaks']} leaks | - |")
    for line in by_test["determinism"]:
        rows.append(f"| determinism (`--fresh` reruns) | {line['runs']} runs, "
                    f"{line['frames']} frames | identical tokens and actions; "
                    f"{line['frames_off_by_one_at_batch_1']} frames off by one grey level "
                    "at batch size 1 | - |")
    return "\n".join(rows)


def _sum(lines: list[dict], key: str) -> int:
    return sum(int(x.get(key, 0)) for x in lines)


def guard_rows(by_test: dict[str, list[dict]]) -> list[str]:
    """Rows of the `_SUCCESS`-means-complete cases (tests/reliability/test_run_guards.py)."""
    rows = []
    for name, what, outcome in (
            ("second_driver", "second driver on a running run (`--fresh`, other settings, "
             "plain, CLI)", "refused, naming the holder; the first completes"),
            ("changed_plan_without_manifest", "changed plan with manifest.json deleted or "
             "garbled", "refused from the commit markers' fingerprints"),
            ("symlink_in_root", "symlink planted at a run's frames folder",
             "run stopped naming the link; 0 files outside the root"),
            ("bounded_inputs", "inputs that would exhaust the machine (per_seed 1e9, "
             "run_id width 1e8, plan of 1.2M rollouts, 40 actors x 0.01 CPU, 4 GiB seed)",
             "refused at validation / before planning / as failed rows"),
            ("hostile_queries", "hostile or oversized queries (files, URLs, COPY, ATTACH, "
             "3000 ORs, deep nesting, huge --limit, bad SQL)",
             "refused with a clear error (the other, `step = 2^63`, answers 0 rows)")):
        lines = by_test.get(name, [])
        if lines:
            tried = _sum(lines, "tried")
            done = _sum(lines, "refused") + _sum(lines, "rejected")
            rows.append(f"| {what} | {tried} | {done} {outcome} | 0 |")
    for line in by_test.get("damaged_outputs", []):
        rows.append(f"| outputs damaged under `_SUCCESS` ({line['frames_deleted']} frames, a "
                    "steps part, a truncated marker) | 3 units | found by `wham-batch verify`"
                    f"; {line['redone']} units redone, run complete | {line['rows_lost']} |")
    for line in by_test.get("deleted_mid_run", []):
        rows.append(f"| frames deleted from the bucket mid-run | {line['deleted']} objects | "
                    f"{line['redone']} unit redone before `_SUCCESS` | {line['rows_lost']} |")
    for line in by_test.get("storage_full", []):
        rows.append(f"| output disk read-only, then full mid-run (tmpfs) | {line['tried']} | "
                    f"{line['stopped_cleanly']} stopped with a message naming the root; "
                    "resumed to a verified run | 0 |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--load-seeds", type=int, default=2000)
    parser.add_argument("--skip-multinode", action="store_true")
    parser.add_argument("--figures", type=Path, help="summarise this figures file only")
    args = parser.parse_args()
    if args.figures:
        code, path = 0, args.figures
    else:
        path = Path(tempfile.mkdtemp(prefix="wham-reliability-")) / "figures.jsonl"
        code = run_tests(path, load_seeds=args.load_seeds, skip_multinode=args.skip_multinode)
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    print(summarise(lines))
    return code


if __name__ == "__main__":
    sys.exit(main())
