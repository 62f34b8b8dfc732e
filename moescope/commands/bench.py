"""``moescope bench``: inference cost of a checkpoint (paper B.11)."""
from __future__ import annotations

import argparse

from ..cli import emit
from ..demo import DEFAULT_CHECKPOINT
from ..errors import MoescopeError
from ..options import CHECKPOINT_HELP, add_output, add_top_k, positive


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="inference cost: latency, throughput, peak memory, FLOPs top-k vs dense, router share (paper B.11)",
        description="Time a checkpoint on random normalised images for a grid of batch sizes, each without and with "
        "routing capture (the hooks' overhead), with torch.utils.benchmark (warm-up, median and IQR); peak memory "
        "(CUDA max_memory_allocated, or the process's peak RSS on CPU); FLOPs per image counted by FlopCounterMode "
        "for the sparse top-k dispatch and for a dense all-experts layer; the router's share of a forward pass. "
        f"With no CKPT: {DEFAULT_CHECKPOINT}. A registered model name (e.g. facemoe_swin_official) is benchmarked "
        "with random weights.",
    )
    p.add_argument("checkpoint", nargs="?", default=DEFAULT_CHECKPOINT, metavar="CKPT",
                   help=f"{CHECKPOINT_HELP}, or a registered model name (random weights); default {DEFAULT_CHECKPOINT}")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--amp", action="store_true", help="autocast: float16 on CUDA, bfloat16 on CPU")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format (models with a 2-D convolution)")
    p.add_argument("--batch-sizes", metavar="N,N,...",
                   help="batch sizes to time, comma-separated (default: 1,8,32 on CPU, 1,8,32,128 on CUDA; 1 for models over 50M parameters on CPU)")
    p.add_argument("--repeats", type=int, help="timed blocks per batch size and capture mode (default 7 on CPU, 10 on CUDA, 3 for large models)")
    p.add_argument("--warmup", type=int, help="untimed warm-up passes before timing (default 2; 1 for large models)")
    p.add_argument("--threads", type=int, help="torch intra-op threads on CPU (default: torch's current setting)")
    p.add_argument("--no-router-time", action="store_true", help="skip the router / experts time-share measurement")
    add_top_k(p)
    add_output(p, seed=False)
    p.set_defaults(run=run)


def batch_sizes(text: str | None) -> tuple[int, ...] | None:
    """``1,8,32`` -> ``(1, 8, 32)``; one-line error for anything but positive integers."""
    if text is None:
        return None
    try:
        sizes = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise MoescopeError(f"--batch-sizes takes positive integers separated by commas, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise MoescopeError(f"--batch-sizes takes positive integers separated by commas, got {text!r}")
    return sizes


def load_bench_model(spec: str, top_k: int | None):
    """A checkpoint (path / ``demo:NAME``) or, for a registered model name that is not a file, that
    model with random weights (seeded); returns the model and whether its weights are random."""
    from pathlib import Path

    from facemoe_model.models import create_model, list_models

    from ..demo import load_model

    if not spec.startswith("demo:") and not Path(spec).exists() and spec in list_models():
        import torch

        torch.manual_seed(0)
        kwargs = {"top_k": top_k} if top_k is not None else {}
        return create_model(spec, **kwargs).eval(), True
    return load_model(spec, top_k=top_k), False


TORCHRUN_NOTE = ("measured by rank 0 alone on its device; the other {others} torchrun rank(s) exited at once, "
                 "so nothing competed with the timings for the CPU cores or the GPU")
"""``settings["torchrun"]`` of a run under ``torchrun`` (WORLD_SIZE > 1)."""


def run(args: argparse.Namespace) -> int:
    """Benchmark the checkpoint. Under ``torchrun`` rank 0 alone measures (a benchmark times one
    device; N processes timing at once would only slow each other down): the other ranks return
    at once, before loading anything or joining a process group, and print nothing."""
    from .. import distributed
    from ..cost import benchmark_model

    if not distributed.is_main():
        return 0
    sizes = batch_sizes(args.batch_sizes)
    if args.repeats is not None:
        positive(args.repeats, "--repeats")
    if args.threads is not None:
        positive(args.threads, "--threads")
    if args.warmup is not None and args.warmup < 0:
        raise MoescopeError(f"--warmup must be >= 0, got {args.warmup}")
    model, random_weights = load_bench_model(args.checkpoint, args.top_k)
    result = benchmark_model(
        model, batch_sizes=sizes, device=args.device, amp=args.amp, channels_last=args.channels_last,
        repeats=args.repeats, warmup=args.warmup, threads=args.threads, measure_router=not args.no_router_time,
        checkpoint=args.checkpoint,
    )
    result.settings["weights"] = "random (seed 0; no checkpoint)" if random_weights else "checkpoint"
    if distributed.world_size() > 1:
        result.settings["torchrun"] = TORCHRUN_NOTE.format(others=distributed.world_size() - 1)
    emit(result, args, render)
    return 0


def render(result) -> str:
    """The B.11 tables as a person reads them, with the machine they were measured on."""
    s, st, t = result.summary, result.settings, result.tables
    where = f"{st['device']}" + (f" ({s['gpu']})" if "gpu" in s else f", {s['torch_threads']} torch threads of {s['cpu_count']} CPUs: {s['cpu']}")
    lines = [
        f"moescope bench: {result.checkpoints[0] if result.checkpoints else 'model'} "
        f"({s['parameters'] / 1e6:.1f}M parameters, {s['moe_layers']} MoE layers, weights: {st.get('weights', 'checkpoint')}); "
        f"input {'x'.join(str(v) for v in st['input_shape'])}; amp {st['amp']}; channels_last {st['channels_last']}",
        f"machine: {where}; torch {s['torch']}; {st['repeats']} timed blocks per cell (median, IQR)",
        "",
        "B.11  latency, throughput and peak memory, without / with routing capture",
    ]
    lat = t["latency"][["batch_size", "capture", "latency_ms", "latency_iqr_ms", "latency_per_image_ms",
                        "throughput_img_per_s", "peak_memory_mb"]]
    lines.append(lat.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    lines.append(f"memory: {s['memory_method']}")
    lines += ["", "routing-capture overhead (hooked / unhooked latency, median of paired blocks)"]
    lines.append(t["capture_overhead"][["batch_size", "latency_ms_off", "latency_ms_routing", "capture_ratio", "capture_ratio_iqr"]]
                 .to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    lines += ["", "FLOPs per image (FlopCounterMode): sparse top-k dispatch vs a dense all-experts layer"]
    flops = t["flops"][["routing", "experts_per_token", "gflops_per_image", "expert_flops_per_image",
                        "router_flops_per_image", "other_flops_per_image", "relative_to_topk"]].copy()
    for col in ("expert_flops_per_image", "router_flops_per_image", "other_flops_per_image"):
        flops[col] = flops[col] / 1e9
    flops.columns = ["routing", "k", "GFLOPs", "experts GFLOPs", "router GFLOPs", "other GFLOPs", "x top-k"]
    lines.append(flops.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if "router_time" in t:
        lines += ["", "time share of a forward pass (hooks on every MoE layer, its router and experts)"]
        lines.append(t["router_time"][["batch_size", "forward_ms", "moe_ms", "router_ms", "experts_ms", "router_share", "routing_share"]]
                     .to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return "\n".join(lines)
