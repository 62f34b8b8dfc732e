"""How specialised routing is: NMI between facial region and expert, per-region expert entropy.

For a joint count table ``C[r, e]`` (token mass of region ``r`` routed to expert ``e``) with
``p = C / sum C``: ``NMI = I(R; E) / sqrt(H(R) H(E))`` in bits, NaN when either marginal has
zero entropy; per region, the entropy of its expert distribution, in bits and divided by
``log2 E`` (1 = uniform over experts).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

__all__ = ["entropy_bits", "mutual_information", "specialisation_table"]


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
