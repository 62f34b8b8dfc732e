"""Face images -> model-ready batches with each image's facial-region fractions per token grid.

The shared front half of every region-aware analysis: read images (unreadable files are
skipped and counted), find Face Mesh landmarks (cached, parallel), turn them into region
masks, pool those onto every MoE layer's token grid, and batch the images with the model's
preprocessing. Images without a detected face are never silently mixed in: they are
counted and either skipped (``region_source="landmarks"``, default) or labelled from the
canonical aligned-face template (``region_source="template"``). Work proceeds in chunks, so
memory stays flat however many images there are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from facemoe_model.data.datasets import preprocess

from .errors import DataError
from .landmarks import IMAGE_EXTENSIONS, detect_landmarks, find_images, load_image, template_landmarks
from .regions import REGIONS, hard_labels, pool_to_grid, region_masks

__all__ = ["FaceBatch", "FaceStats", "REGION_SOURCES", "ASSIGN_MODES", "list_images", "face_batches"]

REGION_SOURCES = ("landmarks", "template")
ASSIGN_MODES = ("soft", "majority")


@dataclass
class FaceStats:
    """What happened to the input images."""

    found: int = 0
    analysed: int = 0
    no_face: list[str] = field(default_factory=list)
    templated: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    def summary(self, region_source: str) -> dict:
        return {
            "images_found": self.found,
            "images_analysed": self.analysed,
            "images_no_face": len(self.no_face),
            "no_face_handling": "labelled from template" if region_source == "template" else "skipped",
            "images_unreadable": len(self.unreadable),
        }

    def warnings(self) -> list[str]:
        out = []
        if self.unreadable:
            first, reason = self.unreadable[0]
            out.append(f"skipped {len(self.unreadable)} unreadable file(s), e.g. {first}: {reason}")
        if self.no_face and not self.templated:
            out.append(f"no face found in {len(self.no_face)} image(s) (skipped; --region-source template labels them from the template), e.g. {self.no_face[0]}")
        if self.templated:
            out.append(f"no face found in {len(self.templated)} image(s): regions taken from the aligned-face template")
        return out


@dataclass(frozen=True)
class FaceBatch:
    """A model-ready batch: ``images`` ``[B, 3, S, S]``, ``ids``, and per token grid the region
    fractions ``[B, R, rows, cols]``."""

    images: torch.Tensor
    ids: list[str]
    fractions: dict[tuple[int, int], np.ndarray]


def list_images(root: str | Path) -> list[Path]:
    """Image files under ``root`` (a folder, recursive, sorted; or one image file).

    Raises a one-line DataError when the path is missing, is not an image, or holds none."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"image folder not found: {root}")
    if root.is_file():
        if root.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"not an image file: {root}")
        return [root]
    return find_images(root)


def _fractions(masks: np.ndarray, grid: tuple[int, int], input_size: int, assign: str) -> np.ndarray:
    frac = pool_to_grid(masks, grid, input_hw=(input_size, input_size))
    if assign == "majority":
        frac = (hard_labels(frac)[None] == np.arange(len(REGIONS))[:, None, None]).astype(np.float64)
    return frac


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
) -> Iterator[FaceBatch]:
    """Yield model-ready batches of the images in ``paths`` with their region fractions.

    ``stats`` (updated in place) counts images found, analysed, without a face, unreadable.
    """
    if region_source not in REGION_SOURCES:
        raise ValueError(f"unknown region source {region_source!r}; use one of {', '.join(REGION_SOURCES)}")
    if assign not in ASSIGN_MODES:
        raise ValueError(f"unknown assignment {assign!r}; use one of {', '.join(ASSIGN_MODES)}")
    stats = stats if stats is not None else FaceStats()
    grids = list(dict.fromkeys(tuple(g) for g in grids))
    stats.found += len(paths)
    for start in range(0, len(paths), chunk_size):
        images, ids = [], []
        for path in paths[start : start + chunk_size]:
            try:
                images.append(load_image(path))
                ids.append(str(path))
            except DataError as exc:
                stats.unreadable.append((str(path), str(exc)))
        landmarks = detect_landmarks(images, workers=workers, progress=progress)
        pending: list[tuple[np.ndarray, str, dict]] = []
        for image, image_id, lm in zip(images, ids, landmarks):
            h, w = image.shape[:2]
            if lm is None:
                stats.no_face.append(image_id)
                if region_source != "template":
                    continue
                stats.templated.append(image_id)
                lm = template_landmarks(h, w)
            masks = region_masks(lm, h, w)
            pending.append((image, image_id, {g: _fractions(masks, g, input_size, assign) for g in grids}))
            if len(pending) == batch_size:
                yield _batch(pending, input_size, stats)
                pending = []
        if pending:
            yield _batch(pending, input_size, stats)


def _batch(items: list[tuple[np.ndarray, str, dict]], input_size: int, stats: FaceStats) -> FaceBatch:
    stats.analysed += len(items)
    grids = items[0][2].keys()
    return FaceBatch(
        images=torch.stack([preprocess(image, input_size) for image, _, _ in items]),
        ids=[image_id for _, image_id, _ in items],
        fractions={g: np.stack([f[g] for _, _, f in items]) for g in grids},
    )
