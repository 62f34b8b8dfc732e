"""Images -> model-ready batches, optionally aligned, with each image's facial-region fractions per token grid.

The front half of every analysis, on the one image path (:mod:`facemoe_model.data.images`):
read the files (unreadable ones are skipped and counted; large images are decoded reduced,
long side at most ``MAX_SIDE``), optionally prepare faces — find the Face Mesh landmarks of
the largest face (cached, parallel) with mediapipe's detection score, pass the face through the
quality gate (:func:`moescope.align.face_quality`), align it (``--align auto|always|none``:
five points -> similarity to the ArcFace template -> 112 warp -> model input; ``auto`` leaves
canonical crops such as the bundled demo faces untouched), transform its landmarks with the same
matrix, turn them into region masks on what the model sees and pool those onto every MoE layer's
token grid — and batch the images with the model's preprocessing (:func:`image_batches`, the one
batching function). Images without a detected face, and faces the gate rejects (counted per
reason), are never silently mixed in: they are counted and either skipped
(``region_source="landmarks"``, default) or labelled from the canonical aligned-face template
(``region_source="template"``). Work proceeds in chunks, so memory stays flat however many
images there are. :func:`align_image` / :func:`align_images` are the same preparation for
paths that need no regions (evaluation).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np
import torch

from facemoe_model.data.images import INPUT_SIZE, MAX_SIDE, preprocess, read_image_scaled
from facemoe_model.fileio import atomic_write

from .align import ALIGN_MODES, REJECTION_REASONS, align_face, face_quality, warp_reduction
from .choices import BATCH_SIZE
from .errors import DataError

__all__ = [
    "ALIGN_MODES",
    "ALIGN_OUTCOMES",
    "ASSIGN_MODES",
    "FACE_SHARE_WARNING",
    "REGION_SOURCES",
    "FacePrep",
    "FaceStats",
    "ImageBatch",
    "ImageStats",
    "Prepared",
    "align_image",
    "CHUNK_SIZE",
    "PREFETCH_BATCHES",
    "align_images",
    "alignment_preparation",
    "chunk_plan",
    "common_root",
    "face_batches",
    "image_batches",
    "prepare_face",
    "read_images",
    "region_preparation",
]

ALIGN_OUTCOMES = ("aligned", "canonical", "unaligned", "no_face", *REJECTION_REASONS)
"""What preparing one image gave: warped to the template, left as is because it already is a
canonical crop (``auto``), left as is (``none``), no face, or the first quality-gate failure."""

FACE_SHARE_WARNING = 0.25
"""Images analysed unaligned whose face covers under this share of the tokens are warned about
(measured with ``--align none``: ``astronaut`` 3%, ``grace_hopper`` 10%, 92x112 portraits 50%,
the bundled demo faces 43%)."""

CHUNK_SIZE = 512
"""Images whose landmarks are found together (one pool of Face Mesh workers on an empty cache)."""

PREFETCH_BATCHES = 6
"""Batches to prepare ahead of the model (:func:`moescope.forward.prefetched`). Within a chunk
(:func:`chunk_plan`) batches leave as they fill; at a chunk boundary the next chunk's images are
read and their landmarks looked up first: for a 512-image chunk on a warm cache about 0.35 s on a
2-core CPU, three to four batches of the demo model's time, so six in hand keep the model busy
(with three it waited 0.4-0.8 s per 1,600 images) while memory stays bounded by them."""


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
    reduced: dict[str, tuple[Path, np.ndarray]] = field(default_factory=dict)
    """Images decoded reduced (long side over ``MAX_SIDE``): id -> (path, full px per decoded px)."""

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
    rejected: dict[str, list[str]] = field(default_factory=dict)
    """Quality-gate failures: reason -> ids (an image counts under every reason it fails)."""
    rejected_images: list[str] = field(default_factory=list)
    aligned: list[str] = field(default_factory=list)
    multiple_faces: list[str] = field(default_factory=list)
    low_face_share: list[str] = field(default_factory=list)
    cache_problems: list[str] = field(default_factory=list)
    align: str = "auto"
    template_hint: bool = True
    """Whether the no-face warning points at ``--region-source template`` (region analyses)."""

    def note_cache_problem(self, message: str) -> None:
        if message not in self.cache_problems:
            self.cache_problems.append(message)

    def alignment_summary(self) -> dict:
        """The alignment and quality-gate counts (also for analyses without regions)."""
        return {
            "alignment": self.align,
            "images_aligned": len(self.aligned),
            "images_rejected": len(self.rejected_images),
            "rejected_by_reason": {reason: len(self.rejected.get(reason, ())) for reason in REJECTION_REASONS},
            "images_multiple_faces": len(self.multiple_faces),
            "images_downscaled": len(self.reduced),
        }

    def summary(self, region_source: str) -> dict:
        return {
            "images_found": self.found,
            "images_analysed": self.analysed,
            "images_no_face": len(self.no_face),
            "no_face_handling": "labelled from template" if region_source == "template" else "skipped",
            "images_unreadable": len(self.unreadable),
            **self.alignment_summary(),
        }

    def warnings(self) -> list[str]:
        out = super().warnings()
        if self.no_face and not self.templated:
            hint = "; --region-source template labels them from the template" if self.template_hint else ""
            out.append(f"no face found in {len(self.no_face)} image(s) (skipped{hint}), e.g. {self.no_face[0]}")
        if self.templated:
            out.append(f"no face found or face rejected in {len(self.templated)} image(s): regions taken from the aligned-face template")
        if self.rejected_images:
            reasons = ", ".join(f"{r} {len(self.rejected[r])}" for r in REJECTION_REASONS if self.rejected.get(r))
            handling = "labelled from the template" if self.templated else "skipped"
            out.append(f"quality gate rejected the face in {len(self.rejected_images)} image(s) ({reasons}; {handling}), e.g. {self.rejected_images[0]}")
        if self.multiple_faces:
            out.append(f"{len(self.multiple_faces)} image(s) hold more than one face: the largest was analysed, e.g. {self.multiple_faces[0]}")
        if self.low_face_share:
            hint = "; --align auto aligns them" if self.align == "none" else "; --align always warps every face to the template"
            out.append(f"the face covers under {FACE_SHARE_WARNING:.0%} of the tokens in {len(self.low_face_share)} image(s) "
                       f"analysed as given (the model sees mostly background{hint}), e.g. {self.low_face_share[0]}")
        out += self.cache_problems
        return [" ".join(w.split()) for w in out]  # one line each, whatever the file names hold


@dataclass(frozen=True)
class ImageBatch:
    """A model-ready batch: ``images`` ``[B, 3, S, S]``, ``ids``, per token grid the region
    fractions ``[B, R, rows, cols]`` (empty without face preparation), and the number of
    ``files`` the batch's group consumed (unreadable ones included)."""

    images: torch.Tensor
    ids: list[str]
    fractions: dict[tuple[int, int], np.ndarray]
    files: int = 0


def read_images(paths: Sequence[Path], stats: ImageStats, max_side: int = MAX_SIDE) -> list[tuple[str, np.ndarray]]:
    """``(id, uint8 RGB image)`` of each readable file; unreadable ones go to ``stats.unreadable``.

    Images with a long side over ``max_side`` are decoded reduced
    (:func:`facemoe_model.data.images.read_image_scaled`) and noted in ``stats.reduced``;
    smaller ones are read exactly as :func:`~facemoe_model.data.images.read_image` reads them.
    """
    images = []
    for path in paths:
        try:
            image, scale = read_image_scaled(path, max_side)
        except DataError as exc:
            stats.unreadable.append((str(path), str(exc)))
            continue
        if not np.array_equal(scale, [1.0, 1.0]):
            stats.reduced[str(path)] = (Path(path), scale)
        images.append((str(path), image))
    return images


def image_batches(
    paths: Sequence[Path],
    input_size: int,
    groups: Iterable[Sequence[int]],
    *,
    batch_size: int | None = None,
    min_images: int = 1,
    prepare: Callable[[list[tuple[str, np.ndarray]]], Iterable[Prepared]] | None = None,
    stats: ImageStats | None = None,
) -> Iterator[ImageBatch]:
    """Model-ready batches of ``paths``, group by group.

    Each group of path indices is read (unreadable files skipped), passed through ``prepare``
    (which may drop images and adds their region fractions; default: none; it may return an
    iterator, consumed as the batches fill), and cut into batches of ``batch_size`` (default:
    the whole group). A batch of fewer than ``min_images``
    images is not yielded; its size goes to ``stats.dropped``.
    """
    stats = stats if stats is not None else ImageStats()
    stats.found += len(paths)

    def batch(piece: list[Prepared], files: int) -> ImageBatch:
        stats.analysed += len(piece)
        return ImageBatch(
            images=torch.stack([preprocess(image, input_size) for _, image, _ in piece]),
            ids=[image_id for image_id, _, _ in piece],
            fractions={g: np.stack([f[g] for _, _, f in piece]) for g in piece[0][2]},
            files=files,
        )

    for group in groups:
        group = list(group)
        loaded = read_images([paths[i] for i in group], stats)
        items = prepare(loaded) if prepare is not None else [(image_id, image, {}) for image_id, image in loaded]
        piece: list[Prepared] = []
        for item in items:  # prepared lazily: a batch leaves as soon as it is full
            piece.append(item)
            if len(piece) == batch_size:  # never, without a batch size: the whole group is one batch
                yield batch(piece, len(group))
                piece = []
        if piece and len(piece) >= min_images:
            yield batch(piece, len(group))
        elif piece:
            stats.dropped.append(len(piece))


def _fractions(labels: np.ndarray, grids: Sequence[tuple[int, int]], input_size: int, assign: str) -> dict[tuple[int, int], np.ndarray]:
    from .regions import REGIONS, hard_labels, pool_labels_to_grids

    fractions = pool_labels_to_grids(labels, grids, input_hw=(input_size, input_size))
    if assign == "majority":
        fractions = {g: (hard_labels(f)[None] == np.arange(len(REGIONS))[:, None, None]).astype(np.float64)
                     for g, f in fractions.items()}
    return fractions


@dataclass(frozen=True)
class FacePrep:
    """One image prepared for the model: ``image`` (what the model sees: the aligned crop at the
    model input size, or the image as read; None when rejected or without a face), its
    ``landmarks`` in ``image`` pixels (None without a face), the ``outcome``
    (:data:`ALIGN_OUTCOMES`), every quality-gate ``reasons`` and the number of ``faces`` found."""

    image: np.ndarray | None
    landmarks: np.ndarray | None
    outcome: str
    reasons: tuple[str, ...] = ()
    faces: int = 0


def prepare_face(
    image: np.ndarray,
    face,
    mode: str = "auto",
    *,
    output_size: int = INPUT_SIZE,
    source: tuple[Path, np.ndarray] | None = None,
    scale: np.ndarray | None = None,
) -> FacePrep:
    """Gate and align one decoded image given its detection (``moescope.landmarks.DetectedFace``
    or None). ``source`` ``(path, scale)`` of an image decoded reduced: the gate measures the
    face in full-resolution pixels, and the crop is warped from a finer decode when the reduced
    one has under one pixel per crop pixel (:func:`moescope.align.warp_reduction`). ``scale``
    alone (no path): the gate measures in full-resolution pixels, the crop comes from ``image``."""
    if mode not in ALIGN_MODES:
        raise ValueError(f"unknown alignment mode {mode!r}; use one of {', '.join(ALIGN_MODES)}")
    if face is None:
        return FacePrep(None, None, "no_face")
    scale = source[1] if source is not None else (np.ones(2) if scale is None else np.asarray(scale, np.float64))
    full = face.landmarks * scale
    quality = face_quality(full, face.confidence)
    if not quality.accepted:
        return FacePrep(None, None, quality.reasons[0], quality.reasons, face.faces)
    landmarks = face.landmarks
    same = np.array_equal(full, landmarks)  # read at full resolution: the gate measured these very points
    aligned = align_face(image, landmarks, mode=mode, output_size=output_size, measured=quality if same else None)
    if aligned.aligned and source is not None:
        finer = warp_reduction(full)
        if finer < scale.max() / 1.01:
            try:
                image, scale = read_image_scaled(source[0], None, reduction=finer)
            except DataError:
                pass  # keep the crop warped from the coarser decode
            else:
                aligned = align_face(image, full / scale, mode="always", output_size=output_size)
    outcome = "aligned" if aligned.aligned else ("unaligned" if mode == "none" else "canonical")
    return FacePrep(aligned.image, aligned.landmarks, outcome, (), face.faces)


def align_images(
    images: Sequence[np.ndarray],
    mode: str = "auto",
    *,
    output_size: int = INPUT_SIZE,
    use_cache: bool = True,
    workers: int | None = None,
    progress: bool = False,
    on_warning: Callable[[str], None] | None = None,
    scales: Sequence[np.ndarray | None] | None = None,
) -> list[tuple[np.ndarray | None, str]]:
    """``(model image, outcome)`` of each decoded image (``uint8 [H, W, 3]`` RGB): the aligned
    crop (``output_size`` square), the image itself (``canonical`` under ``auto``, every image
    under ``none``, which runs no detection), or None (``no_face`` or a quality-gate reason).
    ``scales``: per image, the full-resolution px per decoded px of an image read reduced
    (:func:`~facemoe_model.data.images.read_image_scaled`), so the gate's minimum face size is
    measured in the original pixels (None: as decoded)."""
    if mode not in ALIGN_MODES:
        raise ValueError(f"unknown alignment mode {mode!r}; use one of {', '.join(ALIGN_MODES)}")
    if mode == "none":
        return [(image, "unaligned") for image in images]
    from .landmarks import detect_faces

    found = detect_faces(images, use_cache=use_cache, workers=workers, progress=progress, on_warning=on_warning)
    out = []
    for index, (image, face) in enumerate(zip(images, found)):
        scale = None if scales is None or scales[index] is None else np.asarray(scales[index], np.float64)
        gate_scale = scale if scale is not None and not np.array_equal(scale, [1.0, 1.0]) else None
        prep = prepare_face(image, face, mode, output_size=output_size, scale=gate_scale)
        out.append((prep.image, prep.outcome))
    return out


def align_image(image: np.ndarray, mode: str = "auto", *, output_size: int = INPUT_SIZE, use_cache: bool = True) -> tuple[np.ndarray | None, str]:
    """:func:`align_images` of one image."""
    return align_images([image], mode, output_size=output_size, use_cache=use_cache)[0]


def _save_name(image_id: str, root: Path | None) -> Path:
    path = Path(image_id)
    try:
        relative = path.relative_to(root) if root is not None else Path(path.name)
    except ValueError:
        relative = Path(path.name)
    return relative if relative.suffix.lower() == ".png" else relative.with_name(relative.name + ".png")


def _save_view(folder: Path, image_id: str, root: Path | None, image: np.ndarray, input_size: int) -> None:
    """Write what the model sees (``input_size`` square, RGB) as a PNG, atomically."""
    view = image if image.shape[:2] == (input_size, input_size) else cv2.resize(image, (input_size, input_size), interpolation=cv2.INTER_LINEAR)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(view, cv2.COLOR_RGB2BGR))
    if ok:
        atomic_write(folder / _save_name(image_id, root), encoded.tobytes())


def _prepare_all(
    loaded: list[tuple[str, np.ndarray]], mode: str, input_size: int, stats: FaceStats, workers: int | None, progress: bool
) -> Iterator[tuple[str, np.ndarray, FacePrep]]:
    """Detect the faces of a chunk of images at once, then gate and align them one by one as
    they are consumed, counting outcomes in ``stats``."""
    from .landmarks import detect_faces

    found = detect_faces([image for _, image in loaded], workers=workers, progress=progress, on_warning=stats.note_cache_problem)
    return _gated(loaded, found, mode, input_size, stats)


def _gated(loaded, found, mode: str, input_size: int, stats: FaceStats) -> Iterator[tuple[str, np.ndarray, FacePrep]]:
    for (image_id, image), face in zip(loaded, found):
        prep = prepare_face(image, face, mode, output_size=input_size, source=stats.reduced.get(image_id))
        if prep.faces > 1:
            stats.multiple_faces.append(image_id)
        if prep.outcome == "no_face":
            stats.no_face.append(image_id)
        elif prep.reasons:
            stats.rejected_images.append(image_id)
            for reason in prep.reasons:
                stats.rejected.setdefault(reason, []).append(image_id)
        elif prep.outcome == "aligned":
            stats.aligned.append(image_id)
        yield image_id, image, prep


def common_root(paths: Sequence[Path]) -> Path | None:
    """The deepest folder holding every one of ``paths`` (None if there is none): ``--save-aligned``
    writes each view at its path relative to it, so names from different folders never collide."""
    try:
        return Path(os.path.commonpath([str(Path(p).parent) for p in paths])) if paths else None
    except ValueError:
        return None


def alignment_preparation(
    input_size: int,
    *,
    align: str = "auto",
    stats: FaceStats,
    workers: int | None = None,
    progress: bool = True,
    save_aligned: str | os.PathLike | None = None,
    save_root: Path | None = None,
) -> Callable[[list[tuple[str, np.ndarray]]], list[Prepared]] | None:
    """The ``prepare`` step of :func:`image_batches` for analyses without regions (CKA): detect,
    gate and align; images without an accepted face are counted in ``stats`` and skipped.
    ``align="none"`` returns None (no detection: the images go in as read) unless
    ``save_aligned`` asks for the model's view to be written."""
    if align not in ALIGN_MODES:
        raise ValueError(f"unknown alignment mode {align!r}; use one of {', '.join(ALIGN_MODES)}")
    stats.align = align
    stats.template_hint = False
    folder = Path(save_aligned) if save_aligned else None
    if align == "none" and folder is None:
        return None

    def prepare(loaded: list[tuple[str, np.ndarray]]) -> list[Prepared]:
        if align == "none":
            kept = [(image_id, image) for image_id, image in loaded]
        else:
            kept = [(i, p.image) for i, _, p in _prepare_all(loaded, align, input_size, stats, workers, progress) if p.image is not None]
        if folder is not None:
            for image_id, image in kept:
                _save_view(folder, image_id, save_root, image, input_size)
        return [(image_id, image, {}) for image_id, image in kept]

    return prepare


def region_preparation(
    grids: Sequence[tuple[int, int]],
    input_size: int,
    *,
    region_source: str = "landmarks",
    assign: str = "soft",
    stats: FaceStats,
    workers: int | None = None,
    progress: bool = True,
    align: str = "auto",
    save_aligned: str | os.PathLike | None = None,
    save_root: Path | None = None,
) -> Callable[[list[tuple[str, np.ndarray]]], Iterator[Prepared]]:
    """The ``prepare`` step of :func:`image_batches` for region-aware analyses: landmarks ->
    quality gate -> alignment (``align``) -> region masks on what the model sees -> fractions on
    each token grid; images without a face or with a rejected one are counted in ``stats`` (and
    skipped, or labelled from the template with ``region_source="template"``). The model's view
    of each analysed image is written under ``save_aligned`` (PNG, paths relative to
    ``save_root``) when given."""
    from .landmarks import template_landmarks
    from .regions import REGIONS, region_labels

    if region_source not in REGION_SOURCES:
        raise ValueError(f"unknown region source {region_source!r}; use one of {', '.join(REGION_SOURCES)}")
    if assign not in ASSIGN_MODES:
        raise ValueError(f"unknown assignment {assign!r}; use one of {', '.join(ASSIGN_MODES)}")
    if align not in ALIGN_MODES:
        raise ValueError(f"unknown alignment mode {align!r}; use one of {', '.join(ALIGN_MODES)}")
    stats.align = align
    grids = list(dict.fromkeys(tuple(g) for g in grids))
    folder = Path(save_aligned) if save_aligned else None
    background = REGIONS.index("hair_background")

    def prepare(loaded: list[tuple[str, np.ndarray]]) -> Iterator[Prepared]:
        for image_id, image, prep in _prepare_all(loaded, align, input_size, stats, workers, progress):
            if prep.image is None:
                if region_source != "template":
                    continue
                stats.templated.append(image_id)
                view, landmarks = image, template_landmarks(*image.shape[:2])
            else:
                view, landmarks = prep.image, prep.landmarks
            h, w = view.shape[:2]
            labels = region_labels(landmarks, h, w)
            fractions = _fractions(labels, grids, input_size, assign)
            if prep.outcome in ("canonical", "unaligned") and grids:
                if 1.0 - float(fractions[grids[0]][background].mean()) < FACE_SHARE_WARNING:
                    stats.low_face_share.append(image_id)
            if folder is not None:
                _save_view(folder, image_id, save_root, view, input_size)
            yield image_id, view, fractions

    return prepare


def face_batches(
    paths: Sequence[Path],
    grids: Sequence[tuple[int, int]],
    input_size: int,
    *,
    batch_size: int = BATCH_SIZE,
    region_source: str = "landmarks",
    assign: str = "soft",
    stats: FaceStats | None = None,
    chunk_size: int = CHUNK_SIZE,
    workers: int | None = None,
    progress: bool = True,
    align: str = "auto",
    save_aligned: str | os.PathLike | None = None,
    save_root: Path | None = None,
) -> Iterator[ImageBatch]:
    """Batches of the face images in ``paths`` with their region fractions on every grid in ``grids``.

    Landmarks are found ``chunk_size`` images at a time (:func:`chunk_plan`); ``stats`` (updated in place) counts
    images found, analysed, without a face, rejected (per reason), aligned, unreadable.
    ``align``, ``save_aligned`` and ``save_root`` as :func:`region_preparation` (default root:
    :func:`common_root` of ``paths``; pass the root of all the images when ``paths`` is a share of them).
    """
    stats = stats if stats is not None else FaceStats()
    prepare = region_preparation(grids, input_size, region_source=region_source, assign=assign, stats=stats,
                                 workers=workers, progress=progress, align=align, save_aligned=save_aligned,
                                 save_root=(save_root or common_root(paths)) if save_aligned else None)
    return image_batches(paths, input_size, chunk_plan(len(paths), batch_size, chunk_size), batch_size=batch_size,
                         prepare=prepare, stats=stats)


def chunk_plan(count: int, batch_size: int, chunk_size: int = CHUNK_SIZE) -> list[range]:
    """Index ranges of ``count`` images prepared together, always whole batches (so a ``torchrun``
    rank's share, cut at batch boundaries, is batched as one process batches it): one batch
    first (the model starts at once), then twice as many each time up to about ``chunk_size``.
    A chunk's images are read and looked up before its first batch leaves, so the growing
    chunks keep that pause shorter than the batches already prepared ahead of the model."""
    full = batch_size * max(1, chunk_size // batch_size)
    bounds, step = [0], min(batch_size, full)
    while bounds[-1] < count:
        bounds.append(min(bounds[-1] + step, count))
        step = min(2 * step, full)
    return [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
