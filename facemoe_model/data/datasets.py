"""Real face data: identity folders, verification pairs, gallery/probe splits, insightface ``.bin`` sets.

Every loader is a torch ``Dataset`` of ``(image_tensor, label)`` built on :class:`LabelledImages`.
Images are decoded and preprocessed on the image path (:mod:`facemoe_model.data.images`:
:func:`~facemoe_model.data.images.decode_image`, :func:`~facemoe_model.data.images.preprocess`)
unless a ``transform`` is given. Each file is decoded once when the dataset is built, so files that
cannot be read or are not images are skipped up front (listed in ``skipped`` and reported by
one warning line) instead of failing in the middle of a long run; hidden files and folders
(names starting with ``.``) are ignored. No readable image at all raises :class:`DataError`.
"""
from __future__ import annotations

import functools
import logging
import os
import pickle
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from ..evaluate import consecutive_folds
from .images import INPUT_SIZE, decode_image, identity_folders, list_identity_folders, preprocess, unreadable_reason, visible_files

__all__ = [
    "INPUT_SIZE",
    "preprocess",
    "decode_image",
    "LabelledImages",
    "ImageFolder",
    "GalleryProbe",
    "gallery_probe_split",
    "VerificationPairs",
]

log = logging.getLogger(__name__)

Transform = Callable[[np.ndarray], torch.Tensor]
ImageSource = Path | bytes


def _source_bytes(source: ImageSource) -> bytes:
    return source.read_bytes() if isinstance(source, Path) else source


class LabelledImages(Dataset):
    """``(image_tensor, label)`` for image files or encoded images; label -1 marks a distractor.

    Built from ``(source, label)`` candidates: the ones that do not decode go to ``skipped``.

    Attributes:
        sources: readable image paths (or encoded bytes) in dataset order.
        labels: int64 label per image (index into ``classes``, -1 for distractors).
        classes: identity names, label ``i`` is ``classes[i]``.
        origin: the folder or file the images come from (for messages).
        skipped: ``(path, reason)`` of every input left out (bytes sources: ``origin[position]``).
    """

    def __init__(
        self,
        candidates: Sequence[tuple[ImageSource, int]],
        classes: Sequence[str],
        origin: str | os.PathLike,
        size: int = INPUT_SIZE,
        transform: Transform | None = None,
        skipped: Sequence[tuple[object, str]] = (),
    ) -> None:
        self.origin = str(origin)
        self.classes = list(classes)
        self.skipped = list(skipped)
        kept = []
        for position, (source, label) in enumerate(candidates):
            if (reason := unreadable_reason(source)) is None:
                kept.append((source, label))
            else:
                self.skipped.append((source if isinstance(source, Path) else f"{self.origin}[{position}]", reason))
        if not kept:
            raise DataError(f"{self.origin}: no readable images ({len(candidates)} found)")
        self.sources = [source for source, _ in kept]
        self.labels = np.array([label for _, label in kept], dtype=np.int64)
        self.transform = transform if transform is not None else functools.partial(preprocess, size=size)

    @property
    def skip_summary(self) -> str | None:
        """One line saying what was skipped and why, or None when nothing was."""
        if not self.skipped:
            return None
        reasons = ", ".join(f"{reason}: {count}" for reason, count in Counter(r for _, r in self.skipped).items())
        path, reason = self.skipped[0]
        total = len(self.sources) + len(self.skipped)
        return f"{self.origin}: skipped {len(self.skipped)} of {total} images ({reasons}); first: {path} ({reason})"

    def _warn_skipped(self) -> None:
        if (summary := self.skip_summary) is not None:
            log.warning(summary)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        source = self.sources[index]
        try:
            image = decode_image(_source_bytes(source))
        except OSError:
            image = None
        if image is None:  # it decoded when the dataset was built: the file changed since
            raise DataError(f"{source if isinstance(source, Path) else f'{self.origin}[{index}]'}: no longer a decodable image")
        return self.transform(image), int(self.labels[index])


class ImageFolder(LabelledImages):
    """One sub-folder per identity (``root/<identity>/**/<image>``); labels follow the sorted folder names.

    Files placed directly in ``root`` belong to no identity and are skipped.
    """

    def __init__(self, root: str | os.PathLike, size: int = INPUT_SIZE, transform: Transform | None = None) -> None:
        listing = list_identity_folders(root)
        stray = [(p, "not inside an identity folder") for p in listing.stray]
        super().__init__(listing.files, listing.classes, listing.root, size, transform, stray)
        self._warn_skipped()


@dataclass
class GalleryProbe:
    """A closed-set identification split; both sides share ``classes`` (gallery distractors have label -1)."""

    gallery: LabelledImages
    probe: LabelledImages


def gallery_probe_split(root: str | os.PathLike, size: int = INPUT_SIZE, transform: Transform | None = None) -> GalleryProbe:
    """Load ``root/gallery/<id>/...``, ``root/probe/<id>/...`` and optional ``root/distractors/...`` (TinyFace layout).

    Labels index the sorted union of gallery and probe identity names; every distractor image
    (any depth under ``distractors/``) joins the gallery with label -1.
    """
    root = Path(root)
    gallery_folders, probe_folders = identity_folders(root / "gallery"), identity_folders(root / "probe")
    classes = sorted({f.name for f in gallery_folders} | {f.name for f in probe_folders})
    label_of = {name: label for label, name in enumerate(classes)}

    def candidates(folders: list[Path]) -> list[tuple[Path, int]]:
        return [(path, label_of[folder.name]) for folder in folders for path in visible_files(folder)]

    distractors = [(path, -1) for path in visible_files(root / "distractors")]  # none when the folder is absent
    gallery_candidates = candidates(gallery_folders) + distractors
    split = GalleryProbe(
        gallery=LabelledImages(gallery_candidates, classes, root / "gallery", size, transform),
        probe=LabelledImages(candidates(probe_folders), classes, root / "probe", size, transform),
    )
    split.gallery._warn_skipped()
    split.probe._warn_skipped()
    return split


class _RefusedGlobal(Exception):
    """A pickle asked for a global that an insightface .bin never contains."""


class _VerificationBinUnpickler(pickle.Unpickler):
    """Unpickles only what insightface ``.bin`` files hold: bytes, lists, bools, numpy bool arrays.

    Plain containers need no globals; a numpy array needs exactly its reconstructor, ``ndarray``
    and ``dtype``. Any other global (``os.system``, ``builtins.eval`` ...) is refused before it
    is resolved, so nothing in the file is ever executed.
    """

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),  # the same function as written by numpy >= 2
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise _RefusedGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def _read_verification_bin(path: Path) -> tuple[list[bytes], np.ndarray]:
    """``(jpeg_bytes_list, issame)`` from an insightface ``.bin``, read with the restricted unpickler."""
    try:
        with path.open("rb") as fh:
            content = _VerificationBinUnpickler(fh, encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise DataError(f"{path}: refused to unpickle global {exc}; an insightface .bin holds only image bytes and a same/different list") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # any malformed pickle
        raise DataError(f"{path}: not an insightface .bin ({type(exc).__name__}: {exc})") from None
    if not (isinstance(content, (tuple, list)) and len(content) == 2):
        raise DataError(f"{path}: expected a pickled (images, issame) pair")
    bins, issame = content
    issame = np.asarray(issame)
    if not isinstance(bins, list) or not all(isinstance(b, (bytes, bytearray)) for b in bins):
        raise DataError(f"{path}: images must be a list of encoded image bytes")
    if issame.dtype != np.bool_ or issame.ndim != 1 or len(bins) != 2 * len(issame) or not len(issame):
        raise DataError(f"{path}: expected {len(bins) // 2} same/different booleans for {len(bins)} images, got {issame.dtype} {issame.shape}")
    return [bytes(b) for b in bins], issame


class VerificationPairs(LabelledImages):
    """Images of a verification protocol; ``dataset[i] = (image_tensor, i)``.

    Attributes (one row per kept pair):
        pairs: int array [P, 2], indices of the two images of each pair.
        issame: bool array [P], True for a genuine (same identity) pair.
        folds: int array [P], the pair's fold in the 10-fold protocol (from the file's order).
        dropped_pairs: pairs left out because one of their images is missing or unreadable.
    """

    def __init__(
        self,
        sources: Sequence[ImageSource],
        pairs: np.ndarray,
        issame: np.ndarray,
        folds: np.ndarray,
        origin: str | os.PathLike,
        size: int = INPUT_SIZE,
        transform: Transform | None = None,
    ) -> None:
        super().__init__([(source, i) for i, source in enumerate(sources)], [], origin, size, transform)
        readable = np.zeros(len(sources), dtype=bool)
        readable[self.labels] = True
        keep_pair = readable[pairs].all(axis=1)
        if not keep_pair.any():
            raise DataError(f"{self.origin}: no pair has two readable images ({len(pairs)} pairs)")
        self.pairs = np.searchsorted(self.labels, pairs[keep_pair])
        self.issame = np.asarray(issame, dtype=bool)[keep_pair]
        self.folds = np.asarray(folds, dtype=np.int64)[keep_pair]
        self.dropped_pairs = int((~keep_pair).sum())
        self.labels = np.arange(len(self.sources))
        self._warn_skipped()

    @property
    def skip_summary(self) -> str | None:
        summary = super().skip_summary
        return None if summary is None else f"{summary}; dropped {self.dropped_pairs} of {self.dropped_pairs + len(self.pairs)} pairs"

    @classmethod
    def from_pairs_file(
        cls,
        pairs_file: str | os.PathLike,
        root: str | os.PathLike | None = None,
        size: int = INPUT_SIZE,
        transform: Transform | None = None,
    ) -> VerificationPairs:
        """Read an LFW ``pairs.txt`` or a simple ``path1 path2 label`` list.

        LFW format: a header ``<sets> <n>`` then, per set, ``n`` lines ``name i j`` (same) and ``n``
        lines ``name1 i name2 j`` (different); images are ``root/name/name_%04d.jpg`` and the
        sets are the folds. Simple format (no header): ``path1 path2 label`` with label 1 = same,
        0 = different, relative paths resolved against ``root``. Without sets in the file (simple
        format, or a one-number LFW header), pairs form 10 consecutive folds. ``root`` defaults
        to the pairs file's folder.
        """
        pairs_file = Path(pairs_file)
        root = Path(root) if root is not None else pairs_file.parent
        try:
            text = pairs_file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{pairs_file}: cannot read pairs list ({exc})") from None
        rows = [(number, line.split()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
        if not rows:
            raise DataError(f"{pairs_file}: empty pairs list")
        header = rows[0][1]
        is_lfw = len(header) in (1, 2) and all(token.isdigit() for token in header)
        paths, issame = [], []
        for number, fields in rows[1:] if is_lfw else rows:
            try:
                (a, b), same = _lfw_pair(root, fields) if is_lfw else _simple_pair(root, fields)
            except ValueError:
                expected = "'name i j' or 'name1 i name2 j'" if is_lfw else "'path1 path2 label' with label 0 or 1"
                raise DataError(f"{pairs_file}:{number}: expected {expected}, got {' '.join(fields)!r}") from None
            paths += [a, b]
            issame.append(same)
        n_pairs = len(issame)
        if is_lfw and len(header) == 2:
            n_sets, per_set = map(int, header)
            if n_pairs != 2 * n_sets * per_set:
                raise DataError(f"{pairs_file}: header promises {n_sets} sets of 2x{per_set} pairs, file has {n_pairs}")
            folds = np.arange(n_pairs) // (2 * per_set)
        else:
            folds = consecutive_folds(n_pairs)
        unique = list(dict.fromkeys(paths))
        index = {p: i for i, p in enumerate(unique)}
        pairs = np.array([index[p] for p in paths], dtype=np.int64).reshape(-1, 2)
        return cls(unique, pairs, np.array(issame), folds, pairs_file, size, transform)

    @classmethod
    def from_bin(cls, path: str | os.PathLike, size: int = INPUT_SIZE, transform: Transform | None = None) -> VerificationPairs:
        """Read an insightface verification ``.bin`` (images ``2i`` and ``2i+1`` form pair ``i``; 10 consecutive folds)."""
        path = Path(path)
        bins, issame = _read_verification_bin(path)
        pairs = np.arange(len(bins), dtype=np.int64).reshape(-1, 2)
        return cls(bins, pairs, issame, consecutive_folds(len(issame)), path, size, transform)


def _lfw_pair(root: Path, fields: list[str]) -> tuple[tuple[Path, Path], bool]:
    def image(name: str, number: str) -> Path:
        return root / name / f"{name}_{int(number):04d}.jpg"

    if len(fields) == 3:
        return (image(fields[0], fields[1]), image(fields[0], fields[2])), True
    if len(fields) == 4:
        return (image(fields[0], fields[1]), image(fields[2], fields[3])), False
    raise ValueError(fields)


def _simple_pair(root: Path, fields: list[str]) -> tuple[tuple[Path, Path], bool]:
    if len(fields) != 3 or fields[2] not in ("0", "1"):
        raise ValueError(fields)
    return (root / fields[0], root / fields[1]), fields[2] == "1"
