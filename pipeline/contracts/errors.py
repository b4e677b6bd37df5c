"""Errors a user can meet and fix; the CLI prints them without a traceback."""


class UserError(Exception):
    """A problem with the user's input or environment; the message says what to do."""
