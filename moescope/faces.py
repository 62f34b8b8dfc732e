"""Images -> model-ready batches, optionally with each image's facial-region fractions per token grid.

The front half of every analysis, on the one image path (:mod:`facemoe_model.data.images`):
read the files (unreadable ones are skipped and counted), optionally prepare faces — find
Face Mesh landmarks (cached, parallel), turn them into region masks and pool those onto every
MoE layer's token grid — and batch the images with the model's preprocessing
(:func:`image_batches`, the one batching function). Images without a detected face are never
silently mixed in: they are counted and either skipped (``region_source="landmarks"``,
default) or labelled from the canonical aligned-face template (``region_source="template"``).
Work proceeds in chunks, so memory stays flat however many images there are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from facemoe_model.data.images import preprocess, read_image

from .errors import DataError

__all__ = [
    "ASSIGN_MODES",
    "REGION_SOURCES",
    "FaceStats",
    "ImageBatch",
    "ImageStats",
    "Prepared",
    "face_batches",
    "image_batches",
    "read_images",
    "region_preparation",
]

REGION_SOURCES = ("landmarks", "template")
ASSIGN_MODES = ("soft", "majority")

Prepared = tuple[str, np.ndarray, dict]
"""An image ready to batch: ``(id, uint8 RGB image, region fractions per token grid)``."""


@dataclass
class ImageStats:
    """What happened to the input images: found, analysed, unreadable, dropped (batch sizes)."""

    found: int = 0
    analysed: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)

    def warnings(self) -> list[str]:
        out = []
        if self.unreadable:
            first, reason = self.unreadable[0]
            out.append(f"skipped {len(self.unreadable)} unreadable file(s), e.g. {first}: {reason}")
        return out


@dataclass
class FaceStats(ImageStats):
    """:class:`ImageStats` plus the images without a detected face (skipped or templated)."""

    no_face: list[str] = field(default_factory=list)
    templated: list[str] = field(default_factory=list)

    def summary(self, region_source: str) -> dict:
        return {
            "images_found": self.found,
            "images_analysed": self.analysed,
            "images_no_face": len(self.no_face),
            "no_face_handling": "labelled from template" if region_source == "template" else "skipped",
            "images_unreadable": len(self.unreadable),
        }

    def warnings(self) -> list[str]:
        out = super().warnings()
        if self.no_face and not self.templated:
            out.append(f"no face found in {len(self.no_face)} image(s) (skipped; --region-source template labels them from the template), e.g. {self.no_face[0]}")
        if self.templated:
            out.append(f"no face found in {len(self.templated)} image(s): regions taken from the aligned-face template")
        return out


@dataclass(frozen=True)
class ImageBatch:
    """A model-ready batch: ``images`` ``[B, 3, S, S]``, ``ids``, per token grid the region
    fractions ``[B, R, rows, cols]`` (empty without face preparation), and the number of
    ``files`` the batch's group consumed (unreadable ones included)."""

    images: torch.Tensor
    ids: list[str]
    fractions: dict[tuple[int, int], np.ndarray]
    files: int = 0


def read_images(paths: Sequence[Path], stats: ImageStats) -> list[tuple[str, np.ndarray]]:
    """``(id, uint8 RGB image)`` of each readable file; unreadable ones go to ``stats.unreadable``."""
    images = []
    for path in paths:
        try:
            images.append((str(path), read_image(path)))
        except DataError as exc:
            stats.unreadable.append((str(path), str(exc)))
    return images


def image_batches(
    paths: Sequence[Path],
    input_size: int,
    groups: Iterable[Sequence[int]],
    *,
    batch_size: int | None = None,
    min_images: int = 1,
    prepare: Callable[[list[tuple[str, np.ndarray]]], list[Prepared]] | None = None,
    stats: ImageStats | None = None,
) -> Iterator[ImageBatch]:
    """Model-ready batches of ``paths``, group by group.

    Each group of path indices is read (unreadable files skipped), passed through ``prepare``
    (which may drop images and adds their region fractions; default: none), and cut into
    batches of ``batch_size`` (default: the whole group). A batch of fewer than ``min_images``
    images is not yielded; its size goes to ``stats.dropped``.
    """
    stats = stats if stats is not None else ImageStats()
    stats.found += len(paths)
    for group in groups:
        group = list(group)
        loaded = read_images([paths[i] for i in group], stats)
        items = prepare(loaded) if prepare is not None else [(image_id, image, {}) for image_id, image in loaded]
        size = batch_size or max(len(items), 1)
        for start in range(0, len(items), size):
            piece = items[start : start + size]
            if len(piece) < min_images:
                stats.dropped.append(len(piece))
                continue
            stats.analysed += len(piece)
            yield ImageBatch(
                images=torch.stack([preprocess(image, input_size) for _, image, _ in piece]),
                ids=[image_id for image_id, _, _ in piece],
                fractions={g: np.stack([f[g] for _, _, f in piece]) for g in piece[0][2]},
                files=len(group),
            )


def _fractions(masks: np.ndarray, grid: tuple[int, int], input_size: int, assign: str) -> np.ndarray:
    from .regions import REGIONS, hard_labels, pool_to_grid

    frac = pool_to_grid(masks, grid, input_hw=(input_size, input_size))
    if assign == "majority":
        frac = (hard_labels(frac)[None] == np.arange(len(REGIONS))[:, None, None]).astype(np.float64)
    return frac


def region_preparation(
    grids: Sequence[tuple[int, int]],
    input_size: int,
    *,
    region_source: str = "landmarks",
    assign: str = "soft",
    stats: FaceStats,
    workers: int | None = None,
    progress: bool = True,
) -> Callable[[list[tuple[str, np.ndarray]]], list[Prepared]]:
    """The ``prepare`` step of :func:`image_batches` for region-aware analyses: landmarks ->
    region masks -> fractions on each token grid; images without a face counted in ``stats``."""
    from .landmarks import detect_landmarks, template_landmarks
    from .regions import region_masks

    if region_source not in REGION_SOURCES:
        raise ValueError(f"unknown region source {region_source!r}; use one of {', '.join(REGION_SOURCES)}")
    if assign not in ASSIGN_MODES:
        raise ValueError(f"unknown assignment {assign!r}; use one of {', '.join(ASSIGN_MODES)}")
    grids = list(dict.fromkeys(tuple(g) for g in grids))

    def prepare(loaded: list[tuple[str, np.ndarray]]) -> list[Prepared]:
        landmarks = detect_landmarks([image for _, image in loaded], workers=workers, progress=progress)
        prepared = []
        for (image_id, image), lm in zip(loaded, landmarks):
            h, w = image.shape[:2]
            if lm is None:
                stats.no_face.append(image_id)
                if region_source != "template":
                    continue
                stats.templated.append(image_id)
                lm = template_landmarks(h, w)
            masks = region_masks(lm, h, w)
            prepared.append((image_id, image, {g: _fractions(masks, g, input_size, assign) for g in grids}))
        return prepared

    return prepare


def face_batches(
    paths: Sequence[Path],
    grids: Sequence[tuple[int, int]],
    input_size: int,
    *,
    batch_size: int = 64,
    region_source: str = "landmarks",
    assign: str = "soft",
    stats: FaceStats | None = None,
    chunk_size: int = 512,
    workers: int | None = None,
    progress: bool = True,
) -> Iterator[ImageBatch]:
    """Batches of the face images in ``paths`` with their region fractions on every grid in ``grids``.

    Landmarks are found ``chunk_size`` images at a time; ``stats`` (updated in place) counts
    images found, analysed, without a face, unreadable.
    """
    stats = stats if stats is not None else FaceStats()
    prepare = region_preparation(grids, input_size, region_source=region_source, assign=assign, stats=stats,
                                 workers=workers, progress=progress)
    chunks = (range(start, min(start + chunk_size, len(paths))) for start in range(0, len(paths), chunk_size))
    return image_batches(paths, input_size, chunks, batch_size=batch_size, prepare=prepare, stats=stats)
