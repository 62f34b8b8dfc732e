"""Cost of expert activation maps: routing + output maps vs one plain inference pass, side by side.

The bundled 160 demo faces are read and preprocessed once (the same tensors for both; image
decoding and landmarks are shared by every analysis and left out). Timed round-robin in one
run, medians:

* ``plain`` — one inference pass over the faces (``facemoe_model.inference.run_batches``);
* ``maps`` — the same pass through :func:`moescope.runners.maps.map_passes` producing, for
  every MoE layer, the top-1 routing map and the combine-weight map (from ``hook_routing``)
  and the expert output-norm map (from ``hook_expert_outputs``), plus the stage averages.

Target ratio maps/plain <= 1.3. The gradient maps are then timed once each and their cost
stated per image: Grad-CAM (one forward + backward pass per MoE layer and expert) and
Integrated Gradients (``--steps`` forward + backward passes per image).

    python benchmarks/bench_maps.py [--checkpoint demo:after] [--batch-size 64] [--repeats 7]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from facemoe_model.inference import run_batches
from facemoe_model.moe import moe_layers
from moescope.demo import DEFAULT_CHECKPOINT, demo_images_dir, load_model
from moescope.faces import image_batches
from moescope.runners.maps import _gradient_maps, map_passes
from moescope.stats.maps import group_maps

from _timing import interleaved_medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--gradient-images", type=int, default=8, help="images for the Grad-CAM timing (default 8)")
    parser.add_argument("--steps", type=int, default=32, help="Integrated Gradients steps (default 32)")
    args = parser.parse_args()

    from facemoe_model.data.images import list_images

    model = load_model(args.checkpoint).eval()
    paths = list_images(demo_images_dir())
    batches = list(image_batches(paths, model.img_size, [range(len(paths))], batch_size=args.batch_size))
    images = torch.cat([b.images for b in batches])
    names = list(moe_layers(model))

    def plain() -> None:
        for _ in run_batches(model, (b.images for b in batches)):
            pass

    def maps() -> None:
        kept = {"routing": [], "weight": [], "output": []}
        for _, (per_kind,) in map_passes([model], batches, ("routing", "weight", "output")):
            for kind, layer_maps in per_kind.items():
                kept[kind].append(layer_maps)
        for kind, parts in kept.items():
            joined = {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}
            group_maps(joined, "stage")

    med = interleaved_medians({"plain": plain, "maps": maps}, repeats=args.repeats)
    print(f"model={args.checkpoint} images={len(images)} batch={args.batch_size} threads={torch.get_num_threads()} "
          f"layers={len(names)} repeats={args.repeats}")
    print(f"plain inference {med['plain'] * 1e3:8.1f} ms   routing+weight+output maps {med['maps'] * 1e3:8.1f} ms   "
          f"ratio maps/plain = {med['maps'] / med['plain']:.3f} (target <= 1.3)")

    # gradient maps: cost per image (one timed run each, after one warm-up image)
    x = images[: args.gradient_images]
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model(images[args.gradient_images : 2 * args.gradient_images]), dim=1)
    _gradient_maps(model, "gradcam", x[:1], ref[:1], names, args.steps)
    start = time.perf_counter()
    _gradient_maps(model, "gradcam", x, ref, names, args.steps)
    gradcam = (time.perf_counter() - start) / len(x)
    n_ig = min(2, len(x))
    start = time.perf_counter()
    _gradient_maps(model, "input", x[:n_ig], ref[:n_ig], names, args.steps)
    ig = (time.perf_counter() - start) / n_ig
    per_image_plain = med["plain"] / len(images)
    print(f"gradcam: {gradcam * 1e3:8.1f} ms per image ({len(names)} layers x {model.get_submodule(names[0]).num_experts} experts, "
          f"batch {len(x)}; {gradcam / per_image_plain:.0f}x a plain inference per image)")
    print(f"integrated gradients ({args.steps} steps): {ig * 1e3:8.1f} ms per image ({ig / per_image_plain:.0f}x a plain inference per image)")


if __name__ == "__main__":
    main()
