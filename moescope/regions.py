"""Facial regions (docs/analyses.md, B.1 / B.2) as pixel masks and as soft fractions on token grids.

Regions come from Face Mesh landmarks (:mod:`moescope.landmarks`), in the face's own frame:
``u`` runs from the image-left eye centre to the other eye centre and ``v`` points down the
face (perpendicular to ``u``), so head roll is handled.

- eyes: per side, the convex hull of the eye contour and the eyebrow (eyelid included);
- nose: the convex hull of Face Mesh's nose landmarks (bridge from between the eyes to the alae);
- mouth: the outer lip contour;
- forehead: inside the face oval, above the upper eyebrow edges (interpolated along ``u``);
- chin_jawline: inside the oval, below the line through the mouth corners, plus a band of
  ``JAW_BAND`` x inter-ocular distance inside the oval contour below the nose tip;
- cheeks: the rest of the oval;
- hair_background: outside the face oval.

Precedence where these overlap (each pixel gets the first that claims it):
hair_background > eyes > nose > mouth > chin_jawline > forehead > cheeks.
"""
from __future__ import annotations

from functools import cache, lru_cache
from typing import NamedTuple, Sequence

import cv2
import numpy as np

from facemoe_model.geometry import JAW_BAND, PRECEDENCE, REGIONS

from .landmarks import MOUTH_CORNERS, NOSE_TIP, NUM_LANDMARKS, five_points, landmark_set

__all__ = ["JAW_BAND", "PRECEDENCE", "REGIONS", "hard_labels", "pool_labels_to_grid", "pool_labels_to_grids", "pool_to_grid", "region_labels", "region_masks"]


_SUBPIXEL_BITS = 8


def _chains(connections: frozenset[tuple[int, int]]) -> list[list[int]]:
    """Ordered landmark chains (closed loops or open paths) of a connection set whose landmarks
    have at most two neighbours; a loop's first index is not repeated at its end."""
    neighbours: dict[int, set[int]] = {}
    for a, b in connections:
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    unvisited = set(neighbours)
    chains = []
    while unvisited:
        ends = sorted(i for i in unvisited if len(neighbours[i]) == 1)
        chain = [ends[0] if ends else min(unvisited)]
        unvisited.discard(chain[0])
        while step := sorted(neighbours[chain[-1]] & unvisited):
            chain.append(step[0])
            unvisited.discard(step[0])
        chains.append(chain)
    return chains


class _Outlines(NamedTuple):
    """Landmark indices of the region outlines, from Face Mesh's connection sets."""

    oval: list[int]  # closed loop
    eyes: list[list[int]]  # per side: eye contour and eyebrow points (for a convex hull)
    brows: list[list[int]]  # upper and lower edge chains of the image-left brow, then the other
    nose: list[int]  # nose points (for a convex hull)
    mouth: list[int]  # outer lip loop


@cache
def _outlines() -> _Outlines:
    from .mesh import face_mesh_connections as fmc

    sides = ((fmc.FACEMESH_RIGHT_EYE, fmc.FACEMESH_RIGHT_EYEBROW), (fmc.FACEMESH_LEFT_EYE, fmc.FACEMESH_LEFT_EYEBROW))
    return _Outlines(
        oval=_chains(fmc.FACEMESH_FACE_OVAL)[0],
        eyes=[landmark_set(eye | brow) for eye, brow in sides],
        brows=[chain for _, brow in sides for chain in _chains(brow)],
        nose=landmark_set(fmc.FACEMESH_NOSE),
        # The lips are an outer and an inner loop; the outer one runs through the mouth corners.
        mouth=next(loop for loop in _chains(fmc.FACEMESH_LIPS) if MOUTH_CORNERS[0] in loop),
    )


def _fill(shape: tuple[int, int], *polygons: np.ndarray) -> np.ndarray:
    """Boolean mask of the pixels inside any of ``polygons`` (continuous pixel coordinates)."""
    mask = np.zeros(shape, np.uint8)
    for polygon in polygons:
        vertices = np.round((polygon - 0.5) * (1 << _SUBPIXEL_BITS)).astype(np.int32)
        cv2.fillPoly(mask, [vertices], 1, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    return mask.view(bool)


@lru_cache(maxsize=16)
def _pixel_centres(height: int, width: int) -> np.ndarray:
    """``[height, width, 2]`` (x, y) centres of the pixels (cached: read-only)."""
    rows, cols = np.mgrid[0:height, 0:width]
    pixels = np.stack([cols + 0.5, rows + 0.5], axis=-1)
    pixels.flags.writeable = False
    return pixels


def _convex_hull(points: np.ndarray) -> np.ndarray:
    return cv2.convexHull(points.astype(np.float32))[:, 0].astype(np.float64)


def region_labels(landmarks: np.ndarray, height: int, width: int) -> np.ndarray:
    """``int64 [height, width]`` index into ``REGIONS`` of each pixel (see module docstring)."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (NUM_LANDMARKS, 2):
        raise ValueError(f"landmarks must be [{NUM_LANDMARKS}, 2], got {list(landmarks.shape)}")
    outlines = _outlines()
    shape = (height, width)

    eye_centres = five_points(landmarks)[:2]
    interocular = float(np.linalg.norm(eye_centres[1] - eye_centres[0]))
    u_axis = (eye_centres[1] - eye_centres[0]) / max(interocular, 1e-9)
    v_axis = np.array([-u_axis[1], u_axis[0]])
    pixels = _pixel_centres(height, width)
    pixel_u, pixel_v = pixels @ u_axis, pixels @ v_axis

    oval = _fill(shape, landmarks[outlines.oval])
    eyes = _fill(shape, *(_convex_hull(landmarks[side]) for side in outlines.eyes))
    nose = _fill(shape, _convex_hull(landmarks[outlines.nose]))
    mouth = _fill(shape, landmarks[outlines.mouth])

    # Forehead: above the upper edges of the eyebrows (of each brow's two chains, the higher one).
    brow_chains = [landmarks[chain] for chain in outlines.brows]
    upper_edges = np.concatenate(
        [min(pair, key=lambda chain: float((chain @ v_axis).mean())) for pair in (brow_chains[:2], brow_chains[2:])]
    )
    brow_u, brow_v = upper_edges @ u_axis, upper_edges @ v_axis
    order = np.argsort(brow_u)
    forehead = pixel_v < np.interp(pixel_u, brow_u[order], brow_v[order])

    left_corner, right_corner = landmarks[list(MOUTH_CORNERS)]
    mouth_normal = np.array([left_corner[1] - right_corner[1], right_corner[0] - left_corner[0]])  # points down
    below_mouth = (pixels - left_corner) @ mouth_normal > 0
    distance_to_oval = cv2.distanceTransform(oval.view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    jaw_band = (distance_to_oval <= JAW_BAND * interocular) & (pixel_v > landmarks[NOSE_TIP] @ v_axis)

    claims = {
        "hair_background": ~oval,
        "eyes": eyes,
        "nose": nose,
        "mouth": mouth,
        "chin_jawline": below_mouth | jaw_band,
        "forehead": forehead,
    }
    labels = np.full(shape, REGIONS.index("cheeks"), dtype=np.int64)
    for name in reversed(PRECEDENCE[:-1]):
        labels[claims[name]] = REGIONS.index(name)
    return labels


def region_masks(landmarks: np.ndarray, height: int, width: int) -> np.ndarray:
    """``bool [7, height, width]`` masks of ``REGIONS``: a partition, every pixel in exactly one."""
    return region_labels(landmarks, height, width)[None] == np.arange(len(REGIONS))[:, None, None]


@lru_cache(maxsize=64)
def _overlap(size: int, covered: float, cells: int) -> np.ndarray:
    """``[cells, size]`` length of each of ``cells`` equal intervals tiling ``[0, covered)``
    that falls in each unit pixel interval ``[i, i + 1)`` (cached: read-only)."""
    bounds = np.arange(cells + 1) * (covered / cells)
    pixel = np.arange(size)
    overlap = np.clip(np.minimum(bounds[1:, None], pixel + 1.0) - np.maximum(bounds[:-1, None], pixel), 0.0, None)
    overlap.flags.writeable = False
    return overlap


def pool_to_grid(
    masks: np.ndarray, grid_hw: tuple[int, int], *, input_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """Area fraction of each token cell covered by each mask: ``float64 [R, gh, gw]``.

    The model resizes the whole image (no crop) to its input size, and its token grid tiles
    that input, so a token covers an equal ``H/gh x W/gw`` share of the original image, whatever
    the input size (e.g. a 112-px image resized to 120 with a 20x20 grid: 5.6-px cells). Cell
    boundaries need not fall on pixels: each pixel counts by the exact area it shares with the
    cell. If ``input_hw`` is given and not divisible by the grid, the cells are
    ``input // grid`` input pixels from the top-left corner, and the right/bottom remainder
    (dropped by a strided patch embedding) belongs to no token.

    For masks that partition the image (:func:`region_masks`) every cell sums to 1.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [regions, H, W], got shape {list(masks.shape)}")
    _, height, width = masks.shape
    grid_h, grid_w = grid_hw
    covered_h, covered_w = float(height), float(width)
    if input_hw is not None:
        covered_h *= (input_hw[0] // grid_h) * grid_h / input_hw[0]
        covered_w *= (input_hw[1] // grid_w) * grid_w / input_hw[1]
    rows = _overlap(height, covered_h, grid_h)
    cols = _overlap(width, covered_w, grid_w)
    area = (covered_h / grid_h) * (covered_w / grid_w)
    return (rows @ masks.astype(np.float64) @ cols.T) / area  # [gh, H] @ [R, H, W] @ [W, gw]


@lru_cache(maxsize=64)
def _histogram_bins(height: int, width: int, covered_h: float, covered_w: float, grid_h: int, grid_w: int,
                    num_regions: int) -> tuple[np.ndarray, np.ndarray] | None:
    """For cells of whole pixels: ``(pixels inside a cell (flat indices), their cell x
    num_regions)``; None when a cell boundary falls inside a pixel (cached: read-only)."""
    cell_h, cell_w = covered_h / grid_h, covered_w / grid_w
    if not (cell_h.is_integer() and cell_w.is_integer() and covered_h.is_integer() and covered_w.is_integer()):
        return None
    rows = np.arange(int(covered_h)) // int(cell_h)
    cols = np.arange(int(covered_w)) // int(cell_w)
    pixels = (np.arange(int(covered_h))[:, None] * width + np.arange(int(covered_w))[None, :]).ravel()
    bins = ((rows[:, None] * grid_w + cols[None, :]) * num_regions).ravel()
    pixels.flags.writeable = bins.flags.writeable = False
    return pixels, bins


def _covered(height: int, width: int, grid_hw: tuple[int, int], input_hw: tuple[int, int] | None) -> tuple[float, float]:
    """The image extent the grid's cells tile (the whole image, less a strided patch embedding's remainder)."""
    covered_h, covered_w = float(height), float(width)
    if input_hw is not None:
        covered_h *= (input_hw[0] // grid_hw[0]) * grid_hw[0] / input_hw[0]
        covered_w *= (input_hw[1] // grid_hw[1]) * grid_hw[1] / input_hw[1]
    return covered_h, covered_w


def _cell_counts(labels: np.ndarray, grid_hw: tuple[int, int], input_hw: tuple[int, int] | None,
                 num_regions: int) -> np.ndarray | None:
    """``int64 [gh, gw, R]`` pixels of each region in each cell when the cells are whole pixels, else None."""
    height, width = labels.shape
    histogram = _histogram_bins(height, width, *_covered(height, width, grid_hw, input_hw), *grid_hw, num_regions)
    if histogram is None:
        return None
    pixels, bins = histogram
    counts = np.bincount(bins + labels.ravel()[pixels], minlength=grid_hw[0] * grid_hw[1] * num_regions)
    return counts.reshape(*grid_hw, num_regions)


def _cell_area(height: int, width: int, grid_hw: tuple[int, int], input_hw: tuple[int, int] | None) -> float:
    covered_h, covered_w = _covered(height, width, grid_hw, input_hw)
    return (covered_h / grid_hw[0]) * (covered_w / grid_hw[1])


def pool_labels_to_grid(
    labels: np.ndarray, grid_hw: tuple[int, int], *, input_hw: tuple[int, int] | None = None, num_regions: int = len(REGIONS)
) -> np.ndarray:
    """:func:`pool_to_grid` of the one-hot masks of a label image (``int [H, W]`` region indices,
    e.g. :func:`region_labels`), without building them: a histogram per cell when the cells are
    whole pixels (the bundled faces and every aligned crop), the exact area weights otherwise."""
    return pool_labels_to_grids(labels, [grid_hw], input_hw=input_hw, num_regions=num_regions)[tuple(grid_hw)]


def pool_labels_to_grids(
    labels: np.ndarray, grids: Sequence[tuple[int, int]], *, input_hw: tuple[int, int] | None = None,
    num_regions: int = len(REGIONS),
) -> dict[tuple[int, int], np.ndarray]:
    """:func:`pool_labels_to_grid` on each of ``grids`` (e.g. a Swin model's 20x20, 10x10 and 5x5
    grids): a grid whose cells are blocks of a finer grid's whole-pixel cells over the same extent
    is summed from that grid's pixel counts (the same numbers, one histogram for all of them)."""
    labels = np.asarray(labels)
    height, width = labels.shape
    out: dict[tuple[int, int], np.ndarray] = {}
    counted: list[tuple[tuple[int, int], np.ndarray]] = []  # (grid, counts) of the whole-pixel grids done
    for grid in sorted(dict.fromkeys(tuple(g) for g in grids), key=lambda g: -g[0] * g[1]):  # finest first
        extent = _covered(height, width, grid, input_hw)
        finer = next(((g, c) for g, c in counted if g[0] % grid[0] == 0 and g[1] % grid[1] == 0
                      and _covered(height, width, g, input_hw) == extent), None)
        if finer is not None and _histogram_bins(height, width, *extent, *grid, num_regions) is not None:
            (fine_h, fine_w), fine = finer
            counts = fine.reshape(grid[0], fine_h // grid[0], grid[1], fine_w // grid[1], num_regions).sum(axis=(1, 3))
        else:
            counts = _cell_counts(labels, grid, input_hw, num_regions)
        if counts is None:
            out[grid] = pool_to_grid(labels[None] == np.arange(num_regions)[:, None, None], grid, input_hw=input_hw)
            continue
        counted.append((grid, counts))
        out[grid] = counts.transpose(2, 0, 1) / _cell_area(height, width, grid, input_hw)
    return {tuple(g): out[tuple(g)] for g in grids}


def hard_labels(fractions: np.ndarray) -> np.ndarray:
    """``int64 [gh, gw]`` majority region of each cell (ties go to the earlier region)."""
    return np.argmax(fractions, axis=0)
