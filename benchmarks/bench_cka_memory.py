"""Peak memory of streaming CKA as the number of images grows 10x, next to a keep-everything baseline.

Each setting runs in its own subprocess and reports its peak resident set size (``ru_maxrss``),
both in total and above the process's peak right after importing torch and moescope. Settings:

- ``streaming``: :class:`moescope.stats.cka.StreamingCKA` fed batch by batch (what ``moescope cka`` does);
- ``keep-all``: every batch's features kept, then one full batch per layer (memory grows with N).

Usage: python benchmarks/bench_cka_memory.py [--images 64 640] [--layers 25] [--tokens 25] [--channels 96]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(setting: str, n_images: int, layers: int, tokens: int, channels: int, batch_size: int) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    from moescope.stats.cka import StreamingCKA, plan_batches

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)

    def layer_outputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        before = torch.randn(n, tokens, channels, generator=generator)
        return before, before + 0.5 * torch.randn(n, tokens, channels, generator=generator)

    warm = StreamingCKA()
    warm.update("warm-up", *layer_outputs(batch_size))
    baseline = peak_rss_mib()

    cka = StreamingCKA()
    batches, _ = plan_batches(n_images, batch_size)
    if setting == "streaming":
        for batch in batches:
            for layer in range(layers):
                cka.update(f"layer{layer}", *layer_outputs(len(batch)))
    else:
        kept = {f"layer{layer}": [] for layer in range(layers)}
        for batch in batches:
            for name in kept:
                kept[name].append(layer_outputs(len(batch)))
        for name, outputs in kept.items():
            cka.update(name, torch.cat([x for x, _ in outputs]), torch.cat([y for _, y in outputs]))
    table = cka.to_frame()
    assert len(table) == layers and (table.images == n_images).all()
    return {"peak_mib": peak_rss_mib(), "baseline_mib": baseline, "mean_cka": float(table.cka.mean())}


def measure(setting: str, n_images: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", setting, str(n_images), "--layers", str(args.layers),
               "--tokens", str(args.tokens), "--channels", str(args.channels), "--batch-size", str(args.batch_size)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs=2, default=[64, 640], metavar=("SMALL", "LARGE"))
    parser.add_argument("--layers", type=int, default=25)
    parser.add_argument("--tokens", type=int, default=25)
    parser.add_argument("--channels", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--child", nargs=2, metavar=("SETTING", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.layers, args.tokens, args.channels, args.batch_size)))
        return

    small, large = args.images
    print(f"{args.layers} layers, features [{args.tokens} tokens x {args.channels} channels] per image, batches of {args.batch_size}")
    print(f"{'setting':<10} {'images':>7} {'peak RSS MiB':>13} {'above baseline MiB':>19}")
    growth = {}
    for setting in ("streaming", "keep-all"):
        runs = {n: measure(setting, n, args) for n in (small, large)}
        for n, run in runs.items():
            print(f"{setting:<10} {n:>7} {run['peak_mib']:>13.1f} {run['peak_mib'] - run['baseline_mib']:>19.1f}")
        growth[setting] = runs[large]["peak_mib"] / runs[small]["peak_mib"]
    for setting, ratio in growth.items():
        print(f"{setting}: peak RSS ratio {large} / {small} images = {ratio:.3f}")


if __name__ == "__main__":
    main()
