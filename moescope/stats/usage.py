"""The expert-usage table from assignment counts (e.g. :class:`facemoe_model.hooks.ExpertUsage`)."""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

__all__ = ["usage_table"]


def usage_table(counts: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Tidy ``layer, expert, assignments, percent`` per layer and over all layers (``layer == "all"``).

    ``counts``: assignments ``[num_experts]`` per layer (all layers with one expert count);
    ``percent`` is NaN for a layer without assignments."""
    total = np.sum(list(counts.values()), axis=0)
    rows = []
    for layer, layer_counts in [*counts.items(), ("all", total)]:
        layer_total = layer_counts.sum()
        for expert, n in enumerate(layer_counts):
            rows.append({"layer": layer, "expert": expert, "assignments": int(n), "percent": 100.0 * n / layer_total if layer_total else float("nan")})
    return pd.DataFrame(rows)
