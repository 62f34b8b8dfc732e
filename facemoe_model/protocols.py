"""Running a model over an evaluation protocol: gallery/probe identification and verification pairs.

One function per protocol returns that protocol's headline numbers (see
:mod:`facemoe_model.evaluate`); ``moescope eval``, the validation of ``moescope train`` and the
baseline row of ``moescope ablate`` all call them, so one checkpoint on one data set gives the
same figures everywhere.

``probe_transform`` degrades the probe side only (an RGB ``uint8`` -> RGB ``uint8`` callable
such as ``transforms.DownUp(16)``): the probes of an identification split and the second image
of every verification pair. The gallery (first image of a pair) stays as it is, as in
low-resolution face recognition where a high-resolution enrolment meets a low-resolution probe.

An evaluation folder (:func:`load_protocols`) is a gallery/probe split
(``gallery/<id>/``, ``probe/<id>/``, optional ``distractors/``) that may also hold a
verification list ``pairs.txt`` (``path1 path2 label`` relative to the folder);
:func:`write_split` builds one from an identity folder. :func:`identity_protocols` builds both
protocols in memory from identity-labelled images (``moescope eval --data DIR``), seeded.
"""
from __future__ import annotations

import copy
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Sequence

import numpy as np
from torch import nn
from torch.utils.data import Subset

from .data.datasets import INPUT_SIZE, GalleryProbe, ImageSource, LabelledImages, VerificationPairs, gallery_probe_split
from .data.transforms import DownUp
from .errors import DataError
from .evaluate import consecutive_folds, embed_dataset, identification_metrics, verification_metrics
from .fileio import atomic_path, atomic_write

__all__ = [
    "PAIRS_FILE",
    "Degradation",
    "EmbeddingCache",
    "EvaluationData",
    "degraded",
    "evaluate_identification",
    "evaluate_verification",
    "source_key",
    "evaluate",
    "identity_protocols",
    "load_protocols",
    "lowres_probes",
    "write_split",
]

PAIRS_FILE = "pairs.txt"
"""Name of the optional verification list inside an evaluation folder."""

Degradation = Callable[[np.ndarray], np.ndarray]


def lowres_probes(size: int) -> DownUp:
    """The low-resolution probe degradation of ``--lowres S``: area-down to ``S x S``, bicubic back up."""
    return DownUp(size, interpolation="bicubic")


def degraded(dataset: LabelledImages, degrade: Degradation) -> LabelledImages:
    """A shallow copy of ``dataset`` whose decoded images pass through ``degrade`` before its own transform."""
    copied = copy.copy(dataset)
    base = dataset.transform
    copied.transform = lambda image: base(degrade(image))
    return copied


def source_key(source: Path | bytes) -> int:
    """A stable non-negative int64 naming an image by its encoded content (a hash of the file's bytes).

    The random-routing key of the image (:func:`facemoe_model.moe.sample_keys`): under random
    routing an image gets the same experts in every data set, order, batch, cache and folder.
    """
    data = source.read_bytes() if isinstance(source, Path) else bytes(source)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 2


class EmbeddingCache:
    """Flip-fused L2-normalised embeddings of one model, computed once per image and degradation.

    Images are keyed by their source (file path or encoded bytes), so an image shared by an
    identification split and its verification pairs is embedded once; its random-routing key
    is :func:`source_key`. Every data set given to one cache must preprocess images alike (as
    the ones :func:`load_protocols` builds do).
    """

    def __init__(self, model: nn.Module, *, batch_size: int = 64, flip: bool = True, device=None) -> None:
        self.model, self.batch_size, self.flip, self.device = model, batch_size, flip, device
        self._vectors: dict[tuple[object, Degradation | None], np.ndarray] = {}  # (source, degradation) -> vector

    def __call__(self, dataset: LabelledImages, degrade: Degradation | None = None) -> np.ndarray:
        """Embeddings [N, D] of ``dataset`` in order, its images passed through ``degrade`` when given."""
        todo = [i for i, source in enumerate(dataset.sources) if (source, degrade) not in self._vectors]
        if todo:
            images = dataset if degrade is None else degraded(dataset, degrade)
            keys = [source_key(dataset.sources[i]) for i in todo]
            vectors = embed_dataset(self.model, Subset(images, todo), self.batch_size, self.flip, self.device, keys=keys)
            self._vectors.update({(dataset.sources[i], degrade): vector for i, vector in zip(todo, vectors)})
        return np.stack([self._vectors[(source, degrade)] for source in dataset.sources])


def evaluate_identification(
    model: nn.Module,
    split: GalleryProbe,
    *,
    batch_size: int = 64,
    flip: bool = True,
    probe_transform: Degradation | None = None,
    device=None,
    cache: EmbeddingCache | None = None,
) -> dict[str, float]:
    """Closed-set identification of ``split``: probe/gallery/distractor counts and Rank-1/5/10/20.

    ``cache`` reuses embeddings across calls on the same model (it overrides ``batch_size``,
    ``flip`` and ``device``).
    """
    embed = cache or EmbeddingCache(model, batch_size=batch_size, flip=flip, device=device)
    return identification_metrics(embed(split.probe, probe_transform), split.probe.labels, embed(split.gallery), split.gallery.labels)


def evaluate_verification(
    model: nn.Module,
    pairs: VerificationPairs,
    *,
    batch_size: int = 64,
    flip: bool = True,
    probe_transform: Degradation | None = None,
    device=None,
    cache: EmbeddingCache | None = None,
) -> dict[str, float]:
    """Verification of ``pairs``: pair count, 10-fold accuracy (+- std, threshold) and TAR@FAR.

    With ``probe_transform`` pairs compare the clean first image with the degraded second image.
    ``cache`` as in :func:`evaluate_identification`.
    """
    embed = cache or EmbeddingCache(model, batch_size=batch_size, flip=flip, device=device)
    clean = embed(pairs)
    if probe_transform is None:
        return verification_metrics(clean, pairs.pairs, pairs.issame, pairs.folds)
    mixed_pairs = np.stack([pairs.pairs[:, 0], pairs.pairs[:, 1] + len(clean)], axis=1)
    return verification_metrics(np.concatenate([clean, embed(pairs, probe_transform)]), mixed_pairs, pairs.issame, pairs.folds)


@dataclass
class EvaluationData:
    """The protocols of one evaluation source: an identification split and/or verification pairs."""

    source: str
    split: GalleryProbe | None = None
    pairs: VerificationPairs | None = None
    protocol: dict | None = None
    """How the protocols were built when they were drawn here (:func:`identity_protocols`'s record)."""
    preparation: dict | None = None
    """What the image path did to the images before (e.g. alignment outcome counts)."""
    notes: list[str] = field(default_factory=list)
    """One-line warnings about the data (images left out and why)."""

    @property
    def datasets(self) -> list[LabelledImages]:
        """The image sets of all protocols: gallery, probes, pair images."""
        split = [self.split.gallery, self.split.probe] if self.split is not None else []
        return split + ([self.pairs] if self.pairs is not None else [])

    @property
    def images(self) -> int:
        """Distinct images of all protocols (an image of both the split and the pairs counts once)."""
        return len({source for images in self.datasets for source in images.sources})


def load_protocols(
    split: str | os.PathLike | None = None,
    pairs: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    bin_file: str | os.PathLike | None = None,
    size: int = INPUT_SIZE,
) -> EvaluationData:
    """Load exactly one evaluation source.

    Args:
        split: a gallery/probe folder; its ``pairs.txt``, when present, adds verification.
        pairs: a pairs list (LFW ``pairs.txt`` or ``path1 path2 label``), paths under ``root``.
        root: image root of ``pairs`` (default: the pairs file's folder).
        bin_file: an insightface verification ``.bin``.
        size: model input side.
    """
    given = [name for name, value in (("split", split), ("pairs", pairs), ("bin", bin_file)) if value is not None]
    if len(given) != 1:
        raise DataError(f"give exactly one evaluation source (split folder, pairs list or .bin), got {len(given)}: {', '.join(given) or 'none'}")
    if split is not None:
        folder = Path(split)
        if not folder.is_dir():
            raise DataError(f"{folder}: evaluation split folder not found")
        pairs_file = folder / PAIRS_FILE
        return EvaluationData(
            source=str(folder),
            split=gallery_probe_split(folder, size),
            pairs=VerificationPairs.from_pairs_file(pairs_file, folder, size) if pairs_file.is_file() else None,
        )
    if pairs is not None:
        if not Path(pairs).is_file():
            raise DataError(f"{pairs}: pairs list not found")
        return EvaluationData(source=str(pairs), pairs=VerificationPairs.from_pairs_file(pairs, root, size))
    if not Path(bin_file).is_file():
        raise DataError(f"{bin_file}: verification .bin not found")
    return EvaluationData(source=str(bin_file), pairs=VerificationPairs.from_bin(bin_file, size))


def evaluate(
    model: nn.Module,
    data: EvaluationData,
    *,
    batch_size: int = 64,
    flip: bool = True,
    probe_transform: Degradation | None = None,
    device=None,
    cache: EmbeddingCache | None = None,
) -> dict[str, dict[str, float]]:
    """Every protocol ``data`` holds: ``{"identification": {...}, "verification": {...}}``.

    One :class:`EmbeddingCache` (``cache``, or a new one) serves both protocols.
    """
    cache = cache or EmbeddingCache(model, batch_size=batch_size, flip=flip, device=device)
    results = {}
    if data.split is not None:
        results["identification"] = evaluate_identification(model, data.split, probe_transform=probe_transform, cache=cache)
    if data.pairs is not None:
        results["verification"] = evaluate_verification(model, data.pairs, probe_transform=probe_transform, cache=cache)
    return results


def write_split(
    identity_folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    gallery_per_identity: int = 1,
    impostor_pairs: int | None = None,
    impostor_group: Callable[[str], Hashable] | None = None,
    seed: int = 0,
) -> Path:
    """Turn an identity folder (``<id>/<image>``) into an evaluation folder with verification pairs.

    The first ``gallery_per_identity`` images of each identity (sorted names) go to
    ``gallery/<id>/``, the rest to ``probe/<id>/``. ``pairs.txt`` lists every genuine pair of
    an identity's images, gallery images first, and as many impostor pairs (default) drawn with
    ``seed`` between different identities; pairs are shuffled so the 10 consecutive folds mix
    both kinds. Identities with fewer than ``gallery_per_identity + 1`` images are refused.

    ``impostor_group`` maps an identity name to a group (e.g. its hair style): impostor pairs
    then join two identities of the same group — look-alikes, as in CPLFW — instead of any two.
    """
    source, out = Path(identity_folder), Path(out_dir)
    identities = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")) if source.is_dir() else []
    if len(identities) < 2:
        raise DataError(f"{source}: need at least 2 identity folders to build a split, found {len(identities)}")
    rng = np.random.default_rng(seed)
    images: dict[str, list[str]] = {}
    for folder in identities:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        if len(files) <= gallery_per_identity:
            raise DataError(f"{folder}: {len(files)} images, need more than {gallery_per_identity} for gallery + probe")
        images[folder.name] = []
        for position, file in enumerate(files):
            side = "gallery" if position < gallery_per_identity else "probe"
            atomic_path(out / side / folder.name / file.name, lambda tmp, file=file: shutil.copyfile(file, tmp))
            images[folder.name].append(f"{side}/{folder.name}/{file.name}")
    genuine = [(a, b, 1) for paths in images.values() for i, a in enumerate(paths) for b in paths[i + 1 :]]
    groups: dict[Hashable, list[str]] = {}
    for name in images:
        groups.setdefault(impostor_group(name) if impostor_group else None, []).append(name)
    groups = {key: names for key, names in groups.items() if len(names) >= 2}
    if not groups:
        raise DataError(f"{source}: no two identities share an impostor group")
    group_names = list(groups)
    group_weights = np.array([len(groups[key]) for key in group_names], dtype=np.float64)
    impostors = []
    for _ in range(len(genuine) if impostor_pairs is None else impostor_pairs):
        names = groups[group_names[rng.choice(len(group_names), p=group_weights / group_weights.sum())]]
        first, second = rng.choice(len(names), size=2, replace=False)
        impostors.append((rng.choice(images[names[first]]), rng.choice(images[names[second]]), 0))
    pairs = genuine + impostors
    lines = [f"{a} {b} {label}" for a, b, label in (pairs[i] for i in rng.permutation(len(pairs)))]
    atomic_write(out / PAIRS_FILE, "\n".join(lines) + "\n")
    return out


DEFAULT_MAX_PAIRS = 6000
"""Verification pairs :func:`identity_protocols` draws at most (half genuine, half impostor; LFW's 6000)."""


def identity_protocols(
    images: Sequence[tuple[ImageSource, str]],
    origin: str | os.PathLike,
    *,
    size: int = INPUT_SIZE,
    seed: int = 0,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    transform=None,
    names: Sequence[str] | None = None,
) -> tuple[EvaluationData, dict]:
    """Both protocols from identity-labelled images ``(source, identity)`` (readable ones), seeded.

    Identification (closed set): per identity with two or more images, one image drawn with
    ``seed`` is its gallery image and the others are probes; an identity with one image only
    joins the gallery as a distractor (label -1: no probe can match it, it can only be a wrong
    rank-1 answer). Verification: ``min(all genuine pairs, max_pairs // 2)`` genuine pairs drawn
    without replacement from all same-identity pairs, and as many impostor pairs of two images
    of different identities (distinct pairs, uniformly over images), shuffled together and cut
    into 10 consecutive folds (threshold chosen on the other 9 folds, as for every pairs list).

    ``names`` (default: ``str(source)``) names each image in the record. Returns the
    :class:`EvaluationData` and a record: ``seed``, counts, and per image its ``role``
    (``gallery`` / ``probe`` / ``distractor``) and every pair, so the split can be reproduced.
    """
    names = [str(source) for source, _ in images] if names is None else list(names)
    by_identity: dict[str, list[int]] = {}
    for index, (_, identity) in enumerate(images):
        by_identity.setdefault(identity, []).append(index)
    with_probes = sorted(identity for identity, members in by_identity.items() if len(members) >= 2)
    if len(with_probes) < 2:
        raise DataError(f"{origin}: need at least 2 identities with 2 or more images for a gallery/probe split, found {len(with_probes)}")
    rng = np.random.default_rng(seed)
    classes = with_probes
    label_of = {identity: label for label, identity in enumerate(classes)}
    role = [""] * len(images)
    gallery, probe = [], []
    for identity in sorted(by_identity):
        members = by_identity[identity]
        if len(members) == 1:
            role[members[0]] = "distractor"
            gallery.append((images[members[0]][0], -1))
            continue
        chosen = members[int(rng.integers(len(members)))]
        for index in members:
            role[index] = "gallery" if index == chosen else "probe"
            (gallery if index == chosen else probe).append((images[index][0], label_of[identity]))
    genuine_all = [(a, b) for identity in with_probes for i, a in enumerate(by_identity[identity]) for b in by_identity[identity][i + 1 :]]
    n_genuine = min(len(genuine_all), max(max_pairs // 2, 1))
    genuine = [genuine_all[i] for i in sorted(rng.choice(len(genuine_all), size=n_genuine, replace=False))]
    identity_of = np.array([identity for _, identity in images], dtype=object)
    impostor_available = (len(images) ** 2 - sum(len(m) ** 2 for m in by_identity.values())) // 2
    n_impostor = min(n_genuine, impostor_available)
    impostors: set[tuple[int, int]] = set()
    while len(impostors) < n_impostor:
        a, b = (int(x) for x in rng.integers(len(images), size=2))
        if identity_of[a] != identity_of[b]:
            impostors.add((min(a, b), max(a, b)))
    pair_list = [(a, b, True) for a, b in genuine] + [(a, b, False) for a, b in sorted(impostors)]
    pair_list = [pair_list[i] for i in rng.permutation(len(pair_list))]
    used = sorted({i for a, b, _ in pair_list for i in (a, b)})
    position = {image: k for k, image in enumerate(used)}
    pairs = VerificationPairs(
        [images[i][0] for i in used],
        np.array([(position[a], position[b]) for a, b, _ in pair_list], dtype=np.int64).reshape(-1, 2),
        np.array([same for _, _, same in pair_list], dtype=bool),
        consecutive_folds(len(pair_list)),
        origin, size, transform,
    )
    split = GalleryProbe(
        gallery=LabelledImages(gallery, classes, origin, size, transform),
        probe=LabelledImages(probe, classes, origin, size, transform),
    )
    record = {
        "seed": seed,
        "identities": len(by_identity),
        "identities_with_probes": len(with_probes),
        "single_image_identities": len(by_identity) - len(with_probes),
        "gallery": len(gallery),
        "probes": len(probe),
        "distractors": len(gallery) - len(with_probes),
        "genuine_pairs": n_genuine,
        "genuine_pairs_available": len(genuine_all),
        "impostor_pairs": len(impostors),
        "images": [{"image": names[i], "identity": images[i][1], "role": role[i]} for i in range(len(images))],
        "pairs": [{"first": names[a], "second": names[b], "same": same, "fold": int(f)}
                  for (a, b, same), f in zip(pair_list, consecutive_folds(len(pair_list)))],
    }
    return EvaluationData(source=str(origin), split=split, pairs=pairs, protocol=record), record
