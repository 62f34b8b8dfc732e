"""Face Mesh landmarks: cached parallel detection with a confidence, and the aligned-face template.

Images come from the one image path (:func:`facemoe_model.data.images.read_image`).

Landmarks are mediapipe Face Mesh's 468 points as ``float32 [468, 2]`` arrays of ``(x, y)``
in continuous pixel coordinates of the original image: pixel ``(row, col)`` covers
``[col, col + 1) x [row, row + 1)``, so its centre is ``(col + 0.5, row + 0.5)``. Points may
lie outside the image (tight crops cut off the face oval).

Small images (112x112 aligned crops, 25x25 LFW crops) are upscaled so that their long side is
``DETECTION_SETTINGS["min_detection_size"]`` px, and where no face is found the image is padded
and tried again (mediapipe's face detector misses faces that fill the frame); the landmarks are
mapped back to the original pixels. Face Mesh looks for several faces; the largest is kept and
the others counted (:class:`DetectedFace`), and mediapipe's face detector scores it (the quality
gate of :mod:`moescope.align` uses the score).

The cache (:func:`detect_faces`) cannot lie: each entry records the content hash of the image,
the mediapipe version, the detector settings and a checksum of its arrays, and is used only when
all of them verify; an unusable cache location is one warning and the run goes on uncached.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import sys
import time
import tempfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from functools import cache
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import cv2
import numpy as np
from tqdm.auto import tqdm

from facemoe_model.geometry import ALIGNED_FIVE_POINTS, ALIGNED_SIZE

from .cache import cache_dir

__all__ = [
    "ALIGNED_FIVE_POINTS",
    "ALIGNED_SIZE",
    "DETECTION_SETTINGS",
    "CacheWarning",
    "DetectedFace",
    "detect_faces",
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
    # 2: several faces per image (the largest kept, the others counted) and a detection score.
    "version": 2,
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
    # Face Mesh looks for up to this many faces; the largest (landmark hull area) is kept.
    "max_num_faces": 4,
    # The confidence: mediapipe face_detection (short-range model, what Face Mesh runs inside)
    # score of the box holding the kept face, best over all padding variants (0 when none does).
    "score_model": 0,
    "min_score_reported": 0.05,
}
"""Everything that determines the detections; part of every cache key and recorded in every entry."""

# Uncached images per extra worker process before a Pool pays for its start-up (~1 s per worker).
MIN_IMAGES_PER_WORKER = 200

TEMPLATE_ASSET = "face_template_468.npy"
NOSE_TIP, MOUTH_CORNERS = 1, (61, 291)


@dataclass(frozen=True)
class DetectedFace:
    """The face kept in one image: its Face Mesh ``landmarks`` (``float32 [468, 2]``, image
    pixels), the detector's ``confidence`` (0-1) and how many ``faces`` Face Mesh found."""

    landmarks: np.ndarray
    confidence: float
    faces: int = 1


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


class _Detector:
    """Face Mesh plus the face detector that scores its faces (one of each per process)."""

    def __init__(self) -> None:
        os.environ.setdefault("GLOG_minloglevel", "2")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import mediapipe as mp

        with _native_stderr_silenced():
            self.mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=True,
                max_num_faces=DETECTION_SETTINGS["max_num_faces"],
                refine_landmarks=DETECTION_SETTINGS["refine_landmarks"],
                min_detection_confidence=DETECTION_SETTINGS["min_detection_confidence"],
            )
            self.scorer = mp.solutions.face_detection.FaceDetection(
                model_selection=DETECTION_SETTINGS["score_model"],
                min_detection_confidence=DETECTION_SETTINGS["min_score_reported"],
            )
            # Start both graphs here, silenced: their native threads log start-up notices
            # (TFLite delegate, absl feedback manager) on the first frame, asynchronously.
            blank = np.zeros((64, 64, 3), np.uint8)
            self.mesh.process(blank)
            self.scorer.process(blank)
            time.sleep(0.05)

    def __enter__(self) -> "_Detector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.mesh.close()
        self.scorer.close()


def _create_face_mesh() -> _Detector:
    return _Detector()


def _padded_variants(image: np.ndarray) -> Iterator[tuple[np.ndarray, int]]:
    for pad_fraction in DETECTION_SETTINGS["pad_fractions"]:
        pad = round(pad_fraction * max(image.shape[:2]))
        yield cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0)), pad


def _score(detector: _Detector, image: np.ndarray, face: np.ndarray) -> float:
    """Best detection score, over the padding variants, of a box whose centre lies inside the
    bounding box of ``face`` (landmarks in ``image`` pixels); 0 when no box does."""
    low, high = face.min(axis=0), face.max(axis=0)
    best = 0.0
    for padded, pad in _padded_variants(image):
        with _native_stderr_silenced():
            found = detector.scorer.process(padded).detections or []
        size = np.array([padded.shape[1], padded.shape[0]])
        for detection in found:
            box = detection.location_data.relative_bounding_box
            centre = np.array([box.xmin + box.width / 2, box.ymin + box.height / 2]) * size - pad
            if (low <= centre).all() and (centre <= high).all():
                best = max(best, float(detection.score[0]))
    return best


def _detect_one(detector: _Detector, image: np.ndarray) -> DetectedFace | None:
    """Upscale + pad ``image``, run Face Mesh, keep the largest face, map its landmarks back to
    ``image`` pixels and score it."""
    from .align import largest_face

    height, width = image.shape[:2]
    upscale = max(1.0, DETECTION_SETTINGS["min_detection_size"] / max(height, width))
    if upscale > 1.0:
        image = cv2.resize(image, (round(width * upscale), round(height * upscale)), interpolation=cv2.INTER_CUBIC)
    scale = np.array([image.shape[1] / width, image.shape[0] / height])
    for padded, pad in _padded_variants(image):
        with _native_stderr_silenced():
            found = detector.mesh.process(padded).multi_face_landmarks
        if found:
            padded_hw = np.array([padded.shape[1], padded.shape[0]])
            faces = [np.array([(p.x, p.y) for p in face.landmark[:NUM_LANDMARKS]]) * padded_hw - pad for face in found]
            kept = faces[largest_face(faces) if len(faces) > 1 else 0]
            confidence = _score(detector, image, kept)
            return DetectedFace((kept / scale).astype(np.float32), confidence, len(faces))
    return None


_worker_detector: Any = None


def _init_worker() -> None:
    global _worker_detector
    # A worker's fd 2 goes to /dev/null for good: mediapipe's native threads log asynchronously
    # (absl/TFLite notices) after any scoped silencing ends; errors still reach the parent as exceptions.
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), 2)
    _worker_detector = _create_face_mesh()


def _detect_in_worker(image: np.ndarray) -> DetectedFace | None:
    return _detect_one(_worker_detector, image)


def _detect_many(images: list[np.ndarray], workers: int) -> Iterator[DetectedFace | None]:
    """Detections of ``images`` in order: in this process, or in a Pool of ``workers`` processes."""
    if workers <= 1:
        with _create_face_mesh() as detector:
            for image in images:
                yield _detect_one(detector, image)
        return
    # spawn: forking a process whose threads (torch, mediapipe) hold locks can deadlock the children.
    context = multiprocessing.get_context("spawn")
    chunksize = max(1, min(16, len(images) // (4 * workers)))
    with context.Pool(workers, initializer=_init_worker) as pool:
        yield from pool.imap(_detect_in_worker, images, chunksize=chunksize)


# ---------------------------------------------------------------------------------------------
# Cache: entries that record what produced them and are verified on read


def default_cache_dir() -> Path:
    """``$MOESCOPE_CACHE/landmarks``, or ``~/.cache/moescope/landmarks`` when the variable is unset."""
    return cache_dir("landmarks")


def _settings_json() -> str:
    return json.dumps(DETECTION_SETTINGS, sort_keys=True)


def _content_hash(image: np.ndarray) -> str:
    """sha256 of the pixels, their dtype and shape: which image an entry belongs to."""
    digest = hashlib.sha256(f"{image.dtype.str}{image.shape}".encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


def _cache_key(image: np.ndarray, content: str | None = None) -> str:
    """The entry name: sha256 of the detector settings and the image's content hash."""
    content = content or _content_hash(image)
    return hashlib.sha256((_settings_json() + content).encode()).hexdigest()


def _cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / key[:2] / f"{key}.npz"


def _checksum(landmarks: np.ndarray, confidence: float, faces: int) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(landmarks, dtype=np.float32).tobytes())
    digest.update(repr((float(confidence), int(faces))).encode())
    return digest.hexdigest()


def _entry_bytes(content: str, found: DetectedFace | None) -> bytes:
    landmarks = np.zeros((0, 2), np.float32) if found is None else np.asarray(found.landmarks, np.float32)
    confidence, faces = (0.0, 0) if found is None else (found.confidence, found.faces)
    record = {
        "image_sha256": content,
        "mediapipe": DETECTION_SETTINGS["mediapipe"],
        "settings": _settings_json(),
        "confidence": float(confidence),
        "faces": int(faces),
        "checksum": _checksum(landmarks, confidence, faces),
    }
    buffer = io.BytesIO()
    np.savez(buffer, landmarks=landmarks, record=np.frombuffer(json.dumps(record, sort_keys=True).encode(), np.uint8))
    return buffer.getvalue()


_NPY_HEADER = re.compile(
    rb"\x93NUMPY\x01\x00(?P<length>..)\{'descr': '(?P<descr>[<>|][fiub][1248])', 'fortran_order': False, "
    rb"'shape': \((?P<shape>(?:\d+, ?)*\d*)\), \} *\n",
    re.DOTALL,
)


def _npy_array(data: bytes) -> np.ndarray:
    """The array in ``.npy`` bytes. The headers ``np.save`` writes for the cache's arrays (version
    1.0, C order, a plain numeric dtype) are read directly; any other header goes to numpy's
    reader, whose general header parsing took half of a cache hit's time."""
    match = _NPY_HEADER.match(data)
    if match is None or match.end() != 10 + int.from_bytes(match["length"], "little"):
        return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    shape = tuple(int(n) for n in match["shape"].split(b",") if n.strip())
    dtype = np.dtype(match["descr"].decode())
    count = math.prod(shape)
    if len(data) - match.end() < count * dtype.itemsize:
        raise ValueError("the array is shorter than its header says")
    return np.frombuffer(data, dtype, count=count, offset=match.end()).reshape(shape).copy()


def _read_cache(path: Path, content: str) -> tuple[bool, DetectedFace | None]:
    """``(hit, detection)``. A miss: the entry is missing, unreadable or malformed, or does not
    verify: made for other pixels, another mediapipe or other settings, or its landmarks do not
    match its checksum."""
    try:
        with zipfile.ZipFile(io.BytesIO(path.read_bytes())) as stored:  # CRC-checked like np.load
            landmarks, raw = (_npy_array(stored.read(f"{name}.npy")) for name in ("landmarks", "record"))
        record = json.loads(raw.tobytes().decode())
        confidence, faces = float(record["confidence"]), int(record["faces"])
        verified = (
            record["image_sha256"] == content
            and record["mediapipe"] == DETECTION_SETTINGS["mediapipe"]
            and record["settings"] == _settings_json()
            and landmarks.dtype == np.float32
            and landmarks.shape == ((NUM_LANDMARKS, 2) if faces else (0, 2))
            and record["checksum"] == _checksum(landmarks, confidence, faces)
            and bool(np.isfinite(landmarks).all())
        )
    except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError, UnicodeDecodeError, zipfile.BadZipFile,
            NotImplementedError, zlib.error):
        return False, None
    if not verified:
        return False, None
    return True, (DetectedFace(landmarks, confidence, faces) if faces else None)


def _write_cache(path: Path, data: bytes) -> None:
    """Temp file + rename, no fsync: an entry torn by a crash fails verification and is redone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:16]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _warn(message: str, on_warning: Callable[[str], None] | None) -> None:
    if on_warning is not None:
        on_warning(message)
    else:
        warnings.warn(message, CacheWarning, stacklevel=3)


class CacheWarning(UserWarning):
    """The landmark cache cannot be used; the run goes on without it."""


def detect_faces(
    images: Sequence[np.ndarray],
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    workers: int | None = None,
    progress: bool = True,
    on_warning: Callable[[str], None] | None = None,
) -> list[DetectedFace | None]:
    """The face kept in each image (:class:`DetectedFace`), None where no face was found.

    Args:
        images: ``uint8 [H, W, 3]`` RGB images (e.g. from :func:`facemoe_model.data.images.read_image`).
        cache_dir: landmark cache folder; default :func:`default_cache_dir`. An entry is named by
            the sha256 of ``DETECTION_SETTINGS`` and the pixels; it records the pixels' hash, the
            mediapipe version, the settings and a checksum of its arrays, all verified on read:
            an entry that does not verify is a miss and is rewritten.
        use_cache: False neither reads nor writes the cache.
        workers: processes for the uncached images; None picks ``min(cpu_count,
            uncached // MIN_IMAGES_PER_WORKER)``; 0 or 1 runs in this process.
        progress: show a tqdm progress bar over the uncached images.
        on_warning: called once with a one-line message when the cache cannot be used (the
            folder is a file, not writable, an entry is a folder ...); the run goes on uncached.
            Default: :class:`CacheWarning` via :func:`warnings.warn`.
    """
    for index, image in enumerate(images):
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
            raise ValueError(f"images[{index}] must be a uint8 [H, W, 3] RGB array")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else (default_cache_dir() if use_cache else None)
    results: list[DetectedFace | None] = [None] * len(images)
    contents: list[str] = [""] * len(images)
    missing: list[int] = []
    for index, image in enumerate(images):
        if use_cache:
            contents[index] = _content_hash(image)
            hit, results[index] = _read_cache(_cache_path(cache, _cache_key(image, contents[index])), contents[index])
            if hit:
                continue
        missing.append(index)
    if not missing:
        return results
    if workers is None:
        workers = min(os.cpu_count() or 1, len(missing) // MIN_IMAGES_PER_WORKER)
    workers = max(1, min(workers, len(missing)))
    detections = _detect_many([images[i] for i in missing], workers)
    failed: list[str] = []
    for index, found in tqdm(
        zip(missing, detections), total=len(missing), disable=not progress, desc="face landmarks", unit="img"
    ):
        results[index] = found
        if use_cache and len(failed) < 2:  # two failures: the cache is off for the rest of the call
            path = _cache_path(cache, _cache_key(images[index], contents[index]))
            try:
                _write_cache(path, _entry_bytes(contents[index], found))
            except OSError as exc:
                failed.append(f"{exc.filename or path}: {exc.strerror or type(exc).__name__}")
    if failed:
        _warn(f"landmark cache {cache} is unusable ({failed[0]}); going on without caching", on_warning)
    return results


def detect_landmarks(
    images: Sequence[np.ndarray],
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    workers: int | None = None,
    progress: bool = True,
    on_warning: Callable[[str], None] | None = None,
) -> list[np.ndarray | None]:
    """Face Mesh landmarks (``float32 [468, 2]``, original pixel coordinates) of each image's
    largest face, None where no face was found: :func:`detect_faces` without the scores."""
    found = detect_faces(images, cache_dir=cache_dir, use_cache=use_cache, workers=workers, progress=progress,
                         on_warning=on_warning)
    return [None if face is None else face.landmarks for face in found]


# ---------------------------------------------------------------------------------------------
# Aligned-face template


def landmark_set(connections: frozenset[tuple[int, int]]) -> list[int]:
    """Sorted landmark indices of a Face Mesh connection set (e.g. ``FACEMESH_LEFT_EYE``)."""
    return sorted({index for edge in connections for index in edge})


@cache
def _eye_sets() -> tuple[np.ndarray, np.ndarray]:
    from .mesh import FACEMESH_LEFT_EYE, FACEMESH_RIGHT_EYE

    right, left = (np.array(landmark_set(eye), dtype=np.intp) for eye in (FACEMESH_RIGHT_EYE, FACEMESH_LEFT_EYE))
    right.flags.writeable = left.flags.writeable = False
    return right, left


_OTHER_POINTS = np.array([NOSE_TIP, *MOUTH_CORNERS], dtype=np.intp)


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """``[5, 2]`` eye centres, nose tip and mouth corners, image-left first (ArcFace order)."""
    right, left = _eye_sets()
    landmarks = np.asarray(landmarks)
    if landmarks.dtype not in (np.float32, np.float64):
        return np.stack([landmarks[right].mean(axis=0), landmarks[left].mean(axis=0), *landmarks[_OTHER_POINTS]])
    # ndarray.mean is add.reduce and a division by the count: the same numbers without mean's
    # per-call overhead (two thirds of this function's time; it runs several times per image)
    points = np.empty((5, 2), landmarks.dtype)
    points[0] = np.add.reduce(landmarks[right], axis=0) / len(right)
    points[1] = np.add.reduce(landmarks[left], axis=0) / len(left)
    points[2:] = landmarks[_OTHER_POINTS]
    return points


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
