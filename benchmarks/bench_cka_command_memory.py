"""Peak memory of the drift analysis behind ``moescope cka`` as the number of images grows 10x.

Each image count runs :func:`moescope.runners.drift.analyse_drift` (two checkpoints of one architecture,
every layer's CKA, expert shift, routing agreement) in its own subprocess, which reports its
peak resident set size (``ru_maxrss``) in total and above its peak after a one-batch warm-up
(imports, models, first forward passes). Images are real LFW face crops from scikit-image
(200, cycled when more are asked for), written once to a temporary folder. Streaming keeps
only per-layer sums, so the peak must stay flat: the printed ratio should be close to 1.

Every count runs with glibc's default allocator, whose dynamic mmap threshold lets the heap
grow by some tens of MiB over the first batches before it plateaus, and with a fixed threshold
(``MALLOC_MMAP_THRESHOLD_=131072``), which shows what the analysis itself keeps. A reference
workload, ``forward``, runs only the two models' forward passes on the same batches (no hooks,
no CKA): the analysis should grow no more than it.

Usage: python benchmarks/bench_cka_command_memory.py [--images 16 160] [--batch-size 16]
       [--model facemoe_swin_tiny] [--features flatten] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_images(folder: Path, count: int) -> None:
    import cv2
    import numpy as np
    from skimage.data import lfw_subset

    faces = lfw_subset()
    for i, face in enumerate(faces[:count]):
        cv2.imwrite(str(folder / f"{i:04d}.png"), (face * 255).astype(np.uint8))


def child(workload: str, folder: Path, n_images: int, args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(REPO))
    import torch

    from facemoe_model import create_model
    from facemoe_model.data.images import list_images, preprocess, read_image
    from moescope.runners.drift import analyse_drift

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    before = create_model(args.model).eval()
    after = create_model(args.model).eval()
    after.load_state_dict(before.state_dict())
    with torch.no_grad():
        for p in after.parameters():
            p.add_(0.1 * p.std().nan_to_num(0.02) * torch.randn_like(p))
    paths = list_images(folder)
    paths = (paths * -(-n_images // len(paths)))[:n_images]

    def drift(images: list[Path]) -> float:
        result = analyse_drift(before, after, ["before", "after"], images, features=args.features,
                               batch_size=args.batch_size, progress=False)
        assert result.summary["images_analysed"] == len(images), result.summary
        return result.summary["mean_cka"]

    def forward(images: list[Path]) -> float:
        with torch.inference_mode():
            for start in range(0, len(images), args.batch_size):
                x = torch.stack([preprocess(read_image(p), before.img_size) for p in images[start : start + args.batch_size]])
                before(x), after(x)
        return float("nan")

    run = drift if workload == "drift" else forward
    run(paths[: args.batch_size])  # warm-up: imports, allocator pools, one batch of both models
    baseline = peak_rss_mib()
    start = time.perf_counter()
    mean_cka = run(paths)
    seconds = time.perf_counter() - start
    return {"peak_mib": peak_rss_mib(), "baseline_mib": baseline, "seconds": seconds, "mean_cka": mean_cka}


ALLOCATORS = {"glibc default": {}, "fixed mmap threshold": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def measure(workload: str, folder: Path, n_images: int, allocator: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", workload, str(folder), str(n_images), "--batch-size", str(args.batch_size),
               "--model", args.model, "--features", args.features, "--threads", str(args.threads)]
    env = {**os.environ, **ALLOCATORS[allocator]}
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs=2, default=[16, 160], metavar=("SMALL", "LARGE"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default="facemoe_swin_tiny")
    parser.add_argument("--features", choices=("flatten", "mean"), default="flatten")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--child", nargs=3, metavar=("WORKLOAD", "DIR", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), int(args.child[2]), args), allow_nan=True))
        return

    small, large = args.images
    with tempfile.TemporaryDirectory(prefix="bench-cka-") as tmp:
        write_images(Path(tmp), max(small, large))
        print(f"moescope.runners.drift.analyse_drift, {args.model}, features={args.features}, batches of {args.batch_size}, "
              f"{args.threads} thread(s)")
        print(f"{'allocator':<21} {'workload':<8} {'images':>7} {'peak RSS MiB':>13} {'above warm-up MiB':>18} {'seconds':>8} {'mean CKA':>9}")
        ratios = {}
        for allocator in ALLOCATORS:
            for workload in ("drift", "forward"):
                runs = {n: measure(workload, Path(tmp), n, allocator, args) for n in (small, large)}
                for n, run in runs.items():
                    print(f"{allocator:<21} {workload:<8} {n:>7} {run['peak_mib']:>13.1f} {run['peak_mib'] - run['baseline_mib']:>18.1f} "
                          f"{run['seconds']:>8.2f} {run['mean_cka']:>9.4f}")
                ratios[allocator, workload] = runs[large]["peak_mib"] / runs[small]["peak_mib"]
    for (allocator, workload), ratio in ratios.items():
        print(f"{allocator}, {workload}: peak RSS ratio {large} / {small} images = {ratio:.3f}")

if __name__ == "__main__":
    main()
