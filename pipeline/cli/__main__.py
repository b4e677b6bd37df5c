"""`python -m pipeline.cli ...` is `wham-batch ...`."""

import sys

from pipeline.cli import main

sys.exit(main())
