"""``moescope eval``: face-recognition accuracy of a checkpoint (docs/analyses.md, "Evaluation protocols").

Verification (pairs: 10-fold accuracy, TAR@FAR) and closed-set identification (gallery/probe:
Rank-1/5/10/20, distractors allowed), with flip-fused L2-normalised embeddings. With no data
option the bundled demo split is used (held-out synthetic identities; its ``pairs.txt`` adds
verification); with no checkpoint, :data:`~moescope.demo.DEFAULT_CHECKPOINT`. ``--data DIR``
(identity folders) draws both protocols with ``--seed`` after aligning the images (``--align``)
and records the draw in the output (tables ``split`` and ``pairs``).
"""
from __future__ import annotations

import argparse
import math

from ..cli import emit
from ..demo import DEFAULT_CHECKPOINT
from ..options import add_checkpoint, add_evaluation_data, add_output, add_top_k, check_evaluation_data, evaluation_data, load_models, probe_transform


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="verification and identification accuracy of a checkpoint",
        description="Evaluate a checkpoint: verification (10-fold accuracy, TAR@FAR) on pairs, closed-set "
        f"identification (CMC Rank-1/5/10/20) on a gallery/probe split. Default: {DEFAULT_CHECKPOINT} on the bundled demo split.",
    )
    add_checkpoint(p)
    add_evaluation_data(p)
    add_top_k(p)
    add_output(p)
    p.set_defaults(run=run)


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def render(result) -> str:
    s, settings = result.summary, result.settings
    probes = f"probes down-sampled to {settings['lowres']}x{settings['lowres']} px" if settings["lowres"] else "images as they are"
    lines = [f"checkpoint: {result.checkpoints[0]}", f"data:       {settings['data']} ({probes})"]
    if "protocol" in settings:
        p = settings["protocol"]
        lines.append(f"protocol:   drawn with seed {p['seed']}: {p['identities']} identities ({p['single_image_identities']} with one "
                     f"image: gallery distractors); {p['genuine_pairs']} genuine + {p['impostor_pairs']} impostor pairs "
                     f"(of {p['genuine_pairs_available']} genuine available)")
    if "alignment" in s:
        a = s["alignment"]
        counts = ", ".join(f"{k} {v}" for k, v in a.items() if k not in ("mode", "rejected", "unreadable"))
        lines.append(f"alignment:  --align {a['mode']}: {counts}; {a['rejected']} left out, {a['unreadable']} unreadable")
    if "identification" in s:
        m = s["identification"]
        lines += ["", f"identification: {m['probes']} probes against {m['gallery']} gallery images ({m['distractors']} distractors)",
                  "  " + "  ".join(f"{k} {_fmt(v)}" for k, v in m.items() if k.startswith("Rank-"))
                  + (f"  (chance Rank-1 {_fmt(s['chance_rank1'])})" if "chance_rank1" in s else "")]
    if "verification" in s:
        m = s["verification"]
        tar = "  ".join(f"{k} {_fmt(v)}" for k, v in m.items() if k.startswith("TAR@"))
        lines += ["", f"verification: {m['pairs']} pairs, 10 folds",
                  f"  accuracy {_fmt(m['accuracy'])} +- {_fmt(m['accuracy_std'])} (mean threshold {m['threshold']:.3f}, chosen on "
                  "the other 9 folds)" + (f"; chance {_fmt(s['chance_verification'])}" if "chance_verification" in s else ""), f"  {tar}"]
        if any(isinstance(v, float) and math.isnan(v) for v in m.values()):
            lines.append("  (n/a: too few impostor pairs to measure that false accept rate)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..runners.evaluation import evaluate_checkpoint

    check_evaluation_data(args)
    degradation = probe_transform(args)
    (model,) = load_models([args.checkpoint], args)
    data = evaluation_data(args, model.img_size)
    result = evaluate_checkpoint(
        model, data, checkpoint=args.checkpoint, batch_size=args.batch_size, flip=not args.no_flip,
        probe_transform=degradation, settings={"lowres": args.lowres},
    )
    emit(result, args, render)
    return 0
