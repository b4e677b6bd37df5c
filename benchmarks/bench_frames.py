"""Frame storage modes side by side: what one run of the demo job stores, and how long the
loader takes to read every frame back, per mode, in one run.

    python benchmarks/bench_frames.py [--repeats 3] [--write-docs]

configs/demo.yaml (the demo world model, 6 seeds x 2 rollouts x (1 + 20) steps) runs once
per `output.frames` mode (png, parquet, none) through the real driver and actors, into a
local folder and into an S3 bucket on a moto server on loopback. For each root: objects and
bytes under `frames/` and in total (previews included, the same in every mode); then
`RolloutWindows(root, window=21)` reads every frame back (PNG objects, frames parts, or
tokens decoded by the model), `--repeats` times, modes interleaved, median reported.
Moto answers each request in about a millisecond on this machine, far faster than S3 across
a network, so the S3 times understate what per-frame objects cost there. `--write-docs`
replaces the "## Frame storage" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from docs_section import replace_section  # noqa: E402

from pipeline.contracts.spec import load_spec  # noqa: E402
from pipeline.contracts.storage import open_storage  # noqa: E402
from pipeline.dataset import RolloutWindows  # noqa: E402
from pipeline.driver import run_job  # noqa: E402
from workers.actor.actor import RolloutActor  # noqa: E402

DOCS = REPO / "docs" / "benchmarks.md"
SECTION = "## Frame storage"
MODES = ("png", "parquet", "none")
NIGHTLY = {"seeds": 10_000, "per_seed": 8, "steps": 50, "rollouts_per_unit": 16}


def _stored(root: str) -> dict[str, int]:
    storage = open_storage(root)
    fs, base = storage.arrow_fs()
    import pyarrow.fs as pafs

    infos = [f for f in fs.get_file_info(pafs.FileSelector(base, recursive=True))
             if f.type == pafs.FileType.File]
    frames = [f for f in infos if f.path[len(base) + 1:].startswith("frames/")]
    return {"objects": len(infos), "bytes": sum(f.size for f in infos),
            "frame_objects": len(frames), "frame_bytes": sum(f.size for f in frames)}


def _read_all(root: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    windows = RolloutWindows(root, window=21)
    frames = sum(len(w["frames"]) for w in windows.iter_windows())
    return time.perf_counter() - t0, frames


def _moto() -> object:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                       "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}"})
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    return server


def _runs(work: Path) -> dict[tuple[str, str], str]:
    roots = {}
    for where in ("local", "s3"):
        for mode in MODES:
            root = str(work / mode) if where == "local" else f"s3://bench/{mode}"
            spec = load_spec(REPO / "configs" / "demo.yaml", overrides=[
                f"output.root={root}", f"output.frames={mode}",
                f"model.checkpoint={REPO / 'models' / 'demo'}",
                f"seeds.source={REPO / 'configs' / 'seeds' / 'toygame'}"])
            summary = run_job(spec, actor_cls=RolloutActor, progress=False)
            assert summary.complete, summary.line()
            roots[(where, mode)] = root
    return roots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    server = _moto()
    load = os.getloadavg()[0]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            roots = _runs(Path(tmp))
            stored = {key: _stored(root) for key, root in roots.items()}
            times: dict[tuple[str, str], list[float]] = {key: [] for key in roots}
            frames = {}
            for _ in range(args.repeats):
                for key, root in roots.items():
                    seconds, frames[key] = _read_all(root)
                    times[key].append(seconds)
    finally:
        server.stop()
    body = _table(stored, times, frames)
    header = (f"Measured {dt.date.today().isoformat()} with `python benchmarks/bench_frames.py "
              f"--repeats {args.repeats}` ({platform.machine()}, {os.cpu_count()} CPUs; load "
              f"average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, from "
              "other work on the machine).")
    print(header + "\n\n" + body)
    if args.write_docs:
        replace_section(DOCS, f"{SECTION}\n\n{header}\n\n{body}\n")
    return 0


def _table(stored: dict, times: dict, frames: dict) -> str:
    base = {where: statistics.median(times[(where, "png")]) for where in ("local", "s3")}
    lines = ["| root | output.frames | objects under frames/ | bytes under frames/ | all objects "
             "| all bytes | read every frame (median) | vs png |",
             "|---|---|---|---|---|---|---|---|"]
    for (where, mode), s in stored.items():
        t = statistics.median(times[(where, mode)])
        lines.append(f"| {where} | {mode} | {s['frame_objects']} | {s['frame_bytes']:,} | "
                     f"{s['objects']} | {s['bytes']:,} | {t:.2f} s ({frames[(where, mode)]} "
                     f"frames) | {t / base[where]:.2f}x |")
    n = NIGHTLY
    rollouts = n["seeds"] * n["per_seed"]
    units = -(-rollouts // n["rollouts_per_unit"])
    lines += ["", f"At a nightly scale ({n['seeds']:,} seeds x {n['per_seed']} "
              f"rollouts x {n['steps']} steps, {n['rollouts_per_unit']} rollouts per unit) "
              f"the frames take {rollouts * (n['steps'] + 1):,} PUTs as PNG objects, "
              f"{units:,} as Parquet parts, none with `frames: none`. Reading a `none` run "
              "decodes every frame with the model on the CPU, and each pass here loads the "
              "model once (torch and the weights: a few seconds of every `none` figure); a "
              "training job pays that once per worker, the decoding every epoch."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
