"""``moescope models``: list the registered FaceMoE configurations."""
from __future__ import annotations

import argparse

from ..cli import emit
from ..options import add_output


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered FaceMoE model configurations")
    add_output(p, seed=False)
    p.set_defaults(run=run)


def render(result) -> str:
    return "\n".join(f"{name:24s} {description}" for name, description in zip(result.tables["models"]["name"], result.tables["models"]["description"]))


def run(args: argparse.Namespace) -> int:
    from ..runners.info import registered_models

    emit(registered_models(), args, render)
    return 0
