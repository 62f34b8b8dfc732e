"""Face-recognition evaluation protocols (docs/analyses.md, "Evaluation protocols").

- Embeddings: flip-fused (image + horizontal flip, summed) and L2-normalised.
- Verification: cosine similarity of each pair; 10-fold accuracy with the threshold chosen on
  the other 9 folds (consecutive folds, as in LFW); TAR at fixed FAR from genuine/impostor scores.
- Identification: closed-set CMC and Rank-k over a gallery that may hold distractors (label -1).

Accuracies, TAR and Rank-k are fractions in [0, 1].
"""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .errors import DataError
from .inference import run_batches
from .rows import RowBuffer

__all__ = [
    "FARS",
    "RANKS",
    "embed_images",
    "embed_dataset",
    "pair_scores",
    "consecutive_folds",
    "best_threshold",
    "VerificationAccuracy",
    "verification_accuracy",
    "tar_at_far",
    "verification_metrics",
    "mate_ranks",
    "cmc_curve",
    "identification_metrics",
]

FARS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
RANKS: tuple[int, ...] = (1, 5, 10, 20)


# --- embeddings ---------------------------------------------------------------------------


def _embed_batches(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    flip: bool,
    device: torch.device | str | None,
    keys: Sequence[int] | None = None,
) -> np.ndarray:
    """Embed image batches; image ``i`` (in order) gets random-routing key ``keys[i]`` (default ``i``), its mirror ``-1 - key``."""

    # Each batch's keys are queued as its inputs are made and taken when the model takes the
    # batch. (itertools.tee of (inputs, keys) kept up to 57 whole input batches alive: its
    # buffer blocks are freed only when both sides have passed all of a block's items.)
    pending: collections.deque[torch.Tensor] = collections.deque()

    def inputs() -> Iterator[torch.Tensor]:
        start = 0
        for images in batches:
            if keys is None:
                index = torch.arange(start, start + len(images), dtype=torch.int64)
            else:
                index = torch.as_tensor(keys[start : start + len(images)], dtype=torch.int64)
            start += len(images)
            pending.append(torch.cat([index, -1 - index]) if flip else index)
            yield torch.cat([images, images.flip(-1)]) if flip else images

    def batch_keys() -> Iterator[torch.Tensor]:
        while True:  # run_batches takes a batch's keys right after its inputs
            yield pending.popleft()

    embeddings = RowBuffer()  # one block, not one small array per batch (see facemoe_model.rows)
    outputs = run_batches(model, inputs(), device=device, keys=batch_keys())
    for output in outputs:
        output = output.float()
        embedding = output[: len(output) // 2] + output[len(output) // 2 :] if flip else output
        embeddings.append(F.normalize(embedding, dim=1).cpu().numpy())
    return embeddings.array


def embed_images(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 64,
    flip: bool = True,
    device: torch.device | str | None = None,
    keys: Sequence[int] | None = None,
) -> np.ndarray:
    """L2-normalised embeddings [N, D] (float32) of already-normalised images [N, 3, H, W].

    With ``flip`` the embedding of each image and of its horizontal mirror are summed before
    normalising (both go through the model in one batch of ``2 * batch_size``). Runs in eval and
    inference mode on ``device`` (default: the model's) through
    :func:`~facemoe_model.inference.run_batches`; the model's modes are restored. Under random
    routing image ``i`` has key ``keys[i]`` (default ``i``) and its mirror ``-1 - key``
    (:func:`~facemoe_model.moe.sample_keys`), so the embeddings do not depend on ``batch_size``.
    """
    return _embed_batches(model, images.split(batch_size), flip, device, keys)


def embed_dataset(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    flip: bool = True,
    device: torch.device | str | None = None,
    keys: Sequence[int] | None = None,
) -> np.ndarray:
    """:func:`embed_images` over a dataset of ``(image, label)`` items, in dataset order.

    Under ``torchrun`` (:func:`facemoe_model.distributed.analysis_context`) each rank embeds a
    contiguous share of whole batches (the batches one process would form, with the same
    random-routing keys) and the embeddings are gathered in rank order, so every rank returns
    the single-process array."""
    from .distributed import analysis_context, gather_objects, shard_range

    context = analysis_context() if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else None
    if context is None or not context.enabled:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        return _embed_batches(model, (images for images, _ in loader), flip, device, keys)
    n = len(dataset)
    mine = shard_range(n, context, batch_size)
    all_keys = list(keys) if keys is not None else list(range(n))
    part = np.zeros((0, 0), dtype=np.float32)
    if len(mine):
        loader = DataLoader(Subset(dataset, list(mine)), batch_size=batch_size, shuffle=False, num_workers=0)
        part = _embed_batches(model, (images for images, _ in loader), flip, device, all_keys[mine.start : mine.stop])
    pieces = [p for p in gather_objects(part, context) if p.size]
    return np.concatenate(pieces) if pieces else part


# --- verification -------------------------------------------------------------------------


def pair_scores(embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair ``(i, j)`` of rows of L2-normalised ``embeddings``."""
    return np.einsum("pd,pd->p", embeddings[pairs[:, 0]], embeddings[pairs[:, 1]])


def consecutive_folds(n_pairs: int, n_folds: int = 10) -> np.ndarray:
    """Fold index of each pair when ``n_pairs`` pairs are cut into ``n_folds`` consecutive, near-equal folds.

    With fewer pairs than folds each pair is its own fold.
    """
    return np.arange(n_pairs) * n_folds // max(n_pairs, 1)


def best_threshold(scores: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """The threshold maximising accuracy of ``score >= threshold  <=>  same``, and that accuracy.

    Candidates are the midpoints between consecutive distinct scores plus -inf (accept all) and
    +inf (reject all); among equally accurate thresholds the lowest wins.
    """
    order = np.argsort(scores, kind="stable")
    sorted_scores, same = scores[order], issame[order].astype(bool)
    boundaries = np.flatnonzero(np.diff(sorted_scores) > 0)
    candidates = np.concatenate([[-np.inf], (sorted_scores[boundaries] + sorted_scores[boundaries + 1]) / 2, [np.inf]])
    rejected = np.concatenate([[0], boundaries + 1, [len(scores)]])  # scores below each candidate
    impostors_below = np.concatenate([[0], np.cumsum(~same)])[rejected]
    genuine_below = np.concatenate([[0], np.cumsum(same)])[rejected]
    correct = impostors_below + (same.sum() - genuine_below)
    best = int(np.argmax(correct))
    return float(candidates[best]), float(correct[best] / len(scores))


@dataclass(frozen=True)
class VerificationAccuracy:
    """k-fold verification accuracy: ``mean`` +- ``std`` (population std over folds, as in LFW)."""

    mean: float
    std: float
    fold_accuracies: np.ndarray
    thresholds: np.ndarray


def verification_accuracy(
    scores: np.ndarray, issame: np.ndarray, folds: np.ndarray | None = None, n_folds: int = 10
) -> VerificationAccuracy:
    """Accuracy on each fold with the :func:`best_threshold` of all other folds.

    ``folds`` gives each pair's fold; by default the pairs, in order, form ``n_folds``
    consecutive folds (LFW protocol, no shuffling).
    """
    scores, issame = np.asarray(scores, dtype=np.float64), np.asarray(issame, dtype=bool)
    folds = consecutive_folds(len(scores), n_folds) if folds is None else np.asarray(folds)
    fold_ids = np.unique(folds)
    if len(fold_ids) < 2:
        raise DataError(f"verification needs at least 2 folds, got {len(fold_ids)}")
    accuracies, thresholds = [], []
    for fold in fold_ids:
        test = folds == fold
        threshold, _ = best_threshold(scores[~test], issame[~test])
        accuracies.append(np.mean((scores[test] >= threshold) == issame[test]))
        thresholds.append(threshold)
    accuracies = np.array(accuracies)
    return VerificationAccuracy(float(accuracies.mean()), float(accuracies.std()), accuracies, np.array(thresholds))


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, fars: Sequence[float] = FARS) -> dict[float, float]:
    """True accept rate at each false accept rate; pairs are accepted when ``score > threshold``.

    For a FAR ``f`` over ``M`` impostor scores, ``k = floor(f * M)`` impostors may be accepted: the
    threshold is the ``(k+1)``-th highest impostor score (-inf when ``k >= M``), so at most ``k``
    impostors (fewer on ties) lie above it. When ``f < 1 / M`` (``k = 0``) the impostors are too
    few to measure that FAR and the TAR is NaN.
    """
    genuine = np.asarray(genuine, dtype=np.float64)
    descending = np.sort(np.asarray(impostor, dtype=np.float64))[::-1]
    tar = {}
    for far in fars:
        allowed = int(np.floor(far * len(descending) * (1 + 1e-9)))  # tolerate 1e-3 * 1000 = 0.999...
        if allowed < 1:
            tar[far] = float("nan")
        else:
            threshold = descending[allowed] if allowed < len(descending) else -np.inf
            tar[far] = float(np.mean(genuine > threshold))
    return tar


def verification_metrics(
    embeddings: np.ndarray, pairs: np.ndarray, issame: np.ndarray, folds: np.ndarray | None = None
) -> dict[str, float]:
    """Headline verification numbers: pairs, 10-fold accuracy (+- std, mean threshold) and TAR@FAR."""
    scores = pair_scores(embeddings, pairs)
    issame = np.asarray(issame, dtype=bool)
    accuracy = verification_accuracy(scores, issame, folds)
    metrics: dict[str, float] = {
        "pairs": len(scores),
        "accuracy": accuracy.mean,
        "accuracy_std": accuracy.std,
        "threshold": float(accuracy.thresholds.mean()),
    }
    for far, tar in tar_at_far(scores[issame], scores[~issame]).items():
        metrics[f"TAR@FAR={far:.0e}"] = tar
    return metrics


# --- identification -----------------------------------------------------------------------


def mate_ranks(
    probe_embeddings: np.ndarray,
    probe_labels: np.ndarray,
    gallery_embeddings: np.ndarray,
    gallery_labels: np.ndarray,
    chunk_size: int = 1024,
) -> np.ndarray:
    """Rank (1-based) of each probe's best-scoring gallery mate among all gallery images.

    Scores are dot products (cosine similarity for L2-normalised embeddings). The rank is
    1 + the number of non-mate gallery images (other identities and distractors, label -1)
    scoring at least as high as the best mate: ties count against the probe. Probes are scored
    ``chunk_size`` at a time. Every probe identity must have a gallery mate (closed set).
    """
    probe_labels, gallery_labels = np.asarray(probe_labels), np.asarray(gallery_labels)
    orphans = np.unique(probe_labels[~np.isin(probe_labels, gallery_labels[gallery_labels >= 0])])
    if len(orphans):
        count = int(np.isin(probe_labels, orphans).sum())
        raise DataError(
            f"{count} probe images have no gallery mate (identities {orphans[:5].tolist()}"
            f"{' ...' if len(orphans) > 5 else ''}); closed-set identification needs every probe identity in the gallery"
        )
    ranks = []
    for start in range(0, len(probe_labels), chunk_size):
        scores = probe_embeddings[start : start + chunk_size] @ gallery_embeddings.T
        is_mate = probe_labels[start : start + chunk_size, None] == gallery_labels[None, :]
        best_mate = np.where(is_mate, scores, -np.inf).max(axis=1, keepdims=True)
        ranks.append(1 + (np.where(is_mate, -np.inf, scores) >= best_mate).sum(axis=1))
    return np.concatenate(ranks)


def cmc_curve(ranks: np.ndarray, max_rank: int = max(RANKS)) -> np.ndarray:
    """Cumulative match characteristic: entry ``r - 1`` is the share of probes with rank <= r."""
    return (np.asarray(ranks)[:, None] <= np.arange(1, max_rank + 1)[None, :]).mean(axis=0)


def identification_metrics(
    probe_embeddings: np.ndarray,
    probe_labels: np.ndarray,
    gallery_embeddings: np.ndarray,
    gallery_labels: np.ndarray,
    ranks: Sequence[int] = RANKS,
) -> dict[str, float]:
    """Headline identification numbers: probe/gallery/distractor counts and Rank-k accuracies."""
    gallery_labels = np.asarray(gallery_labels)
    cmc = cmc_curve(mate_ranks(probe_embeddings, probe_labels, gallery_embeddings, gallery_labels), max(ranks))
    metrics: dict[str, float] = {
        "probes": len(probe_labels),
        "gallery": len(gallery_labels),
        "distractors": int((gallery_labels < 0).sum()),
    }
    metrics.update({f"Rank-{rank}": float(cmc[rank - 1]) for rank in ranks})
    return metrics
