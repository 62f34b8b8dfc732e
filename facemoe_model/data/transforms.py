"""Image degradations for the low-resolution domain and the degradation analysis.

Each transform is a small callable taking and returning an RGB ``uint8`` array of shape
``(H, W, 3)``. Random transforms take an explicit ``rng`` (a seed or a
``numpy.random.Generator``) and draw new parameters on every call, so a transform built
from the same seed yields the same sequence of outputs.
"""
from __future__ import annotations

import cv2
import numpy as np

from ..errors import DataError, InputError

__all__ = [
    "INTERPOLATIONS",
    "DownUp",
    "GaussianBlur",
    "JpegCompression",
    "GaussianNoise",
    "RandomLowResolution",
    "downsample",
    "upsample",
    "gaussian_blur",
    "jpeg_roundtrip",
]

INTERPOLATIONS: dict[str, int] = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
}


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise DataError(f"expected an RGB uint8 image of shape (H, W, 3), got {desc}")
    return image


def _check_interpolation(name: str) -> str:
    if name not in INTERPOLATIONS:
        raise InputError(f"unknown interpolation {name!r}; choose from {', '.join(INTERPOLATIONS)}")
    return name


def _check_range(name: str, low: float, high: float, minimum: float, maximum: float) -> tuple[float, float]:
    if not minimum <= low <= high <= maximum:
        raise InputError(f"{name} must satisfy {minimum} <= low <= high <= {maximum}, got ({low}, {high})")
    return low, high


def _check_probability(name: str, p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise InputError(f"{name} must be in [0, 1], got {p}")
    return p


def downsample(image: np.ndarray, size: int) -> np.ndarray:
    """Area-average ``image`` down to ``size x size`` (what a low-resolution sensor records)."""
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def upsample(image: np.ndarray, shape: tuple[int, ...], interpolation: str) -> np.ndarray:
    """Resize ``image`` to ``shape[:2]`` (height, width) with the named ``interpolation``."""
    return cv2.resize(image, (shape[1], shape[0]), interpolation=INTERPOLATIONS[interpolation])


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode ``image`` as JPEG at ``quality`` (1..100) and decode it again."""
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise DataError(f"JPEG encoding failed for an image of shape {image.shape}")
    return cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with standard deviation ``sigma`` pixels (0 returns a copy)."""
    if sigma == 0:
        return image.copy()
    return cv2.GaussianBlur(image, (0, 0), sigmaX=float(sigma), sigmaY=float(sigma), borderType=cv2.BORDER_REFLECT_101)


class DownUp:
    """Simulate a low-resolution capture: area-downsample to ``size x size``, upsample back.

    The down step always averages pixel areas (as a low-resolution sensor would); the up
    step uses ``interpolation`` (``nearest``, ``bilinear``, ``bicubic`` or ``area``), or one
    drawn uniformly from ``interpolations`` on every call when ``interpolation`` is None.
    """

    def __init__(
        self,
        size: int,
        interpolation: str | None = "bicubic",
        interpolations: tuple[str, ...] = tuple(INTERPOLATIONS),
        rng: np.random.Generator | int | None = None,
    ) -> None:
        if size < 1:
            raise InputError(f"down-sampling size must be >= 1, got {size}")
        self.size = int(size)
        self.interpolation = None if interpolation is None else _check_interpolation(interpolation)
        self.interpolations = tuple(_check_interpolation(name) for name in interpolations)
        self.rng = np.random.default_rng(rng)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = _check_image(image)
        interpolation = self.interpolation or self.interpolations[self.rng.integers(len(self.interpolations))]
        return upsample(downsample(image, self.size), image.shape, interpolation)

    def __repr__(self) -> str:
        how = repr(self.interpolation) if self.interpolation else f"random from {self.interpolations}"
        return f"DownUp(size={self.size}, interpolation={how})"


class GaussianBlur:
    """Gaussian blur with a fixed ``sigma`` in pixels; ``sigma=0`` is the identity."""

    def __init__(self, sigma: float) -> None:
        if sigma < 0:
            raise InputError(f"blur sigma must be >= 0, got {sigma}")
        self.sigma = float(sigma)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return gaussian_blur(_check_image(image), self.sigma)

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma={self.sigma:g})"


class JpegCompression:
    """JPEG encode/decode round trip at ``quality`` (1 = worst, 100 = best)."""

    def __init__(self, quality: int) -> None:
        if not 1 <= quality <= 100:
            raise InputError(f"JPEG quality must be in 1..100, got {quality}")
        self.quality = int(quality)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return jpeg_roundtrip(_check_image(image), self.quality)

    def __repr__(self) -> str:
        return f"JpegCompression(quality={self.quality})"


class GaussianNoise:
    """Add zero-mean Gaussian noise of standard deviation ``std`` (in 0..255 units), then clip."""

    def __init__(self, std: float, rng: np.random.Generator | int | None = None) -> None:
        if std < 0:
            raise InputError(f"noise std must be >= 0, got {std}")
        self.std = float(std)
        self.rng = np.random.default_rng(rng)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = _check_image(image)
        noise = self.rng.normal(0.0, self.std, size=image.shape)
        return np.clip(np.rint(image + noise), 0, 255).astype(np.uint8)

    def __repr__(self) -> str:
        return f"GaussianNoise(std={self.std:g})"


class RandomLowResolution:
    """Random low-resolution degradation for training.

    Per call: with probability ``blur_prob`` a Gaussian blur (sigma uniform in
    ``blur_sigma``, the capture's optics); area-downsampling to ``s x s`` with ``s`` uniform
    in ``size_range`` (inclusive); with probability ``jpeg_prob`` JPEG compression of the
    small image (quality uniform in ``jpeg_quality``); upsampling back with an interpolation
    drawn from ``interpolations``.
    """

    def __init__(
        self,
        size_range: tuple[int, int] = (12, 64),
        interpolations: tuple[str, ...] = tuple(INTERPOLATIONS),
        blur_prob: float = 0.3,
        blur_sigma: tuple[float, float] = (0.5, 1.5),
        jpeg_prob: float = 0.3,
        jpeg_quality: tuple[int, int] = (30, 90),
        rng: np.random.Generator | int | None = None,
    ) -> None:
        self.size_range = tuple(int(v) for v in _check_range("size_range", *size_range, 1, np.inf))
        if not interpolations:
            raise InputError("interpolations must name at least one interpolation")
        self.interpolations = tuple(_check_interpolation(name) for name in interpolations)
        self.blur_prob = _check_probability("blur_prob", blur_prob)
        self.blur_sigma = _check_range("blur_sigma", *blur_sigma, 0.0, np.inf)
        self.jpeg_prob = _check_probability("jpeg_prob", jpeg_prob)
        self.jpeg_quality = tuple(int(v) for v in _check_range("jpeg_quality", *jpeg_quality, 1, 100))
        self.rng = np.random.default_rng(rng)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = _check_image(image)
        shape = image.shape
        if self.rng.random() < self.blur_prob:
            image = gaussian_blur(image, self.rng.uniform(*self.blur_sigma))
        size = int(self.rng.integers(self.size_range[0], self.size_range[1] + 1))
        small = downsample(image, size)
        if self.rng.random() < self.jpeg_prob:
            small = jpeg_roundtrip(small, int(self.rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1)))
        interpolation = self.interpolations[self.rng.integers(len(self.interpolations))]
        return upsample(small, shape, interpolation)

    def __repr__(self) -> str:
        return (
            f"RandomLowResolution(size_range={self.size_range}, interpolations={self.interpolations}, "
            f"blur_prob={self.blur_prob:g}, blur_sigma={self.blur_sigma}, "
            f"jpeg_prob={self.jpeg_prob:g}, jpeg_quality={self.jpeg_quality})"
        )
