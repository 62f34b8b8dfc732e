"""The image path: listing image files, decoding them, and turning them into model inputs.

Nothing else in the project decodes images. Three steps:

* **listing** — :func:`list_images` (a folder, recursively, or one image file) and
  :func:`list_identity_folders` (``root/<identity>/**/<file>``, stray files reported);
  hidden files and folders (names starting with ``.``) are always skipped;
* **decoding** — :func:`decode_image` (bytes) and :func:`read_image` (a file) give RGB
  ``uint8 [H, W, 3]``: grey images are expanded to three channels, an alpha channel is
  dropped, 16-bit images are scaled to 8 bits (``value >> 8``) and the EXIF orientation is
  applied (OpenCV ``IMREAD_COLOR``); large images are read reduced (:func:`read_image_scaled`:
  the size from the header, JPEGs decoded at 1/2, 1/4 or 1/8 inside libjpeg, anything still
  larger area-downscaled right after decoding), so the full-resolution pixels of a
  10000x10000 JPEG are never held;
* **preprocessing** — :func:`preprocess` gives the normalised model input; the gradient path
  splits it into :func:`to_unit_tensor` (pixels in [0, 1], what an attack perturbs) and
  :func:`normalise`, with ``normalise(to_unit_tensor(img, s))`` bit-identical to
  ``preprocess(img, s)``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from ..errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "INPUT_SIZE",
    "IdentityListing",
    "list_images",
    "visible_files",
    "identity_folders",
    "list_identity_folders",
    "decode_image",
    "read_image",
    "JPEG_REDUCTIONS",
    "MAX_SIDE",
    "encoded_size",
    "decode_reduced",
    "reduction_for",
    "read_image_scaled",
    "unreadable_reason",
    "preprocess",
    "to_unit_tensor",
    "normalise",
]

IMAGE_EXTENSIONS = frozenset({".bmp", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"})
"""File suffixes (lower case) that :func:`list_images` treats as images."""

INPUT_SIZE = 120
"""Input side of the official FaceMoE network (112x112 aligned crops resized to 120)."""

MAX_SIDE = 2048
"""Default longest side :func:`read_image_scaled` decodes to; smaller images are read exactly
as :func:`read_image` reads them."""

JPEG_REDUCTIONS = (1, 2, 4, 8)
"""Scales libjpeg decodes at directly (``cv2.IMREAD_REDUCED_COLOR_2/4/8``)."""

_REDUCED_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


# --- listing ------------------------------------------------------------------------------


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def list_images(root: str | os.PathLike) -> list[Path]:
    """Image files under ``root`` (recursive, sorted by relative POSIX path), or ``[root]`` for one image file.

    Only suffixes in :data:`IMAGE_EXTENSIONS` count; hidden files and folders are skipped.
    Raises a one-line :class:`DataError` when ``root`` is missing, is a file that is not an
    image, or is a folder holding no image.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"image folder not found: {root}")
    if root.is_file():
        if root.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"not an image file: {root}")
        return [root]
    if not root.is_dir():
        raise DataError(f"image folder not found (or not a folder): {root}")
    images = sorted(
        (
            p
            for p in root.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and not _hidden(p.relative_to(root)) and p.is_file()
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not images:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {root}")
    return images


def visible_files(folder: str | os.PathLike) -> list[Path]:
    """Every file under ``folder`` (recursive, sorted per level), hidden files and folders excluded.

    No suffix filter: whether a file is an image is decided by decoding it. A missing folder
    has no files.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return found


def identity_folders(root: str | os.PathLike) -> list[Path]:
    """The visible sub-folders of ``root``, sorted by name; :class:`DataError` when ``root`` is not a folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


@dataclass(frozen=True)
class IdentityListing:
    """An identity-folder tree ``root/<identity>/**/<file>``.

    Attributes:
        root: the listed folder.
        classes: identity names (sorted folder names); label ``i`` is ``classes[i]``.
        files: ``(path, label)`` of every visible file inside an identity folder.
        stray: visible files directly in ``root`` (they belong to no identity).
    """

    root: Path
    classes: list[str]
    files: list[tuple[Path, int]]
    stray: list[Path]


def list_identity_folders(root: str | os.PathLike) -> IdentityListing:
    """List ``root/<identity>/**/<file>``; files directly in ``root`` are reported as ``stray``."""
    root = Path(root)
    folders = identity_folders(root)
    files = [(path, label) for label, folder in enumerate(folders) for path in visible_files(folder)]
    stray = [p for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")]
    return IdentityListing(root, [f.name for f in folders], files, stray)


# --- decoding -----------------------------------------------------------------------------


def decode_image(data: bytes) -> np.ndarray | None:
    """Decode encoded image bytes (JPEG, PNG, ...) to RGB ``uint8 [H, W, 3]``; None if they are not an image.

    Grey becomes three equal channels, alpha is dropped, 16-bit is scaled to 8 bits and the
    EXIF orientation is applied.
    """
    try:
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as RGB ``uint8 [H, W, 3]`` (as :func:`decode_image`).

    Raises a one-line :class:`DataError` naming the file when it cannot be read or decoded.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc.strerror or exc}") from None
    image = decode_image(data)
    if image is None:
        raise DataError(f"cannot decode image {path}: not an image file or corrupt")
    return image


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encoded_size(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` of encoded image bytes from the header alone (Pillow; EXIF
    orientation not applied), None when Pillow cannot read the header. A PNG's size is read
    from its IHDR chunk directly (what Pillow reads; a tenth of the time of opening it)."""
    import io
    import warnings

    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        if width > 0 and height > 0:
            return height, width

    from PIL import Image, UnidentifiedImageError

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # only the header is read: no decompression bomb check (or warning)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return height, width


def decode_reduced(data: bytes, reduction: int = 1) -> tuple[np.ndarray, np.ndarray] | None:
    """Decode image bytes at ``1 / reduction`` scale (one of :data:`JPEG_REDUCTIONS`):
    ``(uint8 [h, w, 3] RGB, scale)``, ``scale`` the ``(x, y)`` full-resolution pixels per
    decoded pixel.

    JPEGs are scaled inside libjpeg (the full-resolution pixels are never held; decoded pixel
    ``i`` covers full pixels ``[k i, k (i + 1))``, so ``scale`` is exactly ``k``); other formats
    are decoded fully, then area-averaged. None when the bytes are no image.
    """
    if reduction not in _REDUCED_FLAGS:
        raise ValueError(f"reduction must be one of {JPEG_REDUCTIONS}, got {reduction}")
    is_jpeg = data[:3] == b"\xff\xd8\xff"
    try:
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _REDUCED_FLAGS[reduction] if is_jpeg else cv2.IMREAD_COLOR)
    except cv2.error:
        bgr = None
    if bgr is None:
        return None
    scale = np.array([float(reduction), float(reduction)]) if is_jpeg else np.ones(2)
    if not is_jpeg and reduction > 1:
        height, width = bgr.shape[:2]
        size = (max(1, round(width / reduction)), max(1, round(height / reduction)))
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
        scale = np.array([width / size[0], height / size[1]])
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=bgr), scale


def reduction_for(height: int, width: int, max_side: int = MAX_SIDE) -> int:
    """Smallest :data:`JPEG_REDUCTIONS` factor bringing the long side to ``max_side`` or less
    (the largest when none does)."""
    for reduction in JPEG_REDUCTIONS:
        if -(-max(height, width) // reduction) <= max_side:
            return reduction
    return JPEG_REDUCTIONS[-1]


def read_image_scaled(
    path: str | os.PathLike, max_side: int | None = MAX_SIDE, *, reduction: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read an image file reduced so its long side is at most ``max_side``: ``(uint8 RGB,
    scale)``, ``scale`` the ``(x, y)`` full-resolution pixels per returned pixel (``[1, 1]``
    when the image is read as it is, bit-identical to :func:`read_image`).

    The size comes from the header; a JPEG is decoded at 1/2, 1/4 or 1/8 inside libjpeg, and
    an image still larger than ``max_side`` is area-downscaled right after decoding.
    ``reduction`` forces a libjpeg factor instead (e.g. a finer decode of a small face).
    ``max_side=None`` reads at full resolution. One-line :class:`DataError` as
    :func:`read_image`, also when the pixels do not fit in memory.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc.strerror or exc}") from None
    except MemoryError:
        raise DataError(f"cannot read image {path}: file too large for memory") from None
    size = encoded_size(data)
    if reduction is None:
        reduction = reduction_for(*size, max_side) if (size is not None and max_side is not None) else 1
    try:
        decoded = decode_reduced(data, reduction)
        del data
        if decoded is None:
            raise DataError(f"cannot decode image {path}: not an image file or corrupt")
        image, scale = decoded
        height, width = image.shape[:2]
        if max_side is not None and max(height, width) > max_side:
            factor = max_side / max(height, width)
            shape = (max(1, round(width * factor)), max(1, round(height * factor)))
            image = cv2.resize(image, shape, interpolation=cv2.INTER_AREA)
            scale = scale * np.array([width / shape[0], height / shape[1]])
    except (MemoryError, cv2.error) as exc:
        raise DataError(f"cannot decode image {path}: too large to decode ({type(exc).__name__})") from None
    return image, scale


def unreadable_reason(source: Path | bytes) -> str | None:
    """Why ``source`` (a file or encoded bytes) cannot be used as an image, or None when it decodes.

    Reasons: ``"missing"``, ``"unreadable (<OSError type>)"``, ``"not a decodable image"``.
    """
    try:
        data = source.read_bytes() if isinstance(source, Path) else source
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({type(exc).__name__})"
    return None if decode_image(data) is not None else "not a decodable image"


# --- preprocessing ------------------------------------------------------------------------


def _resized_rgb(image: np.ndarray, size: int, caller: str) -> np.ndarray:
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"{caller} expects a uint8 HxWx3 RGB or HxW grey image, got {image.dtype} {image.shape}")
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)


def preprocess(image: np.ndarray, size: int = INPUT_SIZE) -> torch.Tensor:
    """Resize an RGB ``uint8`` image (HxWx3, or HxW grey) to ``size`` x ``size`` and normalise it.

    Square resize without crop (bilinear, OpenCV ``INTER_LINEAR``), then
    ``(x / 255 - 0.5) / 0.5`` so values lie in [-1, 1]. Returns a float32 tensor [3, size, size].
    """
    resized = _resized_rgb(image, size, "preprocess")
    return torch.from_numpy(resized).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def to_unit_tensor(image: np.ndarray, size: int = INPUT_SIZE) -> torch.Tensor:
    """The resize of :func:`preprocess` without the normalisation: float32 ``[3, size, size]`` in [0, 1].

    This is the pixel space an attack or a gradient map works in; :func:`normalise` maps it to
    the model input.
    """
    resized = _resized_rgb(image, size, "to_unit_tensor")
    return torch.from_numpy(resized).permute(2, 0, 1).float().div_(255.0)


def normalise(x01: torch.Tensor) -> torch.Tensor:
    """Model input from pixels in [0, 1] (``(x - 0.5) / 0.5``, any leading shape); differentiable.

    Computed as ``2x - 1`` so that ``normalise(to_unit_tensor(img, s))`` equals
    ``preprocess(img, s)`` bit for bit (doubling is exact in floating point).
    """
    return x01 * 2.0 - 1.0
