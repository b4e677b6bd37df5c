"""Fixtures of the reliability tests."""

from support.gated import reference_rows  # noqa: F401 - a fixture: rows of one clean run
