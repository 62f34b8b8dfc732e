"""``moescope cka BEFORE AFTER``: drift between two checkpoints (paper B.12 / B.13 / B.14)."""
from __future__ import annotations

import argparse

from ..cli import emit
from ..demo import DEFAULT_PAIR
from ..errors import MoescopeError
from ..options import add_alignment_options, add_checkpoint_pair, add_image_source, add_output, add_top_k, checkpoint_pair, image_source, load_models


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cka",
        help="layer-wise CKA, expert parameter shift and routing agreement between two checkpoints (paper B.12-B.14)",
        description="Compare two checkpoints of one architecture on the same images: linear CKA per layer "
        "(patch_embed, every block, norm, feature_layer; minibatch unbiased HSIC), the 5 lowest-CKA layers, "
        "each expert's parameter shift, and the share of tokens routed alike. With no checkpoints: "
        f"{' '.join(DEFAULT_PAIR)} on the bundled demo images.",
    )
    add_checkpoint_pair(p)
    add_image_source(p)
    p.add_argument("--features", choices=("flatten", "mean"), default="flatten",
                   help="per-image features: the layer's tokens flattened (default) or averaged")
    p.add_argument("--batch-size", type=int, default=16, help="images per HSIC batch (>= 4); default 16")
    p.add_argument("--last-batch", choices=("fold", "drop"), default="fold",
                   help="a last batch of 1-3 images is folded into the previous one (default) or dropped")
    add_alignment_options(p)
    add_top_k(p)
    add_output(p, seed=False)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..runners.drift import analyse_drift

    from ..stats.cka import MIN_BATCH

    if args.batch_size < MIN_BATCH:
        raise MoescopeError(f"--batch-size must be >= {MIN_BATCH} for CKA (unbiased HSIC), got {args.batch_size}")
    specs = checkpoint_pair(args)
    paths, data = image_source(args)  # before any model is loaded: a bad --data fails at once
    models = load_models(specs, args)
    result = analyse_drift(
        *models, specs, paths, features=args.features, batch_size=args.batch_size, last_batch=args.last_batch,
        progress=not args.json, data=data, align=args.align, save_aligned=args.save_aligned,
    )
    emit(result, args, render)
    return 0


def render(result) -> str:
    """B.12 / B.13 / B.14 and routing agreement as a person reads them."""
    import pandas as pd

    s, st, t = result.summary, result.settings, result.tables
    a, b = st["specs"]
    lines = [
        f"moescope cka: {a} -> {b}; {s['images_analysed']} of {s['images_found']} images in {s['batches']} batches "
        f"(batch size {st['batch_size']}; {st['last_batch_note']}); features={st['features']}",
        "",
        "B.12  CKA similarity per layer",
        t["cka"][["layer", "cka"]].to_string(index=False, float_format=lambda v: f"{v:.6f}"),
        "",
        "B.13  five most changed layers (lowest CKA)",
        t["lowest_cka"].to_string(index=False, float_format=lambda v: f"{v:.6f}"),
        "",
        "B.14  expert parameter shift, all MoE layers (L2 of after - before; % of the before-norm)",
    ]
    total = t["expert_shift_total"]
    shown = {
        "Expert": [f"Expert {e}" for e in total["expert"]],
        "L2 Shift (Magnitude)": [f"{v:.4f}" for v in total["l2_shift"]],
        "Expert Shift (%)": [f"{v:.4f}%" for v in total["shift_pct"]],
    }
    lines.append(pd.DataFrame(shown).to_string(index=False))
    per_layer = t["expert_shift"].pivot(index="layer", columns="expert", values="shift_pct")
    per_layer = per_layer.reindex(t["expert_shift"]["layer"].drop_duplicates())
    per_layer.columns = [f"Expert {e} %" for e in per_layer.columns]
    lines += ["", "expert shift (%) per MoE layer", per_layer.to_string(float_format=lambda v: f"{v:.4f}")]
    lines += [
        "",
        f"routing agreement (share of tokens routed alike): top-1 {s['routing_top1_agreement']:.4f}, "
        f"top-k set {s['routing_topk_agreement']:.4f} over all MoE layers",
        t["routing_agreement"].to_string(index=False, float_format=lambda v: f"{v:.4f}"),
    ]
    return "\n".join(lines)

