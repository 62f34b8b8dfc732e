"""Inference cost of an MoE model (paper B.11): latency, throughput, peak memory, FLOPs, router share.

Everything is measured on the model as it is, through public mechanisms only:

* **Latency / throughput** with :class:`torch.utils.benchmark.Timer` (it synchronises the
  accelerator around every block), after explicit warm-up passes, as the median and IQR over
  ``repeats`` blocks. Each batch size is timed *without* and *with* routing capture
  (a :class:`~moescope.trace.RoutingTrace` plus ``trace.pop()`` after every batch, i.e. what an
  analysis pays); the two are interleaved block by block so that load drifting on a shared
  machine hits both alike, and the capture overhead is the median of the paired ratios.
* **Peak memory** on CUDA is ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats`` (tensors only, weights included). On CPU it is the process's
  resident set: Linux lets a process reset its high-water mark (``/proc/self/clear_refs``
  ``5``) so ``VmHWM`` is the peak RSS *of this one forward pass*; freed heap is handed back
  first (``malloc_trim``) so the baseline is honest. ``resource.getrusage`` maxrss is only
  used where the reset is unavailable: it is a lifetime maximum, so its delta is a lower
  bound (the method is named in every row). ``tracemalloc`` is not used: it does not see
  torch's C++ allocations.
* **FLOPs per image** with :class:`torch.utils.flop_counter.FlopCounterMode` on one image
  (attention on the math backend while counting: the fused CPU kernel is invisible to it).
  The MoE layer dispatches each token only to the experts it chose, so the counter sees the
  sparse cost; the dense all-experts cost is measured the same way with the documented
  intervention ``RoutingOverride(k=num_experts)`` (restored afterwards), and both are
  cross-checked against the analytic count read off the MoE layers
  (``tokens x k x 2 x (2 x C x H)`` for the experts, ``tokens x 2 x C x E`` for the router).
* **Router share of time** from forward pre/post hooks on every MoE layer, its router and
  its experts (removed afterwards, also on exceptions), with CUDA synchronisation on a GPU:
  the part of a forward pass spent in the gate, in the experts, and in the rest of the
  routing step (top-k, auxiliary loss, gather/scatter).

``amp`` runs under :func:`torch.autocast`: float16 on CUDA, **bfloat16 on CPU**.
``channels_last`` applies to models with 2-D convolutions (the patch embedding) only.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# torch.utils.benchmark imports torch.utils.cpp_extension, which warns on a CUDA build without a
# GPU that it found a CUDA_HOME; nothing here compiles an extension, so that line is only noise.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from facemoe_model.inference import eval_mode, model_device
from facemoe_model.moe import RoutingOverride, moe_layers, override_routing

from .errors import MoescopeError
from .forward import release_free_memory
from .results import AnalysisResult
from .trace import RoutingTrace

__all__ = [
    "CostGrid",
    "default_grid",
    "example_input",
    "count_flops",
    "moe_flops",
    "flops_table",
    "time_share",
    "benchmark_model",
    "machine_info",
]

LARGE_MODEL_PARAMS = 50_000_000
"""Models above this many parameters get the tiny default grid on CPU (batch 1, 3 repeats)."""


@dataclass(frozen=True)
class CostGrid:
    """Batch sizes and repetition counts of a benchmark."""

    batch_sizes: tuple[int, ...]
    repeats: int
    warmup: int


def default_grid(model: nn.Module, device: str | torch.device = "cpu") -> CostGrid:
    """The default grid: tiny for a large model on CPU (``facemoe_swin_official``: batch 1)."""
    params = sum(p.numel() for p in model.parameters())
    cuda = torch.device(device).type == "cuda"
    if cuda:
        return CostGrid((1, 8, 32, 128), repeats=10, warmup=3)
    if params > LARGE_MODEL_PARAMS:
        return CostGrid((1,), repeats=3, warmup=1)
    return CostGrid((1, 8, 32), repeats=7, warmup=2)


# -- inputs and model state ------------------------------------------------------------------
def _input_shape(model: nn.Module) -> tuple[int, ...]:
    """Per-image input shape ``(C, H, W)`` from the model's ``img_size`` and first convolution."""
    size = getattr(model, "img_size", None)
    if size is None:
        raise MoescopeError(f"cannot tell the input size of {type(model).__name__}: it has no img_size; pass input_shape")
    size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return (conv.in_channels if conv is not None else 3, *size)


def example_input(shape: Sequence[int], batch_size: int, device: torch.device, seed: int = 0,
                  channels_last: bool = False) -> torch.Tensor:
    """A seeded standard-normal batch ``[batch_size, *shape]`` (normalised images)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, *shape), generator=g).to(device)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@contextlib.contextmanager
def _prepared(model: nn.Module, device: torch.device, channels_last: bool) -> Iterator[None]:
    """Eval mode on ``device`` (and channels-last) for the block; the model's train/eval flags,
    device and memory format are restored afterwards."""
    original = model_device(model)
    with eval_mode(model):
        try:
            model.to(device)
            if channels_last:
                model.to(memory_format=torch.channels_last)
            yield
        finally:
            if channels_last:
                model.to(memory_format=torch.contiguous_format)
            model.to(original)


def _forward_context(device: torch.device, amp: bool, amp_dtype: torch.dtype | None) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    if amp:
        stack.enter_context(torch.autocast(device_type=device.type, dtype=amp_dtype))
    return stack


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- FLOPs -------------------------------------------------------------------------------------
def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass of ``model(x)`` as counted by ``FlopCounterMode`` (matmuls,
    convolutions, attention; a multiply-add counts 2).

    Attention runs on the math backend while counting: the fused CPU kernel of
    ``scaled_dot_product_attention`` is invisible to the counter (it would count 0), the math
    backend does the same arithmetic as visible ``bmm`` s, so the count is device-independent.
    """
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sdpa_kernel([SDPBackend.MATH]), counter:
        model(x)
    return int(counter.get_total_flops())


def moe_flops(model: nn.Module, x: torch.Tensor) -> pd.DataFrame:
    """Analytic FLOPs per MoE layer for input ``x``, read off the layers themselves.

    One row per layer: ``tokens`` it saw (from its own routing output), ``dim`` C,
    ``hidden`` H, ``experts`` E, ``k`` (under any current override), and
    ``expert_flops_topk`` = tokens x k x 4CH, ``expert_flops_dense`` = tokens x E x 4CH,
    ``router_flops`` = tokens x 2CE. Bias additions and activations are not counted (as in
    ``FlopCounterMode``).
    """
    layers = moe_layers(model)
    if not layers:
        raise MoescopeError("the model has no MoE layers")
    with RoutingTrace(model) as trace, torch.inference_mode():
        model(x)
        raw = trace.pop_raw()
    rows = []
    for name, layer in layers.items():
        fc1, fc2 = layer.experts[0].fc1, layer.experts[0].fc2
        C, H, E = fc1.in_features, fc1.out_features, layer.num_experts
        tokens = int(raw[name].logits.shape[0])
        k = int(raw[name].topk_indices.shape[-1])
        per_token_expert = 2 * C * H + 2 * fc2.in_features * fc2.out_features
        rows.append({
            "layer": name, "tokens": tokens, "dim": C, "hidden": H, "experts": E, "k": k,
            "expert_flops_topk": tokens * k * per_token_expert,
            "expert_flops_dense": tokens * E * per_token_expert,
            "router_flops": tokens * 2 * layer.router.gate.in_features * layer.router.gate.out_features,
        })
    return pd.DataFrame(rows)


def flops_table(model: nn.Module, x: torch.Tensor) -> tuple[pd.DataFrame, list[str]]:
    """FLOPs per image of sparse top-k dispatch and of a dense all-experts layer.

    Both rows are measured with ``FlopCounterMode`` (dense: ``RoutingOverride(k=E)`` on every
    MoE layer, restored afterwards) on the batch ``x`` and divided by its size; the MoE parts
    are the analytic counts of :func:`moe_flops`. Returns the table and warnings (when the
    measured and analytic differences disagree).
    """
    layers = moe_layers(model)
    batch = x.shape[0]
    analytic = moe_flops(model, x)
    sparse = count_flops(model, x)
    dense_override = {name: RoutingOverride(k=layer.num_experts) for name, layer in layers.items()}
    with override_routing(model, dense_override):
        dense = count_flops(model, x)
    router = int(analytic["router_flops"].sum())
    rows = []
    for routing, measured, expert_col in (("top-k", sparse, "expert_flops_topk"), ("dense", dense, "expert_flops_dense")):
        expert = int(analytic[expert_col].sum())
        k = sorted(set(analytic["k"] if routing == "top-k" else analytic["experts"]))
        rows.append({
            "routing": routing,
            "experts_per_token": ",".join(str(v) for v in k),
            "flops_per_image": measured / batch,
            "gflops_per_image": measured / batch / 1e9,
            "expert_flops_per_image": expert / batch,
            "router_flops_per_image": router / batch,
            "other_flops_per_image": (measured - expert - router) / batch,
            "relative_to_topk": measured / sparse if sparse else float("nan"),
        })
    warnings = []
    other = [r["other_flops_per_image"] for r in rows]
    if not math.isclose(other[0], other[1], rel_tol=1e-9, abs_tol=0.5):
        warnings.append(
            f"FLOP cross-check failed: the non-MoE part differs between top-k ({other[0]:.0f}) and dense ({other[1]:.0f}) "
            "routing; the counter and the analytic MoE count disagree"
        )
    if rows[0]["other_flops_per_image"] < 0:
        warnings.append("FLOP cross-check failed: the analytic MoE count exceeds the measured total")
    return pd.DataFrame(rows), warnings


# -- peak memory -------------------------------------------------------------------------------
def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False when unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _proc_status_kb("VmHWM") is not None
    except OSError:
        return False


def _release_free_heap() -> None:
    """Collect garbage and hand the freed heap back to the OS so the RSS baseline is honest."""
    gc.collect()
    release_free_memory()


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def peak_memory(run: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Run ``run()`` once; its peak memory in bytes (``peak``), the extra over what was held
    before (``extra``) and the ``method`` (see the module docstring)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak": peak, "extra": peak - base, "method": "cuda max_memory_allocated"}
    _release_free_heap()
    if _reset_rss_peak():
        base = _proc_status_kb("VmRSS") * 1024
        run()
        peak = _proc_status_kb("VmHWM") * 1024
        return {"peak": peak, "extra": peak - base, "method": "process peak RSS (VmHWM, reset per run)"}
    base = _maxrss_bytes()
    run()
    peak = _maxrss_bytes()
    return {"peak": peak, "extra": peak - base, "method": "ru_maxrss (lifetime peak; extra is a lower bound)"}


# -- timing ------------------------------------------------------------------------------------
def _timer(fn: Callable[[], Any], threads: int, label: str) -> benchmark.Timer:
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, label="bench", description=label)


def _time_pair(forward: Callable[[], Any], model: nn.Module, repeats: int, warmup: int, threads: int,
               min_block_s: float) -> tuple[benchmark.Measurement, benchmark.Measurement, list[float], int]:
    """Interleaved blocks without / with routing capture: both Measurements (seconds per
    forward pass, one entry per block), the paired hooked/unhooked ratios and the passes per block."""
    holder: dict[str, RoutingTrace] = {}

    def captured() -> None:
        forward()
        holder["trace"].pop()

    plain_timer = _timer(forward, threads, "no capture")
    hooked_timer = _timer(captured, threads, "routing capture")
    once = min(plain_timer.timeit(1).times[0] for _ in range(max(1, warmup)))
    number = max(1, min(1000, int(min_block_s / max(once, 1e-9))))
    with RoutingTrace(model) as trace:
        holder["trace"] = trace
        for _ in range(max(1, warmup)):
            hooked_timer.timeit(1)
    plain, hooked = [], []
    for _ in range(repeats):
        plain.append(plain_timer.timeit(number))
        with RoutingTrace(model) as trace:
            holder["trace"] = trace
            hooked.append(hooked_timer.timeit(number))
    ratios = [h.times[0] / p.times[0] for p, h in zip(plain, hooked)]
    return benchmark.Measurement.merge(plain)[0], benchmark.Measurement.merge(hooked)[0], ratios, number


def time_share(model: nn.Module, forward: Callable[[], Any], device: torch.device, repeats: int) -> dict[str, float]:
    """Seconds per forward pass spent in the MoE layers, their routers and their experts.

    Forward pre/post hooks (synchronising on CUDA) time each MoE layer, its ``router`` and
    each expert; they are removed afterwards, also when the forward pass raises. Values are
    medians over ``repeats`` passes (after one warm-up pass).
    """
    layers = list(moe_layers(model).values())
    acc = {"moe": 0.0, "router": 0.0, "experts": 0.0}
    starts: dict[int, float] = {}

    def pre(module: nn.Module, inputs: Any) -> None:
        _sync(device)
        starts[id(module)] = time.perf_counter()

    def post_for(key: str):
        def post(module: nn.Module, inputs: Any, output: Any) -> None:
            _sync(device)
            acc[key] += time.perf_counter() - starts.pop(id(module))
        return post

    handles = []
    per_pass: dict[str, list[float]] = {"forward": [], "moe": [], "router": [], "experts": []}
    try:
        for layer in layers:
            targets = [(layer, "moe"), (layer.router, "router"), *[(e, "experts") for e in layer.experts]]
            for module, key in targets:
                handles.append(module.register_forward_pre_hook(pre))
                handles.append(module.register_forward_hook(post_for(key)))
        for i in range(repeats + 1):
            for key in acc:
                acc[key] = 0.0
            _sync(device)
            t0 = time.perf_counter()
            forward()
            _sync(device)
            if i:  # the first pass warms up
                per_pass["forward"].append(time.perf_counter() - t0)
                for key, value in acc.items():
                    per_pass[key].append(value)
    finally:
        for h in handles:
            h.remove()
    return {key: float(np.median(values)) for key, values in per_pass.items()}


# -- machine -----------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the numbers come from: CPU model, cores, torch threads, torch version, GPU name."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# -- the benchmark -----------------------------------------------------------------------------
def benchmark_model(
    model: nn.Module,
    *,
    batch_sizes: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    amp: bool = False,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    repeats: int | None = None,
    warmup: int | None = None,
    threads: int | None = None,
    min_block_s: float = 0.05,
    input_shape: Sequence[int] | None = None,
    measure_router: bool = True,
    seed: int = 0,
    checkpoint: str | None = None,
) -> AnalysisResult:
    """Measure the inference cost of ``model`` (paper B.11) over a grid of batch sizes.

    Args:
        model: any module with MoE layers (moved to ``device`` and back, put in eval mode and
            restored; hooks are always removed).
        batch_sizes / repeats / warmup: the grid; defaults from :func:`default_grid`.
        device: ``cpu`` or ``cuda`` (``cuda:N``).
        amp: run under ``torch.autocast`` — float16 on CUDA, bfloat16 on CPU, unless ``amp_dtype``.
        channels_last: channels-last memory format, where the model has 2-D convolutions.
        threads: torch intra-op threads while timing (default: the current setting).
        min_block_s: each timed block repeats the forward pass to last about this long.
        input_shape: per-image input shape (default ``(3, img_size, img_size)``).
        measure_router: also time the router / experts share of a forward pass.
        seed: seed of the random input batch.
        checkpoint: the name the result records for the model.

    Returns an AnalysisResult with tables ``latency`` (one row per batch size x capture),
    ``capture_overhead`` (per batch size), ``flops`` (top-k vs dense per image) and
    ``router_time`` (per batch size), and a summary of the headline numbers.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MoescopeError("--device cuda requested but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise MoescopeError(f"unsupported device {device}; use cpu or cuda")
    if not moe_layers(model):
        raise MoescopeError("the model has no MoE layers to benchmark")
    grid = default_grid(model, device)
    batch_sizes = tuple(int(b) for b in (batch_sizes or grid.batch_sizes))
    if not batch_sizes or min(batch_sizes) < 1:
        raise MoescopeError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    repeats = grid.repeats if repeats is None else int(repeats)
    warmup = grid.warmup if warmup is None else int(warmup)
    if repeats < 1:
        raise MoescopeError(f"repeats must be at least 1, got {repeats}")
    if amp and amp_dtype is None:
        amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    shape = tuple(input_shape) if input_shape is not None else _input_shape(model)
    warnings: list[str] = []
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    if channels_last and not (has_conv and len(shape) == 3):
        warnings.append("channels_last does not apply: the model has no 2-D convolution on image input; ignored")
        channels_last = False
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    threads_used = torch.get_num_threads()
    amp_name = str(amp_dtype).replace("torch.", "") if amp else "off"
    common = {"device": str(device), "amp": amp_name, "channels_last": channels_last, "threads": threads_used}

    latency_rows, overhead_rows, router_rows = [], [], []
    try:
        with _prepared(model, device, channels_last):
            flops, flop_warnings = flops_table(model, example_input(shape, 1, device, seed, channels_last))
            warnings += flop_warnings
            for batch in batch_sizes:
                x = example_input(shape, batch, device, seed, channels_last)

                def forward(x: torch.Tensor = x) -> None:
                    with _forward_context(device, amp, amp_dtype):
                        model(x)

                plain, hooked, ratios, number = _time_pair(forward, model, repeats, warmup, threads_used, min_block_s)
                memory = {"off": peak_memory(forward, device)}
                with RoutingTrace(model) as trace:
                    memory["routing"] = peak_memory(lambda: (forward(), trace.pop()), device)
                for capture, m in (("off", plain), ("routing", hooked)):
                    mem = memory[capture]
                    latency_rows.append({
                        "batch_size": batch, "capture": capture,
                        "latency_ms": 1e3 * m.median, "latency_iqr_ms": 1e3 * m.iqr,
                        "latency_per_image_ms": 1e3 * m.median / batch,
                        "throughput_img_per_s": batch / m.median,
                        "repeats": len(m.times), "runs_per_repeat": number,
                        "peak_memory_mb": mem["peak"] / 2**20, "extra_memory_mb": mem["extra"] / 2**20,
                        "memory_method": mem["method"], **common,
                    })
                overhead_rows.append({
                    "batch_size": batch,
                    "latency_ms_off": 1e3 * plain.median, "latency_ms_routing": 1e3 * hooked.median,
                    "capture_ratio": float(np.median(ratios)),
                    "capture_ratio_iqr": float(np.subtract(*np.percentile(ratios, [75, 25]))),
                    **common,
                })
                if measure_router:
                    share = time_share(model, forward, device, repeats)
                    total = share["forward"]
                    router_rows.append({
                        "batch_size": batch,
                        "forward_ms": 1e3 * total, "moe_ms": 1e3 * share["moe"],
                        "router_ms": 1e3 * share["router"], "experts_ms": 1e3 * share["experts"],
                        "routing_other_ms": 1e3 * (share["moe"] - share["router"] - share["experts"]),
                        "router_share": share["router"] / total,
                        "routing_share": (share["moe"] - share["experts"]) / total,
                        "moe_share": share["moe"] / total,
                        **common,
                    })
    finally:
        torch.set_num_threads(previous_threads)

    latency = pd.DataFrame(latency_rows)
    overhead = pd.DataFrame(overhead_rows)
    router = pd.DataFrame(router_rows)
    flops = flops.assign(**common)
    topk, dense = flops.iloc[0], flops.iloc[1]
    summary: dict[str, Any] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "moe_layers": len(moe_layers(model)),
        "gflops_per_image_topk": topk["gflops_per_image"],
        "gflops_per_image_dense": dense["gflops_per_image"],
        "dense_over_topk": dense["relative_to_topk"],
        "capture_ratio": {int(r.batch_size): r.capture_ratio for r in overhead.itertuples()},
        "throughput_img_per_s": {int(r.batch_size): r.throughput_img_per_s for r in latency[latency.capture == "off"].itertuples()},
        "peak_memory_mb": {int(r.batch_size): r.peak_memory_mb for r in latency[latency.capture == "off"].itertuples()},
        "memory_method": latency["memory_method"].iloc[0],
        **machine_info(device),
        "torch_threads": threads_used,
    }
    if measure_router:
        summary["router_share"] = {int(r.batch_size): r.router_share for r in router.itertuples()}
    settings = {
        "batch_sizes": list(batch_sizes), "repeats": repeats, "warmup": warmup, "min_block_s": min_block_s,
        "device": str(device), "amp": amp_name, "channels_last": channels_last, "threads": threads_used,
        "input_shape": list(shape), "seed": seed,
        "amp_note": "autocast bfloat16 on CPU, float16 on CUDA" if amp else "fp32",
        "capture": "RoutingTrace on every MoE layer + trace.pop() per batch",
    }
    tables = {"latency": latency, "capture_overhead": overhead, "flops": flops}
    if measure_router:
        tables["router_time"] = router
    return AnalysisResult(
        command="bench", checkpoints=[checkpoint] if checkpoint else [], settings=settings,
        tables=tables, summary=summary, warnings=warnings,
    )
