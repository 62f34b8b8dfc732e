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
import multiprocessing
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from ..errors import DataError, InputError
from ..fileio import atomic_path, atomic_write
from ..geometry import ALIGNED_FIVE_POINTS, ALIGNED_SIZE, JAW_BAND, PRECEDENCE, REGIONS

from .transforms import GaussianNoise, gaussian_blur

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
    "sample_identity",
    "sample_nuisance",
    "render_face",
    "generate_dataset",
    "load_ground_truth",
]

GENERATOR_VERSION = 1
REGION_NAMES = REGIONS
LANDMARK_NAMES = ("left_eye", "right_eye", "nose_tip", "mouth_left", "mouth_right")
"""Image-left first, as in the ArcFace template: ``left_eye`` is the eye on the image's left."""
HAIR_STYLES = ("short", "medium", "long", "bangs", "curly", "buzz", "bald")
FACIAL_HAIR = ("none", "stubble", "moustache", "beard")
OCCLUSIONS = ("glasses", "sunglasses", "mask", "hat", "hand")

_SUPERSAMPLE = 2
_MAX_WARP_DEPTH = 1.2  # above the highest point of the warp surface (_head_depth, smooth), face units
_FOREHEAD_TOP = 0.78  # height of the face oval above the eye line (as mediapipe's oval), face units

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
_FACIAL_HAIR_WEIGHTS = np.array([0.4, 0.25, 0.35])  # of FACIAL_HAIR[1:]
_OCCLUSION_WEIGHTS = np.array([0.35, 0.1, 0.15, 0.2, 0.2])


def _linear(srgb: np.ndarray) -> np.ndarray:
    return (np.asarray(srgb, dtype=np.float64) / 255.0) ** 2.2


Range = tuple[float, float]


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the generator. Defaults narrow the identities and widen the nuisances, so that
    telling people apart is not trivial; all ranges are ``(low, high)``, uniform."""

    # identity: how different people are
    shape_spread: float = 0.6  # share of the full human-like range of every face-geometry parameter (0 = alike)
    colour_spread: float = 0.7  # share of the full range of skin tone, lip, hair and iris colour
    facial_hair_prob: float = 0.25  # share of identities with stubble, moustache or beard
    # pose: head rotation in depth (+- degrees), then residual misalignment after 5-point alignment
    yaw_deg: float = 40.0
    pitch_deg: float = 12.0
    roll_deg: float = 8.0
    scale_jitter: float = 0.08  # relative, +-
    shift_jitter: float = 0.04  # fraction of the image size, +- in x and y
    # light: one key light plus ambient (linear units), camera auto-exposure
    light_azimuth_deg: float = 75.0  # +- from the front
    light_elevation_deg: Range = (-20.0, 55.0)  # positive = from above
    light_strength: Range = (0.5, 1.2)
    ambient: Range = (0.12, 0.5)
    white_balance: float = 0.15  # max relative tint per colour channel
    exposure: Range = (0.7, 1.3)  # face brightness relative to the auto-exposure target
    # expression: 0 = neutral only, 1 = full range of smile, mouth opening, brow raise/frown, squint, gaze
    expression: float = 0.7
    # background and per-sample degradations (probabilities per image)
    background_texture: float = 0.6  # textured (stripes, blotches, rectangles) rather than smooth
    occlusion_prob: float = 0.25  # glasses, sunglasses, mask, hat or hand
    blur_prob: float = 0.3
    blur_sigma: Range = (0.4, 1.0)  # Gaussian sigma, pixels at the output size
    noise_prob: float = 0.3
    noise_std: Range = (2.0, 8.0)  # Gaussian noise std, 0..255 units

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (list, tuple)):
                if len(value) != 2 or not value[0] <= value[1]:
                    raise InputError(f"SyntheticConfig.{f.name} must be a (low, high) range, got {value}")
                object.__setattr__(self, f.name, (float(value[0]), float(value[1])))
            elif value < 0:
                raise InputError(f"SyntheticConfig.{f.name} must be >= 0, got {value}")
        for name in ("facial_hair_prob", "expression", "background_texture", "occlusion_prob", "blur_prob", "noise_prob"):
            if getattr(self, name) > 1:
                raise InputError(f"SyntheticConfig.{name} must be in [0, 1], got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SyntheticConfig":
        """Rebuild a config from :func:`dataclasses.asdict` output (e.g. a dataset manifest)."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise InputError(f"unknown SyntheticConfig field(s): {', '.join(sorted(unknown))}")
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
    (x, y) in continuous pixel coordinates (pixel (row, col) covers [col, col + 1) x [row, row + 1),
    the landmark convention of the analyses) in :data:`LANDMARK_NAMES` order.
    """

    image: np.ndarray
    masks: np.ndarray
    landmarks: np.ndarray
    identity: int
    sample: int


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

    geometry = dict(
        face_width=shape(0.98, 1.2), cheek_width=shape(0.88, 1.0), jaw_width=shape(0.68, 0.95),
        chin_width=shape(0.18, 0.4), chin_y=shape(1.5, 1.85), skull_top=shape(-2.0, -1.75),
        cheekbones=shape(0.0, 1.0), eye_width=shape(0.2, 0.27), eye_height=shape(0.07, 0.115),
        eye_lower=shape(0.45, 0.8), eye_tilt=shape(-0.1, 0.16), iris_radius=shape(0.085, 0.105),
        brow_height=shape(0.22, 0.36), brow_thickness=shape(0.04, 0.09), brow_arch=shape(0.0, 0.09),
        brow_inner=shape(0.1, 0.22), brow_outer=shape(0.8, 0.97), brow_slant=shape(-0.06, 0.06),
        nose_length=shape(0.5, 0.68), nose_width=shape(0.14, 0.24), nose_projection=shape(0.22, 0.42),
        nose_bridge=shape(0.05, 0.09), mouth_y=shape(1.0, 1.2), mouth_width=shape(0.36, 0.5),
        upper_lip=shape(0.045, 0.09), lower_lip=shape(0.06, 0.12), ear_y=shape(0.12, 0.35),
        ear_size=shape(0.85, 1.15), hairline=shape(-1.3, -0.95), hairline_shape=shape(-1.0, 1.0),
        hair_volume=shape(0.0, 1.0), hair_part=float(rng.uniform(-1, 1)),
    )
    hair_style = HAIR_STYLES[rng.choice(len(HAIR_STYLES), p=_HAIR_STYLE_WEIGHTS)]
    has_facial_hair = rng.random() < config.facial_hair_prob
    facial_hair = FACIAL_HAIR[1 + rng.choice(len(FACIAL_HAIR) - 1, p=_FACIAL_HAIR_WEIGHTS)] if has_facial_hair else "none"

    tone = _spread(rng, 0.0, 1.0, c) * (len(_SKIN) - 1)
    low = int(min(np.floor(tone), len(_SKIN) - 2))
    skin_srgb = _SKIN[low] + (tone - low) * (_SKIN[low + 1] - _SKIN[low])
    skin_srgb = skin_srgb * (1 + 0.06 * c * rng.uniform(-1, 1, size=3))
    skin = _linear(np.clip(skin_srgb, 0, 255))
    lips = skin * np.array([0.95, 0.55, 0.6]) * _spread(rng, 0.7, 1.1, c)
    hair = np.array(_palette(rng, _HAIR, _HAIR_WEIGHTS, 0.2 * c))
    # brows: the hair colour, darkened below the skin tone for light hair (fair brows stay visible)
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
    """Outlines of one face (the identity's shape with the sample's expression), in face units."""

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

    # face oval: the contour below the eye line, a super-elliptical arc above (as mediapipe's)
    lower = half[half[:, 1] >= 0]
    theta = np.linspace(0, np.pi / 2, 12)[:-1]
    arc = np.stack([fw * np.cos(theta) ** (2 / 2.6), -_FOREHEAD_TOP * np.sin(theta) ** (2 / 2.6)], axis=1)
    oval = _mirror(np.vstack([arc[::-1], lower]))

    eyes, brows, centres, brow_tops = [], [], [], []
    u = np.linspace(-1, 1, 17)
    for side in (-1.0, 1.0):
        centre = np.array([0.5 * side, 0.0])
        height = f.eye_height * n.eye_open * (1 - 0.25 * n.smile)
        upper = -height * (1 - u**2) ** 0.7 * (1 - 0.2 * u)
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
        (-nb, 0.0), (nb, 0.0), (nw + 0.06, tip + 0.02), (nw * 0.7, tip + 0.13), (0.0, tip + 0.15),
        (-nw * 0.7, tip + 0.13), (-nw - 0.06, tip + 0.02),
    ])

    mw = f.mouth_width * (1 + 0.15 * n.smile)
    corner_y = f.mouth_y - 0.08 * n.smile
    corners = np.array([(-mw, corner_y), (mw, corner_y)])
    gap = 0.2 * n.mouth_open
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
        # a flat front (super-ellipse) keeps the far eye in view when the head turns; depth in
        # proportion to the local half-width keeps the jaw from folding over
        z = 0.85 * hw * np.cbrt(1 - r**3) * np.sqrt(np.cos(np.pi / 2 * v))
        nose = 0.2 * np.exp(-(x / 0.2) ** 2 - ((y - f.nose_length * 0.75) / (0.35 * f.nose_length)) ** 2)
        return (z + nose).astype(np.float32)
    return (0.9 * np.sqrt(1 - r**2) * (0.35 + 0.65 * np.sqrt(1 - v**2))).astype(np.float32)


# --------------------------------------------------------------------------- painting


class _Canvas:
    """Layers of the unposed face on a pixel grid: albedo, relief, coverage and gloss."""

    def __init__(self, origin: np.ndarray, shape: tuple[int, int], scale: float) -> None:
        self.origin, self.scale = np.asarray(origin, np.float64), float(scale)
        h, w = shape
        self.albedo = np.zeros((h, w, 3), np.float32)
        self.relief = np.zeros((h, w), np.float32)  # height added to the head surface (hair, occluders)
        self.alpha = np.zeros((h, w), np.float32)
        self.gloss = np.zeros((h, w), np.float32)
        self.ys = (self.origin[1] + np.arange(h) / self.scale).astype(np.float32)
        self.xs = (self.origin[0] + np.arange(w) / self.scale).astype(np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return self.alpha.shape

    def px(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, np.float64) - self.origin) * self.scale

    def window(self, points: np.ndarray, pad: float = 0.0) -> tuple[slice, slice] | None:
        """The clipped pixel window around ``points`` plus ``pad`` face units (None if empty)."""
        pts = self.px(points)
        h, w = self.shape
        x0, y0 = np.floor(pts.min(0) - pad * self.scale - 2).astype(int)
        x1, y1 = np.ceil(pts.max(0) + pad * self.scale + 2).astype(int) + 1
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        return (slice(y0, y1), slice(x0, x1)) if x1 > x0 and y1 > y0 else None

    def coverage(self, points: np.ndarray, width: float | None = None, closed: bool = True, roi=None):
        """Anti-aliased coverage of a filled polygon (``width`` None) or a stroked polyline.

        Returns ``(coverage, roi)``: float32 in [0, 1] over the window ``roi`` (computed from
        the points when not given), or ``(None, None)`` off-canvas.
        """
        roi = roi or self.window(points, pad=width or 0.0)
        if roi is None:
            return None, None
        ys, xs = roi
        buf = np.zeros((ys.stop - ys.start, xs.stop - xs.start), np.uint8)
        fixed = [np.round((self.px(points) - (xs.start, ys.start)) * 16).astype(np.int32)]
        if width is None:
            cv2.fillPoly(buf, fixed, 255, lineType=cv2.LINE_AA, shift=4)
            return buf.astype(np.float32) / 255, roi
        line = width * self.scale
        cv2.polylines(buf, fixed, closed, 255, thickness=max(1, int(round(line))), lineType=cv2.LINE_AA, shift=4)
        return buf.astype(np.float32) * (min(1.0, line) / 255), roi

    def paint(self, cov, roi, colour, *, texture: np.ndarray | None = None, opacity: float = 1.0,
              gloss: float | None = None, relief: float | None = None, solid: bool = False) -> None:
        """Blend ``colour`` (linear RGB) over the window with weight ``cov * opacity``.

        ``texture`` modulates the colour multiplicatively (1 + texture); ``gloss`` / ``relief``
        set those layers; ``solid`` marks the pixels as foreground (against the background).
        """
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
        if relief is not None:
            self.relief[roi] += a * (relief - self.relief[roi])
        if solid:
            np.maximum(self.alpha[roi], cov, out=self.alpha[roi])

    def gaussian(self, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
        """A separable Gaussian bump over the whole canvas (outer product of 1-D profiles)."""
        return np.outer(np.exp(-(((self.ys - cy) / sy) ** 2)), np.exp(-(((self.xs - cx) / sx) ** 2)))

    def fill_labels(self, labels: np.ndarray, points: np.ndarray, value: int) -> None:
        cv2.fillPoly(labels, [np.round(self.px(points) * 16).astype(np.int32)], int(value), shift=4)


def _ellipse(centre, axes, angle: float = 0.0, steps: int = 32) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, steps, endpoint=False)
    return _rotate(np.stack([axes[0] * np.cos(t), axes[1] * np.sin(t)], 1), -angle, np.zeros(2)) + centre


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma: tuple[float, float]) -> np.ndarray:
    """Zero-mean unit-std noise blurred by (sigma_x, sigma_y) pixels: hair strands, fabric."""
    n = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigmaX=sigma[0], sigmaY=sigma[1])
    return n / max(float(n.std()), 1e-6)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1] from a ``cells x cells`` random grid."""
    grid = rng.uniform(-1, 1, size=(cells, cells)).astype(np.float32)
    return cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _waves(c: _Canvas, rng: np.random.Generator, count: int, frequency: tuple[float, float]) -> np.ndarray:
    """Sum of random plane waves in face coordinates (identity-fixed skin variation), in [-1, 1]."""
    total = np.zeros(c.shape, np.float32)
    for _ in range(count):
        w = rng.uniform(*frequency) * 2 * np.pi
        angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        ax, ay = w * np.cos(angle), w * np.sin(angle)
        # sin(ax x + ay y + p) = sin(ax x) cos(ay y + p) + cos(ax x) sin(ay y + p)
        total += np.outer(np.cos(ay * c.ys + phase), np.sin(ax * c.xs)) + np.outer(np.sin(ay * c.ys + phase), np.cos(ax * c.xs))
    return total / count


def _half_width(g: _Geometry, y: float) -> float:
    return float(np.interp(y, g.half_width_y, g.half_width_x))


def _hair_outline(f: FaceIdentity, g: _Geometry, volume: float, rng: np.random.Generator) -> np.ndarray:
    """Outer hair outline: the upper head contour pushed out by ``volume``, image-left to right."""
    right = np.stack([g.half_width_x, g.half_width_y], 1)
    right = right[right[:, 1] < 0.2]  # top of the skull down to below the eye line
    upper = np.vstack([right[::-1] * (-1.0, 1.0), right[1:]])
    centre = np.array([0.0, (f.skull_top + 0.2) / 2])
    d = upper - centre
    angle = np.arctan2(d[:, 1], d[:, 0])
    wobble = 1 + 0.25 * np.sin(angle * rng.integers(5, 10) + rng.uniform(0, 2 * np.pi))
    return centre + d * (1 + volume * wobble[:, None] / np.linalg.norm(d, axis=1, keepdims=True))


def _paint_back_hair(c: _Canvas, f: FaceIdentity, g: _Geometry, strands: np.ndarray, volume: float,
                     rng: np.random.Generator) -> None:
    """Hair hanging behind the head and down the sides (long, medium and curly styles)."""
    length = {"long": 3.2, "medium": 1.0, "curly": 1.1}.get(f.hair_style)
    if length is None:
        return
    outer = _hair_outline(f, g, volume + 0.05, rng)
    side = f.face_width + volume + 0.1
    drop = np.array([(side, length - 0.3), (side * 0.85, length), (-side * 0.85, length), (-side, length - 0.3)])
    cov, roi = c.coverage(np.vstack([outer, drop]))
    c.paint(cov, roi, np.array(f.hair) * 0.75, texture=strands, gloss=0.12, relief=-0.1, solid=True)


def _paint_front_hair(c: _Canvas, f: FaceIdentity, g: _Geometry, strands: np.ndarray, volume: float,
                      rng: np.random.Generator) -> None:
    """Hair cap over the skull down to the hairline, side drapes and fringe."""
    style, hair, fw = f.hair_style, np.array(f.hair), f.face_width
    if style == "bald":
        return
    recede = 0.14 * max(f.hairline_shape, 0.0)
    sideburn = -0.1 if style == "buzz" else 0.08
    hx = _half_width(g, 0.0) + 0.02
    line = _catmull_rom(np.array([
        (hx, sideburn), (hx - 0.08, f.hairline * 0.5), (0.75 * fw, f.hairline - recede),
        (0.3, f.hairline + 0.05 * recede), (0.0, f.hairline + 0.07 * f.hairline_shape),
        (-0.3, f.hairline + 0.05 * recede), (-0.75 * fw, f.hairline - recede), (-(hx - 0.08), f.hairline * 0.5),
        (-hx, sideburn),
    ]), closed=False)
    outer = _hair_outline(f, g, volume, rng)
    cap = np.vstack([outer[outer[:, 1] < sideburn], line])
    cov, roi = c.coverage(cap)
    if style == "buzz":
        c.paint(cov, roi, hair * 0.5 + np.array(f.skin) * 0.5, texture=strands * 0.5, opacity=0.85, solid=True)
        return
    c.paint(cov, roi, hair, texture=strands, gloss=0.2, relief=volume, solid=True)
    if style in ("medium", "long", "curly"):  # hair falling over the ears and temples
        for side in (-1.0, 1.0):
            drape = np.array([(side * (hx - 0.08), f.hairline * 0.5), (side * (hx + volume + 0.05), f.hairline * 0.3),
                              (side * (hx + volume), 0.8), (side * (hx - 0.01), 0.5)])
            cov, roi = c.coverage(drape)
            c.paint(cov, roi, hair, texture=strands, gloss=0.2, relief=volume * 0.5, solid=True)
    if style in ("bangs", "curly"):
        low = -f.brow_height - 0.1 - 0.12 * rng.random()
        k = np.linspace(-1, 1, 17)
        edge = low + 0.035 * np.sin(k * 23 + rng.uniform(0, 2 * np.pi)) - 0.12 * f.hair_part * k - 0.25 * k**4
        fringe = np.vstack([np.stack([k * hx, edge], 1), line - (0.0, 0.1)])
        cov, roi = c.coverage(fringe)
        c.paint(cov, roi, hair, texture=strands, gloss=0.2, relief=volume * 0.6)


def _paint_eye(c: _Canvas, f: FaceIdentity, n: FaceNuisance, g: _Geometry, i: int) -> None:
    """Sclera, iris, pupil, lid shadow, lash line (with a wing), lower lid and crease."""
    outline, centre = g.eyes[i], g.eye_centres[i]
    skin, lashes = np.array(f.skin), np.array(f.brows) * 0.5
    roi = c.window(outline, pad=0.12)
    if roi is None:
        return
    opening, _ = c.coverage(outline, roi=roi)
    c.paint(opening, roi, (0.6, 0.56, 0.53), gloss=0.35)
    iris_centre = centre + np.array(n.gaze) * np.array([1.0, 0.4])
    r = f.iris_radius
    for colour, radius in ((np.array(f.iris) * 0.4, r), (np.array(f.iris), r * 0.86), ((0.01, 0.01, 0.01), r * 0.4)):
        disc, _ = c.coverage(_ellipse(iris_centre, (radius, radius)), roi=roi)
        c.paint(disc * opening, roi, colour, gloss=0.35)
    upper = outline[:17]  # upper lid, inner to outer corner
    lower = np.vstack([upper[-1:], outline[17:], upper[:1]])
    shadow, _ = c.coverage(upper + (0, 0.02), width=0.05, closed=False, roi=roi)
    c.paint(shadow * opening, roi, (0.05, 0.04, 0.04), opacity=0.5)
    wing = upper[-1] + (upper[-1] - upper[-3]) * 0.9 + (0, -0.01)
    line, _ = c.coverage(np.vstack([upper, wing]), width=0.036, closed=False, roi=roi)
    c.paint(line, roi, lashes)
    line, _ = c.coverage(lower, width=0.016, closed=False, roi=roi)
    c.paint(line, roi, skin * 0.4, opacity=0.8)
    crease = centre + (upper[3:-3] - centre) * (1.05, 1.0) - (0, 0.055 + 0.02 * n.brow_raise + 0.5 * f.eye_height)
    line, _ = c.coverage(crease, width=0.02, closed=False, roi=roi)
    c.paint(line, roi, skin * 0.5, opacity=0.5)


def _paint_mouth(c: _Canvas, f: FaceIdentity, n: FaceNuisance, g: _Geometry) -> None:
    cov, roi = c.coverage(g.lips_outer)
    c.paint(cov, roi, f.lips, gloss=0.35)
    if n.mouth_open > 0.04:
        gap, roi = c.coverage(g.mouth_gap)
        c.paint(gap, roi, (0.03, 0.01, 0.01))
        top = g.mouth_gap[:21]
        height = 0.35 * (g.mouth_gap[28:, 1].max() - top[:, 1].min())
        teeth, _ = c.coverage(np.vstack([top * (0.7, 1.0), top[::-1] * (0.7, 1.0) + (0, height)]), roi=roi)
        c.paint(teeth * gap, roi, (0.26, 0.24, 0.2), gloss=0.3)
    else:
        line, roi = c.coverage(g.mouth_gap[:21], width=0.018, closed=False)
        c.paint(line, roi, np.array(f.lips) * 0.3)
    for corner in g.mouth_corners:  # commissures
        cov, roi = c.coverage(_ellipse(corner, (0.035, 0.02)))
        c.paint(cov, roi, np.array(f.skin) * 0.35, opacity=0.6)


def _paint_facial_hair(c: _Canvas, f: FaceIdentity, g: _Geometry, strands: np.ndarray) -> None:
    if f.facial_hair == "none":
        return
    colour = np.array(f.brows)
    mw, my, tip = g.mouth_corners[1, 0], g.mouth_corners[:, 1].mean(), f.nose_length
    moustache = np.array([(-mw - 0.05, my + 0.02), (-0.15, tip + 0.13), (0.15, tip + 0.13), (mw + 0.05, my + 0.02),
                          (mw * 0.6, my - 0.03), (0.0, my - 0.05), (-mw * 0.6, my - 0.03)])
    jaw = np.stack([g.half_width_x, g.half_width_y], 1)
    jaw = jaw[jaw[:, 1] > 0.35] - (0.02, 0.0)  # right jaw, top to chin
    x0 = jaw[0, 0]
    inner = np.array([(-x0 + 0.2, 0.45), (-mw - 0.08, my), (0.0, my + f.lower_lip + 0.07), (mw + 0.08, my), (x0 - 0.2, 0.45)])
    beard = np.vstack([jaw, jaw[::-1][1:] * (-1.0, 1.0), inner])
    if f.facial_hair == "stubble":
        cov, roi = c.coverage(beard)
        c.paint(cov, roi, colour, texture=strands * 0.4, opacity=0.3)
        cov, roi = c.coverage(moustache)
        c.paint(cov, roi, colour, texture=strands * 0.4, opacity=0.3)
        return
    if f.facial_hair == "beard":
        cov, roi = c.coverage(beard)
        c.paint(cov, roi, colour, texture=strands, opacity=0.92, relief=0.06)
    cov, roi = c.coverage(moustache)
    c.paint(cov, roi, colour, texture=strands, opacity=0.92, relief=0.04)


def _paint_occlusion(c: _Canvas, f: FaceIdentity, n: FaceNuisance, g: _Geometry, rng: np.random.Generator) -> None:
    """Glasses, sunglasses, mask, hat or a hand, attached to the face (they follow the pose)."""
    kind = n.occlusion
    colour = _linear(rng.uniform(10, 230, size=3))
    if kind in ("glasses", "sunglasses"):
        frame = colour * 0.3 if rng.random() < 0.6 else colour
        rx, ry = rng.uniform(0.2, 0.27), rng.uniform(0.14, 0.2)
        lenses = [_ellipse(centre + (0.0, 0.02), (rx, ry), steps=40) for centre in g.eye_centres]
        for lens in lenses:
            cov, roi = c.coverage(lens)
            if kind == "sunglasses":
                c.paint(cov, roi, (0.015, 0.015, 0.02), opacity=0.93, gloss=1.0, relief=0.12)
            else:
                c.paint(cov, roi, (0.8, 0.85, 0.9), opacity=0.06, gloss=0.6)
            cov, roi = c.coverage(lens, width=0.03)
            c.paint(cov, roi, frame, gloss=0.5, relief=0.12)
        y = 0.0
        for points in ([(-0.5 + rx, y), (0.5 - rx, y)], [(-0.5 - rx, y), (-_half_width(g, y), y - 0.03)],
                       [(0.5 + rx, y), (_half_width(g, y), y - 0.03)]):
            cov, roi = c.coverage(np.array(points), width=0.03, closed=False)
            c.paint(cov, roi, frame, relief=0.12)
    elif kind == "mask":
        top = f.nose_length * rng.uniform(0.45, 0.65)
        right = np.stack([g.half_width_x, g.half_width_y], 1)
        side = right[right[:, 1] > top] - (0.03, 0.0)  # right face edge, top to chin
        outline = np.vstack([[(0.0, top - 0.05)], side, side[::-1][1:] * (-1.0, 1.0)])
        cov, roi = c.coverage(outline)
        c.paint(cov, roi, colour * 0.3 + 0.45 if rng.random() < 0.5 else colour, relief=0.08,
                texture=_noise(rng, c.shape, (1.0, 1.0)) * 0.05)
    elif kind == "hat":
        brim_y = f.hairline * rng.uniform(0.55, 0.85)
        crown = _hair_outline(f, g, 0.25, rng)
        crown = crown[crown[:, 1] < brim_y]
        cov, roi = c.coverage(np.vstack([crown, [(-crown[0, 0], brim_y)]]))
        c.paint(cov, roi, colour, relief=0.3, solid=True, texture=_noise(rng, c.shape, (1.5, 1.5)) * 0.06)
        brim = _ellipse((0.0, brim_y), (f.face_width + 0.35, 0.12), steps=40)
        cov, roi = c.coverage(brim)
        c.paint(cov, roi, colour * 0.8, relief=0.45, solid=True)
    elif kind == "hand":
        skin = _linear(_SKIN[rng.integers(len(_SKIN))])
        centre = np.array([rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.2), rng.uniform(0.8, 1.8)])
        angle = rng.uniform(-0.6, 0.6)
        cov, roi = c.coverage(_ellipse(centre, (0.42, 0.55), angle))
        c.paint(cov, roi, skin, relief=0.35, solid=True, gloss=0.1)
        for k in range(4):
            base = centre + _rotate(np.array([[-0.3 + 0.2 * k, -0.45]]), angle, np.zeros(2))[0]
            tip = base + _rotate(np.array([[0.03 * (k - 1.5), -rng.uniform(0.45, 0.6)]]), angle, np.zeros(2))[0]
            cov, roi = c.coverage(np.array([base, tip]), width=0.17, closed=False)
            c.paint(cov, roi, skin * 0.95, relief=0.35, solid=True)


def _surface_features(c: _Canvas, f: FaceIdentity, g: _Geometry) -> np.ndarray:
    """Facial relief added to the head (face units): sockets, brow ridge, cheekbones, nose, lips, chin."""
    z = np.zeros(c.shape, np.float32)
    for side in (-1.0, 1.0):
        z -= 0.16 * c.gaussian(0.5 * side, -0.03, 0.3, 0.2)
        z += 0.1 * c.gaussian(0.5 * side, 0.0, 0.2, 0.12)
        z += 0.07 * c.gaussian(0.45 * side, -f.brow_height - 0.02, 0.35, 0.1)
        z += (0.03 + 0.06 * f.cheekbones) * c.gaussian(0.62 * side, 0.38, 0.28, 0.2)
        z -= 0.04 * c.gaussian(0.95 * side, -0.45, 0.15, 0.25)
        z += 0.1 * c.gaussian(f.nose_width * 0.75 * side, f.nose_length - 0.02, 0.08, 0.07)
        z -= 0.04 * c.gaussian(g.mouth_corners[1, 0] * side, g.mouth_corners[0, 1], 0.05, 0.05)
    z += 0.07 * c.gaussian(0.0, f.mouth_y, g.mouth_corners[1, 0] * 0.8, 0.1)
    z += 0.07 * c.gaussian(0.0, f.chin_y - 0.25, 0.25, 0.15)
    z -= 0.03 * c.gaussian(0.0, f.nose_length + 0.15, 0.08, 0.04)
    # nose: a ridge rising from the bridge to the tip, widening towards the alae
    roi = c.window(np.array([(-0.3, 0.0), (0.3, f.nose_length + 0.3)]))
    if roi is not None:
        y, x = c.ys[roi[0]][:, None], c.xs[roi[1]][None, :]
        t = np.clip(y / f.nose_length, 0, None)
        height = np.where(t < 1, t**1.4, np.exp(-(((y - f.nose_length) / 0.07) ** 2)))
        width = f.nose_bridge + (0.6 * f.nose_width - f.nose_bridge) * np.clip(t, 0, 1) ** 2
        z[roi] += f.nose_projection * height * np.exp(-((x / width) ** 2))
    return z


def _paint_face(c: _Canvas, f: FaceIdentity, n: FaceNuisance, g: _Geometry) -> None:
    """Paint every layer of the unposed face onto the canvas."""
    identity_rng = np.random.default_rng(f.texture_seed)
    rng = np.random.default_rng(n.texture_seed)
    skin = np.array(f.skin)
    style_volume = {"short": 0.07, "medium": 0.14, "long": 0.12, "bangs": 0.1, "curly": 0.32, "buzz": 0.015,
                    "bald": 0.0}[f.hair_style]
    volume = style_volume * (0.6 + 0.8 * f.hair_volume)
    strands = _noise(rng, c.shape, (2.0, 2.0) if f.hair_style == "curly" else (1.0, 3.5)) * 0.25

    _paint_back_hair(c, f, g, strands, volume, rng)
    neck = np.array([(-0.62, f.mouth_y), (0.62, f.mouth_y), (0.66, f.chin_y + 1.2), (-0.66, f.chin_y + 1.2)])
    shoulders = np.array([(-0.6, f.chin_y + 0.45), (0.6, f.chin_y + 0.45), (2.8, f.chin_y + 1.0), (2.8, 5.0), (-2.8, 5.0),
                          (-2.8, f.chin_y + 1.0)])
    cov, roi = c.coverage(neck)
    c.paint(cov, roi, skin * 0.8, gloss=0.1, solid=True, relief=-0.25)
    cov, roi = c.coverage(shoulders)
    c.paint(cov, roi, n.clothes, texture=_noise(rng, c.shape, (1.0, 1.0)) * 0.08, solid=True, relief=-0.2)
    for side in (-1.0, 1.0):
        ear = np.array([side * (_half_width(g, f.ear_y) + 0.03), f.ear_y])
        cov, roi = c.coverage(_ellipse(ear, (0.15, 0.4 * f.ear_size), 0.1 * side))
        c.paint(cov, roi, skin * np.array([0.95, 0.85, 0.85]), gloss=0.1, solid=True)
        cov, roi = c.coverage(_ellipse(ear + (side * 0.02, 0.02), (0.07, 0.26 * f.ear_size), 0.1 * side))
        c.paint(cov, roi, skin * 0.6, opacity=0.7)

    cov, roi = c.coverage(g.contour)
    blotches = 1 + 0.06 * _waves(c, identity_rng, 5, (0.4, 1.5))
    c.paint(cov, roi, skin, texture=(blotches - 1), gloss=0.12, relief=0.0, solid=True)
    # blush on the cheeks and nose, darker eye surroundings
    flush = sum(c.gaussian(0.6 * s, 0.55, 0.25, 0.2) for s in (-1, 1)) + 0.6 * c.gaussian(0.0, f.nose_length, 0.12, 0.1)
    c.albedo *= (1 + flush[..., None] * np.array([0.04, -0.08, -0.06], np.float32))
    shade = sum(c.gaussian(0.5 * s, 0.02, 0.3, 0.16) for s in (-1, 1))
    c.albedo *= (1 - 0.12 * shade[..., None])

    alar_crease = _ellipse((-f.nose_width * 0.78, f.nose_length - 0.01), (0.07, 0.08))[14:22]  # image-left ala
    for side in (-1.0, 1.0):
        nostril = _ellipse((side * f.nose_width * 0.5, f.nose_length + 0.045), (0.055, 0.028), 0.35 * side)
        cov, roi = c.coverage(nostril)
        c.paint(cov, roi, skin * 0.25, opacity=0.85)
        cov, roi = c.coverage(alar_crease * (-side, 1.0), width=0.02, closed=False)
        c.paint(cov, roi, skin * 0.6, opacity=0.5)
    _paint_mouth(c, f, n, g)
    for i in range(2):
        _paint_eye(c, f, n, g, i)
    brow_texture = strands * 0.6
    for brow in g.brows:
        cov, roi = c.coverage(brow)
        c.paint(cov, roi, f.brows, texture=brow_texture, opacity=0.92)
    _paint_facial_hair(c, f, g, strands)
    _paint_front_hair(c, f, g, strands, volume, rng)
    if n.occlusion is not None:
        _paint_occlusion(c, f, n, g, rng)


def _region_labels(c: _Canvas, f: FaceIdentity, g: _Geometry) -> np.ndarray:
    """Region index (into :data:`REGION_NAMES`) of every canvas pixel, with the definitions and
    precedence of :mod:`facemoe_model.geometry` (``docs/analyses.md``, "Facial regions") applied
    to the true outlines."""

    def fill(polygons: list[np.ndarray]) -> np.ndarray:
        mask = np.zeros(c.shape, np.uint8)
        for polygon in polygons:
            c.fill_labels(mask, polygon, 1)
        return mask

    oval = fill([g.oval])
    y = c.ys[:, None]
    jaw_band = (cv2.distanceTransform(oval, cv2.DIST_L2, cv2.DIST_MASK_PRECISE) <= JAW_BAND * c.scale) & (y > f.nose_length)
    claims = {
        "hair_background": oval == 0,
        "eyes": fill([cv2.convexHull(np.vstack([eye, brow]).astype(np.float32))[:, 0] for eye, brow in zip(g.eyes, g.brows)]) > 0,
        "nose": fill([g.nose]) > 0,
        "mouth": fill([g.lips_outer]) > 0,
        "chin_jawline": (y > g.mouth_corners[:, 1].mean()) | jaw_band,
        "forehead": y < np.interp(c.xs, *g.brow_top)[None, :],
    }
    labels = np.full(c.shape, REGION_NAMES.index("cheeks"), np.uint8)
    for name in reversed(PRECEDENCE[:-1]):
        labels[claims[name]] = REGION_NAMES.index(name)
    return labels


# --------------------------------------------------------------------------- light, pose, camera


def _light(c: _Canvas, depth: np.ndarray, n: FaceNuisance, rotation: np.ndarray) -> np.ndarray:
    """Linear RGB radiance of the canvas: wrap-around diffuse, hollows, cast shadows, specular."""
    az, el = np.radians(n.light_azimuth), np.radians(n.light_elevation)
    light = rotation.T @ np.array([np.sin(az) * np.cos(el), -np.sin(el), np.cos(az) * np.cos(el)])
    view = rotation.T @ np.array([0.0, 0.0, 1.0])
    half = (light + view) / np.linalg.norm(light + view)
    z_px = depth * c.scale
    gx = cv2.Sobel(z_px, cv2.CV_32F, 1, 0, ksize=3) / 8
    gy = cv2.Sobel(z_px, cv2.CV_32F, 0, 1, ksize=3) / 8
    norm = np.sqrt(gx**2 + gy**2 + 1)
    n_dot_l = (-gx * light[0] - gy * light[1] + light[2]) / norm
    n_dot_h = np.clip((-gx * half[0] - gy * half[1] + half[2]) / norm, 0, 1)
    wrap = 0.35
    diffuse = np.clip((n_dot_l + wrap) / (1 + wrap), 0, 1)
    hollows = cv2.GaussianBlur(depth, (0, 0), 0.12 * c.scale) - depth
    occlusion = 1 - np.clip(4 * hollows, 0, 0.6)
    # cast shadows: march towards the light over the depth map
    shadow = np.zeros_like(depth)
    planar = np.hypot(light[0], light[1])
    if planar > 0.05:
        direction, rise = light[:2] / planar, light[2] / planar
        for step in (0.04, 0.08, 0.14, 0.22, 0.32):
            d = step * c.scale
            shift = np.float32([[1, 0, d * direction[0]], [0, 1, d * direction[1]]])
            ahead = cv2.warpAffine(z_px, shift, z_px.shape[::-1], flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                   borderMode=cv2.BORDER_REPLICATE)
            np.maximum(shadow, np.clip((ahead - z_px - d * rise) / (0.03 * c.scale), 0, 1), out=shadow)
        shadow = cv2.GaussianBlur(shadow, (0, 0), 0.03 * c.scale)
    lit = n.light_strength * diffuse * (1 - 0.85 * shadow)
    tint = np.asarray(n.light_colour, np.float32)
    radiance = c.albedo * ((n.ambient * occlusion + lit * np.sqrt(occlusion))[..., None] * tint)
    radiance += (c.gloss * 0.5 * n_dot_h**40 * lit)[..., None] * tint
    return radiance


def _rotation(yaw: float, pitch: float) -> np.ndarray:
    a, b = np.radians(yaw), np.radians(pitch)
    ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rx @ ry


def _jitter(n: FaceNuisance, size: float) -> np.ndarray:
    """Residual misalignment: roll and scale about the image centre, then a shift."""
    a, s = np.radians(n.roll), n.scale
    centre = np.array([size / 2, size / 2])
    m = np.eye(3)
    m[:2, :2] = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    m[:2, 2] = centre - m[:2, :2] @ centre + np.array(n.shift) * size
    return m


def _pose(f: FaceIdentity, n: FaceNuisance, g: _Geometry, size: int):
    """Map every pixel of the supersampled output to its unposed face coordinates.

    The head turns (yaw, pitch) as the depth surface of :func:`_head_depth` seen
    orthographically; the posed 5 landmarks are aligned to the ArcFace template, then the
    residual jitter applies. Returns (face x, face y) per output pixel, the rotation and the
    landmarks in continuous coordinates of the supersampled output (pixel centres at +0.5).
    """
    rotation = _rotation(n.yaw, n.pitch)
    a, r = rotation[:2, :2], rotation[:2, 2]
    a_inv = np.linalg.inv(a)

    def depth(p: np.ndarray) -> np.ndarray:
        return _head_depth(g, f, p[..., 0], p[..., 1], smooth=True)[..., None]

    posed = g.landmarks @ a.T + depth(g.landmarks) * r
    out = size * _SUPERSAMPLE
    template = ALIGNED_FIVE_POINTS * (out / ALIGNED_SIZE)
    alignment, _ = cv2.estimateAffinePartial2D(posed.astype(np.float32), template.astype(np.float32), method=cv2.LMEDS)
    to_output = _jitter(n, out) @ np.vstack([alignment, (0.0, 0.0, 1.0)])
    # solved at the output size on a grid one pixel wider on each side, then upsampled (the
    # map is smooth): pixel k of that grid is centred at (k - 1 + 0.5) * _SUPERSAMPLE
    centres = (np.arange(size + 2, dtype=np.float64) - 0.5) * _SUPERSAMPLE
    ij = np.stack(np.meshgrid(centres, centres), -1)
    q = (ij - to_output[:2, 2]) @ np.linalg.inv(to_output[:2, :2]).T
    # The surface point seen at q is p = p0 - t d with t = z(p): a root of h(t) = t - z(p0 - t d).
    # Where the turned head folds over itself h has several roots; the largest t is the one
    # nearest to the camera. Bracket it on a grid of t, then refine by regula falsi.
    p0, d = q @ a_inv.T, a_inv @ r

    def h(t: np.ndarray) -> np.ndarray:
        return t - depth(p0 - t[..., None] * d)[..., 0]

    steps = np.linspace(0.0, _MAX_WARP_DEPTH, 12)
    values = np.stack([h(np.full(q.shape[:-1], t)) for t in steps])
    k = np.minimum(len(steps) - 2, (len(steps) - 1) - np.argmax((values <= 0)[::-1], axis=0))
    lo, hi = steps[k], steps[k + 1]
    h_lo, h_hi = np.take_along_axis(values, k[None], 0)[0], np.take_along_axis(values, k[None] + 1, 0)[0]
    for _ in range(3):
        t = lo - h_lo * (hi - lo) / np.where(h_hi - h_lo > 1e-12, h_hi - h_lo, 1.0)
        h_t = h(t)
        below = h_t <= 0
        lo, h_lo = np.where(below, t, lo), np.where(below, h_t, h_lo)
        hi, h_hi = np.where(below, hi, t), np.where(below, h_hi, h_t)
    p = (p0 - t[..., None] * d).astype(np.float32)
    wide = (size + 2) * _SUPERSAMPLE
    p = cv2.resize(p, (wide, wide), interpolation=cv2.INTER_LINEAR)[_SUPERSAMPLE:-_SUPERSAMPLE, _SUPERSAMPLE:-_SUPERSAMPLE]
    landmarks = posed @ to_output[:2, :2].T + to_output[:2, 2]
    return p, rotation, landmarks


def _background(n: FaceNuisance, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Linear RGB background: a tinted gradient with low-frequency blotches, optionally textured."""
    h, w = shape
    base = np.asarray(n.background, np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
    gx, gy = rng.uniform(-0.6, 0.6, size=2)
    shade = 0.8 + gx * (xx - 0.5) + gy * (yy - 0.5) + 0.25 * _smooth_noise(rng, shape, 4)
    image = base * shade[..., None]
    if n.background_textured:
        kind = rng.integers(3)
        if kind == 0:  # stripes
            angle, period = rng.uniform(0, np.pi), rng.uniform(0.05, 0.25)
            pattern = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period) > 0
            other = _linear(rng.uniform(20, 235, size=3)).astype(np.float32)
            image = np.where(pattern[..., None], image, other * shade[..., None])
        elif kind == 1:  # foliage-like blotches
            image = image * (1 + 0.5 * _noise(rng, shape, (2.5, 2.5))[..., None].clip(-1.5, 1.5))
        else:  # shelves / windows: random rectangles
            for _ in range(rng.integers(3, 9)):
                x0, y0 = rng.integers(0, w, size=2)
                x1, y1 = x0 + rng.integers(w // 10, w // 2), y0 + rng.integers(h // 10, h // 2)
                image[y0:y1, x0:x1] = _linear(rng.uniform(20, 235, size=3)).astype(np.float32) * shade[y0:y1, x0:x1, None]
    return np.clip(image * (n.ambient + 0.6 * n.light_strength), 0, None)


def render_face(seed: int, identity: int, sample: int, size: int = 120, config: SyntheticConfig | None = None) -> FaceSample:
    """Render sample ``sample`` of ``identity``: aligned RGB face, region masks and 5 landmarks."""
    config = config or SyntheticConfig()
    f = sample_identity(seed, identity, config)
    n = sample_nuisance(seed, identity, sample, config)
    g = _face_geometry(f, n)
    face_xy, rotation, landmarks = _pose(f, n, g, size)

    scale = _SUPERSAMPLE * size * (ALIGNED_FIVE_POINTS[1, 0] - ALIGNED_FIVE_POINTS[0, 0]) / ALIGNED_SIZE
    low = np.maximum(face_xy.reshape(-1, 2).min(0), (-3.0, -3.0)) - 2 / scale
    high = np.minimum(face_xy.reshape(-1, 2).max(0), (3.0, 4.5)) + 2 / scale
    shape = tuple(np.maximum(np.ceil((high - low) * scale).astype(int)[::-1] + 1, 1))
    c = _Canvas(low, shape, scale)
    _paint_face(c, f, n, g)
    depth = _head_depth(g, f, c.xs[None, :], c.ys[:, None], smooth=False) * (c.alpha > 0)
    depth = depth + _surface_features(c, f, g) * (depth > 0) + c.relief
    radiance = _light(c, depth, n, rotation)
    labels = _region_labels(c, f, g)

    map_xy = (face_xy - c.origin.astype(np.float32)) * np.float32(scale)
    mx, my = map_xy[..., 0], map_xy[..., 1]
    colour = cv2.remap(radiance, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    alpha = cv2.remap(c.alpha, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    region = cv2.remap(labels, mx, my, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                       borderValue=REGION_NAMES.index("hair_background"))

    rng = np.random.default_rng(n.texture_seed)
    background = _background(n, alpha.shape, rng)
    image = colour + (1 - alpha[..., None]) * background
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    alpha = cv2.resize(alpha, (size, size), interpolation=cv2.INTER_AREA)
    votes = cv2.resize(np.eye(len(REGION_NAMES), dtype=np.float32)[region], (size, size), interpolation=cv2.INTER_AREA)
    region = votes.argmax(-1)

    # auto exposure: bring the face to a mid-grey brightness (times the sample's exposure)
    face = (region != REGION_NAMES.index("hair_background")) & (alpha > 0.5)
    luminance = image @ np.array([0.2126, 0.7152, 0.0722], np.float32)
    level = float(luminance[face].mean()) if face.any() else float(luminance.mean())
    gain = np.clip(0.2 * n.exposure / max(level, 1e-4), 0.3, 8.0)
    out = np.rint(np.clip(image * gain, 0, 1) ** (1 / 2.2) * 255).astype(np.uint8)
    if n.blur_sigma > 0:
        out = gaussian_blur(out, n.blur_sigma)
    if n.noise_std > 0:
        out = GaussianNoise(n.noise_std, rng)(out)
    masks = region[None] == np.arange(len(REGION_NAMES))[:, None, None]
    landmarks = (landmarks / _SUPERSAMPLE).astype(np.float32)
    return FaceSample(image=out, masks=masks, landmarks=landmarks, identity=identity, sample=sample)


# --------------------------------------------------------------------------- on-disk data set

_MANIFEST = "manifest.json"
_GROUND_TRUTH = "ground_truth.npz"
_IN_PROGRESS = ".synthetic-in-progress"
_IDENTITY_DIR = re.compile(r"\d{5}")
_IMAGES_PER_WORKER = 200  # images per extra worker before a spawned process (~5-10 s to import) pays off


@dataclass(frozen=True)
class SyntheticGroundTruth:
    """Ground truth of a generated data set, one row per image (identity-major order).

    ``packed_masks``: uint8 [N, bytes] bit-packed region masks (unpack with :meth:`masks`);
    ``landmarks``: float32 [N, 5, 2]; ``identities`` / ``samples``: int [N]; ``paths``: the
    image files.
    """

    packed_masks: np.ndarray
    mask_shape: tuple[int, int, int]
    landmarks: np.ndarray
    identities: np.ndarray
    samples: np.ndarray
    paths: list[Path]

    def __len__(self) -> int:
        return len(self.paths)

    def masks(self, index: int | slice | np.ndarray) -> np.ndarray:
        """Region masks of image ``index`` (bool [7, H, W]; [K, 7, H, W] for a slice or array)."""
        packed = self.packed_masks[index]
        bits = np.unpackbits(packed, axis=-1, count=int(np.prod(self.mask_shape))).astype(bool)
        return bits.reshape(*packed.shape[:-1], *self.mask_shape)


def _cache_key(n_identities: int, samples_per_identity: int, seed: int, size: int, config: SyntheticConfig,
               identity_offset: int) -> str:
    payload = dict(version=GENERATOR_VERSION, n_identities=n_identities, samples_per_identity=samples_per_identity,
                   seed=seed, size=size, identity_offset=identity_offset, config=asdict(config))
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((out / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and "key" in manifest else None


def _render_identity(task: tuple[Path, int, int, int, int, SyntheticConfig]) -> tuple[int, np.ndarray, np.ndarray]:
    """Render and save every sample of one identity; returns its packed masks and landmarks."""
    out, seed, identity, samples, size, config = task
    packed, landmarks = [], []
    for sample in range(samples):
        face = render_face(seed, identity, sample, size, config)
        ok, png = cv2.imencode(".png", cv2.cvtColor(face.image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise DataError(f"PNG encoding failed for identity {identity} sample {sample}")
        atomic_write(out / f"{identity:05d}" / f"{sample:03d}.png", png.tobytes())
        packed.append(np.packbits(face.masks.reshape(-1)))
        landmarks.append(face.landmarks)
    return identity, np.stack(packed), np.stack(landmarks)


def _clear_stale(out: Path) -> None:
    """Remove a previous generation's files; refuse folders that hold something else."""
    ours = (out / _MANIFEST).exists() or (out / _IN_PROGRESS).exists()
    if not ours and out.exists() and any(out.iterdir()):
        raise InputError(f"{out} is not empty and holds no synthetic data set; choose an empty or new folder")
    for child in out.iterdir() if out.exists() else ():
        if child.is_dir() and _IDENTITY_DIR.fullmatch(child.name):
            shutil.rmtree(child)
    for name in (_MANIFEST, _GROUND_TRUTH):
        (out / name).unlink(missing_ok=True)


def generate_dataset(
    out_dir: str | os.PathLike,
    n_identities: int,
    samples_per_identity: int,
    seed: int = 0,
    size: int = 120,
    config: SyntheticConfig | None = None,
    workers: int | None = None,
    identity_offset: int = 0,
) -> Path:
    """Render a data set once into an on-disk cache and return its folder.

    Layout: ``out_dir/<identity:05d>/<sample:03d>.png`` (one folder per identity,
    identities ``identity_offset .. identity_offset + n_identities - 1``),
    ``ground_truth.npz`` (bit-packed region masks, landmarks, identity and sample per image;
    read it with :func:`load_ground_truth`) and ``manifest.json`` (arguments, config,
    counts), written last and atomically. A call whose arguments hash to the manifest's key
    returns at once; an incomplete or different folder is regenerated. ``workers``
    processes render in parallel (default: one per 200 images, at most one per CPU; <= 1
    renders in this process; workers are spawned, so a calling script needs the usual
    ``if __name__ == "__main__":`` guard).
    """
    config = config or SyntheticConfig()
    if n_identities < 1 or not 1 <= samples_per_identity <= 1000 or size < 32 or identity_offset < 0:
        raise InputError(
            f"invalid data set size: n_identities={n_identities}, samples_per_identity={samples_per_identity} "
            f"(1..1000), size={size} (>= 32), identity_offset={identity_offset} (>= 0)"
        )
    out = Path(out_dir)
    key = _cache_key(n_identities, samples_per_identity, seed, size, config, identity_offset)
    manifest = _read_manifest(out)
    if manifest is not None and manifest["key"] == key and (out / _GROUND_TRUTH).exists():
        return out
    _clear_stale(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / _IN_PROGRESS, key + "\n")

    identities = range(identity_offset, identity_offset + n_identities)
    tasks = [(out, seed, identity, samples_per_identity, size, config) for identity in identities]
    if workers is None:
        workers = min(os.cpu_count() or 1, n_identities * samples_per_identity // _IMAGES_PER_WORKER)
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    progress = tqdm(total=n_identities * samples_per_identity, unit="img", desc=f"synthetic faces -> {out}")
    with progress:
        if workers <= 1:
            stream = map(_render_identity, tasks)
            for identity, packed, landmarks in stream:
                results[identity] = packed, landmarks
                progress.update(samples_per_identity)
        else:
            # spawn: forking a process whose threads (torch, OpenCV) hold locks can deadlock the children
            context = multiprocessing.get_context("spawn")
            with context.Pool(min(workers, n_identities), initializer=cv2.setNumThreads, initargs=(1,)) as pool:
                for identity, packed, landmarks in pool.imap_unordered(_render_identity, tasks):
                    results[identity] = packed, landmarks
                    progress.update(samples_per_identity)

    def save(path: Path) -> None:
        np.savez_compressed(
            path,
            masks=np.concatenate([results[i][0] for i in identities]),
            mask_shape=np.array([len(REGION_NAMES), size, size]),
            landmarks=np.concatenate([results[i][1] for i in identities]),
            identities=np.repeat(np.array(identities), samples_per_identity),
            samples=np.tile(np.arange(samples_per_identity), n_identities),
            region_names=np.array(REGION_NAMES),
            landmark_names=np.array(LANDMARK_NAMES),
        )

    atomic_path(out / _GROUND_TRUTH, save)
    manifest = dict(
        key=key, generator_version=GENERATOR_VERSION, seed=seed, size=size, n_identities=n_identities,
        samples_per_identity=samples_per_identity, identity_offset=identity_offset,
        n_images=n_identities * samples_per_identity, layout="<identity:05d>/<sample:03d>.png",
        region_names=list(REGION_NAMES), landmark_names=list(LANDMARK_NAMES), config=asdict(config),
    )
    atomic_write(out / _MANIFEST, json.dumps(manifest, indent=2) + "\n")
    (out / _IN_PROGRESS).unlink()
    return out


def load_ground_truth(out_dir: str | os.PathLike) -> SyntheticGroundTruth:
    """Read the ground truth of a data set written by :func:`generate_dataset`."""
    out = Path(out_dir)
    if _read_manifest(out) is None or not (out / _GROUND_TRUTH).exists():
        raise DataError(f"{out} holds no complete synthetic data set (manifest.json or ground_truth.npz missing)")
    with np.load(out / _GROUND_TRUTH) as data:
        identities, samples = data["identities"], data["samples"]
        return SyntheticGroundTruth(
            packed_masks=data["masks"], mask_shape=tuple(int(v) for v in data["mask_shape"]),
            landmarks=data["landmarks"], identities=identities, samples=samples,
            paths=[out / f"{i:05d}" / f"{s:03d}.png" for i, s in zip(identities, samples)],
        )
