"""``moescope info [CKPT]``: what a checkpoint holds — format, architecture, MoE layers."""
from __future__ import annotations

import argparse

from ..cli import add_output_options, add_top_k_option, emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a checkpoint: format, architecture, MoE layers")
    p.add_argument("checkpoint", nargs="?", help="checkpoint path or demo:before/demo:after (default demo:after)")
    add_top_k_option(p)
    add_output_options(p, seed=False)
    p.set_defaults(run=run)


def describe(model):
    """The checkpoint summary as an AnalysisResult (one row per MoE layer)."""
    import pandas as pd

    from facemoe_model import moe_layers

    from ..results import AnalysisResult

    rows = []
    for name, layer in moe_layers(model).items():
        grid = layer.token_grid
        rows.append(
            {
                "layer": name,
                "grid": f"{grid[0]}x{grid[1]}" if grid else "",
                "experts": layer.num_experts,
                "k": layer.k,
                "weighting": layer.weighting,
                "params": sum(p.numel() for p in layer.parameters()),
            }
        )
    config = dict(model.model_config)
    return AnalysisResult(
        command="info",
        checkpoints=[getattr(model, "checkpoint_path", "")],
        settings={"format": getattr(model, "checkpoint_format", ""), "config": config},
        tables={"moe_layers": pd.DataFrame(rows)},
        summary={
            "model": config["name"],
            "parameters": sum(p.numel() for p in model.parameters()),
            "moe_layers": len(rows),
            "metadata": getattr(model, "checkpoint_metadata", {}),
        },
    )


def render(result) -> str:
    s = result.summary
    head = [
        f"checkpoint: {result.checkpoints[0]} ({result.settings['format']} format)",
        f"model:      {s['model']}  {s['parameters'] / 1e6:.2f}M parameters, {s['moe_layers']} MoE layers",
        "config:     " + ", ".join(f"{k}={v}" for k, v in result.settings["config"].items() if k != "name"),
    ]
    return "\n".join(head) + "\n\n" + result.tables["moe_layers"].to_string(index=False)


def run(args: argparse.Namespace) -> int:
    from ..demo import load_model

    model = load_model(args.checkpoint, top_k=args.top_k)
    emit(describe(model), args, render)
    return 0
