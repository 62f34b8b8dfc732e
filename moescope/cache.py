"""Where moescope caches derived data (landmarks, rendered synthetic faces)."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir(*parts: str) -> Path:
    """``$MOESCOPE_CACHE/<parts>``, or ``~/.cache/moescope/<parts>`` when the variable is unset."""
    root = os.environ.get("MOESCOPE_CACHE") or Path.home() / ".cache" / "moescope"
    return Path(root).expanduser().joinpath(*parts)
