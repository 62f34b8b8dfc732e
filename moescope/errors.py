"""User-facing errors: one line, no traceback, exit status 2 from the CLI.

The classes live in :mod:`facemoe_model.errors` (the model package stands alone);
``MoescopeError`` is their common base, :class:`facemoe_model.errors.InputError`.
"""
from __future__ import annotations

from facemoe_model.errors import CheckpointError, DataError, InputError

MoescopeError = InputError
"""Base of every error caused by the user's input; the CLI prints it as ``moescope: error: ...``."""

__all__ = ["MoescopeError", "CheckpointError", "DataError"]
