"""Analyses under ``torchrun``: sharding the images over ranks and summing what they counted.

``torchrun --nproc_per_node=N -m moescope regions|cka|ablate|eval|maps|attack|degrade ...``
runs the command unchanged in N processes (gloo on CPU; NCCL on GPU, one GPU per rank:
``LOCAL_RANK``). Each rank analyses a contiguous share of the images (:func:`shard`, cut at batch boundaries so
every batch holds the images one process would put in it); the streaming accumulators are
summed over the ranks at the end (:func:`reduce_region_counts`, :func:`reduce_cka`,
:func:`reduce_agreement`, :func:`reduce_usage`, :func:`reduce_stats` ...; per-image vectors,
e.g. the bootstrap's, are gathered in rank order, i.e. in image order) and every rank builds
the same result; rank 0 alone prints and writes it (:func:`is_main`). The result equals the
single-process run: integer counts exactly, floating sums up to the order of addition.
Seeded draws (bootstrap over images, attack random starts, noise, sampled images) depend on
the global image index or id, never on a rank's position. ``bench`` measures on rank 0 alone
(the other ranks return at once: a benchmark times one device).

Without ``torchrun`` every function here is the identity on a world of one process. The
module imports nothing heavy at import time (the CLI asks :func:`is_main` before printing).
"""
from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence, TypeVar

if TYPE_CHECKING:
    import numpy as np

    from facemoe_model.distributed import DistributedContext

__all__ = [
    "analysis_device",
    "context",
    "gather",
    "is_main",
    "rank",
    "reduce_agreement",
    "reduce_change",
    "reduce_cka",
    "reduce_null",
    "reduce_region_counts",
    "reduce_region_mass",
    "reduce_stats",
    "reduce_usage",
    "shard",
    "shard_groups",
    "sum_arrays",
    "world_size",
]

T = TypeVar("T")


def world_size() -> int:
    """Processes in the run (``WORLD_SIZE`` of ``torchrun``; 1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    """This process's rank (``RANK``; 0 without ``torchrun``)."""
    return int(os.environ.get("RANK", "0") or 0)


def is_main() -> bool:
    """Rank 0: the one process that prints, shows progress and writes files."""
    return rank() == 0


def context(device: str | None = None) -> "DistributedContext":
    """The run's process group (:func:`facemoe_model.distributed.analysis_context`), joined on first use."""
    from facemoe_model.distributed import analysis_context

    return analysis_context(device)


def analysis_device(device: str | None = None) -> "Any":
    """The device models run on: ``--device auto`` (or None) is CUDA when present — under
    ``torchrun`` GPU ``LOCAL_RANK`` of the node — else the CPU; ``cpu`` / ``cuda`` / ``cuda:N``
    as given (``cuda`` without a GPU is a one-line error)."""
    import torch

    from .errors import MoescopeError

    wanted = None if device in (None, "", "auto") else str(device)
    if wanted is not None and wanted.startswith("cuda") and not torch.cuda.is_available():
        raise MoescopeError(f"--device {wanted}: CUDA is not available on this machine")
    if wanted is not None and not (wanted == "cpu" or wanted.startswith("cuda")):
        raise MoescopeError(f"--device must be auto, cpu, cuda or cuda:N, got {wanted!r}")
    ctx = context("cuda" if wanted and wanted.startswith("cuda") else wanted)
    if wanted is None or (world_size() > 1 and wanted == "cuda"):
        return ctx.device
    return torch.device(wanted)


# --- sharding ----------------------------------------------------------------------------------


def shard(items: Sequence[T], block: int = 1) -> list[T]:
    """This rank's contiguous share of ``items``, cut at multiples of ``block`` (e.g. the batch
    size); the shares of all ranks, in rank order, are ``items``. The whole list without ``torchrun``."""
    if world_size() == 1:
        return list(items)
    from facemoe_model.distributed import shard_range

    return [items[i] for i in shard_range(len(items), context(), block)]


def shard_groups(paths: Sequence[T], groups: Iterable[Sequence[int]]) -> tuple[list[T], list[range]]:
    """This rank's share of planned batches (consecutive index ranges of ``paths``, e.g.
    :func:`moescope.stats.cka.plan_batches`): whole batches in rank order, returned as
    ``(its paths, its batches re-indexed into them)``."""
    groups = [range(g[0], g[-1] + 1) if len(g) else range(0, 0) for g in groups]
    mine = shard(groups)
    if not mine:
        return [], []
    start, stop = mine[0].start, mine[-1].stop
    return list(paths[start:stop]), [range(g.start - start, g.stop - start) for g in mine]


# --- collectives -------------------------------------------------------------------------------


def gather(obj: Any) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (``[obj]`` without ``torchrun``)."""
    if world_size() == 1:
        return [obj]
    from facemoe_model.distributed import gather_objects

    return gather_objects(obj, context())


def sum_arrays(array: "np.ndarray") -> "np.ndarray":
    """``array`` summed over the ranks with ``all_reduce`` (float64 or int64, on the group's
    device); integer-valued counts stay exact. The array itself without ``torchrun``."""
    import numpy as np

    array = np.asarray(array)
    if world_size() == 1:
        return array
    import torch

    from facemoe_model.distributed import all_reduce_sum

    ctx = context()
    exact = np.issubdtype(array.dtype, np.integer) or array.dtype == bool
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64 if exact else np.float64)).to(ctx.device)
    out = all_reduce_sum(tensor, ctx).cpu().numpy()
    return out.astype(array.dtype, copy=False) if exact else out


# --- the streaming accumulators ----------------------------------------------------------------


def reduce_region_counts(counts) -> None:
    """Sum :class:`~moescope.stats.regions.RegionRoutingCounts` over the ranks, in place: the
    counts, per-layer and per-rank counts summed, the per-image vectors (bootstrap) gathered in
    image order."""
    if world_size() == 1:
        return
    import numpy as np

    from facemoe_model.rows import RowBuffer

    counts.counts = sum_arrays(counts.counts)
    counts.layer_counts = sum_arrays(counts.layer_counts)
    pieces = gather((counts.rank_counts, counts.per_image.array, counts.images))
    ranks = [p[0] for p in pieces if p[0] is not None]
    counts.rank_counts = np.sum(ranks, axis=0) if ranks else None
    counts.per_image = RowBuffer.joined(p[1] for p in pieces)
    counts.images = int(sum(p[2] for p in pieces))


def reduce_null(null) -> None:
    """Sum :class:`~moescope.stats.specialisation.PermutationNull` tables and image counts over
    the ranks, in place (each image's draws are seeded by its id, so this is the single-process null)."""
    if world_size() == 1:
        return
    import numpy as np

    null.observed = sum_arrays(null.observed)
    null.null = sum_arrays(null.null)
    null.kept, null.seen = (int(v) for v in sum_arrays(np.array([null.kept, null.seen], dtype=np.int64)))


def reduce_cka(cka) -> None:
    """Sum :class:`~moescope.stats.cka.StreamingCKA` HSIC sums, images and batches over the ranks, in place."""
    if world_size() == 1:
        return
    import torch

    from .stats.cka import _LayerSums

    pieces = gather({name: (s.hsic.detach().cpu().double().numpy(), s.images, s.batches) for name, s in cka._layers.items()})
    names = list(dict.fromkeys(name for p in pieces for name in p))
    merged = {}
    for name in names:
        parts = [p[name] for p in pieces if name in p]
        total = parts[0][0].copy()
        for hsic, _, _ in parts[1:]:
            total = total + hsic
        merged[name] = _LayerSums(torch.from_numpy(total), sum(x[1] for x in parts), sum(x[2] for x in parts))
    cka._layers = merged


def reduce_agreement(agreement) -> None:
    """Sum :class:`~moescope.stats.agreement.RoutingAgreement` token counts over the ranks, in place."""
    if world_size() == 1:
        return
    pieces = gather((agreement._counts, agreement._k))
    names = list(dict.fromkeys(name for p in pieces for name in p[0]))
    agreement._counts = {name: sum(p[0][name] for p in pieces if name in p[0]) for name in names}
    agreement._k = {name: k for p in pieces for name, k in p[1].items()}


def reduce_change(change) -> None:
    """Sum :class:`~moescope.stats.agreement.RoutingChange` sums (tokens, distances, top-1 changes) over the ranks."""
    if world_size() == 1:
        return
    pieces = gather(change._sums)
    names = list(dict.fromkeys(name for p in pieces for name in p))
    change._sums = {name: sum(p[name] for p in pieces if name in p) for name in names}


def reduce_region_mass(sums) -> None:
    """Sum :class:`~moescope.stats.maps.RegionMass` (map mass and region area per group) over the
    ranks, in place, adding the ranks' sums in rank order (the same on every rank)."""
    if world_size() == 1:
        return
    pieces = gather(sums)
    sums.mass, sums.area, sums.images = {}, {}, 0
    for piece in pieces:
        sums.merge(piece)


def reduce_usage(counts: Mapping[str, "np.ndarray"] | None) -> dict[str, "np.ndarray"] | None:
    """Expert-usage counts (``layer -> [E]`` assignments) summed over the ranks (exact integers)."""
    if counts is None or world_size() == 1:
        return None if counts is None else dict(counts)
    import numpy as np

    names = list(counts)
    if not names:
        return {}
    stacked = sum_arrays(np.stack([np.asarray(counts[n]) for n in names]))
    return {name: stacked[i] for i, name in enumerate(names)}


def reduce_stats(stats) -> None:
    """Merge image statistics dataclasses (:class:`~moescope.faces.ImageStats`, ``FaceStats``)
    of all ranks into ``stats``, in place: numbers summed, lists concatenated in rank order,
    dicts merged (their list values concatenated)."""
    if world_size() == 1:
        return
    pieces = gather(stats)
    for f in dataclasses.fields(stats):
        values = [getattr(p, f.name) for p in pieces]
        first = values[0]
        if isinstance(first, bool) or not isinstance(first, (int, float, list, dict)):
            continue
        if isinstance(first, (int, float)):
            merged: Any = sum(values)
        elif isinstance(first, list):
            merged = [item for v in values for item in v]
        else:
            merged = {}
            for v in values:
                for key, item in v.items():
                    if isinstance(item, list):
                        merged.setdefault(key, []).extend(item)
                    else:
                        merged[key] = item
        setattr(stats, f.name, merged)
