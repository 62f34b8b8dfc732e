"""How specialised routing is: NMI between facial region and expert, per-region expert entropy.

For a joint count table ``C[r, e]`` (token mass of region ``r`` routed to expert ``e``) with
``p = C / sum C``: ``NMI = I(R; E) / sqrt(H(R) H(E))`` in bits, NaN when either marginal has
zero entropy; per region, the entropy of its expert distribution, in bits and divided by
``log2 E`` (1 = uniform over experts).

Against chance: :class:`PermutationNull` draws the NMI a routing that ignores the regions would
show on the same images (region fractions shuffled across tokens within each image), exact and
streaming over a seeded subsample of images (:func:`null_sample`); :func:`nmi_of_joints` is the vectorised NMI.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Collection, Mapping, Sequence

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from ..trace import LayerRouting

__all__ = ["PermutationNull", "entropy_bits", "mutual_information", "nmi_of_joints", "null_sample", "specialisation_table"]


def entropy_bits(p: np.ndarray) -> float:
    """Shannon entropy (bits) of a probability vector (zeros ignored)."""
    p = np.asarray(p, dtype=np.float64)
    return float(-(p[p > 0] * np.log2(p[p > 0])).sum())


def mutual_information(joint: np.ndarray) -> tuple[float, float]:
    """``(I(R;E) in bits, NMI)`` of a non-negative joint count table ``[R, E]`` with a positive sum."""
    p = joint / joint.sum()
    pr, pe = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log2(p[nz] / np.outer(pr, pe)[nz])).sum())
    hr, he = entropy_bits(pr), entropy_bits(pe)
    nmi = mi / np.sqrt(hr * he) if hr > 0 and he > 0 else float("nan")
    return mi, nmi


def specialisation_table(counts: np.ndarray, groups: Sequence[str], regions: Sequence[str]) -> pd.DataFrame:
    """Per group of ``counts [G, R, E]``: ``nmi``, ``mutual_information_bits`` and, per region,
    ``entropy_bits`` / ``entropy_normalised`` (groups and regions without tokens skipped).

    Columns ``group, region, metric, value``."""
    num_experts = counts.shape[-1]
    rows = []
    for g, group in enumerate(groups):
        joint = counts[g]
        if joint.sum() <= 0:
            continue
        mi, nmi = mutual_information(joint)
        rows.append({"group": group, "region": "(all)", "metric": "nmi", "value": nmi})
        rows.append({"group": group, "region": "(all)", "metric": "mutual_information_bits", "value": mi})
        for r, region in enumerate(regions):
            row_total = joint[r].sum()
            if row_total <= 0:
                continue
            h = entropy_bits(joint[r] / row_total)
            rows.append({"group": group, "region": region, "metric": "entropy_bits", "value": h})
            rows.append({"group": group, "region": region, "metric": "entropy_normalised", "value": h / np.log2(num_experts)})
    return pd.DataFrame(rows, columns=["group", "region", "metric", "value"])


# --- NMI per layer with a within-image permutation null ------------------------------------------


def null_sample(ids: Sequence[str], size: int, seed: int = 0) -> list[str]:
    """The ids the permutation null is drawn on: all of ``ids`` when there are at most
    ``size``, else ``size`` of them drawn uniformly with ``seed`` (in their order)."""
    ids = [str(i) for i in ids]
    if len(ids) <= size:
        return ids
    pick = np.sort(np.random.default_rng([seed, 0x5EC]).choice(len(ids), size, replace=False))
    return [ids[i] for i in pick]


def _id_hash(image_id: str) -> int:
    """A stable 64-bit number of an image id (seeds its permutations)."""
    return int.from_bytes(hashlib.blake2b(image_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")



def nmi_of_joints(joints: np.ndarray) -> np.ndarray:
    """NMI of every ``[R, E]`` joint count table in ``joints [..., R, E]`` (vectorised
    :func:`mutual_information`; NaN where a table is empty or a marginal has zero entropy)."""
    joints = np.asarray(joints, dtype=np.float64)
    total = joints.sum(axis=(-2, -1), keepdims=True)
    p = np.divide(joints, total, out=np.zeros_like(joints), where=total > 0)
    pr, pe = p.sum(-1, keepdims=True), p.sum(-2, keepdims=True)
    outer = pr * pe
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0) / np.where(outer > 0, outer, 1.0)), 0.0)
        hr = -np.where(pr > 0, pr * np.log2(np.where(pr > 0, pr, 1.0)), 0.0).sum(axis=(-2, -1))
        he = -np.where(pe > 0, pe * np.log2(np.where(pe > 0, pe, 1.0)), 0.0).sum(axis=(-2, -1))
        mi = terms.sum(axis=(-2, -1))
        nmi = mi / np.sqrt(hr * he)
    return np.where((hr > 0) & (he > 0) & (total[..., 0, 0] > 0), nmi, np.nan)


class PermutationNull:
    """Null distribution of NMI(region; expert) under "routing ignores the region labels".

    What is shuffled: within each image, the tokens' region fractions are permuted across that
    image's tokens (a uniform random permutation of token positions, drawn independently per
    image, token grid and resample; the MoE layers on one grid see the same shuffled labels);
    experts, images and each image's region composition stay as they are. Equivalently the tokens' expert contributions are permuted,
    which is what is computed: ``J_null = sum_b F_b^T C_b[perm_b]`` exactly, with ``F_b [N, R]``
    the fractions and ``C_b [N, E]`` the expert contributions of image ``b``. Within-image
    shuffling keeps between-image confounds (an image with much background that also uses one
    expert more) out of the null, so only the token-level association of region and expert is
    tested; region and token position are shuffled together, so routing that follows position
    alone also departs from this null (compare with ``--baseline init`` for that).

    Streaming and shard-invariant: the null is drawn on the images whose ids are in ``images``
    (e.g. a seeded sample of the inputs, :func:`null_sample`; None: every image). Each image's
    permutations come from its own generator, seeded by ``seed``, a hash of its id and the
    token grid, and its observed and null tables are added to running sums as it passes, so memory
    does not grow with the images, and the same images give the same null whatever the batching
    or the split over ``torchrun`` ranks (the sums are added up, :func:`moescope.distributed.reduce_null`).
    The p-value compares the NMI of the drawn images with their null:
    ``p = (1 + #{null >= observed}) / (1 + resamples)``. Grouped NMIs (stage, all layers) sum
    the per-layer null tables of the same resample.
    """

    def __init__(self, layers: Sequence[str], num_experts: int, num_regions: int, *, resamples: int = 200,
                 images: Collection[str] | None = None, seed: int = 0, count: str = "top1") -> None:
        self.layers, self.num_experts, self.num_regions = list(layers), num_experts, num_regions
        self.resamples, self.seed, self.count = resamples, seed, count
        self.images = None if images is None else frozenset(images)
        self.observed = np.zeros((len(self.layers), num_regions, num_experts))
        self.null = np.zeros((resamples, len(self.layers), num_regions, num_experts))
        self.kept = 0
        """Images the null is drawn on."""
        self.seen = 0
        """Images passed to :meth:`update`."""

    def update(self, routing: Mapping[str, "LayerRouting"], fractions: Mapping[tuple[int, int], np.ndarray],
               ids: Sequence[str] | None = None) -> None:
        """Add one batch (the arguments of :meth:`moescope.stats.regions.RegionRoutingCounts.update`
        and the images' ``ids``, which select and seed the draws; without ids image ``i`` of the
        run is drawn on and seeded by its position ``i``)."""
        present = [(l, layer) for l, layer in enumerate(self.layers) if layer in routing]
        if not present:
            return
        batch = routing[present[0][1]].topk.shape[0]
        keys = [str(self.seen + b) for b in range(batch)] if ids is None else [str(i) for i in ids]
        self.seen += batch
        chosen = [b for b in range(batch) if self.images is None or keys[b] in self.images]
        if not chosen:
            return
        self.kept += len(chosen)
        grids: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
        for l, layer in present:
            grids.setdefault(routing[layer].grid, []).append((l, routing[layer].contributions(self.count)))  # [B, N, E]
        for grid, members in grids.items():
            frac = fractions[grid].reshape(batch, self.num_regions, -1).astype(np.float64)  # [B, R, N]
            N = frac.shape[-1]
            order = np.broadcast_to(np.arange(N), (self.resamples, N))
            for b in chosen:
                f = frac[b]
                if self.resamples:
                    perm = np.random.default_rng([self.seed, 0x9E11, _id_hash(keys[b]), *grid]).permuted(order, axis=1)
                for l, contrib in members:
                    c = contrib[b].astype(np.float64)
                    self.observed[l] += f @ c
                    if self.resamples:  # [E * S, N] @ [N, R] -> [E, S, R] -> [S, R, E]
                        shuffled = np.take(np.ascontiguousarray(c.T), perm, axis=1).reshape(-1, N)
                        self.null[:, l] += (shuffled @ f.T).reshape(-1, self.resamples, self.num_regions).transpose(1, 2, 0)

    def joints(self) -> tuple[np.ndarray, np.ndarray]:
        """``(observed [L, R, E], null [S, L, R, E])`` joint tables of the drawn images."""
        return self.observed, self.null

    def table(self, groups: Mapping[str, Sequence[str]]) -> pd.DataFrame:
        """Per group (name -> its layers): ``observed`` NMI of the kept images, ``null_mean``,
        ``null_std``, ``p_value``, ``resamples``, ``images`` (kept)."""
        observed, null = self.joints()
        index = {layer: i for i, layer in enumerate(self.layers)}
        rows = []
        for group, members in groups.items():
            ids = [index[m] for m in members if m in index]
            if not ids:
                continue
            obs = float(nmi_of_joints(observed[ids].sum(0)))
            draws = nmi_of_joints(null[:, ids].sum(1)) if self.resamples else np.zeros(0)
            valid = draws[np.isfinite(draws)]
            finite = np.isfinite(obs) and valid.size > 0
            rows.append({
                "group": group,
                "observed": obs,
                "null_mean": float(valid.mean()) if valid.size else float("nan"),
                "null_std": float(valid.std()) if valid.size else float("nan"),
                "p_value": float((1 + (valid >= obs).sum()) / (1 + valid.size)) if finite else float("nan"),
                "resamples": int(valid.size),
                "images": self.kept,
            })
        return pd.DataFrame(rows, columns=["group", "observed", "null_mean", "null_std", "p_value", "resamples", "images"])
