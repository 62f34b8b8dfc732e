"""Overhead of routing capture: a hooked vs an unhooked forward pass, side by side.

Two copies of the same model: one inside ``RoutingTrace`` (hooks on every MoE layer, the
batch's records popped after each pass, as ``moescope regions`` does), one bare; timed
round-robin in one run. Target ratio <= 1.03.

    python benchmarks/bench_trace_overhead.py [--checkpoint demo:after] [--batch-size 32]
"""
from __future__ import annotations

import argparse
import copy

import torch

from facemoe_model import create_model
from moescope.demo import load_model
from moescope.errors import MoescopeError
from moescope.trace import RoutingTrace

from _timing import interleaved_medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="demo:after", help="checkpoint to time (falls back to a random facemoe_swin_tiny)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    try:
        model, name = load_model(args.checkpoint), args.checkpoint
    except MoescopeError:
        torch.manual_seed(0)
        model, name = create_model("facemoe_swin_tiny").eval(), "random facemoe_swin_tiny"
    hooked_model = copy.deepcopy(model)
    x = torch.randn(args.batch_size, 3, model.img_size, model.img_size)
    with torch.inference_mode(), RoutingTrace(hooked_model) as trace:

        def hooked() -> None:
            hooked_model(x)
            trace.pop_raw()

        med = interleaved_medians({"unhooked": lambda: model(x), "hooked": hooked}, repeats=args.repeats)
    print(f"model={name} batch={args.batch_size} threads={torch.get_num_threads()}")
    print(
        f"unhooked {med['unhooked'] * 1e3:8.2f} ms   hooked {med['hooked'] * 1e3:8.2f} ms   "
        f"ratio hooked/unhooked = {med['hooked'] / med['unhooked']:.3f} (target <= 1.03)"
    )


if __name__ == "__main__":
    main()
