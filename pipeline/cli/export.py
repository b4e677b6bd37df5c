"""`wham-batch export` and `wham-batch decode`: a run's outputs as other datasets, and the
frames of a tokens-only run."""

from __future__ import annotations

import argparse

from pipeline.cli.command import Command
from pipeline.export.decode import DECODE_FORMATS, decode_run
from pipeline.export.hf import export_hf
from pipeline.export.lerobot import export_lerobot

EXPORTERS = {"lerobot": export_lerobot, "hf": export_hf}


def _source(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT", help="output root: a local folder or s3://bucket/prefix")
    p.add_argument("--run-id", required=True, help="the run to read (its committed ok rollouts)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="model that decodes a frames: none run (default: the run's own model)")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: AWS or AWS_ENDPOINT_URL_S3)")
    p.add_argument("--region", help="S3 region")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    _source(p)
    p.add_argument("--format", choices=tuple(EXPORTERS), required=True,
                   help="lerobot: a LeRobot v3.0 dataset; hf: a Hugging Face datasets folder")
    p.add_argument("out", metavar="OUT", help="a new local folder to write the dataset into")


def run_export(args: argparse.Namespace) -> int:
    counts = EXPORTERS[args.format](args.root, run_id=args.run_id, out=args.out,
                                    decoder=args.checkpoint, endpoint_url=args.endpoint_url,
                                    region=args.region)
    print(f"wrote {counts['episodes']} episodes, {counts['frames']} frames of run "
          f"{args.run_id} to {args.out} ({args.format})")
    return 0


def _decode_arguments(p: argparse.ArgumentParser) -> None:
    _source(p)
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
    "export", "write a run as a LeRobot or Hugging Face dataset", _export_arguments, run_export,
    description="Write the committed ok rollouts of one run as a LeRobot v3.0 dataset "
    "(episodes = rollouts, MP4 frames, float actions, 10 Hz timestamps) or as a Hugging Face "
    "datasets folder (Image feature, save_to_disk). Frames of a frames: none run are decoded "
    "from its tokens by its model.")
DECODE = Command(
    "decode", "decode the frames of a tokens-only run", _decode_arguments, run_decode,
    description="For a run stored with output.frames: none, decode every step's image tokens "
    "with the model that wrote it and store the frames (watermarked like stored frames) as "
    "one Parquet part per unit or one PNG per frame.")
