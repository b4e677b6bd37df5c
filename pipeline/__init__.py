"""wham-batch: batch rollouts of the WHAM world model on Ray (see docs/architecture.md)."""

__version__ = "0.2.0"
