"""Region occlusion: mask one facial region of a face image, found from its landmarks (issue 12).

The TinyFace-style occlusion the paper mentions: every pixel of one facial region
(:data:`~moescope.regions.REGIONS`: eyes, nose, mouth, ...; the partition of
:func:`moescope.regions.region_masks`) is set to a flat grey. Landmarks come from Face Mesh
(:func:`moescope.landmarks.detect_landmarks`); where no face is found the caller decides
(e.g. the aligned-face template, :func:`moescope.landmarks.template_landmarks`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import MoescopeError
from .regions import REGIONS, region_masks

__all__ = ["OCCLUSION_FILL", "check_regions", "occlude", "RegionOcclusion"]

OCCLUSION_FILL = 128
"""Grey level (0..255) the occluded pixels are set to (mid grey: the normalised input's zero)."""


def check_regions(names: Sequence[str]) -> list[str]:
    """``names`` if each is a facial region of :data:`REGIONS`, else a one-line error."""
    unknown = [n for n in names if n not in REGIONS]
    if unknown:
        raise MoescopeError(f"--occlude: unknown region {unknown[0]!r}; choose from {', '.join(REGIONS)}")
    return list(names)


def occlude(image: np.ndarray, landmarks: np.ndarray, region: str, fill: int = OCCLUSION_FILL) -> np.ndarray:
    """A copy of the RGB ``uint8`` ``image`` with every pixel of ``region`` set to ``fill``.

    ``landmarks``: ``[468, 2]`` Face Mesh points in the image's pixel coordinates.
    """
    (region,) = check_regions([region])
    h, w = image.shape[:2]
    mask = region_masks(landmarks, h, w)[REGIONS.index(region)]
    out = image.copy()
    out[mask] = fill
    return out


class RegionOcclusion:
    """``occlude(image, landmarks, region)`` as a degradation of one facial ``region``."""

    def __init__(self, region: str, fill: int = OCCLUSION_FILL) -> None:
        (self.region,) = check_regions([region])
        self.fill = int(fill)

    def __call__(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        return occlude(image, landmarks, self.region, self.fill)

    def __repr__(self) -> str:
        return f"RegionOcclusion(region={self.region!r}, fill={self.fill})"
