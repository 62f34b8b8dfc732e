"""``moescope train``: train or fine-tune a FaceMoE model (face margin loss + lambda x MoE auxiliary loss).

Data is an identity folder (``--data DIR``: one sub-folder per identity) or synthetic faces
(``--synthetic IDS:SAMPLES``, rendered once into ``$MOESCOPE_CACHE/synthetic``). The run
folder ``--out DIR`` receives ``last.pt`` (resume point, every epoch), ``log.csv`` (one row
per epoch) and ``model.pt`` (the final model; its metadata records this command line).
Several processes, one per GPU or CPU share: ``torchrun --nproc_per_node N -m moescope train ...``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
from pathlib import Path

from ..cache import cache_dir
from ..cli import emit
from ..errors import MoescopeError
from ..options import add_output


def register(sub: argparse._SubParsersAction) -> None:
    from facemoe_model.train_config import TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train", help="train or fine-tune a FaceMoE model",
        description="Train FaceMoE: margin loss on the embeddings + lambda x the MoE auxiliary loss, AdamW with "
        "warm-up and polynomial decay. --out DIR is the run folder (last.pt, log.csv, model.pt).",
    )
    data = p.add_argument_group("data")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="DIR", help="training images, one sub-folder per identity")
    source.add_argument("--synthetic", metavar="IDS:SAMPLES", help="synthetic faces: IDS identities x SAMPLES images each (cached)")
    data.add_argument("--synthetic-config", metavar="K=V,...|FILE", help="SyntheticConfig knobs, e.g. 'shape_spread=0.4,yaw_deg=45,exposure=0.6:1.4', or a JSON file")
    data.add_argument("--synthetic-seed", type=int, default=0, metavar="N", help="seed of the synthetic identities (default 0)")
    data.add_argument("--lowres", nargs="?", const="12:64", metavar="MIN:MAX",
                      help="degrade every training image to a random MIN..MAX px resolution (default 12:64)")
    data.add_argument("--no-hflip", action="store_true", help="do not mirror training images at random")
    data.add_argument("--workers", type=int, metavar="N", help="data-loading processes (default 4 with CUDA, else 0)")

    model = p.add_argument_group("model")
    model.add_argument("--model", help=f"architecture to train from scratch (default {d.model}; see 'moescope models')")
    model.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="architecture override, e.g. embedding_dim=128 (repeatable)")
    model.add_argument("--init", metavar="CKPT", help="start from this checkpoint (its architecture, a fresh margin head): fine-tuning")
    model.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt (a fresh start if there is none)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--head", choices=("cosface", "arcface", "adaface"), default=d.head, help=f"margin loss (default {d.head}; cosface: s=64 m=0.4)")
    opt.add_argument("--scale", type=float, metavar="S", help="margin-head scale s (default: the head's, 64)")
    opt.add_argument("--margin", type=float, metavar="M", help="margin-head margin m (default: the head's, cosface 0.4, arcface 0.5, adaface 0.4)")
    opt.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the data (default {d.epochs})")
    opt.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per step and process (default {d.batch_size})")
    opt.add_argument("--lr", type=float, default=d.lr, help=f"AdamW peak learning rate (default {d.lr:g})")
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW weight decay (default {d.weight_decay:g})")
    opt.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help=f"linear warm-up length (default {d.warmup_epochs:g})")
    opt.add_argument("--poly-power", type=float, default=d.poly_power, help=f"power of the polynomial decay (default {d.poly_power:g})")
    opt.add_argument("--aux-weight", type=float, default=d.aux_weight, help=f"lambda of the MoE auxiliary loss (default {d.aux_weight:g}, official)")
    opt.add_argument("--clip-grad", type=float, default=d.clip_grad, help=f"gradient-norm clipping, 0 = off (default {d.clip_grad:g})")
    opt.add_argument("--device", choices=("cpu", "cuda"), help="training device (default cuda when available; mixed precision there)")

    val = p.add_argument_group("validation and output")
    val.add_argument("--val", metavar="DIR", help="held-out evaluation folder (gallery/, probe/, optional pairs.txt) validated during training")
    val.add_argument("--val-lowres", type=int, metavar="S", help="also validate with probes down-sampled to S x S px")
    val.add_argument("--val-every", type=int, default=1, metavar="N", help="validate every N epochs (always after the last; default 1)")
    val.add_argument("--half", action="store_true", help="store model.pt in float16 (final figures measured on those weights)")
    add_output(p)
    p.set_defaults(run=run, out_replace=False)  # --out is the run folder: files are added to it, never replaced as a whole


def _range(text: str, option: str) -> tuple[int, int]:
    try:
        low, high = (int(v) for v in text.split(":"))
    except ValueError:
        raise MoescopeError(f"{option} expects MIN:MAX in pixels, got {text!r}") from None
    if not 1 <= low <= high:
        raise MoescopeError(f"{option} expects 1 <= MIN <= MAX, got {text!r}")
    return low, high


def _value(text: str):
    """A command-line value as JSON when it parses (numbers, booleans, lists), else as a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _model_args(items: list[str]) -> dict:
    args = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MoescopeError(f"--model-arg expects KEY=VALUE, got {item!r}")
        args[key] = _value(value)
    return args


def synthetic_config(spec: str | None):
    """A ``SyntheticConfig`` from ``k=v,k=lo:hi,...`` or a JSON file (None: the defaults)."""
    from facemoe_model.data.synthetic import SyntheticConfig

    if not spec:
        return SyntheticConfig()
    if "=" not in spec:
        try:
            values = json.loads(Path(spec).read_text())
        except (OSError, ValueError) as exc:
            raise MoescopeError(f"--synthetic-config {spec}: not KEY=VALUE items nor a readable JSON file ({exc})") from None
        if not isinstance(values, dict):
            raise MoescopeError(f"--synthetic-config {spec}: expected a JSON object of SyntheticConfig fields")
    else:
        values = {}
        for item in spec.split(","):
            key, sep, value = item.strip().partition("=")
            if not sep:
                raise MoescopeError(f"--synthetic-config expects KEY=VALUE items or a JSON file, got {item!r}")
            try:
                values[key] = tuple(float(v) for v in value.split(":")) if ":" in value else float(value)
            except ValueError:
                raise MoescopeError(f"--synthetic-config {key}: expected a number or LOW:HIGH, got {value!r}") from None
    return SyntheticConfig.from_dict(values)


def _synthetic_images(spec: str, config, seed: int, context):
    """Render (once, cached) the synthetic training identities; returns (folder, description)."""
    from dataclasses import asdict

    from facemoe_model.data.synthetic import generate_dataset

    try:
        identities, samples = (int(v) for v in spec.split(":"))
    except ValueError:
        raise MoescopeError(f"--synthetic expects IDS:SAMPLES (e.g. 500:20), got {spec!r}") from None
    description = {"kind": "synthetic", "identities": identities, "samples_per_identity": samples, "seed": seed,
                   "identity_offset": 0, "config": asdict(config)}
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir("synthetic", f"{identities}x{samples}-seed{seed}-{digest}")
    if context.is_main:
        generate_dataset(folder, identities, samples, seed=seed, config=config)
    context.barrier()
    return folder, {**description, "path": str(folder)}


def _command_line(args: argparse.Namespace) -> str:
    return shlex.join(["moescope", *(getattr(args, "argv", None) or sys.argv[1:])])


def render(result) -> str:
    log = result.tables["log"]
    columns = [c for c in log.columns if not c.startswith("load_")]
    s = result.summary
    lines = [log[columns].to_string(index=False, float_format=lambda v: f"{v:.4f}"), ""]
    lines.append(f"model:     {s['checkpoint']}")
    lines.append(f"trained:   {s['epochs']} epochs, {s['steps']} steps, {s['training_seconds']:.0f}s on {s['world_size']} x {s['device']}")
    for setting, protocols in s.get("validation", {}).items():
        figures = []
        if "identification" in protocols:
            figures.append(f"Rank-1 {protocols['identification']['Rank-1']:.4f}")
        if "verification" in protocols:
            figures.append(f"verification {protocols['verification']['accuracy']:.4f}")
        lines.append(f"val {setting}:".ljust(11) + ", ".join(figures))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from facemoe_model.data.datasets import ImageFolder
    from facemoe_model.distributed import init_distributed
    from facemoe_model.train import TrainConfig, train

    import numpy as np

    from ..runners.train import training_result

    if not args.out:
        raise MoescopeError("train needs --out DIR, the run folder")
    if not (args.data or args.synthetic):
        raise MoescopeError("give training data: --data DIR (one sub-folder per identity) or --synthetic IDS:SAMPLES")
    if args.init and (args.model or args.model_arg):
        raise MoescopeError("--init takes the checkpoint's architecture; drop --model/--model-arg")
    if args.init and not Path(args.init).is_file():
        raise MoescopeError(f"--init checkpoint not found: {args.init}")
    for option, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--val-every", args.val_every)):
        if value < 1:
            raise MoescopeError(f"{option} must be >= 1, got {value}")
    if args.val and not Path(args.val).is_dir():
        raise MoescopeError(f"--val folder not found: {args.val}")
    if args.val_lowres is not None and not args.val:
        raise MoescopeError("--val-lowres needs --val DIR")
    config = TrainConfig(
        model=args.model or TrainConfig.model, model_args=_model_args(args.model_arg), head=args.head, head_scale=args.scale,
        head_margin=args.margin, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
        poly_power=args.poly_power, aux_weight=args.aux_weight, clip_grad=args.clip_grad,
        lowres=_range(args.lowres, "--lowres") if args.lowres else None, hflip=not args.no_hflip, seed=args.seed,
    )
    try:
        context = init_distributed(args.device)
    except RuntimeError as exc:
        raise MoescopeError(str(exc)) from None
    try:
        if args.synthetic:
            folder, description = _synthetic_images(args.synthetic, synthetic_config(args.synthetic_config), args.synthetic_seed, context)
        else:
            folder, description = Path(args.data), {"kind": "folder", "path": str(args.data)}
        images = ImageFolder(folder, transform=np.asarray)
        description.update(identities=len(images.classes), images=len(images))
        workers = args.workers if args.workers is not None else (4 if context.device.type == "cuda" else 0)
        outcome = train(
            config, images, args.out, init=args.init, resume=args.resume, validation=args.val, val_lowres=args.val_lowres,
            val_every=args.val_every, half=args.half, workers=workers, context=context,
            metadata={"command": _command_line(args), "data": description},
        )
    finally:
        context.shutdown()
    if not context.is_main:
        return 0
    result = training_result(outcome, data=description, init=args.init, val=args.val, val_lowres=args.val_lowres,
                             half=args.half, seed=args.seed)
    emit(result, args, render)
    return 0
