"""Sparse MoE dispatch vs dense all-experts compute, side by side (CPU, or CUDA if present).

Dense = every expert on every token, then the top-k outputs are gathered and weighted: the
naive implementation the sparse dispatch replaces. Prints median times and the speed-up.

    python benchmarks/bench_moe_dispatch.py [--tokens 12800] [--dim 96]
"""
from __future__ import annotations

import argparse

import torch

from facemoe_model.moe import MoELayer

from _timing import interleaved_medians


def dense_forward(layer: MoELayer, tokens: torch.Tensor) -> torch.Tensor:
    logits = layer.router(tokens)
    indices = logits.topk(layer.k, dim=-1).indices
    weights = logits.gather(-1, indices)
    all_out = torch.stack([expert(tokens) for expert in layer.experts], dim=1)  # [T, E, C]
    chosen = all_out.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return (chosen * weights.unsqueeze(-1)).sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32 * 400, help="tokens per batch (default 32 images x 400 tokens)")
    parser.add_argument("--dim", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    print(f"device={device} tokens={args.tokens} dim={args.dim} hidden={4 * args.dim}")
    print(f"{'N':>3} {'k':>3} {'sparse ms':>10} {'dense ms':>10} {'dense/sparse':>13}")
    for n, k in ((3, 2), (8, 2)):
        layer = MoELayer(args.dim, 4 * args.dim, n, k).to(device).eval()
        x = torch.randn(args.tokens, args.dim, device=device)
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), dense_forward(layer, x), atol=1e-4, rtol=1e-4)

            def sync(fn):
                def run():
                    fn()
                    if device == "cuda":
                        torch.cuda.synchronize()
                return run

            med = interleaved_medians(
                {"sparse": sync(lambda: layer(x)), "dense": sync(lambda: dense_forward(layer, x))}, repeats=args.repeats
            )
        print(f"{n:>3} {k:>3} {med['sparse'] * 1e3:>10.2f} {med['dense'] * 1e3:>10.2f} {med['dense'] / med['sparse']:>13.2f}")


if __name__ == "__main__":
    main()
