"""The ``moescope`` command line: one subcommand per analysis.

Errors caused by input (a bad checkpoint, an unreadable folder, a wrong option) print one
line ``moescope: error: ...`` and exit with status 2; never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .errors import MoescopeError

# Subcommand modules in ``moescope.commands`` (in --help order).
COMMANDS = ("regions", "cka", "ablate", "train", "eval", "info", "models")


def add_output_options(parser: argparse.ArgumentParser, seed: bool = True) -> None:
    """The options every analysis command shares: ``--out``, ``--json``, ``--seed``."""
    parser.add_argument("--out", metavar="DIR", help="write tables (CSV, Markdown, LaTeX), result.json and figures to DIR")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout (text goes to stderr)")
    if seed:
        parser.add_argument("--seed", type=int, default=0, help="random seed (bootstrap, random routing ...); default 0")


def add_top_k_option(parser: argparse.ArgumentParser) -> None:
    """``--top-k``: experts per token for official checkpoints, which do not store it."""
    parser.add_argument("--top-k", type=int, help="experts per token for official checkpoints (not stored in them; default 2)")


def split_names(values: list[str] | None) -> list[str] | None:
    """Names from repeatable, comma-separated options (``--layers a,b --layers c``); None if none."""
    names = [n.strip() for v in values or () for n in v.split(",") if n.strip()]
    return names or None


def emit(result, args: argparse.Namespace, render) -> None:
    """Show an AnalysisResult: human text (``render(result) -> str``), JSON, files."""
    text_stream = sys.stderr if getattr(args, "json", False) else sys.stdout
    print(render(result), file=text_stream)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if getattr(args, "out", None):
        written = result.save(args.out)
        print(f"wrote {len(written)} files to {args.out}", file=sys.stderr)
    if getattr(args, "json", False):
        print(result.to_json(indent=None))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moescope",
        description="Analyse Mixture-of-Experts routing in FaceMoE and other MoE vision transformers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"moescope.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"moescope.commands.{name}":
                continue  # command not shipped in this build
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the exact command line, recorded by commands that write provenance
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        status = args.run(args)
    except MoescopeError as exc:
        print(f"moescope: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("moescope: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
