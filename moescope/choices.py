"""The option vocabularies commands offer (``--assign``, ``--region-source``, ``--count``, ``--by``).

Kept free of heavy imports so that building the parser (``moescope --help``, argument errors)
imports neither torch nor numpy; :mod:`moescope.faces`, :mod:`moescope.stats.regions` and
:mod:`moescope.runners.maps` (``KINDS``) use the same values (tests/test_distributed.py checks they agree).
"""
from __future__ import annotations

__all__ = ["ASSIGN_MODES", "COUNT_MODES", "GROUPINGS", "MAP_KINDS", "REGION_SOURCES"]

REGION_SOURCES = ("landmarks", "template")
ASSIGN_MODES = ("soft", "majority")
COUNT_MODES = ("top1", "topk", "weighted")
GROUPINGS = ("all", "stage", "layer")
MAP_KINDS = ("routing", "topk", "weight", "prob", "output", "gradcam", "input")
