"""``moescope models``: list the registered FaceMoE configurations."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered FaceMoE model configurations")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from facemoe_model import list_models

    for name, description in list_models().items():
        print(f"{name:24s} {description}")
    return 0
