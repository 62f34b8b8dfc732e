"""``moescope info [CKPT]``: what a checkpoint holds — format, architecture, MoE layers."""
from __future__ import annotations

import argparse

from ..cli import emit
from ..options import add_checkpoint, add_output, add_top_k, load_models


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a checkpoint: format, architecture, MoE layers")
    add_checkpoint(p)
    add_top_k(p)
    add_output(p, seed=False)
    p.set_defaults(run=run)


def render(result) -> str:
    s = result.summary
    head = [
        f"checkpoint: {result.checkpoints[0]} ({result.settings['format']} format)",
        f"model:      {s['model']}  {s['parameters'] / 1e6:.2f}M parameters, {s['moe_layers']} MoE layers",
        "config:     " + ", ".join(f"{k}={v}" for k, v in result.settings["config"].items() if k != "name"),
    ]
    return "\n".join(head) + "\n\n" + result.tables["moe_layers"].to_string(index=False)


def run(args: argparse.Namespace) -> int:
    from ..runners.info import describe

    (model,) = load_models([args.checkpoint], args)
    emit(describe(model), args, render)
    return 0
