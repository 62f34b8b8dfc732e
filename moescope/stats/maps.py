"""Expert activation maps (paper D / E) as arrays, and the numbers measured on them. No model, no I/O.

A *map* is ``float [B, E, rows, cols]``: per image, per expert, one value per token of a MoE
layer's grid (token ``n`` at ``divmod(n, cols)``, as in :class:`~moescope.trace.LayerRouting`).

Routing maps (:func:`routing_maps`) come straight from what the layer computed:

* ``top1`` — 1 where the expert is the token's rank-1 choice, else 0;
* ``topk`` — 1 where the expert is among the token's k experts (membership, not 1/k);
* ``weight`` — the normalised combine weight ``|w| / sum |w|`` (the ``weighted`` counting
  convention of :meth:`LayerRouting.contributions`), 0 where the expert did not run;
* ``prob`` — the router probability ``softmax(logits)``.

:func:`group_maps` averages a stage's blocks (``by="stage"``) when their grids match.

Statistics on any non-negative map (routing, expert output norms, ReLU'd Grad-CAM):

* :func:`region_mass` / :func:`region_mass_table` (streaming: :class:`RegionMass`) — map mass per expert per facial region,
  normalised by region area: ``sum_b sum_n frac[b,r,n] map[b,e,n] / sum_b sum_n frac[b,r,n]``
  (the mean map value over the region's tokens, tokens split across regions by area). On
  ``top1`` maps this is the region routing table's top-1 share (``moescope regions --count top1``).
* :func:`concentration` / :func:`concentration_table` (streaming: :class:`ConcentrationRows`) — per image and expert: entropy of the
  map normalised to a distribution over tokens (bits, and divided by ``log2 N``: 1 = uniform,
  i.e. diffuse; 0 = one token), and the share of the map's mass on the face vs on
  ``hair_background`` (with that region's area share for reference: a uniform map has
  ``background_share == background_area``).
* :func:`compare_cases` — the per-image numbers of two groups of images (success vs failure),
  means with seeded percentile-bootstrap 95% intervals over images, and their difference.

Display helpers: :func:`upsample` to the aligned input (bilinear, ``align_corners=False``, or
nearest) and :func:`shared_scale`, one colour range for a whole figure.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from facemoe_model.geometry import REGIONS
from facemoe_model.rows import RowBuffer

from .regions import layer_group

if TYPE_CHECKING:  # pragma: no cover
    from ..trace import LayerRouting

__all__ = [
    "ROUTING_KINDS",
    "routing_maps",
    "token_maps",
    "group_maps",
    "region_sums",
    "region_mass",
    "RegionMass",
    "region_mass_table",
    "concentration",
    "concentration_table",
    "ConcentrationRows",
    "compare_cases",
    "upsample",
    "shared_scale",
]

ROUTING_KINDS = ("top1", "topk", "weight", "prob")
CONCENTRATION_METRICS = ("mass", "entropy_bits", "entropy_normalised", "face_share", "background_share")
_CONCENTRATION_VALUES = (*CONCENTRATION_METRICS, "background_area")


def token_maps(values: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Per-token values ``[B, N, E]`` (grid tokens, row-major) as maps ``[B, E, rows, cols]``."""
    values = np.asarray(values)
    rows, cols = grid
    if values.ndim != 3 or values.shape[1] != rows * cols:
        raise ValueError(f"expected values [B, {rows * cols}, E] for grid {tuple(grid)}, got {list(values.shape)}")
    return np.ascontiguousarray(values.transpose(0, 2, 1)).reshape(values.shape[0], values.shape[2], rows, cols)


def routing_maps(routing: "LayerRouting", kind: str = "top1") -> np.ndarray:
    """One layer's routing maps ``float64 [B, E, rows, cols]`` of ``kind`` (see module docstring)."""
    if kind == "top1":
        values = routing.contributions("top1")
    elif kind == "topk":
        values = np.zeros(routing.probs.shape, dtype=np.float64)
        np.put_along_axis(values, routing.topk, 1.0, axis=-1)
    elif kind == "weight":
        values = routing.contributions("weighted")
    elif kind == "prob":
        values = routing.probs.astype(np.float64)
    else:
        raise ValueError(f"unknown routing map kind {kind!r}; use one of {', '.join(ROUTING_KINDS)}")
    return token_maps(values, routing.grid)


def group_maps(
    maps: Mapping[str, np.ndarray], by: str | Mapping[str, str] | Callable[[str], str] = "stage"
) -> dict[str, np.ndarray]:
    """Average per-layer maps over the layers of each group, in first-seen order.

    ``by``: ``"layer"`` (unchanged), ``"stage"`` (a stage's blocks, e.g. ``layers.1``), ``"all"``,
    or a mapping / function from layer name to group name. All layers of a group must share
    one grid and image count (``ValueError`` naming the group otherwise).
    """
    if isinstance(by, str):
        group_of = lambda layer: layer_group(layer, by)  # noqa: E731
    elif isinstance(by, Mapping):
        group_of = by.__getitem__
    else:
        group_of = by
    members: dict[str, list[tuple[str, np.ndarray]]] = {}
    for layer, m in maps.items():
        members.setdefault(group_of(layer), []).append((layer, np.asarray(m)))
    out = {}
    for group, items in members.items():
        shapes = {m.shape for _, m in items}
        if len(shapes) != 1:
            detail = ", ".join(f"{layer} {list(m.shape)}" for layer, m in items)
            raise ValueError(f"cannot average the maps of {group}: their grids differ ({detail})")
        out[group] = np.mean([m.astype(np.float64) for _, m in items], axis=0)
    return out


# -- region statistics ----------------------------------------------------------------------
def _check(maps: np.ndarray, fractions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    maps = np.asarray(maps, dtype=np.float64)
    fractions = np.asarray(fractions, dtype=np.float64)
    if maps.ndim != 4 or fractions.ndim != 4:
        raise ValueError(f"expected maps [B, E, rows, cols] and fractions [B, R, rows, cols], got {list(maps.shape)} and {list(fractions.shape)}")
    if maps.shape[0] != fractions.shape[0] or maps.shape[2:] != fractions.shape[2:]:
        raise ValueError(f"maps {list(maps.shape)} and region fractions {list(fractions.shape)} differ in images or grid")
    return maps, fractions


def region_sums(maps: np.ndarray, fractions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: map mass in each region ``[B, E, R]`` (``sum_n frac[r,n] map[e,n]``) and
    each region's area in tokens ``[B, R]`` (``sum_n frac[r,n]``)."""
    maps, fractions = _check(maps, fractions)
    b, e, r = maps.shape[0], maps.shape[1], fractions.shape[1]
    m = maps.reshape(b, e, -1)
    f = fractions.reshape(b, r, -1)
    return np.einsum("ben,brn->ber", m, f), f.sum(-1)


def region_mass(maps: np.ndarray, fractions: np.ndarray, *, per_image: bool = False) -> np.ndarray:
    """Map mass per expert per region normalised by region area: ``[E, R]`` pooled over images
    (total mass / total area), or ``[B, E, R]`` per image. NaN where a region has no area."""
    mass, area = region_sums(maps, fractions)
    if not per_image:
        mass, area = mass.sum(0), area.sum(0)
    area = np.broadcast_to(area[..., None, :], mass.shape)
    return np.divide(mass, area, out=np.full(mass.shape, np.nan), where=area > 0)


class RegionMass:
    """Streaming :func:`region_mass_table`: per group, the map mass per expert and region and the
    regions' areas, summed over the batches :meth:`add` sees (a few floats, however many images).

    Under ``torchrun`` each rank sums its images and :func:`moescope.distributed.reduce_region_mass`
    adds the ranks' sums in rank order.
    """

    def __init__(self, regions: Sequence[str] = REGIONS) -> None:
        self.regions = tuple(regions)
        self.mass: dict[str, np.ndarray] = {}  # group -> [E, R]
        self.area: dict[str, np.ndarray] = {}  # group -> [R]
        self.images = 0

    def add(self, maps: Mapping[str, np.ndarray], fractions: Mapping[tuple[int, int], np.ndarray]) -> None:
        """Add a batch: ``maps`` per group ``[B, E, rows, cols]``, ``fractions`` per grid the
        images' region fractions ``[B, R, rows, cols]`` (:func:`moescope.regions.pool_to_grid`)."""
        count = None
        for group, m in maps.items():
            frac = fractions[tuple(np.shape(m)[2:])]
            if frac.shape[1] != len(self.regions):
                raise ValueError(f"region fractions have {frac.shape[1]} regions, expected {len(self.regions)}")
            mass, area = region_sums(m, frac)
            self.mass[group] = self.mass.get(group, 0) + mass.sum(0)
            self.area[group] = self.area.get(group, 0) + area.sum(0)
            count = mass.shape[0]
        self.images += count or 0

    def merge(self, other: "RegionMass") -> None:
        """Add another accumulator's sums (another rank's images) to these."""
        for group in other.mass:
            self.mass[group] = self.mass.get(group, 0) + other.mass[group]  # a new array: no sharing with other
            self.area[group] = self.area.get(group, 0) + other.area[group]
        self.images += other.images

    def table(self) -> pd.DataFrame:
        """Tidy ``group, region, expert, mass, region_tokens`` (see :func:`region_mass_table`)."""
        rows = []
        for group, total in self.mass.items():
            area = self.area[group]
            mass = np.divide(total, area[None], out=np.full(total.shape, np.nan), where=area[None] > 0)
            for r, region in enumerate(self.regions):
                for e in range(total.shape[0]):
                    rows.append({"group": group, "region": region, "expert": e, "mass": mass[e, r], "region_tokens": area[r]})
        return pd.DataFrame(rows, columns=["group", "region", "expert", "mass", "region_tokens"])


def region_mass_table(
    maps: Mapping[str, np.ndarray],
    fractions: Mapping[tuple[int, int], np.ndarray],
    regions: Sequence[str] = REGIONS,
) -> pd.DataFrame:
    """Tidy ``group, region, expert, mass, region_tokens`` (mass: :func:`region_mass`, pooled
    over images; region_tokens: the region's area in tokens over all images).

    ``maps``: per group (layer or stage) ``[B, E, rows, cols]``; ``fractions``: per grid the
    images' region fractions ``[B, R, rows, cols]`` (:func:`moescope.regions.pool_to_grid`).
    One batch of :class:`RegionMass`.
    """
    sums = RegionMass(regions)
    sums.add(maps, fractions)
    return sums.table()


def concentration(maps: np.ndarray, background: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Spatial concentration per image and expert (each ``[B, E]``).

    Returns ``mass`` (sum of the map), ``entropy_bits`` (entropy of ``map / mass`` over the
    N tokens), ``entropy_normalised`` (divided by ``log2 N``: 1 = uniform, 0 = one token), and
    with ``background`` (the background region's fraction per token ``[B, rows, cols]``)
    ``background_share`` (share of the mass on it), ``face_share`` (the rest) and
    ``background_area`` (``[B]``, the background's share of the grid). NaN where the map is
    all zero (e.g. an expert that processed no token of the image). Maps must be >= 0.
    """
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 4:
        raise ValueError(f"expected maps [B, E, rows, cols], got {list(maps.shape)}")
    if (maps < 0).any():
        raise ValueError("concentration needs non-negative maps (use ReLU'd Grad-CAM or magnitudes)")
    b, e = maps.shape[:2]
    flat = maps.reshape(b, e, -1)
    n = flat.shape[-1]
    mass = flat.sum(-1)
    ok = mass > 0
    p = np.divide(flat, mass[..., None], out=np.zeros_like(flat), where=ok[..., None])
    plogp = np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    entropy = np.where(ok, -plogp.sum(-1), np.nan)
    out = {
        "mass": mass,
        "entropy_bits": entropy,
        "entropy_normalised": entropy / np.log2(n) if n > 1 else np.where(ok, 0.0, np.nan),
    }
    if background is not None:
        bg = np.asarray(background, dtype=np.float64)
        if bg.shape != (b, *maps.shape[2:]):
            raise ValueError(f"background fractions must be [{b}, {maps.shape[2]}, {maps.shape[3]}], got {list(bg.shape)}")
        bg = bg.reshape(b, 1, -1)
        share = np.divide((flat * bg).sum(-1), mass, out=np.full(mass.shape, np.nan), where=ok)
        out.update(background_share=share, face_share=1.0 - share, background_area=bg[:, 0].mean(-1))
    return out


def concentration_table(
    maps: Mapping[str, np.ndarray],
    fractions: Mapping[tuple[int, int], np.ndarray] | None,
    image_ids: Sequence[str],
    *,
    regions: Sequence[str] = REGIONS,
    background: str = "hair_background",
) -> pd.DataFrame:
    """Tidy per image, group and expert: ``image, group, expert, mass, entropy_bits,
    entropy_normalised, face_share, background_share, background_area`` (:func:`concentration`;
    the share columns are NaN without ``fractions``), group by group."""
    rows = ConcentrationRows(regions=regions, background=background)
    rows.add(maps, fractions, image_ids)
    return rows.table()


class ConcentrationRows:
    """:func:`concentration_table` over a stream of batches: :meth:`add` each batch's maps, then
    :meth:`table` has the rows of all of them, group by group, images in order within a group.

    The numbers are kept as one :class:`~facemoe_model.rows.RowBuffer` ``[images, E, 6]`` per
    group (not one table per batch, whose small arrays would stay scattered over the heap).
    """

    def __init__(self, *, regions: Sequence[str] = REGIONS, background: str = "hair_background") -> None:
        self.regions, self.background = tuple(regions), background
        self.ids: list[str] = []
        self.values: dict[str, RowBuffer] = {}

    def add(self, maps: Mapping[str, np.ndarray], fractions: Mapping[tuple[int, int], np.ndarray] | None, image_ids: Sequence[str]) -> None:
        """One batch: ``maps`` per group ``[B, E, rows, cols]``, ``fractions`` per token grid
        ``[B, R, rows, cols]`` (or None: NaN shares), ``B`` image ids; every batch has the same groups."""
        if maps and self.values and list(maps) != list(self.values):
            raise ValueError(f"groups {list(maps)} differ from the earlier batches' {list(self.values)}")
        for group, m in maps.items():
            b, e = np.shape(m)[:2]
            if len(image_ids) != b:
                raise ValueError(f"{len(image_ids)} image ids for {b} maps")
            bg = None
            if fractions is not None:
                bg = np.asarray(fractions[tuple(np.shape(m)[2:])])[:, self.regions.index(self.background)]
            stats = concentration(m, bg)
            if "background_area" in stats:
                stats["background_area"] = np.repeat(stats["background_area"][:, None], e, axis=1)
            columns = [stats[key] if key in stats else np.full((b, e), np.nan) for key in _CONCENTRATION_VALUES]
            self.values.setdefault(group, RowBuffer()).append(np.stack(columns, axis=-1))
        self.ids.extend(image_ids)

    @classmethod
    def joined(cls, parts: Sequence["ConcentrationRows"]) -> "ConcentrationRows":
        """The rows of ``parts`` (e.g. the torchrun ranks, in rank order) one after another."""
        out = cls(regions=parts[0].regions, background=parts[0].background) if parts else cls()
        for part in parts:
            out.ids.extend(part.ids)
        groups = dict.fromkeys(g for part in parts for g in part.values)
        out.values = {g: RowBuffer.joined(part.values[g] for part in parts if g in part.values) for g in groups}
        return out

    def table(self) -> pd.DataFrame:
        """``image, group, expert, mass, entropy_bits, entropy_normalised, face_share,
        background_share, background_area``: group by group, images in order, experts in order."""
        if not self.values:
            return pd.DataFrame(columns=["image", "group", "expert", *_CONCENTRATION_VALUES])
        ids = np.asarray(self.ids, dtype=object)
        frames = []
        for group, buffer in self.values.items():
            values = buffer.array
            n, e = values.shape[:2]
            data = {"image": np.repeat(ids, e), "group": group, "expert": np.tile(np.arange(e), n)}
            data.update(zip(_CONCENTRATION_VALUES, values.reshape(n * e, -1).T))
            frames.append(pd.DataFrame(data))
        return pd.concat(frames, ignore_index=True)


def _boot_means(values: np.ndarray, n_boot: int, rng: np.random.Generator, chunk: int = 200) -> np.ndarray:
    """``[n_boot, F]`` NaN-aware means of ``values [n, F]`` over images resampled with replacement."""
    n = values.shape[0]
    finite = np.isfinite(values)
    filled = np.where(finite, values, 0.0)
    draws = []
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(np.float64)  # [size, n]
        total, count = weights @ filled, weights @ finite.astype(np.float64)
        draws.append(np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0))
    return np.concatenate(draws)


def compare_cases(
    table: pd.DataFrame,
    *,
    case_column: str = "case",
    cases: tuple[str, str] = ("success", "failure"),
    metrics: Sequence[str] = ("entropy_normalised", "face_share"),
    by: Sequence[str] = ("group", "expert"),
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per-image metrics of two groups of images compared, with bootstrap intervals over images.

    ``table`` has one row per image and ``by`` key (e.g. :func:`concentration_table` with a
    ``case`` column). Per ``by`` key and metric: the mean over each case's images (NaNs left
    out) with a 95% percentile interval from ``n_boot`` resamples of that case's images (with
    replacement, all metrics and keys resampled together, seeded), and the difference
    ``second - first`` (e.g. ``failure - success``) from independent resamples of the two.
    Returns tidy ``*by, metric, case, images, mean, ci_low, ci_high``.
    """
    missing = [c for c in (case_column, "image", *by, *metrics) if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks column(s) {', '.join(missing)}")
    per_image_cases = table.groupby("image")[case_column].nunique()
    if (per_image_cases > 1).any():
        raise ValueError(f"image {per_image_cases.index[per_image_cases > 1][0]!r} is in more than one case")
    keys = list(by)
    wide = table.set_index(["image", *keys])[list(metrics)].unstack(keys)  # rows images, cols (metric, *by)
    case_of = table.groupby("image")[case_column].first().reindex(wide.index)
    rng = np.random.default_rng(seed)
    stats = {}
    for case in cases:
        values = wide[(case_of == case).to_numpy()].to_numpy(dtype=np.float64)
        n = values.shape[0]
        with _quiet():
            mean = np.nanmean(values, axis=0) if n else np.full(values.shape[1], np.nan)
        boot = _boot_means(values, n_boot, rng) if n >= 2 and n_boot > 0 else None
        stats[case] = (n, mean, boot)
    (na, ma, ba), (nb, mb, bb) = stats[cases[0]], stats[cases[1]]
    stats[f"{cases[1]} - {cases[0]}"] = (min(na, nb), mb - ma, None if ba is None or bb is None else bb - ba)
    rows = []
    for label, (n, mean, boot) in stats.items():
        with _quiet():
            low = np.nanpercentile(boot, 2.5, axis=0) if boot is not None else np.full(mean.shape, np.nan)
            high = np.nanpercentile(boot, 97.5, axis=0) if boot is not None else np.full(mean.shape, np.nan)
        for i, col in enumerate(wide.columns):
            metric, *key = col
            rows.append({**dict(zip(keys, key)), "metric": metric, "case": label, "images": n, "mean": mean[i], "ci_low": low[i], "ci_high": high[i]})
    return pd.DataFrame(rows, columns=[*keys, "metric", "case", "images", "mean", "ci_low", "ci_high"])


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence numpy's all-NaN slice warnings (the NaN result is the answer)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


# -- display ----------------------------------------------------------------------------------
def upsample(maps: np.ndarray, size: int | tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """Upsample maps ``[..., rows, cols]`` to the aligned input ``size`` (``[..., H, W]``).

    The token grid tiles the whole input (cell ``(i, j)`` covers ``H/rows x W/cols`` pixels), so
    ``bilinear`` is :func:`torch.nn.functional.interpolate` with ``align_corners=False``: each
    token is a sample at its cell centre, pixels in between are interpolated, border pixels
    take the edge value. Values stay within the map's range, so a shared colour scale stays
    valid. ``nearest`` (torch ``nearest-exact``) paints each pixel with the token whose cell
    contains the pixel centre — the blocks the model actually sees.
    """
    import torch
    import torch.nn.functional as F

    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"unknown interpolation {mode!r}; use bilinear or nearest")
    maps = np.asarray(maps)
    if maps.ndim < 2:
        raise ValueError(f"expected maps [..., rows, cols], got {list(maps.shape)}")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    lead, grid = maps.shape[:-2], maps.shape[-2:]
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float64)).reshape(-1, 1, *grid)
    if mode == "bilinear":
        up = F.interpolate(t, size=hw, mode="bilinear", align_corners=False)
    else:
        up = F.interpolate(t, size=hw, mode="nearest-exact")
    return up.reshape(*lead, *hw).numpy()


def shared_scale(maps: Iterable[np.ndarray], *, symmetric: bool = False, include_zero: bool = True) -> tuple[float, float]:
    """One ``(vmin, vmax)`` for every map of a figure (never per-map min-max, which hides
    before/after differences). Over all finite values; ``include_zero`` stretches the range to
    contain 0 (non-negative maps start at 0); ``symmetric`` gives ``(-m, m)`` with ``m`` the
    largest magnitude (signed attributions). A constant range is widened to width 1."""
    lo, hi = np.inf, -np.inf
    for m in maps:
        m = np.asarray(m, dtype=np.float64)
        finite = m[np.isfinite(m)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    if not np.isfinite(lo):
        return 0.0, 1.0
    if symmetric:
        m = max(abs(lo), abs(hi))
        lo, hi = -m, m
    elif include_zero:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi
