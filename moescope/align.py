"""Five-point face alignment, the canonical-crop test, face choice and the face-quality gate.

The official ArcFace/insightface preprocessing, on Face Mesh landmarks: take five points (eye
centres, nose, mouth corners; :func:`alignment_points`), estimate the least-squares similarity
transform (Umeyama 1991, what insightface's ``skimage SimilarityTransform.estimate`` computes)
onto ``ALIGNED_FIVE_POINTS``, warp to the 112x112 frame (``cv2.warpAffine``, bilinear, constant
black border as insightface), then resize to the model input (bilinear; 120 for FaceMoE). The
468 landmarks go through the same matrix, so region masks are built on the aligned crop without
detecting again.

Coordinates are continuous pixel coordinates (pixel ``(row, col)`` covers ``[col, col + 1) x
[row, row + 1)``), as in :mod:`moescope.landmarks`; ``ALIGNED_FIVE_POINTS`` is read in the same
convention, as the synthetic renderer and the landmark template read it (insightface reads it as
pixel indices: its crops sit 0.5 px lower-right of ours).

Large images: :func:`encoded_size` reads the size from the header, :func:`detection_reduction`
picks the scale at which to detect, :func:`decode_reduced` decodes JPEGs at 1/2, 1/4 or 1/8 in
libjpeg (never holding the full-resolution pixels; these three live on the one image path,
:mod:`facemoe_model.data.images`, and are re-exported here) and :func:`warp_reduction` picks the
coarsest scale that still has a source pixel per crop pixel (``benchmarks/bench_large_image.py``:
a 10000x10000 JPEG costs 52 MiB above the imports this way, 577 MiB decoded in full).

Everything here is a pure function of arrays (no mediapipe): detection happens elsewhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import cv2
import numpy as np

from facemoe_model.data.images import JPEG_REDUCTIONS, MAX_SIDE, decode_reduced, encoded_size, reduction_for
from facemoe_model.geometry import ALIGNED_FIVE_POINTS, ALIGNED_SIZE

from .landmarks import NUM_LANDMARKS, five_points

__all__ = [
    "ALIGN_MODES",
    "CANONICAL_MAX_SHIFT",
    "EYE_MOUTH_RANGE",
    "JPEG_REDUCTIONS",
    "MAX_DETECTION_SIDE",
    "MAX_FIT_RESIDUAL",
    "MIN_DETECTION_CONFIDENCE",
    "MIN_INTEROCULAR_PX",
    "MOUTH_WIDTH_RANGE",
    "NOSE_LANDMARK",
    "PREFILTER_BELOW_SCALE",
    "REJECTION_REASONS",
    "AlignedFace",
    "FaceQuality",
    "align_face",
    "alignment_matrix",
    "alignment_points",
    "alignment_shift",
    "apply_transform",
    "decode_reduced",
    "detection_reduction",
    "encoded_size",
    "face_quality",
    "fit_residual",
    "is_canonical",
    "largest_face",
    "similarity_transform",
    "use_alignment",
    "warp_face",
    "warp_reduction",
]

ALIGN_MODES = ("auto", "always", "none")

NOSE_LANDMARK = 4
"""Face Mesh landmark used as the nose point. Measured with the other four points aligned to
the template: landmark 4 lands 0.2 px (100 ``lfw_subset`` faces) / 0.6 px (160 demo faces)
below the ArcFace nose point, landmark 1 (``moescope.landmarks.NOSE_TIP``) 4.0 px below."""

CANONICAL_MAX_SHIFT = 10.0
"""An image is a canonical crop when it is square and aligning it would move its five points
(scaled to the 112 frame) by at most this many px on average (:func:`alignment_shift`; not the
distance to the template, which also holds what no similarity removes: expression, pose). The
bundled demo faces carry a deliberate residual misalignment (roll +-8 deg, scale +-8 %, shift
+-4 %, plus pose): measured 0.5-8.5 px, mean 4.2. The 25x25 ``lfw_subset`` crops (tight LFW
crops, not ArcFace framing): 7.1-27.7 px, mean 14.9 (6 of 100 within). ``astronaut`` 47.6,
``grace_hopper`` 29.7."""

MIN_DETECTION_CONFIDENCE = 0.6
"""Minimum mediapipe face-detection score (short-range model, best over the padding variants
of :mod:`moescope.landmarks`). Measured: bundled demo faces 0.80-0.93, the 100 ``lfw_subset``
faces 0.62 and up, ``astronaut`` 0.92, ``grace_hopper`` 0.94; the ``lfw_subset`` texture that
Face Mesh fits a mesh to (image 110) 0.56, so 0.6 rejects it on confidence too (mediapipe's own
default, 0.5, does not)."""

MIN_INTEROCULAR_PX = 6.0
"""Minimum eye-centre distance in source pixels (the minimum source face size). The 25x25
``lfw_subset`` faces measure 7.1-11.8 px; below 6 px the 112 crop is upsampled ~6x or more."""

MAX_FIT_RESIDUAL = 8.0
"""Maximum mean distance (112-frame px) of the five points from the template after alignment:
what a similarity cannot explain (expression, pose, a bad fit). Measured: demo faces up to 4.8,
``lfw_subset`` faces up to 5.4, ``astronaut`` (broad smile) 4.6, ``grace_hopper`` 1.3."""

MOUTH_WIDTH_RANGE = (0.4, 1.6)
"""Bounds of mouth width / eye distance (template 0.83; lfw faces 0.48-1.15, demo 0.56-1.04)."""

EYE_MOUTH_RANGE = (0.8, 2.0)
"""Bounds of the mouth centre's distance below the eye line / eye distance (template 1.15; lfw
faces 0.83-1.37, demo 0.89-1.57, astronaut 0.86; the ``lfw_subset`` texture image 110: 0.74).
Foreshortening by pitch lowers it, yaw raises it; outside the bounds the mesh is no face."""

REJECTION_REASONS = ("low_confidence", "face_too_small", "poor_fit", "implausible_landmarks")
"""Named reasons of :func:`face_quality`, in report order."""

MAX_DETECTION_SIDE = MAX_SIDE
"""Images with a longer side are detected at a reduced scale (Face Mesh crops the face to
192 px anyway); images up to this size are detected exactly as before."""

PREFILTER_BELOW_SCALE = 0.5
"""When the crop has fewer than this many px per source px (a face over twice the crop size),
the face region is first area-averaged to the crop's scale (a bilinear warp would alias)."""



# ---------------------------------------------------------------------------------------------
# Points and transforms


def alignment_points(landmarks: np.ndarray) -> np.ndarray:
    """``float64 [5, 2]`` alignment points of Face Mesh ``landmarks`` (ArcFace order, image-left
    first): :func:`moescope.landmarks.five_points` with the nose at ``NOSE_LANDMARK``."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (NUM_LANDMARKS, 2):
        raise ValueError(f"landmarks must be [{NUM_LANDMARKS}, 2], got {list(landmarks.shape)}")
    points = np.asarray(five_points(landmarks), dtype=np.float64)
    points[2] = landmarks[NOSE_LANDMARK]
    return points


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``[2, 3]`` least-squares similarity (rotation, uniform scale, translation; no reflection)
    mapping ``source`` ``[N, 2]`` points onto ``target`` (Umeyama 1991; in 2-D its closed form:
    with the centred points as complex numbers, scale x rotation is ``sum(conj(s) d) / sum |s|^2``)."""
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    if source.shape != target.shape or source.ndim != 2 or source.shape[1] != 2 or len(source) < 2:
        raise ValueError(f"need two matching [N >= 2, 2] point sets, got {list(source.shape)} and {list(target.shape)}")
    # the means as ndarray.mean computes them (add.reduce / count), without its per-call overhead
    source_mean, target_mean = np.add.reduce(source, axis=0) / len(source), np.add.reduce(target, axis=0) / len(target)
    src, dst = source - source_mean, target - target_mean
    variance = float((src**2).sum())
    if variance <= 0:
        raise ValueError("source points coincide: no similarity transform")
    a = float((src * dst).sum()) / variance  # real part: scale * cos
    b = float((src[:, 0] * dst[:, 1] - src[:, 1] * dst[:, 0]).sum()) / variance  # imaginary part: scale * sin
    linear = np.array([[a, -b], [b, a]])
    return np.hstack([linear, (target_mean - linear @ source_mean)[:, None]])


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``points`` ``[N, 2]`` mapped by the ``[2, 3]`` affine ``matrix`` (float64)."""
    points = np.asarray(points, np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def _scale_of(matrix: np.ndarray) -> float:
    return math.sqrt(abs(float(np.linalg.det(matrix[:, :2]))))


def alignment_matrix(points: np.ndarray) -> np.ndarray:
    """``[2, 3]`` similarity from five source points to ``ALIGNED_FIVE_POINTS`` (112 frame)."""
    return similarity_transform(points, ALIGNED_FIVE_POINTS)


def fit_residual(points: np.ndarray) -> float:
    """Mean distance (112-frame px) of five points from the template after alignment."""
    aligned = apply_transform(alignment_matrix(points), points)
    return float(np.linalg.norm(aligned - ALIGNED_FIVE_POINTS, axis=1).mean())


def alignment_shift(image_shape: Sequence[int], points: np.ndarray) -> float:
    """Mean distance (112-frame px) aligning would move the five points of an image of
    ``image_shape`` ``(H, W, ...)`` once the image is resized to 112x112 as a whole."""
    height, width = image_shape[:2]
    in_frame = np.asarray(points, np.float64) * (ALIGNED_SIZE / np.array([width, height]))
    moved = apply_transform(alignment_matrix(in_frame), in_frame)
    return float(np.linalg.norm(moved - in_frame, axis=1).mean())


# ---------------------------------------------------------------------------------------------
# Decisions


def is_canonical(image_shape: Sequence[int], points: np.ndarray) -> bool:
    """True when an image of ``image_shape`` with these five points (:func:`alignment_points`)
    already is an aligned crop: square, and ``alignment_shift <= CANONICAL_MAX_SHIFT``."""
    height, width = image_shape[:2]
    return height == width and alignment_shift(image_shape, points) <= CANONICAL_MAX_SHIFT


def use_alignment(mode: str, image_shape: Sequence[int], points: np.ndarray) -> bool:
    """Whether ``--align mode`` warps this image: ``always`` yes, ``none`` no, ``auto`` unless
    :func:`is_canonical`."""
    if mode not in ALIGN_MODES:
        raise ValueError(f"unknown alignment mode {mode!r}; use one of {', '.join(ALIGN_MODES)}")
    return mode == "always" or (mode == "auto" and not is_canonical(image_shape, points))


def largest_face(landmark_sets: Sequence[np.ndarray]) -> int:
    """Index of the largest face (area of the convex hull of its landmarks) among several."""
    if not len(landmark_sets):
        raise ValueError("largest_face needs at least one face")
    areas = [cv2.contourArea(cv2.convexHull(np.asarray(lm, np.float32))) for lm in landmark_sets]
    return int(np.argmax(areas))


@dataclass(frozen=True)
class FaceQuality:
    """The gate's measures and the reasons (``REJECTION_REASONS``) a face fails it."""

    measures: dict[str, float]
    reasons: tuple[str, ...] = field(default=())
    points: np.ndarray | None = field(default=None, repr=False, compare=False)
    """The five :func:`alignment_points` measured (None when the eyes coincide)."""

    @property
    def accepted(self) -> bool:
        return not self.reasons


def face_quality(landmarks: np.ndarray, confidence: float | None = None) -> FaceQuality:
    """Quality gate of one detected face; ``landmarks`` in source pixels, ``confidence`` the
    detector's score (None: not checked). Measures: ``confidence``, ``interocular_px``,
    ``fit_residual_px`` (112 frame), ``mouth_width_ratio`` and ``eye_mouth_ratio`` (over the eye
    distance); thresholds are this module's constants."""
    points = alignment_points(landmarks)
    points.flags.writeable = False
    left_eye, right_eye, _, mouth_left, mouth_right = points
    interocular = float(np.linalg.norm(right_eye - left_eye))
    measures = {"confidence": float("nan") if confidence is None else float(confidence), "interocular_px": interocular}
    reasons = []
    if confidence is not None and confidence < MIN_DETECTION_CONFIDENCE:
        reasons.append("low_confidence")
    if interocular < MIN_INTEROCULAR_PX:
        reasons.append("face_too_small")
    if interocular <= 1e-6:
        measures.update(fit_residual_px=float("nan"), mouth_width_ratio=float("nan"), eye_mouth_ratio=float("nan"))
        return FaceQuality(measures, tuple(reasons + ["poor_fit", "implausible_landmarks"]))
    measures["fit_residual_px"] = fit_residual(points)
    u_axis = (right_eye - left_eye) / interocular
    v_axis = np.array([-u_axis[1], u_axis[0]])  # down the face
    measures["mouth_width_ratio"] = float(np.linalg.norm(mouth_right - mouth_left)) / interocular
    measures["eye_mouth_ratio"] = float(((mouth_left + mouth_right) / 2 - (left_eye + right_eye) / 2) @ v_axis) / interocular
    if not measures["fit_residual_px"] <= MAX_FIT_RESIDUAL:
        reasons.append("poor_fit")
    if not (
        MOUTH_WIDTH_RANGE[0] <= measures["mouth_width_ratio"] <= MOUTH_WIDTH_RANGE[1]
        and EYE_MOUTH_RANGE[0] <= measures["eye_mouth_ratio"] <= EYE_MOUTH_RANGE[1]
    ):
        reasons.append("implausible_landmarks")
    return FaceQuality(measures, tuple(reasons), points)


# ---------------------------------------------------------------------------------------------
# Warping


def _pixel_index_matrix(matrix: np.ndarray) -> np.ndarray:
    """The continuous-coordinate affine ``matrix`` in cv2's pixel-index convention."""
    converted = np.array(matrix, np.float64)
    converted[:, 2] += converted[:, :2] @ np.array([0.5, 0.5]) - 0.5
    return converted


def warp_face(image: np.ndarray, matrix: np.ndarray, output_size: int = ALIGNED_SIZE) -> np.ndarray:
    """The 112x112 crop that ``matrix`` (source -> 112 frame, continuous coordinates) maps
    ``image`` to, resized to ``output_size`` (bilinear). Outside the image is black. Where the
    crop has under ``PREFILTER_BELOW_SCALE`` px per source px, the face region is first
    area-resized to 1 px per crop px, so large sources do not alias."""
    matrix = np.asarray(matrix, np.float64)
    scale = _scale_of(matrix)
    if scale < PREFILTER_BELOW_SCALE:
        height, width = image.shape[:2]
        inverse = cv2.invertAffineTransform(matrix)
        corners = apply_transform(inverse, np.array([[0, 0], [1, 0], [0, 1], [1, 1]], float) * ALIGNED_SIZE)
        margin = 2.0 / scale
        x0, y0 = np.clip(np.floor(corners.min(axis=0) - margin), 0, [width, height]).astype(int)
        x1, y1 = np.clip(np.ceil(corners.max(axis=0) + margin), 0, [width, height]).astype(int)
        if x1 > x0 and y1 > y0:
            region = image[y0:y1, x0:x1]
            size = (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale)))
            image = cv2.resize(region, size, interpolation=cv2.INTER_AREA)
            sx, sy = size[0] / (x1 - x0), size[1] / (y1 - y0)
            to_region = np.array([[sx, 0.0, -x0 * sx], [0.0, sy, -y0 * sy]])
            matrix = matrix @ np.vstack([cv2.invertAffineTransform(to_region), [0.0, 0.0, 1.0]])
    crop = cv2.warpAffine(
        image, _pixel_index_matrix(matrix), (ALIGNED_SIZE, ALIGNED_SIZE),
        flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0),
    )
    if output_size != ALIGNED_SIZE:
        crop = cv2.resize(crop, (output_size, output_size), interpolation=cv2.INTER_LINEAR)
    return crop


@dataclass(frozen=True)
class AlignedFace:
    """What the model sees: ``image`` (the aligned crop, or the input unchanged when not
    aligned), its ``landmarks`` (``float32 [468, 2]``), ``matrix`` (input -> ``image``
    coordinates, ``[2, 3]``), whether it was ``aligned``, and the five-point ``residual``
    (mean 112-frame px after alignment)."""

    image: np.ndarray
    landmarks: np.ndarray
    matrix: np.ndarray
    aligned: bool
    residual: float


def align_face(
    image: np.ndarray, landmarks: np.ndarray, *, mode: str = "auto", output_size: int = ALIGNED_SIZE,
    measured: FaceQuality | None = None,
) -> AlignedFace:
    """Align one face of ``image`` (``uint8 [H, W, 3]``) given its Face Mesh ``landmarks`` in
    that image's pixels; ``mode`` as :func:`use_alignment`. Not aligned, the image and landmarks
    come back unchanged (the model input is then resized from the whole image, as before).
    ``measured``: the gate's :func:`face_quality` of these same landmarks, whose five points and
    residual are then used rather than computed again."""
    if measured is not None and measured.points is not None:
        points, residual = measured.points, measured.measures["fit_residual_px"]
    else:
        points = alignment_points(landmarks)
        residual = fit_residual(points)
    if not use_alignment(mode, image.shape, points):
        identity = np.hstack([np.eye(2), np.zeros((2, 1))])
        return AlignedFace(image, np.asarray(landmarks, np.float32), identity, False, residual)
    to_frame = alignment_matrix(points)
    crop = warp_face(image, to_frame, output_size)
    to_output = to_frame * (output_size / ALIGNED_SIZE)
    return AlignedFace(crop, apply_transform(to_output, landmarks).astype(np.float32), to_output, True, residual)


# ---------------------------------------------------------------------------------------------
# Large images


def detection_reduction(height: int, width: int, max_side: int = MAX_DETECTION_SIDE) -> int:
    """Smallest ``JPEG_REDUCTIONS`` factor bringing the long side to ``max_side`` or less
    (the largest when none does); :func:`facemoe_model.data.images.reduction_for`."""
    return reduction_for(height, width, max_side)


def warp_reduction(landmarks: np.ndarray) -> int:
    """Largest ``JPEG_REDUCTIONS`` factor at which the face of ``landmarks`` (full-resolution
    pixels) still has at least one source pixel per 112-frame pixel, so warping from that
    reduced decode loses nothing the crop could show."""
    scale = _scale_of(alignment_matrix(alignment_points(landmarks)))
    return max(r for r in JPEG_REDUCTIONS if r == 1 or scale * r <= 1.0)
