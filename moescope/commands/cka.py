"""``moescope cka BEFORE AFTER``: drift between two checkpoints (paper B.12 / B.13 / B.14)."""
from __future__ import annotations

import argparse

from ..cli import add_output_options, add_top_k_option, emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cka",
        help="layer-wise CKA, expert parameter shift and routing agreement between two checkpoints (paper B.12-B.14)",
        description="Compare two checkpoints of one architecture on the same images: linear CKA per layer "
        "(patch_embed, every block, norm, feature_layer; minibatch unbiased HSIC), the 5 lowest-CKA layers, "
        "each expert's parameter shift, and the share of tokens routed alike. With no checkpoints: "
        "demo:before demo:after on the bundled demo images.",
    )
    p.add_argument("before", nargs="?", metavar="BEFORE", help="reference checkpoint (.pt, official or moescope) or demo:before")
    p.add_argument("after", nargs="?", metavar="AFTER", help="checkpoint compared with BEFORE, e.g. fine-tuned (or demo:after)")
    p.add_argument("--data", metavar="DIR", help="folder of images (recursive); default: bundled demo images")
    p.add_argument("--features", choices=("flatten", "mean"), default="flatten",
                   help="per-image features: the layer's tokens flattened (default) or averaged")
    p.add_argument("--batch-size", type=int, default=16, help="images per HSIC batch (>= 4); default 16")
    p.add_argument("--last-batch", choices=("fold", "drop"), default="fold",
                   help="a last batch of 1-3 images is folded into the previous one (default) or dropped")
    add_top_k_option(p)
    add_output_options(p, seed=False)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import demo_images_dir, load_model
    from ..drift import analyse_drift
    from ..errors import MoescopeError
    from ..faces import list_images

    if (args.before is None) != (args.after is None):
        raise MoescopeError("give two checkpoints, BEFORE and AFTER (or none for demo:before demo:after)")
    specs = [args.before or "demo:before", args.after or "demo:after"]
    models = [load_model(spec, top_k=args.top_k) for spec in specs]
    paths = list_images(args.data if args.data else demo_images_dir())
    result = analyse_drift(
        *models, specs, paths, features=args.features, batch_size=args.batch_size, last_batch=args.last_batch,
        progress=not args.json, data=str(args.data or "demo:images"),
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

