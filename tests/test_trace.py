"""Routing capture: what the hooks record, and that they always go away."""
from __future__ import annotations

import pytest
import torch

from facemoe_model import create_model, moe_layers
from moescope.trace import RoutingTrace, token_frame


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("facemoe_swin_tiny").eval()


def _hook_count(model) -> int:
    return sum(len(layer.hook_routing._forward_hooks) for layer in moe_layers(model).values())


def test_records_every_layer_with_grids(model):
    x = torch.randn(3, 3, 120, 120)
    with torch.no_grad(), RoutingTrace(model) as trace:
        model(x)
        routing = trace.pop()
    assert list(routing) == list(moe_layers(model))
    grids = [r.grid for r in routing.values()]
    assert grids == [(20, 20), (20, 20), (10, 10), (10, 10), (5, 5), (5, 5)]
    for r in routing.values():
        B, N, k = r.topk.shape
        assert (B, N, k) == (3, r.grid[0] * r.grid[1], 2)
        # rank order: rank-1 expert has the larger logit
        l1 = torch.tensor(r.logits).gather(-1, torch.tensor(r.topk[..., :1]))
        l2 = torch.tensor(r.logits).gather(-1, torch.tensor(r.topk[..., 1:]))
        assert torch.all(l1 >= l2)
        torch.testing.assert_close(torch.tensor(r.probs).sum(-1), torch.ones(B, N))


def test_recorded_routing_matches_layer_output(model):
    """The trace holds exactly what the layer used: re-dispatching it reproduces the layer."""
    x = torch.randn(2, 3, 120, 120)
    layer = moe_layers(model)["layers.0.blocks.0.mlp"]
    inputs = {}
    handle = layer.register_forward_hook(lambda m, i, o: inputs.update(x=i[0], y=o))
    try:
        with torch.no_grad(), RoutingTrace(model, ["layers.0.blocks.0.mlp"]) as trace:
            model(x)
            raw = trace.pop_raw()["layers.0.blocks.0.mlp"]
    finally:
        handle.remove()
    tokens = inputs["x"].reshape(-1, inputs["x"].shape[-1])
    with torch.no_grad():
        again = layer.dispatch(tokens, raw.topk_indices, raw.combine_weights)
    torch.testing.assert_close(again.reshape(inputs["y"].shape), inputs["y"])


def test_hooks_removed_on_exit_and_on_exception(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with RoutingTrace(model):
        assert _hook_count(model) == 6
    assert _hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with RoutingTrace(model):
            assert _hook_count(model) == 6
            raise RuntimeError("boom")
    assert _hook_count(model) == 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_layer_selection_and_unknown_layer(model):
    with RoutingTrace(model, ["layers.2"]) as trace:
        assert list(trace.layers) == ["layers.2.blocks.0.mlp", "layers.2.blocks.1.mlp"]
    with pytest.raises(KeyError, match="unknown MoE layer 'layers.7'"):
        RoutingTrace(model, ["layers.7"])
    assert _hook_count(model) == 0


def test_token_frame_positions(model):
    with torch.no_grad(), RoutingTrace(model, ["layers.1.blocks.0.mlp"]) as trace:
        model(torch.randn(2, 3, 120, 120))
        frame = token_frame(trace.pop(), ["a", "b"])
    assert len(frame) == 2 * 100
    row = frame.iloc[37]
    assert (row["row"], row["col"]) == divmod(37, 10) and row["image"] == "a"
    assert {"expert_rank1", "expert_rank2", "weight_rank1", "prob_expert2"} <= set(frame.columns)


def test_vit_prefix_free_grid():
    torch.manual_seed(1)
    vit = create_model("facemoe_vit_tiny", depth=2).eval()
    with torch.no_grad(), RoutingTrace(vit) as trace:
        vit(torch.randn(1, 3, 112, 112))
        routing = trace.pop()
    assert [r.grid for r in routing.values()] == [(14, 14), (14, 14)]
