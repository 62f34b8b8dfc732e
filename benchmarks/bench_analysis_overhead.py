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

``--model NAME`` runs the same comparison on a registered configuration with random weights
(seeded; e.g. ``facemoe_swin_official``, the full-size network, whose forward is ~150x the demo
model's: 3.2 vs 460-520 img/s on 2 CPU cores), saved to a temporary checkpoint that the command
loads: how the ratio falls as the model's share of the work grows.

Import cost is measured apart, in fresh processes (``-X importtime``: the sum of the top-level
imports of ``moescope regions`` on one image, and of ``moescope --help``), with the heavy modules
each loads.

    python benchmarks/bench_analysis_overhead.py [--images 1600] [--repeats 3] [--threads 2]
    python benchmarks/bench_analysis_overhead.py --model facemoe_swin_official --images 60 --repeats 2
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
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
    parser.add_argument("--images", type=int, help="faces to generate (default 1600; whole identities of 10); with --data, how many it must hold")
    parser.add_argument("--data", type=Path, help="a face folder to use instead of generated faces (all of its images)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--only", choices=("regions", "cka"), help="one command only")
    parser.add_argument("--model", default="demo", help="demo (the bundled checkpoints, default) or a registered "
                        "configuration name, run with random weights (e.g. facemoe_swin_official)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        measure(args, Path(scratch))


def random_checkpoints(name: str, folder: Path) -> list[str]:
    """Two checkpoints of the registered configuration ``name`` with random weights (seeds 0 and
    1) in ``folder``: the "before" and "after" of ``cka``; ``regions`` runs on the second."""
    import torch
    from facemoe_model import save_checkpoint
    from facemoe_model.models import create_model, list_models

    if name not in list_models():
        raise SystemExit(f"--model: unknown configuration {name!r}; registered: {', '.join(list_models())}")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(str(save_checkpoint(create_model(name), folder / f"{name}-seed{seed}.pt")))
    return paths


def measure(args: argparse.Namespace, scratch: Path) -> None:
    """The comparison of the module docstring; temporary checkpoints go under ``scratch``."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from _faces import face_folder
    from _timing import cpu_by_thread, interleaved_medians
    from facemoe_model.data.images import list_images, preprocess, read_image
    from moescope.choices import BATCH_SIZE
    from moescope.cli import main as cli
    from moescope.demo import DEFAULT_PAIR, load_model
    from moescope.trace import compatible_layers

    checkpoints = list(DEFAULT_PAIR) if args.model == "demo" else random_checkpoints(args.model, scratch)
    data = args.data or face_folder(args.images or 1600)
    paths = list_images(data)  # the command reads the whole folder: the pure forward gets the same images
    if args.data is not None and args.images is not None and len(paths) != args.images:
        raise SystemExit(f"{data} holds {len(paths)} images, not the {args.images} asked for (--images)")
    print(f"{len(paths)} images from {data}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs (shared with other work: compare the ratios, not the seconds)")

    def command(*argv: str):
        def run() -> None:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                status = cli([*argv, "--data", str(data), "--json"])
            if status:
                raise SystemExit(f"moescope {' '.join(argv)} failed with status {status}")
        return run

    models = [load_model(c).eval() for c in checkpoints]
    input_size = compatible_layers(models[:1], ["model"], None)[2]
    described = "the bundled demo checkpoints" if args.model == "demo" else f"{args.model}, random weights (seeds 0, 1)"
    print(f"model: {described}, input {input_size}x{input_size}")
    images = torch.stack([preprocess(read_image(p), input_size) for p in paths])

    def forward(models, batch_size):
        def run() -> None:
            with torch.inference_mode():
                for batch in images.split(batch_size):
                    for m in models:
                        m(batch)
        return run

    for name in ("regions", "cka") if args.only is None else (args.only,):
        if name == "regions":
            run_models, batch = models[1:], BATCH_SIZE
            candidates = {"regions": command("regions", checkpoints[1]), "regions --null 0": command("regions", checkpoints[1], "--null", "0")}
        else:
            run_models, batch, candidates = models, 16, {"cka": command("cka", *checkpoints)}
        start = time.perf_counter()
        next(iter(candidates.values()))()
        first = time.perf_counter() - start
        times = interleaved_medians({**candidates, "pure forward": forward(run_models, batch)}, repeats=args.repeats, warmup=0)
        print(f"\n{name}: first run (landmark cache as found) {first:.1f} s")
        for label, seconds in times.items():
            print(f"  {label:<18} {seconds:7.2f} s   {len(paths) / seconds:7.1f} img/s   ratio {seconds / times['pure forward']:.2f}")
        command_cpu = cpu_by_thread(next(iter(candidates.values())))
        forward_cpu = cpu_by_thread(forward(run_models, batch))
        if command_cpu:
            print(cpu_summary(name, command_cpu, forward_cpu))

    print()
    for argv in (["--help"], ["regions", "--data", str(paths[0]), "--json", "--null", "0", "--bootstrap", "0"]):
        seconds, heavy = import_seconds(argv)
        print(f"imports of moescope {' '.join(argv[:1])}: {seconds:.2f} s ({', '.join(heavy) or 'no heavy module'})")


if __name__ == "__main__":
    main()
