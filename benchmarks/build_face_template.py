"""Regenerate moescope/assets/face_template_468.npy, the aligned-face landmark template.

The template is computed here from real photos shipped by scikit-image, nothing is downloaded:
mediapipe Face Mesh runs on the 100 face crops of ``skimage.data.lfw_subset()`` (25x25
grey), every detected face is aligned to the ArcFace 112x112 five points and the landmarks are
averaged (:func:`moescope.landmarks.build_template`).

    python -m benchmarks.build_face_template      (from the repository root)
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import skimage.data

from moescope.landmarks import TEMPLATE_ASSET, build_template, detect_landmarks
from facemoe_model.fileio import atomic_write

LFW_FACES = 100  # lfw_subset(): the first 100 of its 200 crops are faces, the rest are not


def lfw_faces() -> list[np.ndarray]:
    """The 100 ``lfw_subset()`` faces as ``uint8 [25, 25, 3]`` RGB."""
    grey = np.round(skimage.data.lfw_subset()[:LFW_FACES] * 255).astype(np.uint8)
    return [np.repeat(face[..., None], 3, axis=2) for face in grey]


def main() -> None:
    landmarks = detect_landmarks(lfw_faces(), use_cache=False, progress=False)
    found = [points for points in landmarks if points is not None]
    template = build_template(found)
    buffer = io.BytesIO()
    np.save(buffer, template)
    target = Path(__file__).resolve().parents[1] / "moescope" / "assets" / TEMPLATE_ASSET
    atomic_write(target, buffer.getvalue())
    print(f"faces found: {len(found)}/{len(landmarks)}; wrote {target} {template.shape} {template.dtype}")


if __name__ == "__main__":
    main()
