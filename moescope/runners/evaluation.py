"""Face-recognition accuracy of one checkpoint (``moescope eval``).

evaluation data -> :func:`moescope.forward.evaluate_model` -> one table per protocol.

:func:`identity_evaluation_data` is the ``--data DIR`` route: an ``identity/image`` folder ->
(alignment on the image path, rejected faces counted per reason and left out) -> a seeded
closed-set split and balanced verification pairs (:func:`facemoe_model.protocols.identity_protocols`).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pandas as pd
from torch import nn

from facemoe_model.protocols import DEFAULT_MAX_PAIRS, Degradation, EvaluationData, identity_protocols

from ..choices import EVAL_BATCH_SIZE
from ..errors import DataError
from ..forward import evaluate_model
from ..results import AnalysisResult

__all__ = ["AlignmentCount", "align_evaluation_data", "evaluate_checkpoint", "identity_evaluation_data"]

KEPT_OUTCOMES = ("aligned", "canonical", "unaligned")


@dataclass
class AlignmentCount:
    """What alignment did to the evaluation images: outcome -> count, and the first file per outcome."""

    mode: str
    outcomes: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, outcome: str) -> None:
        self.outcomes[outcome] += 1
        self.examples.setdefault(outcome, name)

    @property
    def rejected(self) -> int:
        return sum(n for outcome, n in self.outcomes.items() if outcome not in KEPT_OUTCOMES)

    def summary(self) -> dict:
        return {"mode": self.mode, **{outcome: int(n) for outcome, n in sorted(self.outcomes.items())},
                "rejected": self.rejected, "unreadable": len(self.unreadable)}

    def warnings(self) -> list[str]:
        out = []
        for outcome, n in sorted(self.outcomes.items()):
            if outcome not in KEPT_OUTCOMES:
                what = "no face found" if outcome == "no_face" else f"face rejected ({outcome})"
                out.append(f"{what} in {n} image(s), left out of the evaluation, e.g. {self.examples[outcome]}")
        if self.unreadable:
            out.append(f"skipped {len(self.unreadable)} unreadable file(s), e.g. {self.unreadable[0][0]}: {self.unreadable[0][1]}")
        return out


def _fallback_align_images(images, mode="auto", *, output_size=120, workers=None, progress=False, **_):
    """The ``moescope.faces.align_images`` contract on :mod:`moescope.align` (until faces.py provides it)."""
    from ..align import align_face, face_quality
    from ..landmarks import detect_landmarks

    if mode == "none":
        return [(image, "unaligned") for image in images]
    out = []
    for image, landmarks in zip(images, detect_landmarks(list(images), workers=workers, progress=progress)):
        if landmarks is None:
            out.append((None, "no_face"))
            continue
        quality = face_quality(landmarks)
        if not quality.accepted:
            out.append((None, quality.reasons[0]))
            continue
        face = align_face(image, landmarks, mode=mode, output_size=output_size)
        out.append((face.image, "aligned") if face.aligned else (image, "canonical"))
    return out


def _align_images() -> Callable:
    """The image path's batch alignment (``moescope.faces.align_images``), or the same contract here."""
    try:
        from ..faces import align_images
    except ImportError:
        return _fallback_align_images
    return align_images


def identity_evaluation_data(
    folder: str | os.PathLike,
    size: int,
    *,
    align: str = "auto",
    seed: int = 0,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    workers: int | None = None,
    progress: bool = False,
    chunk_size: int = 256,
) -> EvaluationData:
    """Evaluation data of an identity folder (``DIR/<identity>/**/<image>``): every image read
    (large ones reduced while decoding), aligned with ``align`` (``auto`` | ``always`` | ``none``;
    images without an accepted face are counted and left out), then split and paired with ``seed``
    (:func:`~facemoe_model.protocols.identity_protocols`). Images that alignment leaves unchanged
    keep their file as source (the same tensors and random-routing keys as ``--split``); aligned
    crops are carried as lossless PNG bytes. The data carries the split record (``protocol``), the
    alignment counts (``preparation``) and the warnings (``notes``)."""
    from facemoe_model.data.images import list_identity_folders, read_image_scaled

    listing = list_identity_folders(folder)
    if not listing.files:
        raise DataError(f"{folder}: no images inside identity folders (expected DIR/<identity>/<image>)")
    counts = AlignmentCount(align)
    align_images = _align_images()
    kept: list[tuple[Path | bytes, str]] = []
    names: list[str] = []
    for start in range(0, len(listing.files), chunk_size):
        chunk, images = [], []
        for path, label in listing.files[start : start + chunk_size]:
            try:
                image, scale = read_image_scaled(path)
            except DataError as exc:
                counts.unreadable.append((str(path), str(exc)))
                continue
            chunk.append((path, listing.classes[label], bool(np.allclose(scale, 1.0))))
            images.append(image)
        results = align_images(images, align, output_size=size, workers=workers, progress=progress) if images else []
        for (path, identity, full), image, (model_image, outcome) in zip(chunk, images, results):
            name = path.relative_to(listing.root).as_posix()
            counts.add(name, outcome)
            if model_image is None:
                continue
            if model_image is image and full:  # unchanged: the file itself (bit-identical tensors, same keys)
                source: Path | bytes = path
            else:
                ok, encoded = cv2.imencode(".png", cv2.cvtColor(model_image, cv2.COLOR_RGB2BGR))
                if not ok:
                    raise DataError(f"{path}: cannot encode the aligned crop")
                source = encoded.tobytes()
            kept.append((source, identity))
            names.append(name)
    if not kept:
        raise DataError(f"{folder}: no image has an accepted face ({', '.join(f'{k}: {n}' for k, n in sorted(counts.outcomes.items()))})")
    data, _ = identity_protocols(kept, listing.root, size=size, seed=seed, max_pairs=max_pairs, names=names)
    data.preparation = {"alignment": counts.summary()}
    data.notes = counts.warnings() + [f"{p}: not inside an identity folder (skipped)" for p in listing.stray[:1]]
    return data


def align_evaluation_data(data: EvaluationData, size: int, *, align: str, workers: int | None = None,
                          progress: bool = False, chunk_size: int = 256) -> EvaluationData:
    """``data`` (a ``--split`` / ``--pairs`` / ``--bin`` source) with every image through
    alignment (``align``): an image left unchanged keeps its source; an aligned one becomes its
    crop (PNG bytes); one without an accepted face leaves its split side, and every pair that
    uses it leaves the pairs (their folds stay as they were). Counted in ``preparation`` and ``notes``."""
    from facemoe_model.data.datasets import GalleryProbe, LabelledImages, VerificationPairs
    from facemoe_model.data.images import decode_image

    counts = AlignmentCount(align)
    if align == "none":
        data.preparation = {"alignment": {"mode": "none", "unaligned": data.images, "rejected": 0, "unreadable": 0}}
        return data
    sources = list(dict.fromkeys(source for images in data.datasets for source in images.sources))
    mapped: dict[object, Path | bytes | None] = {}
    align_images = _align_images()
    for start in range(0, len(sources), chunk_size):
        chunk = sources[start : start + chunk_size]
        images = [decode_image(s.read_bytes() if isinstance(s, Path) else s) for s in chunk]
        for position, source, image, (model_image, outcome) in zip(
            range(start, start + len(chunk)), chunk, images,
            align_images(images, align, output_size=size, workers=workers, progress=progress),
        ):
            counts.add(str(source) if isinstance(source, Path) else f"{data.source}[{position}]", outcome)
            if model_image is None:
                mapped[source] = None
            elif model_image is image:
                mapped[source] = source
            else:
                ok, encoded = cv2.imencode(".png", cv2.cvtColor(model_image, cv2.COLOR_RGB2BGR))
                mapped[source] = encoded.tobytes() if ok else None

    def side(images: LabelledImages) -> LabelledImages:
        kept = [(mapped[s], int(label)) for s, label in zip(images.sources, images.labels) if mapped[s] is not None]
        if not kept:
            raise DataError(f"{images.origin}: no image has an accepted face (--align {align})")
        return LabelledImages(kept, images.classes, images.origin, size)

    split = GalleryProbe(side(data.split.gallery), side(data.split.probe)) if data.split is not None else None
    pairs = None
    if data.pairs is not None:
        p = data.pairs
        keep = np.array([mapped[p.sources[a]] is not None and mapped[p.sources[b]] is not None for a, b in p.pairs], dtype=bool)
        if not keep.any():
            raise DataError(f"{p.origin}: no pair has two images with an accepted face (--align {align})")
        used = sorted({int(i) for pair in p.pairs[keep] for i in pair})
        position = {old: new for new, old in enumerate(used)}
        pairs = VerificationPairs([mapped[p.sources[i]] for i in used], np.vectorize(position.get)(p.pairs[keep]).reshape(-1, 2),
                                  p.issame[keep], p.folds[keep], p.origin, size)
    notes = counts.warnings() + list(data.notes)
    if pairs is not None and len(pairs.pairs) < len(data.pairs.pairs):
        notes.append(f"{len(data.pairs.pairs) - len(pairs.pairs)} of {len(data.pairs.pairs)} pairs left out: an image without an accepted face")
    return EvaluationData(source=data.source, split=split, pairs=pairs, protocol=data.protocol,
                          preparation={"alignment": counts.summary()}, notes=notes)


def evaluate_checkpoint(
    model: nn.Module,
    data: EvaluationData,
    *,
    checkpoint: str,
    batch_size: int = EVAL_BATCH_SIZE,
    flip: bool = True,
    probe_transform: Degradation | None = None,
    settings: dict | None = None,
) -> AnalysisResult:
    """Verification and/or identification of ``model`` on ``data``: one table per protocol
    (one row each), the figures as ``summary``, the data sets' skipped files as warnings.

    Data drawn from an identity folder (:func:`identity_evaluation_data`) adds its record to
    ``settings["protocol"]``, tables ``split`` (image, identity, role) and ``pairs``, the chance
    levels ``summary["chance_rank1"]`` (1 / gallery images) and ``chance_verification`` (share of
    the larger pair class), ``summary["alignment"]`` and a warning per reason images were left out.
    """
    protocol, alignment = data.protocol, (data.preparation or {}).get("alignment")
    figures = evaluate_model(model, data, batch_size=batch_size, flip=flip, probe_transform=probe_transform).figures
    tables = {name: pd.DataFrame([metrics]) for name, metrics in figures.items()}
    extra_settings, summary_extra, warnings = {}, {}, []
    if protocol is not None:
        extra_settings["protocol"] = {k: v for k, v in protocol.items() if k not in ("images", "pairs")}
        tables["split"] = pd.DataFrame(protocol["images"], columns=["image", "identity", "role"])
        tables["pairs"] = pd.DataFrame(protocol["pairs"], columns=["first", "second", "same", "fold"])
        if data.split is not None:
            summary_extra["chance_rank1"] = 1.0 / len(data.split.gallery)
        if data.pairs is not None:
            genuine = float(np.mean(data.pairs.issame))
            summary_extra["chance_verification"] = max(genuine, 1.0 - genuine)
    if alignment is not None:
        summary_extra["alignment"] = alignment
    warnings += data.notes
    return AnalysisResult(
        command="eval",
        checkpoints=[checkpoint],
        settings={
            "data": data.source,
            **(settings or {}),
            "batch_size": batch_size,
            "flip": flip,
            "probe_transform": repr(probe_transform) if probe_transform else None,
            **extra_settings,
        },
        tables=tables,
        summary={"images": data.images, **figures, **summary_extra},
        warnings=warnings + [summary for images in data.datasets if (summary := images.skip_summary)],
    )
