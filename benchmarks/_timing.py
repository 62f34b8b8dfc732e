"""Side-by-side timing for benchmarks: candidates are run interleaved, medians compared."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_medians(candidates: dict[str, Callable[[], object]], repeats: int = 15, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each candidate, measured round-robin in one run."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}
