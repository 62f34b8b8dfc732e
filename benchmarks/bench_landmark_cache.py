"""Speed-up of a cached landmark run over a first run on the same images, side by side.

Images: the 100 ``skimage.data.lfw_subset()`` faces (25x25), ``skimage.data.astronaut()`` and
matplotlib's ``grace_hopper.jpg``. Each round detects them into a fresh cache folder (first
run: mediapipe) and again from it (second run: cache reads only).

    python -m benchmarks.bench_landmark_cache [--rounds 3] [--workers 1]   (from the repository root)
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import matplotlib.cbook
import numpy as np
import skimage.data

from facemoe_model.data.images import read_image
from moescope.landmarks import detect_landmarks


def images() -> list[np.ndarray]:
    grey = np.round(skimage.data.lfw_subset()[:100] * 255).astype(np.uint8)
    grace_hopper = read_image(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    return [np.repeat(face[..., None], 3, axis=2) for face in grey] + [skimage.data.astronaut(), grace_hopper]


def timed_run(batch: list[np.ndarray], cache_dir: str, workers: int) -> tuple[float, list]:
    start = time.perf_counter()
    found = detect_landmarks(batch, cache_dir=cache_dir, workers=workers, progress=False)
    return time.perf_counter() - start, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    batch = images()
    first_times, second_times = [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as cache_dir:
            first, first_found = timed_run(batch, cache_dir, args.workers)
            second, second_found = timed_run(batch, cache_dir, args.workers)
        assert all(a is b is None or np.array_equal(a, b) for a, b in zip(first_found, second_found))
        first_times.append(first)
        second_times.append(second)
    first, second = statistics.median(first_times), statistics.median(second_times)
    faces = sum(points is not None for points in first_found)
    print(f"images: {len(batch)} (faces found: {faces}); workers: {args.workers}; rounds: {args.rounds} (medians)")
    print(f"first run (mediapipe):  {first * 1000:8.1f} ms  ({first / len(batch) * 1000:.2f} ms/image)")
    print(f"second run (cache):     {second * 1000:8.1f} ms  ({second / len(batch) * 1000:.3f} ms/image)")
    print(f"speed-up: {first / second:.1f}x")


if __name__ == "__main__":
    main()
