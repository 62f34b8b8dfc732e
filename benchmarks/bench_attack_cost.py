"""Attack cost per probe relative to one forward+backward pass, side by side (issue 12).

On the demo model and 32 demo probes (mate-away loss, L-inf 8/255, alpha 2/255), timed
round-robin in one run, medians: the unit is one forward+backward pass of the batch to the
input gradient (frozen parameters, eval mode: one attack step); each attack is timed as the
runner pays it (``run_attack``: loss before, the attack, loss after) and as the bare
``perturb``. Ideal for ``run_attack``: steps + 1 (the steps plus the two plain forwards);
for ``perturb``: steps.

    python benchmarks/bench_attack_cost.py [--checkpoint demo:after] [--probes 32] [--repeats 7]
"""
from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch

from facemoe_model.data.images import read_image, to_unit_tensor
from moescope.attacks import AttackSetting, EmbeddingModel, attack_mode, get_loss, reference_embeddings, run_attack
from moescope.demo import demo_split_dir, load_model

from _timing import interleaved_medians


def demo_probes(size: int, n: int) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]:
    """The first ``n`` demo probe images (sorted by identity, then file) and the whole demo gallery."""
    root = demo_split_dir()
    ids = sorted(p.name for p in (root / "gallery").iterdir() if p.is_dir())
    label = {name: i for i, name in enumerate(ids)}
    probe_files = [(f, label[d.name]) for d in sorted((root / "probe").iterdir()) if d.is_dir() for f in sorted(d.glob("*.png"))][:n]
    gallery_files = [(f, label[d.name]) for d in sorted((root / "gallery").iterdir()) if d.is_dir() for f in sorted(d.glob("*.png"))]
    probe = torch.stack([to_unit_tensor(read_image(f), size) for f, _ in probe_files])
    gallery = torch.stack([to_unit_tensor(read_image(f), size) for f, _ in gallery_files])
    return probe, np.array([l for _, l in probe_files]), gallery, np.array([l for _, l in gallery_files])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="demo:after")
    parser.add_argument("--probes", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    model = load_model(args.checkpoint)
    embedder = EmbeddingModel(model)
    probe, probe_labels, gallery, gallery_labels = demo_probes(model.img_size, args.probes)
    loss = get_loss("mate-away")
    with attack_mode(model), torch.no_grad():
        reference = reference_embeddings(loss, probe_labels, embedder(probe), embedder(gallery), gallery_labels)

    def forward_backward() -> None:
        with attack_mode(model):
            x = probe.detach().requires_grad_()
            torch.autograd.grad(loss(embedder(x), reference).sum(), x)

    settings = {"FGSM": AttackSetting("fgsm"), f"PGD-{args.steps}": AttackSetting("pgd", steps=args.steps),
                f"MIM-{args.steps}": AttackSetting("mim", steps=args.steps)}

    def full(setting: AttackSetting):
        return lambda: run_attack(setting, embedder, loss, probe, reference)

    def bare(setting: AttackSetting):
        attack = setting.create(embedder, loss)
        kwargs = setting.perturb_kwargs(loss)

        def go() -> None:
            with attack_mode(model):
                attack.perturb(probe, target=reference, **kwargs)

        return go

    candidates = {"fwd+bwd": forward_backward}
    for name, setting in settings.items():
        candidates[name] = full(setting)
        candidates[f"{name} perturb"] = bare(setting)
    warnings.filterwarnings("ignore", message="Input Tensor .* did not already require gradients")  # captum FGSM, per step
    med = interleaved_medians(candidates, repeats=args.repeats, warmup=1)
    unit = med["fwd+bwd"]
    print(f"model={args.checkpoint} probes={len(probe)} threads={torch.get_num_threads()} repeats={args.repeats} (medians, interleaved)")
    print(f"one forward+backward: {unit / len(probe) * 1e3:.2f} ms/probe")
    print(f"{'attack':<10} {'ms/probe':>9} {'ratio':>7} {'ideal':>6}   {'perturb only':>12} {'ideal':>6}")
    for name, setting in settings.items():
        steps = setting.gradient_steps
        print(
            f"{name:<10} {med[name] / len(probe) * 1e3:9.2f} {med[name] / unit:7.2f} {steps + 1:6d}   "
            f"{med[name + ' perturb'] / unit:12.2f} {steps:6d}"
        )


if __name__ == "__main__":
    main()
