"""The command-line options commands share, declared once, and their resolution.

- the checkpoint positional (a path, ``demo:before`` / ``demo:after``; default
  :data:`~moescope.demo.DEFAULT_CHECKPOINT`) or a BEFORE/AFTER pair, and ``--top-k``;
- the image source ``--data DIR`` (default: the bundled demo images);
- the evaluation data of ``eval``, ``ablate`` (and the coming ``attack`` / ``degrade``):
  ``--split DIR`` | ``--pairs FILE [--root DIR]`` | ``--bin FILE`` | ``--data DIR`` (identity
  folders, split and paired with ``--seed``; ``--align``) (default: the bundled demo split),
  ``--lowres S``, ``--batch-size N``, ``--no-flip``;
- the output options ``--out DIR``, ``--json``, ``--seed N``.

Each ``add_*`` declares options on a parser; the function of the same concept without
``add_`` turns the parsed values into what a runner takes (checked, one-line errors).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .choices import EVAL_BATCH_SIZE
from .demo import DEFAULT_CHECKPOINT, DEFAULT_PAIR, DEMO_IMAGES
from .errors import MoescopeError

__all__ = [
    "CHECKPOINT_HELP",
    "add_checkpoint",
    "add_checkpoint_pair",
    "add_top_k",
    "add_image_source",
    "add_alignment_options",
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
    "check_options",
    "INT_MINIMUMS",
    "OUTPUT_FILES",
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
    if "--device" not in parser._option_string_actions:  # the model-loading options (bench has its own --device)
        parser.add_argument("--device", default="auto", metavar="DEV",
                            help="auto (default: CUDA when present; under torchrun GPU LOCAL_RANK), cpu, cuda or cuda:N")


def load_models(specs: list[str], args: argparse.Namespace) -> list:
    """Load each checkpoint spec (path or ``demo:NAME``) with the ``--top-k`` given."""
    from .demo import load_model

    if args.top_k is not None:
        positive(args.top_k, "--top-k")
    from .distributed import analysis_device

    device = analysis_device(getattr(args, "device", None))  # under torchrun this joins the process group
    models = [load_model(spec, top_k=args.top_k).to(device) for spec in specs]
    ks = [getattr(getattr(m, "moe_config", None), "top_k", None) for m in models]
    args.loaded_top_k = ks[0] if len(set(ks)) == 1 else ks  # recorded in the result's settings by cli.emit
    return models


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


def add_alignment_options(parser: argparse.ArgumentParser) -> None:
    """``--align auto|always|none`` (default auto) and ``--save-aligned DIR``: the face alignment
    of the shared image path (:mod:`moescope.faces`, :mod:`moescope.align`)."""
    parser.add_argument("--align", choices=("auto", "always", "none"), default="auto",
                        help="five-point face alignment to the ArcFace 112x112 template, then resize to the model input: "
                        "auto (default) aligns unless the image already is an aligned crop (the bundled demo faces are), "
                        "always aligns every face, none feeds the whole image as is")
    parser.add_argument("--save-aligned", metavar="DIR",
                        help="also write what the model sees for every analysed image (the aligned crop at the model input size) to DIR as PNG")


# --- evaluation data ---------------------------------------------------------------------------


def add_evaluation_data(parser: argparse.ArgumentParser, *, aliases: bool = False, batch_size: int = EVAL_BATCH_SIZE) -> None:
    """The evaluation data and how it is embedded. ``aliases`` keeps ``ablate``'s older spelling
    ``--protocol FILE`` (= ``--pairs``) working, unlisted; its older ``--data SPLIT`` still works
    (a ``--data`` folder holding ``gallery/`` is read as ``--split``). ``batch_size``: the
    ``--batch-size`` default (images per batch; with the mirror images, twice that per pass)."""
    group = parser.add_argument_group("evaluation data (default: the bundled demo split)")
    source = group.add_mutually_exclusive_group()
    source.add_argument("--split", metavar="DIR", help="gallery/, probe/ (optional distractors/) folders; a pairs.txt there adds verification")
    source.add_argument("--pairs", metavar="FILE", help="verification pairs: LFW pairs.txt or 'path1 path2 label' lines")
    source.add_argument("--bin", metavar="FILE", help="insightface verification .bin (lfw.bin, agedb_30.bin ...)")
    if "--data" not in parser._option_string_actions:  # a command whose --data is its image source (maps) keeps it
        source.add_argument("--data", dest="eval_data", metavar="DIR",
                        help="identity folders DIR/<identity>/<image>: a seeded gallery/probe split (one gallery image per identity, "
                        "single-image identities as gallery distractors) and balanced verification pairs (--seed); "
                        "a folder holding gallery/ is read as --split")
    if aliases:
        source.add_argument("--protocol", dest="pairs", metavar="FILE", help=argparse.SUPPRESS)
    if "--align" not in parser._option_string_actions:  # a command with the image path's --align keeps it
        group.add_argument("--align", dest="eval_align", choices=("auto", "always", "none"),
                       help="face alignment of the evaluation images: auto aligns unless an image already is an aligned crop, "
                       "always aligns every face, none uses images as given; images without an accepted face are left out "
                       "and counted (with their pairs). Default: auto for --data, none for --split/--pairs/--bin and the demo "
                       "split (benchmark protocols come aligned; leaving images out would change them)")
    group.add_argument("--root", metavar="DIR", help="image root of --pairs (default: the pairs file's folder)")
    group.add_argument("--lowres", type=int, metavar="S",
                       help="down-sample probes (second image of each pair) to S x S px and back; the gallery stays as is")
    group.add_argument("--batch-size", type=int, default=batch_size, metavar="N",
                       help=f"images per batch (default {batch_size}); evaluation passes hold each with its mirror image unless --no-flip")
    group.add_argument("--no-flip", action="store_true", help="embed images alone instead of fusing them with their mirror image")


def check_evaluation_data(args: argparse.Namespace) -> None:
    """One-line errors for inconsistent evaluation options (before anything is loaded)."""
    positive(args.batch_size, "--batch-size")
    if args.root and not args.pairs:
        raise MoescopeError("--root applies to --pairs only")


def _is_split(folder: str) -> bool:
    return (Path(folder) / "gallery").is_dir()


def evaluation_data(args: argparse.Namespace, size: int):
    """The :class:`~facemoe_model.protocols.EvaluationData` of the options (default: the demo split)."""
    from facemoe_model.protocols import load_protocols

    from .demo import demo_split_dir

    check_evaluation_data(args)
    data = getattr(args, "eval_data", None)
    if data and not _is_split(data):
        from .runners.evaluation import identity_evaluation_data

        return identity_evaluation_data(data, size, align=getattr(args, "eval_align", None) or "auto", seed=getattr(args, "seed", 0),
                                        progress=not getattr(args, "json", False))
    if data:  # a gallery/probe folder (ablate's older spelling of --split)
        args.split = data
    split = args.split if (args.split or args.pairs or args.bin) else demo_split_dir()
    loaded = load_protocols(split=split, pairs=args.pairs, root=args.root, bin_file=args.bin, size=size)
    if getattr(args, "eval_align", None) in ("auto", "always"):
        from .runners.evaluation import align_evaluation_data

        return align_evaluation_data(loaded, size, align=args.eval_align, progress=not getattr(args, "json", False))
    return loaded


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


def split_names(values: list[str] | None, option: str = "--layers") -> list[str] | None:
    """Names from repeatable, comma-separated options (``--layers a,b --layers c``); None if the
    option is not given; a one-line error if it is given but names nothing (``--layers ,``)."""
    names = [n.strip() for v in values or () for n in v.split(",") if n.strip()]
    if values and not names:
        raise MoescopeError(f"{option} {','.join(values)!r} names nothing; give names separated by commas")
    return names or None


# --- checks of every command line, before any work (moescope.cli.main calls check_options) --------

INT_MINIMUMS: dict[str, tuple[str, int]] = {
    "top_k": ("--top-k", 1),
    "batch_size": ("--batch-size", 1),
    "bootstrap": ("--bootstrap", 0),
    "workers": ("--workers", 0),
    "seed": ("--seed", 0),
    "lowres": ("--lowres", 1),
    "val_lowres": ("--val-lowres", 1),
    "epochs": ("--epochs", 1),
    "val_every": ("--val-every", 1),
    "null": ("--null", 0),
    "null_images": ("--null-images", 1),
    "synthetic_seed": ("--synthetic-seed", 0),
}
"""Integer options by ``dest``: (option, smallest allowed value). Add a line for a new option."""

OUTPUT_FILES: dict[str, str] = {"export_tokens": "--export-tokens"}
"""Options naming an output file, by ``dest`` (checked for writability before any work)."""

INPUT_FILES: dict[str, str] = {"checkpoint": "CKPT", "before": "BEFORE", "after": "AFTER", "compare": "--compare",
                               "pairs": "--pairs", "bin": "--bin", "init": "--init"}
"""Options naming an input file, by ``dest``: a pipe, socket or device there is refused (reading would block)."""

NAME_LISTS: dict[str, str] = {"layers": "--layers"}
"""Repeatable comma-separated name options, by ``dest`` (a given option must name something)."""


def check_options(args: argparse.Namespace) -> None:
    """One-line errors for option values no command can use, before any model is loaded:
    integers below their minimum (:data:`INT_MINIMUMS`), name lists naming nothing, an
    ``--out`` folder or output file (:data:`OUTPUT_FILES`) that cannot be written."""
    from .results import check_out_dir, check_out_file

    for dest, (option, minimum) in INT_MINIMUMS.items():
        value = getattr(args, dest, None)
        if isinstance(value, int) and not isinstance(value, bool) and value < minimum:
            raise MoescopeError(f"{option} must be >= {minimum}, got {value}")
    for dest, option in INPUT_FILES.items():
        value = getattr(args, dest, None)
        if isinstance(value, str) and _special_file(value):
            raise MoescopeError(f"{option} {value} is not a regular file (a pipe, socket or device)")
    for dest, option in NAME_LISTS.items():
        value = getattr(args, dest, None)
        if isinstance(value, list):
            split_names(value, option)
    out = getattr(args, "out", None)
    if out:
        check_out_dir(out, replace=getattr(args, "out_replace", True))
    for dest, option in OUTPUT_FILES.items():
        value = getattr(args, dest, None)
        if value:
            check_out_file(value, option)
            if out and getattr(args, "out_replace", True) and _inside(Path(value), Path(out)):
                raise MoescopeError(f"{option} {value} is inside --out {out}, which is replaced as a whole; write it elsewhere")


def _inside(path: Path, folder: Path) -> bool:
    import os

    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return folder in path.parents


def _special_file(path: str) -> bool:
    """True for an existing path that is neither a regular file nor a folder (FIFO, socket, device)."""
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))
