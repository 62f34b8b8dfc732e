"""Forward hooks that are always removed: re-exported from :mod:`facemoe_model.hooks`."""
from facemoe_model.hooks import ExpertUsage, HookSet

__all__ = ["HookSet", "ExpertUsage"]
