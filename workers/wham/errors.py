"""Errors raised by the model package for bad inputs and bad checkpoints."""


class WHAMError(Exception):
    """Base class: a problem the caller can fix (bad input, bad checkpoint)."""


class InputError(WHAMError, ValueError):
    """Images, actions or options that do not fit the model."""


class CheckpointError(WHAMError):
    """A checkpoint that is missing, truncated, foreign or inconsistent."""
