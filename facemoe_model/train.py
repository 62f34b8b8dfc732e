"""Training FaceMoE: a margin loss on the embeddings plus the MoE auxiliary loss.

The authors' recipe (test-vectors README, point 6): CosFace (s=64, m=0.4; ArcFace or AdaFace
on request) + ``aux_weight`` x the auxiliary loss summed over MoE layers (lambda = 10), AdamW
with linear warm-up then polynomial decay, gradient clipping at 5, mixed precision (fp16
autocast + GradScaler) when training on CUDA. ``init`` starts from a checkpoint: high-resolution
pre-training followed by low-resolution fine-tuning (``TrainConfig.lowres`` degrades every
training image with ``RandomLowResolution``).

A run folder holds

* ``last.pt`` — the full training state after the last finished epoch (model, margin head,
  optimizer, scheduler, grad scaler, step, log): what ``resume`` continues from;
* ``log.csv`` — one row per epoch: learning rate, face / auxiliary loss, the share of routed
  token slots per expert of every MoE layer (observed through each layer's ``hook_routing``)
  and the validation figures; rewritten atomically after every epoch;
* ``model.pt`` — the final model; its metadata records the command line, seed, data, training
  time and final validation figures. It also keeps the margin head with the identity names it
  classifies (``margin_head``), so that fine-tuning on the same identities (``init``) continues
  with the trained classifier instead of a random one.

Data parallel: under ``torchrun`` every process trains on its ``DistributedSampler`` shard
inside ``DistributedDataParallel`` (``find_unused_parameters=True``, since an expert may get
no token in a step); only rank 0 writes files.

Determinism: every random choice is a function of the seed, the epoch and the rank or image
index — the sampler order, per-image augmentations and the torch generator (dropout), which is
reseeded at every epoch — so resuming from ``last.pt`` reproduces an uninterrupted run exactly
(same machine, one process).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

if TYPE_CHECKING:
    import pandas as pd

from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .data.datasets import LabelledImages, preprocess
from .data.transforms import RandomLowResolution
from .distributed import DistributedContext, all_reduce_sum, broadcast_buffers, state_digest
from .errors import InputError
from .fileio import atomic_write
from .hooks import ExpertUsage
from .margin_heads import margin_head
from .models import create_model
from .moe import moe_layers, total_aux_loss
from .train_config import TrainConfig
from .protocols import EmbeddingCache, EvaluationData, evaluate, load_protocols, lowres_probes

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainImages",
    "WarmupPolyDecay",
    "train",
    "LAST_CHECKPOINT",
    "FINAL_CHECKPOINT",
    "LOG_FILE",
]

LAST_CHECKPOINT = "last.pt"
FINAL_CHECKPOINT = "model.pt"
LOG_FILE = "log.csv"
HEAD_KEY = "margin_head"
"""Top-level entry of ``model.pt`` holding the margin head: ``{"head", "classes", "state_dict"}``."""


@dataclass
class TrainResult:
    """What a finished run produced (rank 0; other ranks get the log and digests only).

    ``rows`` is the training log, one dict per epoch (what ``log.csv`` holds).
    """

    run_dir: Path
    checkpoint: Path
    rows: list[dict[str, Any]]
    metadata: dict[str, Any]

    @property
    def log(self) -> "pd.DataFrame":
        """The training log as a pandas DataFrame (pandas is imported only here)."""
        import pandas as pd

        return pd.DataFrame(self.rows)


class TrainImages(Dataset):
    """Training ``(image_tensor, label)`` pairs with per-image random augmentation.

    ``images`` must yield decoded RGB ``uint8`` arrays (build it with ``transform=np.asarray``).
    The augmentation of image ``i`` in epoch ``e`` draws from ``default_rng((seed, e, i))``,
    so it does not depend on worker processes or on where a run was resumed.
    """

    def __init__(self, images: LabelledImages, seed: int, size: int, lowres: tuple[int, int] | None, hflip: bool) -> None:
        self.images = images
        self.seed, self.size, self.lowres, self.hflip = seed, size, lowres, hflip
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.images[index]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        if self.hflip and rng.random() < 0.5:
            image = np.ascontiguousarray(image[:, ::-1])
        if self.lowres is not None:
            image = RandomLowResolution(self.lowres, rng=rng)(image)
        return preprocess(image, self.size), label


class WarmupPolyDecay:
    """Learning-rate factor: linear warm-up over ``warmup_steps``, then ``(1 - progress) ** power``."""

    def __init__(self, warmup_steps: int, total_steps: int, power: float) -> None:
        self.warmup_steps, self.total_steps, self.power = warmup_steps, total_steps, power

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return max(0.0, 1.0 - progress) ** self.power


def _load_shares(usage: ExpertUsage, context: DistributedContext) -> dict[str, float]:
    """``{"load_<layer>_e<k>": share}`` of routed token slots summed over processes; each layer's shares sum to 1."""
    row = {}
    for name, counts in usage.count_tensors.items():
        total = all_reduce_sum(counts.to(context.device).clone(), context).double()
        shares = (total / total.sum().clamp_min(1)).tolist()
        row.update({f"load_{name}_e{expert}": share for expert, share in enumerate(shares)})
    return row


def _log_csv(rows: list[Mapping[str, Any]]) -> str:
    """The training log as CSV: columns in order of first appearance, empty cells for missing or NaN values."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if (v := row.get(c)) is None or (isinstance(v, float) and math.isnan(v)) else v for c in columns])
    return buffer.getvalue()


class _Objective(nn.Module):
    """Backbone + margin head; returns (face loss, auxiliary loss) so DDP sees every used parameter."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.backbone(images)
        face = F.cross_entropy(self.head(embeddings, labels), labels)
        return face, total_aux_loss(self.backbone)


def _embedding_dim(model: nn.Module) -> int:
    return model.feature_layer[-1].num_features


def _validate(model: nn.Module, data: EvaluationData, lowres: int | None, batch_size: int) -> dict[str, dict]:
    """Validation figures: ``{"hr": {...}}`` plus ``{"lr<S>": {...}}`` with low-resolution probes."""
    cache = EmbeddingCache(model, batch_size=batch_size)
    figures = {"hr": evaluate(model, data, cache=cache)}
    if lowres:
        figures[f"lr{lowres}"] = evaluate(model, data, probe_transform=lowres_probes(lowres), cache=cache)
    return figures


def _validation_columns(figures: dict[str, dict]) -> dict[str, float]:
    columns = {}
    for setting, protocols in figures.items():
        if "identification" in protocols:
            columns[f"val_{setting}_rank1"] = protocols["identification"]["Rank-1"]
        if "verification" in protocols:
            columns[f"val_{setting}_accuracy"] = protocols["verification"]["accuracy"]
    return columns


def _round_to_half(model: nn.Module) -> None:
    """Round floating weights through float16 in place: the model then computes what its half checkpoint loads as."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half())


class _Optimisation:
    """AdamW + warm-up/polynomial schedule + gradient clipping + (CUDA) loss scaling, stepped together."""

    def __init__(self, module: nn.Module, config: TrainConfig, steps_per_epoch: int, amp: bool) -> None:
        decay = [p for p in module.parameters() if p.ndim >= 2]  # no weight decay on biases and norms
        no_decay = [p for p in module.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=config.lr
        )
        schedule = WarmupPolyDecay(round(config.warmup_epochs * steps_per_epoch), config.epochs * steps_per_epoch, config.poly_power)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp)
        self.module, self.clip_grad = module, config.clip_grad

    def step(self, loss: torch.Tensor) -> float:
        """Backward pass and one optimiser step; returns the learning rate it used."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.module.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def _initial_model(config: TrainConfig, init: str | Path | None) -> tuple[nn.Module, TrainConfig]:
    """The model to start from and the config describing it (``init`` fixes the architecture)."""
    torch.manual_seed(config.seed)
    if init is not None:
        model = load_checkpoint(init)
        architecture = dict(model.model_config)
        return model.train(), dataclasses.replace(config, model=architecture.pop("name"), model_args=architecture)
    try:
        return create_model(config.model, **config.model_args).train(), config
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"cannot build model {config.model!r}: {str(exc).splitlines()[0]}") from None


def _initial_head(config: TrainConfig, model: nn.Module, classes: list[str], init: str | Path | None) -> tuple[nn.Module, str]:
    """A margin head over ``classes`` — ``init``'s when it was trained on the same identities — and where it came from."""
    head_args = {k: v for k, v in (("s", config.head_scale), ("m", config.head_margin)) if v is not None}
    head = margin_head(config.head, _embedding_dim(model), len(classes), **head_args)
    if init is not None:
        saved = read_checkpoint(init).get(HEAD_KEY)
        if saved and saved["head"] == config.head and saved["classes"] == list(classes):
            head.load_state_dict(saved["state_dict"])
            return head, f"from {init}"
    return head, "fresh"


def _resume_state(run_dir: Path, resume: bool, config: TrainConfig) -> dict[str, Any] | None:
    """The run folder's ``last.pt`` when resuming (its options must agree), None for a fresh start."""
    last_path = run_dir / LAST_CHECKPOINT
    if not last_path.exists():
        return None
    if not resume:
        raise InputError(f"{run_dir} already holds a training run ({LAST_CHECKPOINT}); pass --resume to continue it or choose another folder")
    state = read_checkpoint(last_path)
    changed = sorted(k for k, v in config.to_dict().items() if state["train"]["config"].get(k) != v)
    if changed:
        raise InputError(f"cannot resume {last_path}: training option(s) {', '.join(changed)} differ from the saved run")
    return state


def _train_epoch(trainer: nn.Module, loader: DataLoader, optimisation: _Optimisation, config: TrainConfig,
                 context: DistributedContext, bar: tqdm) -> dict[str, float]:
    """One pass over ``loader``; returns the epoch's mean losses (over all processes) and last learning rate."""
    totals = torch.zeros(3, dtype=torch.float64, device=context.device)  # face, aux, batches
    one = torch.ones((), dtype=torch.float64, device=context.device)
    lr = float("nan")
    for images, labels in loader:
        images, labels = images.to(context.device, non_blocking=True), labels.to(context.device, non_blocking=True)
        with torch.autocast(context.device.type, dtype=torch.float16, enabled=context.device.type == "cuda"):
            face, aux = trainer(images, labels)
            loss = face + config.aux_weight * aux
        lr = optimisation.step(loss)
        totals += torch.stack([face.detach().double(), aux.detach().double(), one])
        bar.update()
        if not bar.disable and bar.n % 10 == 0:
            bar.set_postfix(face=f"{(totals[0] / totals[2]).item():.3f}", aux=f"{(totals[1] / totals[2]).item():.4f}")
    face_loss, aux_loss = (all_reduce_sum(totals, context)[:2] / totals[2]).tolist()
    return {"lr": lr, "face_loss": face_loss, "aux_loss": aux_loss, "loss": face_loss + config.aux_weight * aux_loss}


def train(
    config: TrainConfig,
    images: LabelledImages,
    run_dir: str | Path,
    *,
    init: str | Path | None = None,
    resume: bool = False,
    validation: str | Path | None = None,
    val_lowres: int | None = None,
    val_every: int = 1,
    half: bool = False,
    workers: int = 0,
    context: DistributedContext = DistributedContext(),
    metadata: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train (or fine-tune, or resume) a FaceMoE model; see the module docstring.

    Args:
        config: the optimisation settings.
        images: training images with identity labels, yielding decoded RGB ``uint8`` arrays.
        run_dir: the run folder (``last.pt``, ``log.csv``, ``model.pt``).
        init: start from this checkpoint's weights and architecture; its margin head too when it
            was trained with the same head on the same identity names, else a fresh one.
        resume: continue from ``run_dir/last.pt`` (a fresh start when there is none).
        validation: a held-out evaluation folder (``protocols.load_protocols``) evaluated every
            ``val_every`` epochs and after the last one (rank 0).
        val_lowres: also validate with probes down-sampled to this side (``lowres_probes``).
        half: store ``model.pt`` in float16; the final figures are measured on those weights.
        workers: data-loader worker processes.
        context: this process's place in a ``torchrun`` group (default: one process on CPU).
        metadata: extra entries for ``model.pt`` (the command line, the data description).
        progress: show progress bars (rank 0).
    """
    run_dir = Path(run_dir)
    model, config = _initial_model(config, init)
    state = _resume_state(run_dir, resume, config)
    head, head_start = _initial_head(config, model, images.classes, init if state is None else None)
    objective = _Objective(model, head).to(context.device)
    dataset = TrainImages(images, config.seed, model.img_size, config.lowres, config.hflip)
    sampler = DistributedSampler(dataset, num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=config.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                        pin_memory=context.device.type == "cuda")
    if len(loader) == 0:
        raise InputError(f"{len(dataset)} training images are fewer than one batch of {config.batch_size} x {context.world_size} process(es); lower --batch-size")
    optimisation = _Optimisation(objective, config, len(loader), amp=context.device.type == "cuda")
    rows: list[dict[str, Any]] = []
    step, elapsed = 0, 0.0
    if state is not None:
        model.load_state_dict(state["state_dict"])
        head.load_state_dict(state["train"]["head"])
        optimisation.load_state_dict(state["train"])
        head_start, step, elapsed, rows = state["metadata"]["margin_head"], state["train"]["step"], state["train"]["elapsed"], list(state["train"]["log"])
    trainer = objective
    if context.enabled:
        cuda_ids = [context.device.index] if context.device.type == "cuda" else None
        trainer = DistributedDataParallel(objective, device_ids=cuda_ids, find_unused_parameters=True)
    val_data = load_protocols(split=validation, size=model.img_size) if validation is not None and context.is_main else None
    if not moe_layers(model):
        raise InputError("the model has no MoE layers to train")
    with ExpertUsage(model, training_only=True) as usage:  # validation passes (eval mode) are not counted
        started = time.perf_counter() - elapsed
        for epoch in range(len(rows), config.epochs):
            torch.manual_seed(int(np.random.SeedSequence((config.seed, epoch, context.rank)).generate_state(1)[0]))
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            usage.reset()
            objective.train()
            with tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False,
                      disable=not (progress and context.is_main)) as bar:
                row = {"epoch": epoch + 1, **_train_epoch(trainer, loader, optimisation, config, context, bar)}
            step += len(loader)
            row["step"] = step
            row.update(_load_shares(usage, context))
            broadcast_buffers(objective, context)
            if val_data is not None and (epoch + 1) % val_every == 0 and epoch + 1 < config.epochs:
                row.update(_validation_columns(_validate(model, val_data, val_lowres, config.batch_size)))
            row["seconds"] = time.perf_counter() - started
            rows.append(row)
            if context.is_main:
                train_state = {"config": config.to_dict(), "step": step, "elapsed": row["seconds"], "log": rows,
                               "head": head.state_dict(), **optimisation.state_dict()}
                save_checkpoint(model, run_dir / LAST_CHECKPOINT, {"epoch": epoch + 1, "step": step, "margin_head": head_start},
                                extra={"train": train_state})
                atomic_write(run_dir / LOG_FILE, _log_csv(rows))
                if progress:
                    tqdm.write(_describe_row(row), file=sys.stderr)
            context.barrier()

    result_meta = {
        **dict(metadata or {}),
        "seed": config.seed,
        "train_config": config.to_dict(),
        "init": str(init) if init is not None else None,
        "margin_head": head_start,
        "epochs": config.epochs,
        "steps": step,
        "world_size": context.world_size,
        "device": context.device.type,
        "training_seconds": round(time.perf_counter() - started, 1),
        "replica_digests": _gather_digests(objective, context),
    }
    final_path = run_dir / FINAL_CHECKPOINT
    if context.is_main:
        if half:
            _round_to_half(model)
        if val_data is not None:  # measured on the weights as stored (float16 with ``half``)
            figures = _validate(model, val_data, val_lowres, config.batch_size)
            result_meta["validation"] = {"data": val_data.source, "lowres": val_lowres, **figures}
            rows[-1].update(_validation_columns(figures))
            atomic_write(run_dir / LOG_FILE, _log_csv(rows))
        head_record = {"head": config.head, "classes": list(images.classes), "state_dict": head.state_dict()}
        save_checkpoint(model.eval(), final_path, result_meta, half=half, extra={HEAD_KEY: head_record})
    context.barrier()
    return TrainResult(run_dir=run_dir, checkpoint=final_path, rows=rows, metadata=result_meta)


def _gather_digests(module: nn.Module, context: DistributedContext) -> list[str]:
    """Every process's :func:`state_digest` of backbone + head (all equal when the replicas agree)."""
    digest = state_digest(module)
    if not context.enabled:
        return [digest]
    gathered: list[str] = [""] * context.world_size
    torch.distributed.all_gather_object(gathered, digest)
    return gathered


def _describe_row(row: Mapping[str, Any]) -> str:
    parts = [f"epoch {row['epoch']}", f"face {row['face_loss']:.3f}", f"aux {row['aux_loss']:.4f}", f"lr {row['lr']:.2e}"]
    parts += [f"{k[4:]} {v:.3f}" for k, v in row.items() if k.startswith("val_") and v is not None and not math.isnan(v)]
    return "  ".join(parts) + f"  ({row['seconds']:.0f}s)"
