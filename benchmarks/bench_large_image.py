"""Peak memory of decode + detect + align for one large JPEG, each variant in a fresh subprocess.

A SIZE x SIZE JPEG (``skimage.data.astronaut()`` resized, with film grain so it compresses like a
photo) is written to a temporary folder. Each variant then runs in its own child process and
reports its peak resident set size (``ru_maxrss``), in total and above the peak right after the
imports (numpy, OpenCV, mediapipe, moescope):

- ``reduced``: the header gives the size; the JPEG is decoded inside libjpeg at 1/k for
  detection (long side <= ``MAX_DETECTION_SIDE``); the crop is warped from the coarsest decode
  that still has a source pixel per crop pixel (:func:`moescope.align.warp_reduction`; a second,
  finer decode only when the face needs it);
- ``full``: full-resolution decode, area-downscaled for detection, crop warped from the
  full-resolution pixels.

Both then build the region masks on the 120-px aligned crop and pool them to a 20x20 grid.

- ``cli`` / ``cli-none``: the whole command, ``moescope regions --data DIR --bootstrap 0``
  (``--align auto`` / ``--align none``) on a folder holding only that JPEG, under
  ``/usr/bin/time -v`` (its "Maximum resident set size"; the baseline is
  ``moescope regions --data`` on a 64x64 image, i.e. imports and the model).

    python -m benchmarks.bench_large_image [--size 10000] [--variants reduced full cli cli-none] [--json]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BOUND_MIB = 1.5 * 1024**3 / 2**20  # the bound: 1.5 GB
VARIANTS = ("reduced", "full", "cli", "cli-none")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_jpeg(path: Path, size: int, seed: int = 0) -> None:
    """``skimage.data.astronaut()`` resized to ``size x size``, plus grain, as a quality-90 JPEG."""
    import cv2
    import numpy as np
    import skimage.data

    bgr = cv2.resize(skimage.data.astronaut()[..., ::-1], (size, size), interpolation=cv2.INTER_LINEAR)
    rng = np.random.default_rng(seed)
    for start in range(0, size, 1024):  # in bands: no full-size float temporaries
        band = bgr[start : start + 1024]
        grain = rng.integers(-6, 7, size=band.shape, dtype=np.int16)
        band[...] = np.clip(band.astype(np.int16) + grain, 0, 255).astype(np.uint8)
    if not cv2.imwrite(str(path), bgr, [cv2.IMWRITE_JPEG_QUALITY, 90]):
        raise RuntimeError(f"could not write {path}")


def child(variant: str, path: Path) -> dict:
    sys.path.insert(0, str(REPO))
    import cv2
    import numpy as np

    from facemoe_model.geometry import ALIGNED_FIVE_POINTS, ALIGNED_SIZE
    from moescope import align
    from moescope.landmarks import detect_landmarks
    from moescope.regions import REGIONS, pool_to_grid, region_masks

    detect_landmarks([np.zeros((64, 64, 3), np.uint8)], use_cache=False, workers=1, progress=False)  # load the models
    baseline = peak_rss_mib()
    start = time.perf_counter()

    data = path.read_bytes()
    if variant == "reduced":
        height, width = align.encoded_size(data)
        detect_at = align.detection_reduction(height, width)
        image, scale = align.decode_reduced(data, detect_at)
        landmarks = detect_landmarks([image], use_cache=False, workers=1, progress=False)[0]
        if landmarks is None:
            raise RuntimeError("no face found")
        full_landmarks = landmarks * scale
        warp_at = align.warp_reduction(full_landmarks)
        if warp_at != detect_at:
            del image
            image, scale = align.decode_reduced(data, warp_at)
        source_landmarks = full_landmarks / scale
    else:
        image, _ = align.decode_reduced(data, 1)
        height, width = image.shape[:2]
        detect_at = align.detection_reduction(height, width)
        small = cv2.resize(image, (round(width / detect_at), round(height / detect_at)), interpolation=cv2.INTER_AREA)
        landmarks = detect_landmarks([small], use_cache=False, workers=1, progress=False)[0]
        if landmarks is None:
            raise RuntimeError("no face found")
        source_landmarks = landmarks * np.array([width / small.shape[1], height / small.shape[0]])
        del small
        warp_at = 1
    face = align.align_face(image, source_landmarks, mode="always", output_size=120)
    del image
    masks = region_masks(face.landmarks, 120, 120)
    fractions = pool_to_grid(masks, (20, 20), input_hw=(120, 120))
    seconds = time.perf_counter() - start
    errors = np.linalg.norm(align.alignment_points(face.landmarks) * (ALIGNED_SIZE / 120) - ALIGNED_FIVE_POINTS, axis=1)
    return {
        "variant": variant,
        "size": [height, width],
        "file_mib": len(data) / 2**20,
        "detect_reduction": detect_at,
        "warp_reduction": warp_at,
        "peak_mib": peak_rss_mib(),
        "baseline_mib": baseline,
        "seconds": seconds,
        "five_point_error_px": errors.round(2).tolist(),
        "face_token_share": float(1 - fractions[REGIONS.index("hair_background")].mean()),
    }


def _time_v(command: list[str], env: dict) -> tuple[float, float, str]:
    """``(peak RSS MiB, seconds, stderr)`` of a command under ``/usr/bin/time -v``."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    peak = [line for line in done.stderr.splitlines() if "Maximum resident set size" in line]
    if not peak:
        raise RuntimeError(f"no /usr/bin/time output:\n{done.stderr[-2000:]}")
    return int(peak[0].split()[-1]) / 1024, seconds, done.stderr if done.returncode else ""


def measure_cli(variant: str, path: Path) -> dict:
    """Peak RSS of ``moescope regions --data`` on the large JPEG and on a tiny image."""
    import os
    import shutil

    import cv2
    import numpy as np

    align = "none" if variant == "cli-none" else "auto"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOESCOPE_CACHE": str(path.parent / "cache")}
    folders = {"large": path.parent / "large", "tiny": path.parent / "tiny"}
    for folder in folders.values():
        folder.mkdir(exist_ok=True)
    if not (folders["large"] / path.name).exists():
        shutil.copy(path, folders["large"] / path.name)
    cv2.imwrite(str(folders["tiny"] / "tiny.png"), np.zeros((64, 64, 3), np.uint8))
    moescope = [sys.executable, "-m", "moescope.cli", "regions", "--bootstrap", "0", "--align", align, "--json"]
    baseline, _, _ = _time_v([*moescope, "--data", str(folders["tiny"]), "--region-source", "template"], env)
    peak, seconds, failure = _time_v([*moescope, "--data", str(folders["large"])], env)
    one_line = failure.strip().splitlines()[-1] if failure else ""
    return {"variant": variant, "peak_mib": peak, "baseline_mib": baseline, "seconds": seconds,
            "exit_ok": not failure, "error": one_line, "traceback": "Traceback" in failure}


def measure(variant: str, path: Path) -> dict:
    if variant.startswith("cli"):
        return measure_cli(variant, path)
    command = [sys.executable, __file__, "--child", variant, str(path)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{variant} child failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10000, help="side of the square test JPEG (px)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--json", action="store_true", help="print one JSON object per variant")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]))))
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"large_{args.size}.jpg"
        make_jpeg(path, args.size)
        runs = [measure(variant, path) for variant in args.variants]
    if args.json:
        for run in runs:
            print(json.dumps(run))
        return
    print(f"{args.size}x{args.size} JPEG; bound {BOUND_MIB:.0f} MiB peak RSS")
    print(f"{'variant':<8} {'decode 1/k':>10} {'warp 1/k':>8} {'peak RSS MiB':>13} {'above imports':>14} {'s':>6}  five-point error (112 px)")
    for run in runs:
        if run["variant"].startswith("cli"):
            print(f"{run['variant']:<8} {'':>10} {'':>8} {run['peak_mib']:>13.1f} {run['peak_mib'] - run['baseline_mib']:>14.1f}"
                  f" {run['seconds']:>6.2f}  moescope regions {'ok' if run['exit_ok'] else 'failed: ' + run['error']}")
            continue
        print(
            f"{run['variant']:<8} {run['detect_reduction']:>10} {run['warp_reduction']:>8} {run['peak_mib']:>13.1f}"
            f" {run['peak_mib'] - run['baseline_mib']:>14.1f} {run['seconds']:>6.2f}  {run['five_point_error_px']}"
            f"  face tokens {run['face_token_share']:.0%}"
        )
    by = {run["variant"]: run for run in runs}
    if "full" in by and "reduced" in by:
        print(f"peak RSS ratio full / reduced: {by['full']['peak_mib'] / by['reduced']['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
