"""`wham-batch export` and `wham-batch decode`: runs' outputs as other datasets, and the
frames of a tokens-only run."""

from __future__ import annotations

import argparse

from pipeline.cli.command import Command
from pipeline.export.decode import DECODE_FORMATS, decode_run
from pipeline.export.episodes import ExportSource
from pipeline.export.hf import export_hf
from pipeline.export.lerobot import export_lerobot

EXPORTERS = {"lerobot": export_lerobot, "hf": export_hf}


def _storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="PATH",
                   help="model that decodes a frames: none run (default: the run's own model)")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: AWS or AWS_ENDPOINT_URL_S3)")
    p.add_argument("--region", help="S3 region")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT", help="output root: a local folder or s3://bucket/prefix")
    p.add_argument("out", metavar="OUT", help="a new local folder to write the dataset into "
                   "(outside any output root)")
    p.add_argument("--run-id", action="append", default=[], metavar="ID",
                   help="a run to export (repeatable); a glob such as 'nightly-*' names every "
                   "run it matches")
    p.add_argument("--run-date", action="append", default=[], metavar="DATE",
                   help="export the runs of this date, YYYY-MM-DD (repeatable; a glob such as "
                   "'2026-12-*' too); with --run-id, runs that match both")
    p.add_argument("--format", choices=tuple(EXPORTERS), required=True,
                   help="lerobot: a LeRobot v3.0 dataset; hf: a Hugging Face datasets folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in OUT (any other non-empty folder is "
                   "refused)")
    p.add_argument("--verbose", action="store_true",
                   help="show the datasets library's progress bars and INFO lines")
    _storage(p)


def run_export(args: argparse.Namespace) -> int:
    source = ExportSource(args.root, run_ids=tuple(args.run_id), run_dates=tuple(args.run_date),
                          decoder=args.checkpoint, endpoint_url=args.endpoint_url,
                          region=args.region)
    counts = EXPORTERS[args.format](source, args.out, overwrite=args.overwrite,
                                    verbose=args.verbose)
    runs = counts["runs"]
    names = ", ".join(run_id for _, run_id in runs[:5]) + (", ..." if len(runs) > 5 else "")
    print(f"wrote {counts['episodes']} episodes, {counts['frames']} frames of "
          f"{len(runs)} run{'s' if len(runs) != 1 else ''} ({names}) to {args.out} "
          f"({args.format})")
    return 0


def _decode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT", help="output root: a local folder or s3://bucket/prefix")
    p.add_argument("--run-id", required=True, help="the run to decode (its committed ok rollouts)")
    _storage(p)
    p.add_argument("--format", choices=DECODE_FORMATS, default="parquet",
                   help="parquet: one frames part per unit (the loader reads it); png: one PNG "
                   "per frame")
    p.add_argument("--out", metavar="ROOT2", help="another output root (default: ROOT)")


def run_decode(args: argparse.Namespace) -> int:
    report = decode_run(args.root, run_id=args.run_id, out=args.out, fmt=args.format,
                        decoder=args.checkpoint, endpoint_url=args.endpoint_url,
                        region=args.region)
    print(f"decoded {report.frames} frames of {report.units} units of run {args.run_id} into "
          f"{report.objects} objects under {report.out}")
    return 0


EXPORT = Command(
    "export", "write runs as one LeRobot or Hugging Face dataset", _export_arguments,
    run_export,
    description="Write the committed ok rollouts of the runs named by --run-id and --run-date "
    "(exact, or globs like 'nightly-*') as one dataset, episodes numbered across runs and "
    "each naming its run: a LeRobot v3.0 dataset (episodes = rollouts, MP4 frames, 10 Hz "
    "timestamps) or a Hugging Face datasets folder (Image feature, save_to_disk). In both, "
    "`action` is the 16 controls as floats (buttons 0/1, sticks in [-1, 1]) and "
    "`action_bins` the model form (stick bins 0..10). Frames of a frames: none run are "
    "decoded from its tokens by its model. OUT must be new or empty (--overwrite replaces "
    "an earlier export) and outside any output root; runs of models of different shapes "
    "are refused.")
DECODE = Command(
    "decode", "decode the frames of a tokens-only run", _decode_arguments, run_decode,
    description="For a run stored with output.frames: none, decode every step's image tokens "
    "with the model that wrote it and store the frames (watermarked like stored frames) as "
    "one Parquet part per unit or one PNG per frame.")
