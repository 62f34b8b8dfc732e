"""What an analysis costs beyond the model: `moescope regions` / `cka` in-process time after
imports vs the pure forward passes over the same images, side by side (target <= 1.3).

Faces are generated with the synthetic renderer (cached); a first run of each command warms the
landmark cache (its time is printed: the empty-cache case). Then, round-robin in one process:

* ``regions``: ``moescope.cli.main(["regions", "--data", DIR, "--json"])`` (everything the command
  does after imports: model load, decoding, landmark cache, alignment, region masks, forward with
  routing capture, counts, bootstrap, permutation null, tables, JSON) and once more with
  ``--null 0``; ``pure forward``: the model on the same images, already decoded and preprocessed,
  in batches of the command's size under ``torch.inference_mode``;
* ``cka``: ``main(["cka", "--data", DIR, "--json"])`` vs both models' forwards (batches of 16).

Then one more run of the command and of the pure forward, each with the CPU seconds of every
thread (model: the main thread and torch's workers; the batch preparation and accumulation
threads): with the model filling every core, the CPU time besides the model's bounds the ratio.

Import cost is measured apart, in fresh processes (``-X importtime``: the sum of the top-level
imports of ``moescope regions`` on one image, and of ``moescope --help``), with the heavy modules
each loads.

    python benchmarks/bench_analysis_overhead.py [--images 1600] [--repeats 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def import_seconds(argv: list[str]) -> tuple[float, list[str]]:
    """Seconds of imports (sum of top-level ``-X importtime`` entries) of ``moescope ARGV`` in a
    fresh process, and which heavy modules it imported."""
    probe = ("import sys\nfrom moescope.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
             "    print('HEAVY', ','.join(m for m in ('torch', 'timm', 'torchvision', 'mediapipe', 'seaborn', 'matplotlib', 'pandas', 'cv2') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", probe, *argv], capture_output=True, text=True)
    total = 0
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)  # top level: no indentation before the name
        if m:
            total += int(m.group(1))
    heavy = next((l.split(" ", 1)[1] for l in proc.stdout.splitlines() if l.startswith("HEAVY")), "?").split(",")
    return total / 1e6, [h for h in heavy if h]


THREAD_ROLES = {"main": "main", "native": "torch workers", "moescope-prefetch": "preparation", "moescope-accumulate": "accumulation"}


def cpu_summary(name: str, command_cpu: dict[str, float], forward_cpu: dict[str, float]) -> str:
    """Where the command's CPU time went, by thread, beside the pure forward's: on a machine
    whose cores the model already fills, every CPU-second besides the model's lengthens the run."""
    def part(cpu: dict[str, float]) -> str:
        roles: dict[str, float] = {}
        for thread, seconds in cpu.items():
            role = THREAD_ROLES.get(thread, "other")
            roles[role] = roles.get(role, 0.0) + seconds
        return ", ".join(f"{role} {seconds:.2f}" for role, seconds in sorted(roles.items(), key=lambda kv: -kv[1]))

    total, model = sum(command_cpu.values()), sum(forward_cpu.values())
    cores = os.cpu_count() or 1
    return (f"  CPU seconds by thread, one run each: {name}: {part(command_cpu)} (total {total:.2f}); pure forward: {part(forward_cpu)} "
            f"(total {model:.2f})\n  -> {total - model:.2f} CPU-s beside the model's {model:.2f}; on {cores} CPUs the command needs at "
            f"least {total / cores:.2f} s, ratio >= {total / model:.2f} where the model alone keeps every core busy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1600)
    parser.add_argument("--data", type=Path, help="a face folder to use instead of generated faces")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--only", choices=("regions", "cka"), help="one command only")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from _faces import face_folder
    from _timing import cpu_by_thread, interleaved_medians
    from facemoe_model.data.images import list_images, preprocess, read_image
    from moescope.choices import BATCH_SIZE
    from moescope.cli import main as cli
    from moescope.demo import DEFAULT_PAIR, load_model

    data = args.data or face_folder(args.images)
    paths = list_images(data)[: args.images]
    if len(paths) < args.images:
        raise SystemExit(f"{data}: only {len(paths)} images")
    if args.data is None and len(list_images(data)) != len(paths):
        raise SystemExit("generated folder holds more images than asked")
    print(f"{len(paths)} images from {data}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs (shared with other work: compare the ratios, not the seconds)")

    def command(*argv: str):
        def run() -> None:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                status = cli([*argv, "--data", str(data), "--json"])
            if status:
                raise SystemExit(f"moescope {' '.join(argv)} failed with status {status}")
        return run

    images = torch.stack([preprocess(read_image(p), 120) for p in paths])

    def forward(models, batch_size):
        def run() -> None:
            with torch.inference_mode():
                for batch in images.split(batch_size):
                    for m in models:
                        m(batch)
        return run

    for name in ("regions", "cka") if args.only is None else (args.only,):
        if name == "regions":
            models, batch, candidates = [load_model("demo:after").eval()], BATCH_SIZE, {"regions": command("regions"), "regions --null 0": command("regions", "--null", "0")}
        else:
            models, batch, candidates = [load_model(s).eval() for s in DEFAULT_PAIR], 16, {"cka": command("cka")}
        start = time.perf_counter()
        next(iter(candidates.values()))()
        first = time.perf_counter() - start
        times = interleaved_medians({**candidates, "pure forward": forward(models, batch)}, repeats=args.repeats, warmup=0)
        print(f"\n{name}: first run (landmark cache as found) {first:.1f} s")
        for label, seconds in times.items():
            print(f"  {label:<18} {seconds:7.2f} s   {len(paths) / seconds:7.1f} img/s   ratio {seconds / times['pure forward']:.2f}")
        command_cpu = cpu_by_thread(next(iter(candidates.values())))
        forward_cpu = cpu_by_thread(forward(models, batch))
        if command_cpu:
            print(cpu_summary(name, command_cpu, forward_cpu))

    print()
    for argv in (["--help"], ["regions", "--data", str(paths[0]), "--json", "--null", "0", "--bootstrap", "0"]):
        seconds, heavy = import_seconds(argv)
        print(f"imports of moescope {' '.join(argv[:1])}: {seconds:.2f} s ({', '.join(heavy) or 'no heavy module'})")


if __name__ == "__main__":
    main()
