"""Synthetic face throughput: images/s rendered in one process, and generate_dataset with 1 vs N workers.

    python benchmarks/bench_synthetic.py [--identities 16] [--samples 8] [--size 120] [--workers N]

Rates are measured side by side in one run (machine load affects them alike); the parallel
rate includes starting the worker processes and writing the PNGs and ground truth.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from facemoe_model.data.synthetic import generate_dataset, render_face


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--size", type=int, default=120)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    count = args.identities * args.samples

    render_face(0, 0, 0, args.size)  # warm-up (imports, caches)
    start = time.perf_counter()
    for identity in range(args.identities):
        for sample in range(args.samples):
            render_face(0, identity, sample, args.size)
    render_rate = count / (time.perf_counter() - start)

    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, args.workers):
            start = time.perf_counter()
            generate_dataset(f"{tmp}/w{workers}", args.identities, args.samples, size=args.size, workers=workers)
            rates[workers] = count / (time.perf_counter() - start)

    print(f"{count} faces of {args.size}x{args.size} px")
    print(f"render_face, 1 process:            {render_rate:7.1f} images/s")
    print(f"generate_dataset, 1 worker:        {rates[1]:7.1f} images/s")
    print(f"generate_dataset, {args.workers} workers:       {rates[args.workers]:7.1f} images/s "
          f"({rates[args.workers] / rates[1]:.2f}x the 1-worker rate)")


if __name__ == "__main__":
    main()
