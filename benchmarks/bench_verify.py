"""The cost of verifying a run at scale: `wham-batch verify` of one run of many units, by
metadata (the default) and with `--deep`, on a local folder and on S3 (a moto server).

    python benchmarks/bench_verify.py [--units 10000] [--write-docs]

Each root gets the same run, written with the real writer (`frames: parquet`, each unit one
rollout of 1 context + 2 generated 32x32 frames: a steps, a rollouts and a frames part, a
commit marker). Then `verify_run` checks it four ways, one after the other: local default,
local `--deep`, S3 default (each frames part compared by the SHA-256 S3 keeps beside it:
one HEAD, no download) and S3 `--deep` (every object downloaded and hashed). The local
default hashes too (a folder keeps no checksums), so it costs what `--deep` costs. For S3
the requests the moto server answered are counted from its log (listing and reading the
markers included; the requests pyarrow makes for the frames parts' footers included). Moto
answers in about a millisecond on loopback, far faster than S3 across a network, so the S3
seconds are a floor; requests per unit carry over. `--write-docs` replaces the
"## Cost of verification" section of docs/reliability.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from docs_section import replace_section  # noqa: E402

from pipeline.contracts import layout  # noqa: E402
from pipeline.contracts.sources import NEUTRAL_ACTION  # noqa: E402
from pipeline.contracts.storage import Storage, open_storage  # noqa: E402
from pipeline.driver.verify import verify_run  # noqa: E402
from workers.actor.writer import OutputWriter, WriterSettings  # noqa: E402

DOCS = REPO / "docs" / "reliability.md"
SECTION = "## Cost of verification"
DATE, RUN = "2026-01-02", "verify-bench"
WRITE_THREADS = 16
_REQUEST = re.compile(rb'" (\d{3}) ')
_PORT = re.compile(r"Running on http://127\.0\.0\.1:(\d+)")


def _row(rollout_id: str, unit_id: str) -> dict:
    now = dt.datetime.now(dt.UTC)
    return {"rollout_id": rollout_id, "seed_id": "bench", "seed_uri": "bench.png",
            "rollout_index": 0, "mode": "world_model", "action_policy": "random",
            "context_steps": 1, "generated_steps": 2, "temperature": 1.0, "top_k": None,
            "top_p": 1.0, "greedy": False, "rng_seed": 0, "model_id": "bench",
            "model_sha256": "0" * 64, "status": "ok", "error": None, "worker": "bench",
            "started_at": now, "finished_at": now, "generate_seconds": 0.0}


def write_run(storage: Storage, units: int) -> None:
    """`units` committed units and the run's manifest, written with the real writer."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    settings = WriterSettings(run_date=DATE, run_id=RUN, model_id="bench",
                              frame_mode="parquet", image_tokens=False, threads=4)

    def one(writer: OutputWriter, index: int) -> None:
        unit_id = layout.unit_id_for(index)
        rollout_id = f"bench{index:06d}-r000"
        for step in range(3):
            writer.add_step(unit_id, rollout_id, step=step, image=frames[step],
                            action=NEUTRAL_ACTION, generated=step > 0,
                            action_source="given" if step else "seed")
        writer.finish_rollout(unit_id, _row(rollout_id, unit_id))
        writer.finish_unit(unit_id, plan_fingerprint="bench")

    with OutputWriter(storage, settings) as writer, ThreadPoolExecutor(WRITE_THREADS) as pool:
        list(pool.map(lambda i: one(writer, i), range(units)))
    storage.put_bytes(layout.manifest_key(DATE, RUN), json.dumps(
        {"plan_fingerprint": "bench", "counts": {"units_total": units}}).encode())


class Moto:
    """A moto S3 server in a child process; counts the requests it answers."""

    def __init__(self, log: Path) -> None:
        self.log = log
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1"}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while not (match := _PORT.search(log.read_text(errors="replace"))):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto did not start: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        os.environ.update(env, AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{match.group(1)}",
                          AWS_EC2_METADATA_DISABLED="true")

    def requests(self) -> int:
        return len(_REQUEST.findall(self.log.read_bytes()))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a busy machine: do not wait for a clean exit
            self.proc.kill()
            self.proc.wait(timeout=60)


def measure(storage: Storage, *, deep: bool, moto: Moto | None) -> dict:
    before = moto.requests() if moto else 0
    t0 = time.perf_counter()
    check = verify_run(storage, run_date=DATE, run_id=RUN, deep=deep)
    seconds = time.perf_counter() - t0
    time.sleep(0.5)  # the server's log lines of the last requests
    assert check.ok, check.lines()
    return {"units": check.units_checked, "seconds": seconds,
            "requests": moto.requests() - before if moto else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=10_000)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        moto = Moto(Path(tmp) / "moto.log")
        try:
            import boto3

            boto3.client("s3").create_bucket(Bucket="bench")
            roots = {"local": open_storage(str(Path(tmp) / "out")),
                     "S3 (moto)": open_storage("s3://bench/out")}
            for where, storage in roots.items():
                t0 = time.perf_counter()
                write_run(storage, args.units)
                print(f"{where}: {args.units} units written in "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
            for where, storage in roots.items():
                for deep in (False, True):
                    counter = moto if where != "local" else None
                    results[(where, deep)] = measure(storage, deep=deep, moto=counter)
                    print(where, deep, results[(where, deep)], flush=True)
        finally:
            moto.stop()
    header = (f"Measured {dt.date.today().isoformat()} with `python benchmarks/bench_verify.py "
              f"--units {args.units}` ({platform.machine()}, {os.cpu_count()} CPUs; load "
              f"average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, from "
              "other work on the machine).")
    body = _table(results)
    print(header + "\n\n" + body)
    if args.write_docs:
        replace_section(DOCS, f"{SECTION}\n\n{_intro()}\n\n{header}\n\n{body}\n")
    return 0


def _intro() -> str:
    return ("What `wham-batch verify` (and the driver's check before `_SUCCESS`) costs on one "
            "run of many small units (`frames: parquet`; a steps, a rollouts and a frames part "
            "per unit), by metadata (the default) and with `--deep`. On S3 the default "
            "compares each frames part with the SHA-256 S3 keeps beside it (one HEAD) and "
            "reads its footer and two columns; `--deep` downloads and hashes it whole. A local "
            "folder keeps no checksums, so its default hashes every byte as `--deep` does. "
            "Steps and rollouts parts are read whole and hashed either way. Requests are those "
            "the moto server answered (markers listed and read included). Written by "
            "`benchmarks/bench_verify.py`.")


def _table(results: dict) -> str:
    lines = ["| root | check | units | seconds | ms per unit | requests per unit |",
             "|---|---|---|---|---|---|"]
    for (where, deep), r in results.items():
        per_unit = "-" if r["requests"] is None else f"{r['requests'] / r['units']:.1f}"
        how = "`--deep` (every byte hashed)" if deep else (
            "default (hashes: no stored checksums)" if where == "local"
            else "default (stored checksums, HEAD)")
        lines.append(f"| {where} | {how} | {r['units']:,} | {r['seconds']:.1f} | "
                     f"{1000 * r['seconds'] / r['units']:.2f} | {per_unit} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
