"""Process-group plumbing for data-parallel training launched by ``torchrun``.

``torchrun --nproc_per_node N -m moescope train ...`` starts N processes and sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init_distributed` joins them into one group
(NCCL on GPUs, gloo on CPUs). Started without ``torchrun`` everything here is a no-op on a
world of one process, so the same training code runs on a laptop and on a GPU cluster.

Inference (evaluation, analysis) uses the same group through :func:`analysis_context` — joined
on first use — with :func:`shard_range` (a contiguous, deterministic share of ``n`` items, cut at
multiples of a block such as a batch, so every batch holds the images a single process would put
in it) and :func:`gather_objects` (every rank's piece, in rank order).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistributedContext",
    "init_distributed",
    "analysis_context",
    "shard_range",
    "gather_objects",
    "all_reduce_sum",
    "broadcast_buffers",
    "state_digest",
]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank in a world of ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints progress."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str | None = None) -> DistributedContext:
    """Join the ``torchrun`` process group, if any, and pick this process's device.

    ``device``: ``"cpu"``, ``"cuda"`` or None (CUDA when available). Under ``torchrun`` each
    process takes GPU ``LOCAL_RANK``.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but CUDA is not available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistributedContext(device=torch.device(device or ("cuda" if use_cuda else "cpu")))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistributedContext(rank, world_size, local_rank, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


_ANALYSIS: DistributedContext | None = None


def analysis_context(device: str | None = None) -> DistributedContext:
    """The process group of an inference run under ``torchrun`` (joined on the first call; later
    calls return the same context). Without ``torchrun`` (``WORLD_SIZE`` unset or 1): a world of
    one. ``device`` as :func:`init_distributed` (default CUDA when available): NCCL with one GPU
    per rank, else gloo. A group that is already initialised (``train``) is reused."""
    global _ANALYSIS
    if _ANALYSIS is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and dist.is_initialized():
            use_cuda = dist.get_backend() == "nccl"
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            _ANALYSIS = DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank,
                                           torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))
        else:
            _ANALYSIS = init_distributed(device)
    return _ANALYSIS


def shard_range(n: int, context: DistributedContext, block: int = 1) -> range:
    """This rank's contiguous share of ``range(n)``: the ``ceil(n / block)`` blocks are split as
    evenly as possible in rank order, so the shards concatenated in rank order are ``range(n)``."""
    block = max(int(block), 1)
    blocks = -(-n // block)
    first = context.rank * blocks // context.world_size
    last = (context.rank + 1) * blocks // context.world_size
    return range(min(first * block, n), min(last * block, n))


def gather_objects(obj, context: DistributedContext) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (``[obj]`` in a world of one)."""
    if not context.enabled:
        return [obj]
    out: list = [None] * context.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Sum ``tensor`` over all processes (in place; returned for chaining)."""
    if context.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: nn.Module, context: DistributedContext) -> None:
    """Copy rank 0's buffers (BatchNorm statistics ...) to every process, so all replicas agree."""
    if context.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def state_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state_dict (names, dtypes, shapes and bytes): equal iff the states are."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
