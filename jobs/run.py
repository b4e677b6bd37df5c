"""Ray job entrypoint: `python -m jobs.run CONFIG [--set KEY=VALUE ...] [--fresh]`.

Runs the same driver as `wham-batch run`; inside a Ray job RAY_ADDRESS is set, so the driver
connects to the cluster instead of starting a local instance.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cli.command import failure_status, interrupted_status, stop_on_sigterm
from pipeline.cli.run import add_spec_arguments, run_and_report
from pipeline.errors import UserError
from pipeline.spec import load_spec
from workers.wham.errors import WHAMError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.run", description=__doc__)
    add_spec_arguments(parser)
    parser.add_argument("--fresh", action="store_true", help="replace this run id's outputs")
    parser.add_argument("--quiet", action="store_true",
                        help="only warnings and errors on stderr (no progress)")
    args = parser.parse_args(argv)
    stop_on_sigterm()  # `wham-batch stop` / `ray job stop` send SIGTERM: stop the actors too
    try:
        spec = load_spec(args.config, args.overrides)
        return run_and_report(spec, fresh=args.fresh, quiet=args.quiet)
    except (UserError, WHAMError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        return failure_status(exc)
    except KeyboardInterrupt as exc:
        return interrupted_status(exc)


if __name__ == "__main__":
    sys.exit(main())
