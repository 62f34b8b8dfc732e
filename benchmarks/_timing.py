"""Side-by-side timing for benchmarks: candidates are run interleaved, medians compared."""
from __future__ import annotations

import os
import statistics
import threading
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


def cpu_by_thread(fn: Callable[[], object], interval: float = 0.05) -> dict[str, float]:
    """CPU seconds (user + system) each thread of this process spent while ``fn()`` ran, by
    thread: Python threads by name (``main`` for the caller's), the others (torch's OpenMP
    workers, library pools) together as ``native``. Read from ``/proc/self/task`` every
    ``interval`` s by a sampler thread, which is left out (its own cost shows in none of the
    figures); a thread's last ``interval`` before it ends is missed. ``{}`` where there is no
    ``/proc`` (not Linux)."""
    if not os.path.isdir("/proc/self/task"):
        fn()
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    caller = threading.get_native_id()
    last: dict[int, float] = {}
    names: dict[int, str] = {caller: "main"}
    stop = threading.Event()

    def read() -> None:
        for thread in threading.enumerate():
            if thread.native_id is not None and thread.native_id != caller:
                names.setdefault(thread.native_id, thread.name)
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # ended meanwhile
                continue
            last[int(tid)] = (int(fields[11]) + int(fields[12])) / tick

    def sample() -> None:
        while not stop.wait(interval):
            read()

    read()
    start = dict(last)
    sampler = threading.Thread(target=sample, name="cpu-sampler", daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        stop.set()
        sampler.join()
    read()
    out: dict[str, float] = {}
    for tid, seconds in last.items():
        name = names.get(tid, "native")
        if name != "cpu-sampler":
            out[name] = out.get(name, 0.0) + seconds - start.get(tid, 0.0)
    return out
