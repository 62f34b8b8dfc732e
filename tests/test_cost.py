"""Inference cost (B.11): FLOPs against hand counts, capture ratio, memory, hooks and model restored."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from facemoe_model.models import create_model
from facemoe_model.moe import MoELayer, RoutingOverride, moe_layers, override_routing
from moescope.cost import benchmark_model, count_flops, default_grid, flops_table, moe_flops, peak_memory, time_share
from moescope.demo import load_model
from moescope.errors import MoescopeError


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.fixture(scope="module")
def demo_model():
    return load_model("demo:after")


@pytest.mark.parametrize("k", [1, 2, 3])
def test_flops_of_one_moe_layer_equal_the_hand_count(k):
    C, H, E, B, N = 8, 16, 4, 2, 9
    layer = MoELayer(C, H, num_experts=E, k=k, token_grid=(3, 3))
    x = torch.randn(B, N, C, generator=torch.Generator().manual_seed(0))
    T = B * N
    router = 2 * T * C * E
    expert = 2 * C * H + 2 * H * C  # fc1 + fc2, a multiply-add counts 2
    assert count_flops(layer, x) == T * k * expert + router
    table, warnings = flops_table(layer, x)
    assert warnings == []
    topk, dense = table.set_index("routing").loc["top-k"], table.set_index("routing").loc["dense"]
    assert topk.flops_per_image == (T * k * expert + router) / B
    assert dense.flops_per_image == (T * E * expert + router) / B
    assert topk.other_flops_per_image == 0 and dense.other_flops_per_image == 0
    assert dense.relative_to_topk == pytest.approx((E * expert + 2 * C * E) / (k * expert + 2 * C * E))
    assert layer.override is None and _no_hooks(layer)


def test_flops_follow_the_routing_override_and_restore_it():
    layer = MoELayer(8, 16, num_experts=4, k=3, token_grid=(3, 3))
    x = torch.randn(1, 9, 8)
    with override_routing(layer, RoutingOverride(dropped=(0, 1, 2))):  # one expert left: k shrinks to 1
        assert count_flops(layer, x) == 9 * 1 * 4 * 8 * 16 + 2 * 9 * 8 * 4
        assert moe_flops(layer, x)["k"].tolist() == [1]
        table, _ = flops_table(layer, x)
        assert layer.override == RoutingOverride(dropped=(0, 1, 2))
    assert layer.override is None
    assert table.set_index("routing").loc["dense", "flops_per_image"] == 9 * 4 * 4 * 8 * 16 + 2 * 9 * 8 * 4


def test_vit_flops_equal_an_independent_hand_count():
    """Whole one-block ViT: patch conv, qkv, attention, projection, MoE, head — counted by hand."""
    img, patch, C, heads, emb = 32, 8, 24, 3, 16
    model = create_model("facemoe_vit_tiny", img_size=img, patch_size=patch, embed_dim=C, depth=1,
                         num_heads=heads, embedding_dim=emb).eval()
    N, H, E, k = (img // patch) ** 2, 4 * C, 3, 2
    attention = 2 * N * C * 3 * C + 2 * (2 * N * N * C) + 2 * N * C * C  # qkv, QK^T and AV, proj
    moe_topk = N * k * (4 * C * H) + 2 * N * C * E
    moe_dense = N * E * (4 * C * H) + 2 * N * C * E
    other = 2 * N * C * (3 * patch * patch) + attention + 2 * (N * C) * emb  # patch conv, head Linear
    table, warnings = flops_table(model, torch.randn(1, 3, img, img))
    assert warnings == []
    by = table.set_index("routing")
    assert by.loc["top-k", "flops_per_image"] == other + moe_topk
    assert by.loc["dense", "flops_per_image"] == other + moe_dense
    assert by.loc["top-k", "other_flops_per_image"] == other
    # per image: a batch of 3 gives the same per-image count
    assert flops_table(model, torch.randn(3, 3, img, img))[0].equals(table)


def test_bench_on_the_demo_model(demo_model):
    modes = {m: m.training for m in demo_model.modules()}
    result = benchmark_model(demo_model, batch_sizes=(1, 2), repeats=2, warmup=1, min_block_s=0.0, checkpoint="demo:after")
    assert _no_hooks(demo_model)
    assert {m: m.training for m in demo_model.modules()} == modes
    assert result.command == "bench" and result.checkpoints == ["demo:after"]
    lat, over, flops, router = (result.tables[n] for n in ("latency", "capture_overhead", "flops", "router_time"))
    assert len(lat) == 4 and set(lat.capture) == {"off", "routing"} and sorted(set(lat.batch_size)) == [1, 2]
    assert (lat.latency_ms > 0).all() and (lat.throughput_img_per_s > 0).all()
    assert (lat.latency_per_image_ms * lat.batch_size).tolist() == pytest.approx(lat.latency_ms.tolist())
    assert (lat.peak_memory_mb > 0).all() and lat.memory_method.nunique() == 1
    for ratio in over.capture_ratio:
        assert math.isfinite(ratio) and ratio > 0
    assert result.summary["capture_ratio"] == {int(b): r for b, r in zip(over.batch_size, over.capture_ratio)}
    # FLOPs: the analytic MoE part of the demo Swin, read off its layers
    layers = moe_layers(demo_model)
    tokens = {"layers.0": 400, "layers.1": 100, "layers.2": 25}  # 20x20 grid, merged twice
    expected_experts = sum(tokens[n[:8]] * 2 * 4 * l.experts[0].fc1.in_features * l.experts[0].fc1.out_features for n, l in layers.items())
    assert flops.set_index("routing").loc["top-k", "expert_flops_per_image"] == expected_experts
    assert result.summary["dense_over_topk"] > 1 and result.warnings == []
    assert ((router.router_ms > 0) & (router.router_ms < router.moe_ms) & (router.moe_ms < router.forward_ms)).all()
    assert (router.router_share > 0).all() and (router.router_share < 1).all()
    assert result.summary["torch_threads"] == torch.get_num_threads() == lat.threads.iloc[0]
    assert result.to_json()  # JSON-safe


def test_bench_amp_and_channels_last_on_cpu(demo_model):
    result = benchmark_model(demo_model, batch_sizes=(1,), repeats=1, warmup=1, min_block_s=0.0, amp=True,
                             channels_last=True, measure_router=False)
    assert result.settings["amp"] == "bfloat16" and "bfloat16 on CPU" in result.settings["amp_note"]
    assert result.settings["channels_last"] is True
    assert "router_time" not in result.tables
    conv = next(m for m in demo_model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous() and _no_hooks(demo_model)


def test_channels_last_does_not_apply_without_convolutions():
    layer = MoELayer(8, 16, num_experts=3, k=2, token_grid=(2, 2))
    result = benchmark_model(layer, batch_sizes=(1,), repeats=1, warmup=1, min_block_s=0.0, input_shape=(4, 8),
                             channels_last=True, measure_router=False)
    assert result.settings["channels_last"] is False
    assert any("channels_last does not apply" in w for w in result.warnings)


def test_cpu_peak_memory_sees_each_run(demo_model):
    """The peak is per run (not the process lifetime maximum): two runs both see 64 MiB."""
    def allocate():
        t = torch.ones(16 * 2**20)  # 64 MiB, touched
        return float(t[-1])

    first, second = peak_memory(allocate, torch.device("cpu")), peak_memory(allocate, torch.device("cpu"))
    if not first["method"].startswith("process peak RSS"):
        pytest.skip("the peak-RSS reset needs Linux /proc/self/clear_refs")
    for m in (first, second):
        assert m["extra"] >= 60 * 2**20 and m["peak"] >= m["extra"]


def test_time_share_removes_its_hooks_on_error(demo_model):
    x = torch.randn(1, 3, 120, 120)

    def failing():
        demo_model(x)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        time_share(demo_model, failing, torch.device("cpu"), repeats=1)
    assert _no_hooks(demo_model)


def test_bad_settings_are_one_line_errors(demo_model):
    if not torch.cuda.is_available():
        with pytest.raises(MoescopeError, match="CUDA is not available"):
            benchmark_model(demo_model, device="cuda")
    with pytest.raises(MoescopeError, match="batch sizes"):
        benchmark_model(demo_model, batch_sizes=(0,))
    with pytest.raises(MoescopeError, match="no MoE layers"):
        benchmark_model(nn.Linear(2, 2), input_shape=(2,))


def test_default_grid_is_tiny_for_the_official_model_on_cpu():
    small = load_model("demo:after")
    assert default_grid(small, "cpu").batch_sizes == (1, 8, 32)

    with torch.device("meta"):  # the real configuration, no memory allocated
        official = create_model("facemoe_swin_official")
    assert sum(p.numel() for p in official.parameters()) > 400_000_000
    grid = default_grid(official, "cpu")
    assert grid.batch_sizes == (1,) and grid.repeats <= 3
