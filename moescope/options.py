"""The command-line options commands share, declared once, and their resolution.

- the checkpoint positional (a path, ``demo:before`` / ``demo:after``; default
  :data:`~moescope.demo.DEFAULT_CHECKPOINT`) or a BEFORE/AFTER pair, and ``--top-k``;
- the image source ``--data DIR`` (default: the bundled demo images);
- the evaluation data of ``eval``, ``ablate`` (and the coming ``attack`` / ``degrade``):
  ``--split DIR`` | ``--pairs FILE [--root DIR]`` | ``--bin FILE`` (default: the bundled demo
  split), ``--lowres S``, ``--batch-size N``, ``--no-flip``;
- the output options ``--out DIR``, ``--json``, ``--seed N``.

Each ``add_*`` declares options on a parser; the function of the same concept without
``add_`` turns the parsed values into what a runner takes (checked, one-line errors).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .demo import DEFAULT_CHECKPOINT, DEFAULT_PAIR, DEMO_IMAGES
from .errors import MoescopeError

__all__ = [
    "CHECKPOINT_HELP",
    "add_checkpoint",
    "add_checkpoint_pair",
    "add_top_k",
    "add_image_source",
    "add_evaluation_data",
    "add_output",
    "checkpoint_pair",
    "load_models",
    "image_source",
    "check_evaluation_data",
    "evaluation_data",
    "probe_transform",
    "positive",
    "split_names",
]

CHECKPOINT_HELP = "checkpoint (.pt, official or moescope) or demo:before/demo:after"


# --- checkpoints -----------------------------------------------------------------------------


def add_checkpoint(parser: argparse.ArgumentParser) -> None:
    """The optional ``checkpoint`` positional, default :data:`~moescope.demo.DEFAULT_CHECKPOINT`."""
    parser.add_argument("checkpoint", nargs="?", default=DEFAULT_CHECKPOINT, metavar="CKPT",
                        help=f"{CHECKPOINT_HELP}; default {DEFAULT_CHECKPOINT}")


def add_checkpoint_pair(parser: argparse.ArgumentParser) -> None:
    """``BEFORE AFTER`` positionals (both or neither; default :data:`~moescope.demo.DEFAULT_PAIR`)."""
    parser.add_argument("before", nargs="?", metavar="BEFORE", help=f"reference {CHECKPOINT_HELP}; default {DEFAULT_PAIR[0]}")
    parser.add_argument("after", nargs="?", metavar="AFTER", help=f"checkpoint compared with BEFORE, e.g. fine-tuned; default {DEFAULT_PAIR[1]}")


def checkpoint_pair(args: argparse.Namespace) -> list[str]:
    """The two checkpoint specs of :func:`add_checkpoint_pair`."""
    if (args.before is None) != (args.after is None):
        raise MoescopeError(f"give two checkpoints, BEFORE and AFTER (or none for {' '.join(DEFAULT_PAIR)})")
    return [args.before, args.after] if args.before is not None else list(DEFAULT_PAIR)


def add_top_k(parser: argparse.ArgumentParser) -> None:
    """``--top-k``: experts per token for official checkpoints, which do not store it."""
    parser.add_argument("--top-k", type=int, help="experts per token for official checkpoints (not stored in them; default 2)")


def load_models(specs: list[str], args: argparse.Namespace) -> list:
    """Load each checkpoint spec (path or ``demo:NAME``) with the ``--top-k`` given."""
    from .demo import load_model

    return [load_model(spec, top_k=args.top_k) for spec in specs]


# --- images --------------------------------------------------------------------------------


def add_image_source(parser: argparse.ArgumentParser, what: str = "images") -> None:
    """``--data DIR``: a folder of images (recursive) or one image file; default the demo images."""
    parser.add_argument("--data", metavar="DIR", help=f"folder of {what} (recursive; identity sub-folders allowed) or one image file; "
                        "default: bundled demo images")


def image_source(args: argparse.Namespace) -> tuple[list[Path], str]:
    """The image files of ``--data`` (or the bundled demo images) and how they were given."""
    from facemoe_model.data.images import list_images

    from .demo import demo_images_dir

    return list_images(args.data if args.data else demo_images_dir()), str(args.data or DEMO_IMAGES)


# --- evaluation data ---------------------------------------------------------------------------


def add_evaluation_data(parser: argparse.ArgumentParser, *, aliases: bool = False) -> None:
    """The evaluation data and how it is embedded. ``aliases`` keeps ``ablate``'s older spellings
    ``--data DIR`` (= ``--split``) and ``--protocol FILE`` (= ``--pairs``) working, unlisted."""
    group = parser.add_argument_group("evaluation data (default: the bundled demo split)")
    source = group.add_mutually_exclusive_group()
    source.add_argument("--split", metavar="DIR", help="gallery/, probe/ (optional distractors/) folders; a pairs.txt there adds verification")
    source.add_argument("--pairs", metavar="FILE", help="verification pairs: LFW pairs.txt or 'path1 path2 label' lines")
    source.add_argument("--bin", metavar="FILE", help="insightface verification .bin (lfw.bin, agedb_30.bin ...)")
    if aliases:
        source.add_argument("--data", dest="split", metavar="DIR", help=argparse.SUPPRESS)
        source.add_argument("--protocol", dest="pairs", metavar="FILE", help=argparse.SUPPRESS)
    group.add_argument("--root", metavar="DIR", help="image root of --pairs (default: the pairs file's folder)")
    group.add_argument("--lowres", type=int, metavar="S",
                       help="down-sample probes (second image of each pair) to S x S px and back; the gallery stays as is")
    group.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per forward pass (default 64)")
    group.add_argument("--no-flip", action="store_true", help="embed images alone instead of fusing them with their mirror image")


def check_evaluation_data(args: argparse.Namespace) -> None:
    """One-line errors for inconsistent evaluation options (before anything is loaded)."""
    positive(args.batch_size, "--batch-size")
    if args.root and not args.pairs:
        raise MoescopeError("--root applies to --pairs only")


def evaluation_data(args: argparse.Namespace, size: int):
    """The :class:`~facemoe_model.protocols.EvaluationData` of the options (default: the demo split)."""
    from facemoe_model.protocols import load_protocols

    from .demo import demo_split_dir

    check_evaluation_data(args)
    split = args.split if (args.split or args.pairs or args.bin) else demo_split_dir()
    return load_protocols(split=split, pairs=args.pairs, root=args.root, bin_file=args.bin, size=size)


def probe_transform(args: argparse.Namespace):
    """The probe degradation of ``--lowres S`` (None without it)."""
    from facemoe_model.protocols import lowres_probes

    return lowres_probes(args.lowres) if args.lowres is not None else None


# --- output ---------------------------------------------------------------------------------


def add_output(parser: argparse.ArgumentParser, seed: bool = True) -> None:
    """``--out``, ``--json`` and (``seed``) ``--seed``."""
    parser.add_argument("--out", metavar="DIR", help="write tables (CSV, Markdown, LaTeX), result.json and figures to DIR")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout (text goes to stderr)")
    if seed:
        parser.add_argument("--seed", type=int, default=0, help="random seed (bootstrap, random routing ...); default 0")


# --- small helpers ----------------------------------------------------------------------------


def positive(value: int, option: str) -> int:
    """``value`` if it is >= 1, else a one-line error naming ``option``."""
    if value < 1:
        raise MoescopeError(f"{option} must be >= 1, got {value}")
    return value


def split_names(values: list[str] | None) -> list[str] | None:
    """Names from repeatable, comma-separated options (``--layers a,b --layers c``); None if none."""
    names = [n.strip() for v in values or () for n in v.split(",") if n.strip()]
    return names or None
