"""The option vocabularies commands offer (``--assign``, ``--region-source``, ``--count``, ``--by``) and
the default ``--batch-size``.

Kept free of heavy imports so that building the parser (``moescope --help``, argument errors)
imports neither torch nor numpy; :mod:`moescope.faces`, :mod:`moescope.stats.regions` and
:mod:`moescope.runners.maps` (``KINDS``) use the same values (tests/test_distributed.py checks they agree).
"""
from __future__ import annotations

__all__ = ["ASSIGN_MODES", "BATCH_SIZE", "COUNT_MODES", "EVAL_BATCH_SIZE", "GROUPINGS", "MAP_KINDS", "REGION_SOURCES"]

BATCH_SIZE = 32
"""Images per forward pass (``--batch-size`` of regions and maps; cka keeps HSIC batches of 16, and
the evaluation commands take :data:`EVAL_BATCH_SIZE` images and their mirrors). On the CPU 32 is as
fast as 64 (demo model, 1 thread: 5.77 vs 5.82 s per 1,600 images) and keeps peak memory flat
over a long run: at 64 the experts' per-batch activations (tens of MB, a different size in
every batch) fragment the heap, and peak RSS still grows after thousands of images
(``benchmarks/bench_analysis_memory.py``). On a GPU, raise it."""

EVAL_BATCH_SIZE = BATCH_SIZE // 2
"""Images per batch of the evaluation commands (``eval``, ``ablate``, ``attack``, ``degrade``):
each image goes through the model with its mirror image, so a forward pass holds
:data:`BATCH_SIZE` images (at 32 images per batch, 64 per pass, peak RSS grew 1.22x from
1,000 to 10,000 images; at 16, 1.03x)."""

REGION_SOURCES = ("landmarks", "template")
ASSIGN_MODES = ("soft", "majority")
COUNT_MODES = ("top1", "topk", "weighted")
GROUPINGS = ("all", "stage", "layer")
MAP_KINDS = ("routing", "topk", "weight", "prob", "output", "gradcam", "input")
