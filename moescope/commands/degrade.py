"""``moescope degrade``: blurred, compressed, noisy, low-resolution or occluded probes vs recognition
and routing stability (paper B.10, B.3)."""
from __future__ import annotations

import argparse

from ..cli import emit
from ..demo import DEFAULT_CHECKPOINT
from ..errors import MoescopeError
from ..options import add_checkpoint, add_evaluation_data, add_output, add_top_k, evaluation_data, load_models, split_names
from .attack import _check_common, render

DEFAULTS = {
    "blur": "1,2,3,5",
    "jpeg": "90,50,30,10",
    "noise": "5,10,20",
    "resolution": "8,12,16,32,48,64,96",
    "occlude": "eyes,nose,mouth",
}
"""The paper-shaped grid run when no degradation is named (B.10 blur/JPEG, B.3 resolution)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "degrade",
        help="blur / JPEG / noise / resolution / region occlusion of the probes vs accuracy and routing change (paper B.10, B.3)",
        description="Degrade the probe images (gallery fixed) and report one row per setting, clean first: Rank-1/5/20 and "
        "verification accuracy, expert usage %, routing change (1 - IoU of each token's top-k expert set, share of tokens "
        "whose top-1 expert changed) per layer and facial region. Each option takes a comma-separated grid. With no "
        "degradation named: " + "; ".join(f"--{k} {v}" for k, v in DEFAULTS.items())
        + f". With no CKPT and no data: {DEFAULT_CHECKPOINT} on the bundled demo split.",
    )
    add_checkpoint(p)
    p.add_argument("--blur", metavar="SIGMAS", help="Gaussian blur sigmas in px (0 = none), e.g. 1,2,5")
    p.add_argument("--jpeg", metavar="QUALITIES", help="JPEG qualities 1..100, e.g. 90,50,10")
    p.add_argument("--noise", metavar="SIGMAS", help="Gaussian noise std in grey levels (0..255), e.g. 5,10,20")
    p.add_argument("--resolution", metavar="SIZES", help="area-down to S x S px and bicubic back up, e.g. 8,12,16,32,48,64,96")
    p.add_argument("--occlude", metavar="REGIONS", help="facial regions set to grey from the landmarks, e.g. eyes,nose,mouth")
    p.add_argument("--max-probes", type=int, metavar="N", help="degrade at most N probes, round-robin over identities (default all)")
    p.add_argument("--layers", action="append", metavar="NAMES", help="MoE layers to observe, by name or prefix, comma-separated; default all")
    add_evaluation_data(p, aliases=True)
    add_top_k(p)
    add_output(p)
    p.set_defaults(run=run)


def _numbers(text: str | None, option: str, cast) -> list:
    values = []
    for item in (t.strip() for t in (text or "").split(",") if t.strip()):
        try:
            values.append(cast(item))
        except ValueError:
            raise MoescopeError(f"--{option}: cannot read {item!r}; give comma-separated numbers") from None
    return values


def run(args: argparse.Namespace) -> int:
    from ..occlusion import check_regions
    from ..runners.stability import degradation_grid, degradation_stability

    _check_common(args)
    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None}
    grid = given or DEFAULTS
    degradations = degradation_grid(
        blur=_numbers(grid.get("blur"), "blur", float),
        jpeg=_numbers(grid.get("jpeg"), "jpeg", int),
        noise=_numbers(grid.get("noise"), "noise", float),
        resolution=_numbers(grid.get("resolution"), "resolution", int),
        occlude=check_regions([r.strip() for r in (grid.get("occlude") or "").split(",") if r.strip()]),
    )
    if not degradations:
        raise MoescopeError("name at least one degradation value (--blur, --jpeg, --noise, --resolution, --occlude)")
    (model,) = load_models([args.checkpoint], args)
    data = evaluation_data(args, model.img_size)
    result = degradation_stability(
        model, data, degradations, layers=split_names(args.layers), batch_size=args.batch_size, flip=not args.no_flip,
        max_probes=args.max_probes, seed=args.seed, progress=not args.json, checkpoint=args.checkpoint,
        settings_extra={"format": getattr(model, "checkpoint_format", "")},
    )
    emit(result, args, render)
    return 0
