"""User-facing errors: one line, no traceback, non-zero exit from a command line.

These are the errors of the model package (bad checkpoint, unreadable data, bad option value);
``moescope`` re-exports them (``moescope.errors``) and its CLI prints them as one line.
"""
from __future__ import annotations

__all__ = ["InputError", "CheckpointError", "DataError"]


class InputError(Exception):
    """An error caused by the user's input (file, option, data).

    A command line prints ``<prog>: error: <message>`` on one line and exits with ``exit_code`` (2).
    Messages are a single line that names the offending input (whitespace is collapsed).
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class CheckpointError(InputError):
    """A checkpoint file is missing, corrupt, unsafe or of the wrong architecture."""


class DataError(InputError):
    """Images or protocol files are missing, unreadable or empty."""
