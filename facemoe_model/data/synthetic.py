"""Procedural synthetic faces with ground-truth region masks and landmarks.

No face data set can be downloaded, so the demo data is rendered: each identity has fixed
face parameters (:class:`FaceIdentity`), each sample draws nuisances (:class:`FaceNuisance`:
pose, light, expression, background, occlusion, blur/noise). A face is painted in numpy /
OpenCV as a colour layer plus a depth map, lit with soft wrap-around shading, hollows and
cast shadows, posed by a depth-based warp, aligned to the ArcFace 5-point template
(scaled to the output size) and auto-exposed as a camera would.

Face units: the inter-ocular distance is 1, the origin is midway between the eye centres,
x points to the image right, y down, z towards the camera.

Determinism: identity parameters come from ``SeedSequence(seed, spawn_key=(identity,))``,
nuisances from ``SeedSequence(seed, spawn_key=(identity, sample))``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from moescope.errors import DataError, MoescopeError
from moescope.results import atomic_path, atomic_write

from .transforms import gaussian_blur

__all__ = [
    "REGION_NAMES",
    "LANDMARK_NAMES",
    "HAIR_STYLES",
    "FACIAL_HAIR",
    "OCCLUSIONS",
    "SyntheticConfig",
    "FaceIdentity",
    "FaceNuisance",
    "FaceSample",
    "SyntheticGroundTruth",
    "arcface_template",
    "sample_identity",
    "sample_nuisance",
    "render_face",
    "generate_dataset",
    "load_ground_truth",
]

GENERATOR_VERSION = 1
REGION_NAMES = ("eyes", "nose", "mouth", "forehead", "cheeks", "chin_jawline", "hair_background")
LANDMARK_NAMES = ("left_eye", "right_eye", "nose_tip", "mouth_left", "mouth_right")
"""Image-left first, as in the ArcFace template: ``left_eye`` is the eye on the image's left."""
HAIR_STYLES = ("short", "medium", "long", "bangs", "curly", "buzz", "bald")
FACIAL_HAIR = ("none", "stubble", "moustache", "beard")
OCCLUSIONS = ("glasses", "sunglasses", "mask", "hat", "hand")

_ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
_SUPERSAMPLE = 2
_CHIN_BAND = 0.12  # width of the jawline band along the lower face oval, face units
_FOREHEAD_TOP = 0.72  # height of the face oval above the eye line (as mediapipe's oval), face units

# sRGB palettes, light to dark / by kind
_SKIN = np.array([(250, 222, 200), (238, 198, 168), (222, 176, 140), (196, 142, 104),
                  (160, 108, 74), (122, 80, 54), (86, 56, 40)], dtype=np.float64)
_HAIR = np.array([(26, 22, 20), (58, 40, 30), (100, 68, 44), (148, 108, 72), (205, 170, 115),
                  (145, 68, 38), (140, 138, 135), (205, 202, 196)], dtype=np.float64)
_HAIR_WEIGHTS = np.array([0.3, 0.22, 0.16, 0.1, 0.08, 0.05, 0.05, 0.04])
_IRIS = np.array([(55, 35, 22), (95, 60, 34), (115, 95, 52), (78, 105, 66), (70, 105, 145), (105, 115, 125)],
                 dtype=np.float64)
_IRIS_WEIGHTS = np.array([0.35, 0.25, 0.12, 0.08, 0.12, 0.08])
_HAIR_STYLE_WEIGHTS = np.array([0.24, 0.2, 0.2, 0.12, 0.1, 0.08, 0.06])
_FACIAL_HAIR_WEIGHTS = np.array([0.0, 0.4, 0.25, 0.35])
_OCCLUSION_WEIGHTS = np.array([0.35, 0.1, 0.15, 0.2, 0.2])


def _linear(srgb: np.ndarray) -> np.ndarray:
    return (np.asarray(srgb, dtype=np.float64) / 255.0) ** 2.2


Range = tuple[float, float]


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the generator (defaults: narrow identities, wide nuisances).

    Identity: ``shape_spread`` / ``colour_spread`` scale the range of every geometric /
    colour identity parameter around its middle (1 = the full human-like range, 0 = everyone
    alike except categorical traits); ``facial_hair_prob`` is the share of identities with
    stubble, moustache or beard.
    Pose (uniform in +-value): ``yaw_deg``, ``pitch_deg`` rotate the head in depth;
    ``roll_deg``, ``scale_jitter`` (relative), ``shift_jitter`` (fraction of the image) are
    the residual misalignment after aligning to the 5-point template.
    Light: key light ``light_azimuth_deg`` (+-, from the front), ``light_elevation_deg``
    range (positive = from above), ``light_strength`` and ``ambient`` ranges (linear units),
    ``white_balance`` (max relative per-channel tint), ``exposure`` (face brightness relative
    to the auto-exposure target).
    Expression: ``expression`` in [0, 1] scales smile, mouth opening, brow raise/frown, squint
    and gaze. Background: ``background_texture`` = probability of a textured background.
    Per-sample probabilities: ``occlusion_prob`` (glasses, sunglasses, mask, hat or hand),
    ``blur_prob`` with ``blur_sigma`` (pixels at the output size), ``noise_prob`` with
    ``noise_std`` (0..255 units).
    """

    shape_spread: float = 0.6
    colour_spread: float = 0.7
    facial_hair_prob: float = 0.25
    yaw_deg: float = 35.0
    pitch_deg: float = 12.0
    roll_deg: float = 8.0
    scale_jitter: float = 0.08
    shift_jitter: float = 0.04
    light_azimuth_deg: float = 75.0
    light_elevation_deg: Range = (-20.0, 55.0)
    light_strength: Range = (0.5, 1.2)
    ambient: Range = (0.12, 0.5)
    white_balance: float = 0.15
    exposure: Range = (0.7, 1.3)
    expression: float = 0.7
    background_texture: float = 0.6
    occlusion_prob: float = 0.2
    blur_prob: float = 0.25
    blur_sigma: Range = (0.4, 1.0)
    noise_prob: float = 0.3
    noise_std: Range = (2.0, 8.0)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (list, tuple)):
                if len(value) != 2 or not value[0] <= value[1]:
                    raise MoescopeError(f"SyntheticConfig.{f.name} must be a (low, high) range, got {value}")
                object.__setattr__(self, f.name, (float(value[0]), float(value[1])))
            elif value < 0:
                raise MoescopeError(f"SyntheticConfig.{f.name} must be >= 0, got {value}")
        for name in ("facial_hair_prob", "expression", "background_texture", "occlusion_prob", "blur_prob", "noise_prob"):
            if getattr(self, name) > 1:
                raise MoescopeError(f"SyntheticConfig.{name} must be in [0, 1], got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SyntheticConfig":
        """Rebuild a config from :func:`dataclasses.asdict` output (e.g. a dataset manifest)."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise MoescopeError(f"unknown SyntheticConfig field(s): {', '.join(sorted(unknown))}")
        return cls(**values)


@dataclass(frozen=True)
class FaceIdentity:
    """Fixed parameters of one synthetic person (lengths in face units, colours linear RGB)."""

    face_width: float  # half-width at the eye line
    cheek_width: float  # half-width between eye line and mouth, relative to face_width
    jaw_width: float  # half-width at the mouth line
    chin_width: float
    chin_y: float
    skull_top: float
    cheekbones: float  # 0..1 prominence
    eye_width: float  # half-width of the eye opening
    eye_height: float  # upper-lid height of the eye opening
    eye_lower: float  # lower-lid height relative to eye_height
    eye_tilt: float  # canthal tilt, radians (outer corner up)
    iris_radius: float
    brow_height: float  # brow centre above the eye line
    brow_thickness: float
    brow_arch: float
    brow_inner: float  # x of the inner brow end
    brow_outer: float  # x of the outer brow end
    brow_slant: float  # outer end lower (+) or higher (-)
    nose_length: float  # y of the nose tip
    nose_width: float  # alar half-width
    nose_projection: float
    nose_bridge: float  # bridge half-width
    mouth_y: float
    mouth_width: float  # half-width
    upper_lip: float
    lower_lip: float
    ear_y: float
    ear_size: float
    hairline: float  # y of the hairline at the midline
    hairline_shape: float  # -1 rounded .. +1 receding temples with a widow's peak
    hair_volume: float  # thickness of the hair above the skull
    hair_part: float  # -1..1 side of the fringe sweep
    hair_style: str
    facial_hair: str
    skin: tuple[float, float, float]
    lips: tuple[float, float, float]
    hair: tuple[float, float, float]
    brows: tuple[float, float, float]
    iris: tuple[float, float, float]
    texture_seed: int


@dataclass(frozen=True)
class FaceNuisance:
    """Per-sample conditions of one rendering (angles in degrees)."""

    yaw: float
    pitch: float
    roll: float
    scale: float
    shift: tuple[float, float]  # fraction of the image size
    light_azimuth: float
    light_elevation: float
    light_strength: float
    ambient: float
    light_colour: tuple[float, float, float]
    exposure: float
    smile: float
    mouth_open: float
    brow_raise: float
    eye_open: float
    gaze: tuple[float, float]
    background: tuple[float, float, float]
    background_textured: bool
    clothes: tuple[float, float, float]
    occlusion: str | None
    blur_sigma: float
    noise_std: float
    texture_seed: int


@dataclass(frozen=True)
class FaceSample:
    """One rendered face and its ground truth.

    ``image``: RGB uint8 [H, W, 3]; ``masks``: bool [7, H, W] in :data:`REGION_NAMES`
    order, a partition (every pixel in exactly one region); ``landmarks``: float32 [5, 2]
    (x, y) pixel coordinates (pixel centres at integers) in :data:`LANDMARK_NAMES` order.
    """

    image: np.ndarray
    masks: np.ndarray
    landmarks: np.ndarray
    identity: int
    sample: int


def arcface_template(size: int = 112) -> np.ndarray:
    """The standard ArcFace 5-point template (float64 [5, 2], x/y) scaled to ``size`` pixels."""
    return _ARCFACE_TEMPLATE_112 * (size / 112.0)


# --------------------------------------------------------------------------- parameters


def _spread(rng: np.random.Generator, low: float, high: float, spread: float) -> float:
    return float((low + high) / 2 + (rng.random() - 0.5) * (high - low) * spread)


def _palette(rng: np.random.Generator, palette: np.ndarray, weights: np.ndarray, jitter: float) -> tuple[float, ...]:
    base = palette[rng.choice(len(palette), p=weights / weights.sum())]
    tinted = base * (1 + jitter * rng.uniform(-1, 1)) * (1 + 0.5 * jitter * rng.uniform(-1, 1, size=3))
    return tuple(float(v) for v in _linear(np.clip(tinted, 0, 255)))


def sample_identity(seed: int, identity: int, config: SyntheticConfig | None = None) -> FaceIdentity:
    """The fixed parameters of ``identity`` under ``seed`` and ``config``."""
    config = config or SyntheticConfig()
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(identity,)))
    s, c = config.shape_spread, config.colour_spread

    def shape(low: float, high: float) -> float:
        return _spread(rng, low, high, s)

    face_width = shape(0.98, 1.2)
    geometry = dict(
        face_width=face_width, cheek_width=shape(0.88, 1.0), jaw_width=shape(0.68, 0.95),
        chin_width=shape(0.18, 0.4), chin_y=shape(1.5, 1.85), skull_top=shape(-2.0, -1.75),
        cheekbones=shape(0.0, 1.0), eye_width=shape(0.2, 0.27), eye_height=shape(0.07, 0.115),
        eye_lower=shape(0.45, 0.8), eye_tilt=shape(-0.1, 0.16), iris_radius=shape(0.085, 0.105),
        brow_height=shape(0.22, 0.36), brow_thickness=shape(0.04, 0.09), brow_arch=shape(0.0, 0.09),
        brow_inner=shape(0.1, 0.22), brow_outer=shape(0.8, 0.97), brow_slant=shape(-0.06, 0.06),
        nose_length=shape(0.5, 0.68), nose_width=shape(0.14, 0.24), nose_projection=shape(0.22, 0.42),
        nose_bridge=shape(0.05, 0.09), mouth_y=shape(1.0, 1.2), mouth_width=shape(0.36, 0.5),
        upper_lip=shape(0.035, 0.08), lower_lip=shape(0.05, 0.11), ear_y=shape(0.12, 0.35),
        ear_size=shape(0.85, 1.15), hairline=shape(-1.3, -0.95), hairline_shape=shape(-1.0, 1.0),
        hair_volume=shape(0.0, 1.0), hair_part=float(rng.uniform(-1, 1)),
    )
    hair_style = HAIR_STYLES[rng.choice(len(HAIR_STYLES), p=_HAIR_STYLE_WEIGHTS)]
    has_facial_hair = rng.random() < config.facial_hair_prob
    facial_hair = FACIAL_HAIR[rng.choice(len(FACIAL_HAIR), p=_FACIAL_HAIR_WEIGHTS)] if has_facial_hair else "none"

    tone = _spread(rng, 0.0, 1.0, c) * (len(_SKIN) - 1)
    low = int(min(np.floor(tone), len(_SKIN) - 2))
    skin_srgb = _SKIN[low] + (tone - low) * (_SKIN[low + 1] - _SKIN[low])
    skin_srgb = skin_srgb * (1 + 0.06 * c * rng.uniform(-1, 1, size=3))
    skin = _linear(np.clip(skin_srgb, 0, 255))
    lips = skin * np.array([0.95, 0.55, 0.6]) * _spread(rng, 0.7, 1.1, c)
    hair = np.array(_palette(rng, _HAIR, _HAIR_WEIGHTS, 0.2 * c))
    # brows are darker than the head hair and never lighter than a dark-blond
    brows = np.minimum(hair * 0.7, skin * 0.35) if hair.mean() > skin.mean() * 0.35 else hair
    return FaceIdentity(
        **geometry, hair_style=hair_style, facial_hair=facial_hair,
        skin=tuple(float(v) for v in skin), lips=tuple(float(v) for v in lips),
        hair=tuple(float(v) for v in hair), brows=tuple(float(v) for v in brows),
        iris=_palette(rng, _IRIS, _IRIS_WEIGHTS, 0.25 * c), texture_seed=int(rng.integers(2**31)),
    )


def sample_nuisance(seed: int, identity: int, sample: int, config: SyntheticConfig | None = None) -> FaceNuisance:
    """The per-sample conditions of (``identity``, ``sample``) under ``seed`` and ``config``."""
    config = config or SyntheticConfig()
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(identity, sample)))
    e = config.expression
    occluded = rng.random() < config.occlusion_prob
    occlusion = OCCLUSIONS[rng.choice(len(OCCLUSIONS), p=_OCCLUSION_WEIGHTS)] if occluded else None
    blurred = rng.random() < config.blur_prob
    noisy = rng.random() < config.noise_prob
    return FaceNuisance(
        yaw=float(rng.uniform(-1, 1) * config.yaw_deg),
        pitch=float(rng.uniform(-1, 1) * config.pitch_deg),
        roll=float(rng.uniform(-1, 1) * config.roll_deg),
        scale=float(1 + rng.uniform(-1, 1) * config.scale_jitter),
        shift=tuple(float(v) for v in rng.uniform(-1, 1, size=2) * config.shift_jitter),
        light_azimuth=float(rng.uniform(-1, 1) * config.light_azimuth_deg),
        light_elevation=float(rng.uniform(*config.light_elevation_deg)),
        light_strength=float(rng.uniform(*config.light_strength)),
        ambient=float(rng.uniform(*config.ambient)),
        light_colour=tuple(float(v) for v in 1 + rng.uniform(-1, 1, size=3) * config.white_balance),
        exposure=float(rng.uniform(*config.exposure)),
        smile=float(rng.uniform(0, 1) * e),
        mouth_open=float(max(0.0, rng.uniform(-1, 1)) * e),
        brow_raise=float(rng.uniform(-1, 1) * e),
        eye_open=float(1 - rng.uniform(0, 0.45) * e),
        gaze=tuple(float(v) for v in rng.uniform(-1, 1, size=2) * 0.05 * e),
        background=tuple(float(v) for v in _linear(rng.uniform(20, 235, size=3))),
        background_textured=bool(rng.random() < config.background_texture),
        clothes=tuple(float(v) for v in _linear(rng.uniform(15, 230, size=3))),
        occlusion=occlusion,
        blur_sigma=float(rng.uniform(*config.blur_sigma)) if blurred else 0.0,
        noise_std=float(rng.uniform(*config.noise_std)) if noisy else 0.0,
        texture_seed=int(rng.integers(2**31)),
    )


# --------------------------------------------------------------------------- geometry


def _catmull_rom(points: np.ndarray, closed: bool, steps: int = 8) -> np.ndarray:
    """Smooth curve through ``points`` (uniform Catmull-Rom spline)."""
    pts = np.asarray(points, dtype=np.float64)
    ext = np.vstack([pts[-1:], pts, pts[:2]]) if closed else np.vstack([pts[:1], pts, pts[-1:]])
    t = np.linspace(0, 1, steps, endpoint=False)[:, None]
    segments = []
    for i in range(len(pts) if closed else len(pts) - 1):
        p0, p1, p2, p3 = ext[i : i + 4]
        segments.append(
            0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3)
        )
    if not closed:
        segments.append(pts[-1:])
    return np.vstack(segments)


def _mirror(right: np.ndarray) -> np.ndarray:
    """A closed outline from its right half (top to bottom, x >= 0)."""
    left = right[::-1] * np.array([-1.0, 1.0])
    return np.vstack([right, left[1:-1]])


def _rotate(points: np.ndarray, angle: float, centre: np.ndarray) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return (points - centre) @ np.array([[c, s], [-s, c]]) + centre


@dataclass
class _Geometry:
    """Outlines of one posed-expression face, in face units."""

    contour: np.ndarray  # head outline (skull + jaw), closed
    half_width_y: np.ndarray  # rows of the right half of the contour: y
    half_width_x: np.ndarray  # and its x (increasing y)
    oval: np.ndarray  # face oval for the regions
    eyes: list[np.ndarray]  # eye openings, image-left first
    eye_centres: np.ndarray
    brows: list[np.ndarray]
    brow_top: tuple[np.ndarray, np.ndarray]  # (x, y) polyline of the upper brow edge
    nose: np.ndarray  # nose region outline
    lips_outer: np.ndarray
    mouth_gap: np.ndarray  # inner lip outline (open mouth) or stomion line
    mouth_corners: np.ndarray
    landmarks: np.ndarray  # [5, 2]


def _face_geometry(f: FaceIdentity, n: FaceNuisance) -> _Geometry:
    fw = f.face_width
    chin_y = f.chin_y + 0.12 * n.mouth_open
    right = np.array([
        (0.0, f.skull_top), (0.72 * fw, f.skull_top * 0.82), (0.97 * fw, -0.8), (fw, 0.0),
        (fw * f.cheek_width, 0.6), (f.jaw_width, f.mouth_y + 0.05),
        (f.chin_width + 0.3 * (f.jaw_width - f.chin_width), chin_y - 0.17), (f.chin_width * 0.75, chin_y - 0.03),
        (0.0, chin_y),
    ])
    contour = _catmull_rom(_mirror(right), closed=True)
    half = _catmull_rom(right, closed=False)
    order = np.argsort(half[:, 1])
    hw_y, hw_x = half[order, 1], half[order, 0]

    # face oval: the contour below the eye line, an elliptical arc above (as mediapipe's)
    lower = half[half[:, 1] >= 0]
    theta = np.linspace(0, np.pi / 2, 12)[:-1]
    arc = np.stack([fw * np.cos(theta), -_FOREHEAD_TOP * np.sin(theta)], axis=1)
    oval = _mirror(np.vstack([arc[::-1], lower]))

    eyes, brows, centres, brow_tops = [], [], [], []
    u = np.linspace(-1, 1, 17)
    for side in (-1.0, 1.0):
        centre = np.array([0.5 * side, 0.0])
        height = f.eye_height * n.eye_open * (1 - 0.25 * n.smile)
        upper = -height * (1 - u**2) ** 0.7 * (1 + 0.25 * u * side)
        lower = f.eye_height * f.eye_lower * (1 - u**2) ** 0.9 * (1 - 0.15 * n.smile)
        outline = np.vstack([np.stack([u * f.eye_width, upper], 1), np.stack([u[::-1] * f.eye_width, lower[::-1]], 1)[1:-1]])
        eyes.append(_rotate(outline * np.array([side, 1.0]) + centre, -f.eye_tilt * side, centre))
        centres.append(centre)

        t = np.linspace(0, 1, 12)
        raise_ = 0.06 * n.brow_raise
        x = side * (f.brow_inner + t * (f.brow_outer - f.brow_inner))
        mid = -f.brow_height - raise_ * (0.5 + 0.5 * t)
        y = mid - f.brow_arch * np.sin(np.pi * t**0.8) + f.brow_slant * (t - 0.5) + 0.02 * (1 - t)
        thick = f.brow_thickness * (1.1 - 0.7 * t**1.5)
        top = np.stack([x, y - thick / 2], 1)
        bottom = np.stack([x, y + thick / 2], 1)
        brows.append(np.vstack([top, bottom[::-1]]))
        brow_tops.append(top if side > 0 else top[::-1])

    brow_line = np.vstack(brow_tops)
    brow_line = np.vstack([[-3.0, brow_line[0, 1]], brow_line, [3.0, brow_line[-1, 1]]])

    tip = f.nose_length
    nw, nb = f.nose_width, f.nose_bridge
    nose = np.array([
        (-nb, 0.0), (nb, 0.0), (nb * 1.3, tip - 0.3), (nw + 0.04, tip - 0.06), (nw + 0.02, tip + 0.08),
        (0.0, tip + 0.13), (-nw - 0.02, tip + 0.08), (-nw - 0.04, tip - 0.06), (-nb * 1.3, tip - 0.3),
    ])

    mw = f.mouth_width * (1 + 0.15 * n.smile)
    corner_y = f.mouth_y - 0.08 * n.smile
    corners = np.array([(-mw, corner_y), (mw, corner_y)])
    gap = 0.13 * n.mouth_open
    xs = np.linspace(-1, 1, 21)
    stomion = corner_y + (f.mouth_y - corner_y) * (1 - xs**2) + 0.015
    bow = f.upper_lip * (1 - 0.35 * np.exp(-((xs * mw) / 0.06) ** 2))
    upper_outer = stomion - gap * 0.3 * (1 - xs**2) - bow * (1 - xs**2) ** 0.5
    lower_inner = stomion + gap * (1 - xs**2) ** 0.8
    lower_outer = lower_inner + f.lower_lip * (1 - xs**2) ** 0.6
    upper_inner = stomion - gap * 0.3 * (1 - xs**2)
    x = xs * mw
    lips_outer = np.vstack([np.stack([x, upper_outer], 1), np.stack([x[::-1], lower_outer[::-1]], 1)[1:-1]])
    mouth_gap = np.vstack([np.stack([x, upper_inner], 1), np.stack([x[::-1], lower_inner[::-1]], 1)[1:-1]])

    landmarks = np.vstack([centres, [[0.0, tip]], corners])
    return _Geometry(
        contour=contour, half_width_y=hw_y, half_width_x=hw_x, oval=oval, eyes=eyes, eye_centres=np.array(centres),
        brows=brows, brow_top=(brow_line[:, 0], brow_line[:, 1]), nose=nose, lips_outer=lips_outer,
        mouth_gap=mouth_gap, mouth_corners=corners, landmarks=landmarks,
    )


def _head_depth(g: _Geometry, f: FaceIdentity, x: np.ndarray, y: np.ndarray, smooth: bool) -> np.ndarray:
    """Depth of the head surface (face units); ``smooth`` gives the low-detail warp surface."""
    hw = np.interp(y, g.half_width_y, g.half_width_x, left=0.0, right=0.0)
    r = np.clip(np.abs(x) / np.maximum(hw, 1e-3), 0, 1)
    centre, half_height = (f.skull_top + f.chin_y) / 2, (f.chin_y - f.skull_top) / 2
    v = np.clip(np.abs(y - centre) / half_height, 0, 1)
    if smooth:
        z = 0.9 * np.cos(np.pi / 2 * r) * np.cos(np.pi / 2 * v) ** 0.5
        nose = 0.25 * np.exp(-(x / 0.16) ** 2 - ((y - f.nose_length * 0.75) / (0.35 * f.nose_length)) ** 2)
        return (z + nose).astype(np.float32)
    return (0.9 * np.sqrt(1 - r**2) * (0.35 + 0.65 * np.sqrt(1 - v**2))).astype(np.float32)


# --------------------------------------------------------------------------- painting


class _Canvas:
    """Layers of the unposed face on a pixel grid: albedo, depth, coverage, gloss, regions."""

    def __init__(self, origin: np.ndarray, shape: tuple[int, int], scale: float) -> None:
        self.origin, self.scale = origin, scale  # face coords of pixel (0, 0); pixels per face unit
        h, w = shape
        self.albedo = np.zeros((h, w, 3), np.float32)
        self.alpha = np.zeros((h, w), np.float32)
        self.gloss = np.zeros((h, w), np.float32)
        self.ys = (origin[1] + np.arange(h) / scale).astype(np.float32)
        self.xs = (origin[0] + np.arange(w) / scale).astype(np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return self.alpha.shape

    def px(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points) - self.origin) * self.scale

    def _roi(self, pts_px: np.ndarray, pad: float) -> tuple[slice, slice] | None:
        h, w = self.shape
        x0, y0 = np.floor(pts_px.min(0) - pad).astype(int)
        x1, y1 = np.ceil(pts_px.max(0) + pad).astype(int) + 1
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        return (slice(y0, y1), slice(x0, x1)) if x1 > x0 and y1 > y0 else None

    def coverage(self, points: np.ndarray, width: float | None = None, closed: bool = True):
        """Anti-aliased coverage of a filled polygon (``width`` None) or a stroked polyline."""
        pts = self.px(points)
        line = 0.0 if width is None else width * self.scale
        roi = self._roi(pts, line + 2)
        if roi is None:
            return None, None
        ys, xs = roi
        buf = np.zeros((ys.stop - ys.start, xs.stop - xs.start), np.uint8)
        fixed = [np.round((pts - (xs.start, ys.start)) * 16).astype(np.int32)]
        if width is None:
            cv2.fillPoly(buf, fixed, 255, lineType=cv2.LINE_AA, shift=4)
            return buf.astype(np.float32) / 255, roi
        cv2.polylines(buf, fixed, closed, 255, thickness=max(1, int(round(line))), lineType=cv2.LINE_AA, shift=4)
        return buf.astype(np.float32) / 255 * min(1.0, line), roi

    def ellipse(self, centre, axes, angle: float = 0.0, steps: int = 36) -> np.ndarray:
        t = np.linspace(0, 2 * np.pi, steps, endpoint=False)
        pts = np.stack([axes[0] * np.cos(t), axes[1] * np.sin(t)], 1)
        return _rotate(pts, -angle, np.zeros(2)) + centre

    def paint(self, cov, roi, colour, texture: np.ndarray | None = None, opacity: float = 1.0, gloss: float | None = None,
              alpha: bool = False) -> None:
        if cov is None:
            return
        a = cov * opacity
        value = np.asarray(colour, np.float32)
        if texture is not None:
            value = value * (1 + texture[roi][..., None])
        region = self.albedo[roi]
        region += a[..., None] * (value - region)
        if gloss is not None:
            self.gloss[roi] += a * (gloss - self.gloss[roi])
        if alpha:
            self.alpha[roi] = np.maximum(self.alpha[roi], cov)

    def fill_labels(self, labels: np.ndarray, points: np.ndarray, value: int) -> None:
        cv2.fillPoly(labels, [np.round(self.px(points) * 16).astype(np.int32)], int(value), shift=4)


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma: tuple[float, float]) -> np.ndarray:
    """Zero-mean unit-std noise blurred by (sigma_x, sigma_y) pixels."""
    n = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigmaX=sigma[0], sigmaY=sigma[1])
    return n / max(float(n.std()), 1e-6)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1] from a ``cells x cells`` random grid."""
    grid = rng.uniform(-1, 1, size=(cells, cells)).astype(np.float32)
    return cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _gaussian(c: _Canvas, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    """Separable Gaussian bump over the canvas (outer product of two 1-D profiles)."""
    return np.outer(np.exp(-(((c.ys - cy) / sy) ** 2)), np.exp(-(((c.xs - cx) / sx) ** 2)))


def _hair_outline(f: FaceIdentity, g: _Geometry, volume: float, rng: np.random.Generator) -> np.ndarray:
    """Outer hair outline over the skull, from the left temple over the top to the right one."""
    upper = g.contour[g.contour[:, 1] < 0.1]
    centre = np.array([0.0, (f.skull_top + 0.3) / 2])
    d = upper - centre
    r = np.linalg.norm(d, axis=1, keepdims=True)
    angle = np.arctan2(d[:, 1], d[:, 0])
    wobble = 1 + 0.04 * np.sin(angle * rng.integers(5, 9) + rng.uniform(0, 6.3))
    out = centre + d * (1 + volume * wobble[:, None] / r)
    start = int(np.argmax(out[:, 0] < 0))  # contour runs right side top->bottom, then left bottom->top
    return np.roll(out, -start, axis=0)


def _paint_hair(c: _Canvas, f: FaceIdentity, g: _Geometry, rng: np.random.Generator, back: bool) -> None:
    """Back hair (behind the head: long styles) or the cap and fringe in front of the skull."""
    style, hair = f.hair_style, np.array(f.hair)
    if style == "bald":
        return
    volume = {"short": 0.06, "medium": 0.14, "long": 0.12, "bangs": 0.1, "curly": 0.3, "buzz": 0.015}[style]
    volume *= 0.6 + 0.8 * f.hair_volume
    strands = _noise(rng, c.shape, (1.2, 4.0) if style != "curly" else (2.0, 2.0)) * 0.22
    fw = f.face_width
    if back:
        if style not in ("long", "medium", "curly"):
            return
        length = {"long": 3.2, "medium": 0.9, "curly": 1.2}[style]
        outer = _hair_outline(f, g, volume + 0.04, rng)
        side = fw + volume + 0.12
        drop = np.array([(side, length - 0.4), (side * 0.9, length), (-side * 0.9, length), (-side, length - 0.4)])
        cov, roi = c.coverage(np.vstack([outer[::-1][outer[::-1, 0] > 0], drop, outer[::-1][outer[::-1, 0] < 0]]))
        c.paint(cov, roi, hair * 0.8, texture=strands, gloss=0.15, alpha=True)
        return

    outer = _hair_outline(f, g, volume, rng)
    recede = 0.12 * max(f.hairline_shape, 0.0)
    sideburn = 0.05 if style != "buzz" else -0.1
    hx = fw * 0.97
    line = _catmull_rom(np.array([
        (hx, sideburn), (hx - 0.04, f.hairline * 0.45), (0.78 * fw, f.hairline - recede),
        (0.3, f.hairline + 0.08 * recede), (0.0, f.hairline + 0.08 * f.hairline_shape),
        (-0.3, f.hairline + 0.08 * recede), (-0.78 * fw, f.hairline - recede), (-(hx - 0.04), f.hairline * 0.45),
        (-hx, sideburn),
    ]), closed=False)
    cap = np.vstack([outer[outer[:, 1] < sideburn][::-1], line])
    if style == "buzz":
        colour = hair * 0.5 + np.array(f.skin) * 0.5
        cov, roi = c.coverage(cap)
        c.paint(cov, roi, colour, texture=strands * 0.5, opacity=0.85, alpha=True)
        return
    cov, roi = c.coverage(cap)
    c.paint(cov, roi, hair, texture=strands, gloss=0.25, alpha=True)
    if style == "medium":  # hair over the ears
        for side in (-1, 1):
            drape = np.array([(side * (fw - 0.06), -0.2), (side * (fw + volume + 0.08), -0.3),
                              (side * (fw + volume + 0.05), 0.75), (side * (fw - 0.02), 0.55)])
            cov, roi = c.coverage(drape)
            c.paint(cov, roi, hair, texture=strands, alpha=True)
    if style in ("bangs", "curly"):
        depth = -f.brow_height - 0.1 - 0.15 * rng.random()
        k = np.linspace(-1, 1, 15)
        edge = depth + 0.04 * np.sin(k * 19 + rng.uniform(0, 6.3)) - 0.12 * f.hair_part * k - 0.15 * k**4
        fringe = np.vstack([[(-fw, f.hairline * 0.5)], np.stack([k * fw * 0.95, edge], 1), [(fw, f.hairline * 0.5)],
                            [(0.0, f.hairline - 0.1)]])
        cov, roi = c.coverage(fringe)
        c.paint(cov, roi, hair, texture=strands, gloss=0.25)


def _paint_eye(c: _Canvas, f: FaceIdentity, n: FaceNuisance, g: _Geometry, i: int, rng: np.random.Generator) -> None:
    outline, centre = g.eyes[i], g.eye_centres[i]
    skin = np.array(f.skin)
    open_cov, roi = c.coverage(outline)
    if open_cov is None:
        return
    sclera = np.array([0.62, 0.58, 0.55]) * (0.9 + 0.1 * rng.random())
    c.paint(open_cov, roi, sclera, gloss=0.9)
    iris_centre = centre + np.array(n.gaze) * np.array([1.0, 0.4])
    radius = f.iris_radius
    for colour, r in ((np.array(f.iris) * 0.45, radius), (np.array(f.iris), radius * 0.85), ((0.01, 0.01, 0.01), radius * 0.42)):
        cov, sub = c.coverage(c.ellipse(iris_centre, (r, r)))
        if cov is not None:
            inside = cov * open_cov[sub[0].start - roi[0].start: sub[0].stop - roi[0].start,
                                    sub[1].start - roi[1].start: sub[1].stop - roi[1].start] \
                if _contains(roi, sub) else cov * _crop(open_cov, roi, sub)
            c.paint(inside, sub, colour, gloss=0.9)
    # lid shadow on the upper iris, lash line, lower lid, crease
    upper = outline[: len(outline) // 2 + 1]
    lashes = np.array(f.brows) * 0.5 + 0.004
    cov, sub = c.coverage(upper + np.array([0, 0.012]), width=0.05)
    c.paint(cov * _crop(open_cov, roi, sub, fill=1.0) * 0.5, sub, lashes * 2)
    wing = upper[-1] + (upper[-1] - upper[-3]) * 0.8
    cov, sub = c.coverage(np.vstack([upper, wing if i == 1 else upper[-1]]) if i == 1 else np.vstack([wing * 0 + upper[0] + (upper[0] - upper[2]) * 0.8, upper]), width=0.035)
    c.paint(cov, sub, lashes)
    lower = outline[len(outline) // 2:]
    cov, sub = c.coverage(np.vstack([lower, outline[:1]]), width=0.015, closed=False)
    c.paint(cov, sub, skin * 0.45, opacity=0.8)
    crease = centre + (upper - centre) * np.array([1.08, 1.0]) - np.array([0, 0.06 + 0.02 * n.brow_raise])
    cov, sub = c.coverage(crease[2:-2], width=0.02, closed=False)
    c.paint(cov, sub, skin * 0.55, opacity=0.5)


def _crop(cov: np.ndarray, roi, sub, fill: float = 0.0) -> np.ndarray:
    """``cov`` (defined on ``roi``) resampled onto the window ``sub`` (``fill`` outside ``roi``)."""
    out = np.full((sub[0].stop - sub[0].start, sub[1].stop - sub[1].start), fill, np.float32)
    y0, y1 = max(roi[0].start, sub[0].start), min(roi[0].stop, sub[0].stop)
    x0, x1 = max(roi[1].start, sub[1].start), min(roi[1].stop, sub[1].stop)
    if y1 > y0 and x1 > x0:
        out[y0 - sub[0].start: y1 - sub[0].start, x0 - sub[1].start: x1 - sub[1].start] = \
            cov[y0 - roi[0].start: y1 - roi[0].start, x0 - roi[1].start: x1 - roi[1].start]
    return out
