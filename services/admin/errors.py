"""The `mailbag` command's one error: what was asked for cannot be done (exit 1).

Its own module, so that every part of the command raises it without loading the
others (see cli.py)."""


class AdminError(Exception):
    """str() is one line for the operator."""
