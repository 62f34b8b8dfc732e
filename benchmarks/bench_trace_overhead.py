"""Overhead of routing capture: a hooked vs an unhooked forward pass, side by side.

The same model, timed round-robin in one run: bare, and inside ``RoutingTrace`` (hooks on
every MoE layer attached for the pass, the batch's records popped after it, as ``moescope
regions`` does) — so the hooked figure even includes attaching and removing the hooks.
Target ratio <= 1.03.

    python benchmarks/bench_trace_overhead.py [--checkpoint demo:after] [--batch-size 32]
"""
from __future__ import annotations

import argparse

import torch

from facemoe_model import create_model
from moescope.demo import DEFAULT_CHECKPOINT, load_model
from moescope.errors import MoescopeError
from moescope.trace import RoutingTrace

from _timing import interleaved_medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint to time (falls back to a random facemoe_swin_tiny)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    try:
        model, name = load_model(args.checkpoint), args.checkpoint
    except MoescopeError:
        torch.manual_seed(0)
        model, name = create_model("facemoe_swin_tiny").eval(), "random facemoe_swin_tiny"
    x = torch.randn(args.batch_size, 3, model.img_size, model.img_size)

    def hooked() -> None:
        with RoutingTrace(model) as trace:
            model(x)
            trace.pop_raw()

    with torch.inference_mode():
        med = interleaved_medians({"unhooked": lambda: model(x), "hooked": hooked}, repeats=args.repeats)
    print(f"model={name} batch={args.batch_size} threads={torch.get_num_threads()}")
    print(
        f"unhooked {med['unhooked'] * 1e3:8.2f} ms   hooked {med['hooked'] * 1e3:8.2f} ms   "
        f"ratio hooked/unhooked = {med['hooked'] / med['unhooked']:.3f} (target <= 1.03)"
    )


if __name__ == "__main__":
    main()
