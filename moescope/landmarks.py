"""Face Mesh landmarks: cached parallel detection and the aligned-face template.

Images come from the one image path (:func:`facemoe_model.data.images.read_image`).

Landmarks are mediapipe Face Mesh's 468 points as ``float32 [468, 2]`` arrays of ``(x, y)``
in continuous pixel coordinates of the original image: pixel ``(row, col)`` covers
``[col, col + 1) x [row, row + 1)``, so its centre is ``(col + 0.5, row + 0.5)``. Points may
lie outside the image (tight crops cut off the face oval).

Small images (112x112 aligned crops, 25x25 LFW crops) are upscaled so that their long side is
``DETECTION_SETTINGS["min_detection_size"]`` px, and where no face is found the image is padded
and tried again (mediapipe's face detector misses faces that fill the frame); the landmarks are
mapped back to the original pixels.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import sys
from functools import cache
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Iterator, Sequence

import cv2
import numpy as np
from tqdm.auto import tqdm

from facemoe_model.fileio import atomic_write
from facemoe_model.geometry import ALIGNED_FIVE_POINTS, ALIGNED_SIZE

from .cache import cache_dir

__all__ = [
    "ALIGNED_FIVE_POINTS",
    "ALIGNED_SIZE",
    "DETECTION_SETTINGS",
    "NUM_LANDMARKS",
    "build_template",
    "default_cache_dir",
    "detect_landmarks",
    "five_points",
    "landmark_set",
    "template_landmarks",
]

NUM_LANDMARKS = 468

DETECTION_SETTINGS: dict[str, Any] = {
    "version": 1,
    "mediapipe": metadata.version("mediapipe"),
    # Images whose long side is shorter are upscaled (bicubic) to it before detection.
    "min_detection_size": 256,
    # Padding (fraction of the long side, on each border) tried in order until a face is found:
    # the image as given first (padding a photo shrinks its face in the detector's view and costs
    # accuracy: landmarks move by ~7% of the eye distance on skimage's astronaut), then with
    # context for tight crops (LFW 25x25: 95 of 100 found unpadded, 100 padded).
    "pad_fractions": (0.0, 0.25),
    "min_detection_confidence": 0.5,
    # The attention mesh model: more accurate eyes and lips (synthetic faces' region tokens agree
    # with their ground truth 90.4% vs 89.0% without); its 10 extra iris points are dropped.
    "refine_landmarks": True,
}
"""Everything that determines the landmarks; part of every cache key."""

# Uncached images per extra worker process before a Pool pays for its start-up (~1 s per worker).
MIN_IMAGES_PER_WORKER = 200

TEMPLATE_ASSET = "face_template_468.npy"
NOSE_TIP, MOUTH_CORNERS = 1, (61, 291)


# ---------------------------------------------------------------------------------------------
# Detection


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Silence what mediapipe's C++ side (TFLite, absl, glog) prints straight to fd 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _create_face_mesh() -> Any:
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import mediapipe as mp

    with _native_stderr_silenced():
        return mp.solutions.face_mesh.FaceMesh(
            static_image_mode=True,
            max_num_faces=1,
            refine_landmarks=DETECTION_SETTINGS["refine_landmarks"],
            min_detection_confidence=DETECTION_SETTINGS["min_detection_confidence"],
        )


def _detect_one(face_mesh: Any, image: np.ndarray) -> np.ndarray | None:
    """Upscale + pad ``image``, run Face Mesh, map the landmarks back to ``image`` pixels."""
    height, width = image.shape[:2]
    upscale = max(1.0, DETECTION_SETTINGS["min_detection_size"] / max(height, width))
    if upscale > 1.0:
        image = cv2.resize(image, (round(width * upscale), round(height * upscale)), interpolation=cv2.INTER_CUBIC)
    scale = np.array([image.shape[1] / width, image.shape[0] / height])
    for pad_fraction in DETECTION_SETTINGS["pad_fractions"]:
        pad = round(pad_fraction * max(image.shape[:2]))
        padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        with _native_stderr_silenced():
            found = face_mesh.process(padded).multi_face_landmarks
        if found:
            normalised = np.array([(p.x, p.y) for p in found[0].landmark[:NUM_LANDMARKS]])
            padded_hw = np.array([padded.shape[1], padded.shape[0]])
            return ((normalised * padded_hw - pad) / scale).astype(np.float32)
    return None


_worker_face_mesh: Any = None


def _init_worker() -> None:
    global _worker_face_mesh
    _worker_face_mesh = _create_face_mesh()


def _detect_in_worker(image: np.ndarray) -> np.ndarray | None:
    return _detect_one(_worker_face_mesh, image)


def _detect_many(images: list[np.ndarray], workers: int) -> Iterator[np.ndarray | None]:
    """Landmarks of ``images`` in order: in this process, or in a Pool of ``workers`` processes."""
    if workers <= 1:
        with _create_face_mesh() as face_mesh:
            for image in images:
                yield _detect_one(face_mesh, image)
        return
    # spawn: forking a process whose threads (torch, mediapipe) hold locks can deadlock the children.
    context = multiprocessing.get_context("spawn")
    chunksize = max(1, min(16, len(images) // (4 * workers)))
    with context.Pool(workers, initializer=_init_worker) as pool:
        yield from pool.imap(_detect_in_worker, images, chunksize=chunksize)


# ---------------------------------------------------------------------------------------------
# Cache


def default_cache_dir() -> Path:
    """``$MOESCOPE_CACHE/landmarks``, or ``~/.cache/moescope/landmarks`` when the variable is unset."""
    return cache_dir("landmarks")


def _cache_key(image: np.ndarray) -> str:
    digest = hashlib.sha256(json.dumps(DETECTION_SETTINGS, sort_keys=True).encode())
    digest.update(f"{image.dtype.str}{image.shape}".encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


def _cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / key[:2] / f"{key}.npy"


def _read_cache(path: Path) -> tuple[bool, np.ndarray | None]:
    """``(hit, landmarks)``; a missing, unreadable or malformed entry is a miss."""
    try:
        stored = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False, None
    if stored.dtype != np.float32 or stored.shape not in ((NUM_LANDMARKS, 2), (0, 2)):
        return False, None
    if not np.isfinite(stored).all():
        return False, None
    return True, (stored if len(stored) else None)


def _write_cache(path: Path, landmarks: np.ndarray | None) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((0, 2), np.float32) if landmarks is None else landmarks)
    atomic_write(path, buffer.getvalue())


def detect_landmarks(
    images: Sequence[np.ndarray],
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    workers: int | None = None,
    progress: bool = True,
) -> list[np.ndarray | None]:
    """Face Mesh landmarks (``float32 [468, 2]``, original pixel coordinates) of each image.

    Args:
        images: ``uint8 [H, W, 3]`` RGB images (e.g. from :func:`facemoe_model.data.images.read_image`).
        cache_dir: landmark cache folder; default :func:`default_cache_dir`. Entries are keyed
            by the sha256 of the pixels, shape and ``DETECTION_SETTINGS``, so a repeated run
            over the same images does not run mediapipe; corrupt entries are recomputed.
        use_cache: False neither reads nor writes the cache.
        workers: processes for the uncached images; None picks ``min(cpu_count,
            uncached // MIN_IMAGES_PER_WORKER)``; 0 or 1 runs in this process.
        progress: show a tqdm progress bar over the uncached images.

    Returns:
        One entry per image, None where no face was found (callers count and handle those).
    """
    for index, image in enumerate(images):
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
            raise ValueError(f"images[{index}] must be a uint8 [H, W, 3] RGB array")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    results: list[np.ndarray | None] = [None] * len(images)
    cache_paths: list[Path | None] = [None] * len(images)
    missing: list[int] = []
    for index, image in enumerate(images):
        if use_cache:
            cache_paths[index] = _cache_path(cache, _cache_key(image))
            hit, results[index] = _read_cache(cache_paths[index])
            if hit:
                continue
        missing.append(index)
    if not missing:
        return results
    if workers is None:
        workers = min(os.cpu_count() or 1, len(missing) // MIN_IMAGES_PER_WORKER)
    workers = max(1, min(workers, len(missing)))
    detections = _detect_many([images[i] for i in missing], workers)
    for index, landmarks in tqdm(
        zip(missing, detections), total=len(missing), disable=not progress, desc="face landmarks", unit="img"
    ):
        results[index] = landmarks
        if use_cache:
            _write_cache(cache_paths[index], landmarks)
    return results


# ---------------------------------------------------------------------------------------------
# Aligned-face template


def landmark_set(connections: frozenset[tuple[int, int]]) -> list[int]:
    """Sorted landmark indices of a Face Mesh connection set (e.g. ``FACEMESH_LEFT_EYE``)."""
    return sorted({index for edge in connections for index in edge})


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """``[5, 2]`` eye centres, nose tip and mouth corners, image-left first (ArcFace order)."""
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_LEFT_EYE, FACEMESH_RIGHT_EYE

    return np.stack(
        [
            landmarks[landmark_set(FACEMESH_RIGHT_EYE)].mean(axis=0),
            landmarks[landmark_set(FACEMESH_LEFT_EYE)].mean(axis=0),
            landmarks[NOSE_TIP],
            landmarks[MOUTH_CORNERS[0]],
            landmarks[MOUTH_CORNERS[1]],
        ]
    )


def build_template(landmark_sets: Sequence[np.ndarray]) -> np.ndarray:
    """Mean Face Mesh landmarks of aligned faces, ``float32 [468, 2]`` in [0, 1] units of the
    aligned crop: each face is mapped by the least-median similarity transform of its
    :func:`five_points` onto ``ALIGNED_FIVE_POINTS`` (112x112 frame), then averaged."""
    aligned = []
    for landmarks in landmark_sets:
        transform, _ = cv2.estimateAffinePartial2D(
            five_points(landmarks).astype(np.float32), ALIGNED_FIVE_POINTS.astype(np.float32), method=cv2.LMEDS
        )
        aligned.append(cv2.transform(landmarks[None].astype(np.float64), transform)[0])
    if not aligned:
        raise ValueError("build_template needs at least one set of landmarks")
    return (np.mean(aligned, axis=0) / ALIGNED_SIZE).astype(np.float32)


@cache
def _template() -> np.ndarray:
    with resources.as_file(resources.files("moescope") / "assets" / TEMPLATE_ASSET) as path:
        return np.load(path, allow_pickle=False)


def template_landmarks(height: int, width: int) -> np.ndarray:
    """Canonical landmarks of an aligned face crop of ``height x width`` px (ArcFace framing,
    any size; non-square crops are stretched like the crop). Shipped in
    ``moescope/assets/face_template_468.npy``, the :func:`build_template` of mediapipe's
    detections on the 100 ``skimage.data.lfw_subset()`` faces (``benchmarks/build_face_template.py``)."""
    return _template() * np.array([width, height], dtype=np.float32)
