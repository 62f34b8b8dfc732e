"""Face geometry shared by the model package and moescope: the aligned-face frame and the facial regions.

* ``ALIGNED_SIZE`` / ``ALIGNED_FIVE_POINTS``: the standard ArcFace/insightface five points (eye
  centres, nose tip, mouth corners; image-left first) of a 112x112 aligned face crop. FaceMoE
  is trained on such crops resized to its input size (120).
* ``REGIONS``: the facial regions of the routing analyses, in table order; ``PRECEDENCE``: which
  region claims a pixel where outlines overlap (first wins); ``JAW_BAND``: width of the jaw band
  along the lower face oval, as a fraction of the inter-ocular distance. The definitions are in
  ``docs/analyses.md`` ("Facial regions").
"""
from __future__ import annotations

import numpy as np

__all__ = ["ALIGNED_SIZE", "ALIGNED_FIVE_POINTS", "REGIONS", "PRECEDENCE", "JAW_BAND"]

ALIGNED_SIZE = 112
ALIGNED_FIVE_POINTS = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)

REGIONS = ("eyes", "nose", "mouth", "forehead", "cheeks", "chin_jawline", "hair_background")
PRECEDENCE = ("hair_background", "eyes", "nose", "mouth", "chin_jawline", "forehead", "cheeks")
JAW_BAND = 0.15
