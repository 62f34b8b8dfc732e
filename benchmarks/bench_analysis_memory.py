"""Peak memory of an analysis as the number of images grows 10x (target: within 1.05x).

Each (command, image count) runs in its own process (:mod:`_probe`: ``moescope.cli.main`` in
process, ``ru_maxrss`` at the end). The images are hard links cycling over a folder of generated
faces (the synthetic renderer; distinct files, the same pixels, so the landmark cache — keyed by
content — is warm after the first run and only the image count changes). Streaming keeps sums,
per-image count vectors for the bootstrap (a few floats per image) and the permutation null's
running sums, with at most a few batches in flight, so the peak must stay flat.

    python benchmarks/bench_analysis_memory.py [--images 1000 10000] [--commands regions cka eval maps] [--source-images 1600]

``ablate``, ``attack`` and ``degrade`` run one intervention / attack / degradation each
(``OPTIONS`` below: the cost per image is what they add; the memory pattern is the command's).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

COMMANDS = ("regions", "cka", "eval", "maps", "ablate", "attack", "degrade")
OPTIONS = {"ablate": ["--drop", "0"], "attack": ["--attack", "fgsm", "--eps", "8/255"], "degrade": ["--blur", "2"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--commands", nargs="+", default=["regions", "cka", "eval", "maps"], choices=COMMANDS)
    parser.add_argument("--source", type=Path, help="face folder to link from (default: generated faces)")
    parser.add_argument("--source-images", type=int, default=1600, help="generated faces to link from")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from _faces import face_folder, linked_folder

    source = args.source or face_folder(args.source_images)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    print(f"source {source}; {args.threads} thread(s), {os.cpu_count()} CPUs (shared machine)")
    with tempfile.TemporaryDirectory() as tmp:
        for command in args.commands:
            peaks = {}
            for n in args.images:
                folder = linked_folder(source, n, Path(tmp) / f"n{n}")
                report = Path(tmp) / f"{command}-{n}.json"
                subprocess.run([sys.executable, str(HERE / "_probe.py"), str(report), "--", command, "--data", str(folder), *OPTIONS.get(command, []), "--json"],
                               env=env, check=True, stdout=subprocess.DEVNULL)
                result = json.loads(report.read_text())
                peaks[n] = result["peak_rss_mib"]
                print(f"{command:<8} {n:>6} images: peak RSS {peaks[n]:8.1f} MiB   {result['seconds']:7.1f} s")
            small, large = min(args.images), max(args.images)
            print(f"{command:<8} peak RSS {large} / {small} images: {peaks[large] / peaks[small]:.3f}x (target <= 1.05)")


if __name__ == "__main__":
    main()
