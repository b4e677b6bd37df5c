"""Ray job entrypoint: `python -m jobs.run CONFIG [--set KEY=VALUE ...] [--fresh]`.

Runs the same driver as `wham-batch run`; inside a Ray job RAY_ADDRESS is set, so the driver
connects to the cluster instead of starting a local instance.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cli.command import run_command
from pipeline.cli.run import add_spec_arguments, run_and_report
from pipeline.contracts.spec import load_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.run", description=__doc__)
    add_spec_arguments(parser)
    parser.add_argument("--fresh", action="store_true", help="replace this run id's outputs")
    parser.add_argument("--quiet", action="store_true",
                        help="only warnings and errors on stderr (no progress)")
    args = parser.parse_args(argv)
    # `wham-batch stop` / `ray job stop` send SIGTERM: it stops the actors too
    return run_command(lambda: run_and_report(load_spec(args.config, args.overrides),
                                              fresh=args.fresh, quiet=args.quiet))

if __name__ == "__main__":
    sys.exit(main())
