"""The ``moescope`` command line: the parser, the error boundary and the command list.

Errors caused by input (a bad checkpoint, an unreadable folder, a wrong option) print one
line ``moescope: error: ...`` and exit with status 2; never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .errors import MoescopeError

COMMANDS = ("regions", "cka", "ablate", "train", "eval", "info", "models")
"""The subcommands, in --help order: each is a module ``moescope.commands.NAME``."""


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
    """The parser with every command of :data:`COMMANDS`; a command module that fails to import is an error."""
    parser = argparse.ArgumentParser(
        prog="moescope",
        description="Analyse Mixture-of-Experts routing in FaceMoE and other MoE vision transformers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"moescope.commands.{name}")
        except ImportError as exc:
            raise RuntimeError(f"moescope command {name!r} cannot be imported: {exc}") from exc
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
