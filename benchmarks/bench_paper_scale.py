"""The paper-scale check: ``moescope regions`` over generated faces (default 10,000) on the demo
model, in one process and under ``torchrun --nproc_per_node=2`` (gloo on CPU, NCCL with one GPU
per rank): wall time, images/s, peak RSS per process and the speed-up.

The faces are rendered once with the synthetic renderer into the moescope cache; a first
single-process run warms the landmark cache (its time is printed, the empty-cache case), then
both configurations run on the warm cache. Wall time is the whole launch (interpreter start,
imports, process group), the command's own time comes from each rank (:mod:`_probe`).

    python benchmarks/bench_paper_scale.py [--images 10000] [--nproc 2] [--threads 1] [--device auto]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))


def run(launch: list[str], report: Path, argv: list[str], env: dict) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    subprocess.run([*launch, str(HERE / "_probe.py"), str(report), "--", *argv], env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    reports = sorted(report.parent.glob(report.stem + "*.json"))
    return wall, [json.loads(p.read_text()) for p in reports]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--data", type=Path, help="a face folder instead of generated faces")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OMP/torch threads per process")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-warm", action="store_true", help="the landmark cache is already warm")
    args = parser.parse_args()

    from _faces import face_folder

    data = args.data or face_folder(args.images)
    argv = ["regions", "--data", str(data), "--json", "--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    print(f"regions over {data} ({args.images} images asked); {args.threads} thread(s) per process, "
          f"{os.cpu_count()} CPUs (shared machine: other work runs alongside)")
    with tempfile.TemporaryDirectory() as tmp:
        single = [sys.executable]
        if not args.skip_warm:
            wall, _ = run(single, Path(tmp) / "warm.json", argv, env)
            print(f"first run (landmark cache as found): {wall:.1f} s")
        rows = {}
        for label, launch in (("1 process", single),
                              (f"{args.nproc} processes", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                           f"--nproc_per_node={args.nproc}"])):
            wall, reports = run(launch, Path(tmp) / f"{label.split()[0]}p.json", argv, env)
            rows[label] = wall
            n_images = len([p for p in data.rglob("*.png")])
            rss = ", ".join(f"{r['peak_rss_mib']:.0f}" for r in reports)
            command = max(r["seconds"] for r in reports)
            print(f"{label:<12} wall {wall:7.1f} s  command {command:7.1f} s  {n_images / wall:6.1f} img/s (wall)  "
                  f"{n_images / command:6.1f} img/s (command)  peak RSS per process {rss} MiB")
        first, second = rows.values()
        print(f"speed-up (wall) {first / second:.2f}x with {args.nproc} processes")


if __name__ == "__main__":
    main()
