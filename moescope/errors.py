"""User-facing errors: one line, no traceback, non-zero exit from the CLI."""
from __future__ import annotations


class MoescopeError(Exception):
    """An error caused by the user's input (file, option, data).

    The CLI prints ``moescope: error: <message>`` on one line and exits with status 2.
    Messages must be a single line that names the offending input.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class CheckpointError(MoescopeError):
    """A checkpoint file is missing, corrupt, unsafe or of the wrong architecture."""


class DataError(MoescopeError):
    """Images or protocol files are missing, unreadable or empty."""
