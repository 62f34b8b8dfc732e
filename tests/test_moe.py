"""The MoE layer against an independent dense reference, its losses, and the override."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from facemoe_model.moe import MoELayer, RoutingOverride, override_routing


def dense_reference(layer: MoELayer, x: torch.Tensor, indices=None, perm=None) -> torch.Tensor:
    """Every expert on every token, then pick the top-k by router logits (no sparsity)."""
    flat = x.reshape(-1, x.shape[-1])
    logits = flat @ layer.router.gate.weight.T
    all_out = torch.stack([e(flat) for e in layer.experts], dim=1)  # [T, E, C]
    if indices is None:
        indices = logits.topk(layer.k, dim=-1).indices
    if layer.weighting == "logits":
        w = logits.gather(1, indices)
    else:
        w = logits.softmax(-1).gather(1, indices)
        if layer.renormalize:
            w = w / w.sum(-1, keepdim=True)
    run = indices if perm is None else torch.as_tensor(perm)[indices]
    out = (all_out.gather(1, run.unsqueeze(-1).expand(-1, -1, flat.shape[-1])) * w.unsqueeze(-1)).sum(1)
    return out.reshape(x.shape)


@pytest.mark.parametrize("weighting,renorm", [("logits", False), ("softmax", False), ("softmax", True)])
@pytest.mark.parametrize("shape", [(2, 9, 16), (2, 3, 4, 16)])
@pytest.mark.parametrize("experts,k", [(3, 2), (8, 2), (4, 1)])
def test_sparse_dispatch_equals_dense(weighting, renorm, shape, experts, k):
    torch.manual_seed(0)
    layer = MoELayer(16, 32, experts, k, weighting=weighting, renormalize=renorm).eval()
    x = torch.randn(shape)
    torch.testing.assert_close(layer(x), dense_reference(layer, x), atol=1e-5, rtol=1e-5)


def test_official_aux_loss_matches_formula():
    torch.manual_seed(1)
    layer = MoELayer(8, 16, 3, 2)
    x = torch.randn(4, 10, 8)
    layer(x)
    logits = x.reshape(-1, 8) @ layer.router.gate.weight.T
    T, E = logits.shape
    top = logits.topk(2, dim=-1).indices
    importance = logits.softmax(-1).sum(0)
    load = torch.tensor([float(sum(int(e in row) for row in top.tolist())) for e in range(E)])
    expected = 1e-3 * (logits**2).mean() + 1e-2 * E * (importance * load).sum() / T**2
    torch.testing.assert_close(layer.aux_loss, expected)


def test_switch_aux_loss_matches_formula():
    torch.manual_seed(2)
    layer = MoELayer(8, 16, 4, 2, aux_loss="switch")
    x = torch.randn(3, 7, 8)
    layer(x)
    logits = x.reshape(-1, 8) @ layer.router.gate.weight.T
    f = F.one_hot(logits.argmax(-1), 4).float().mean(0)
    p = logits.softmax(-1).mean(0)
    expected = 1e-3 * torch.logsumexp(logits, -1).pow(2).mean() + 1e-2 * 4 * (f * p).sum()
    torch.testing.assert_close(layer.aux_loss, expected)


def _observe(point, layer, x):
    """The layer's output and what its hook point ``point`` received during one forward pass."""
    seen = []
    handle = point.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        out = layer(x)
    finally:
        handle.remove()
    return out, seen[0]


def _routes(layer, x):
    return _observe(layer.hook_routing, layer, x)


def test_hook_sees_what_layer_computed():
    torch.manual_seed(3)
    layer = MoELayer(8, 16, 3, 2).eval()
    x = torch.randn(2, 4, 5, 8)
    out, r = _routes(layer, x)
    assert r.grid == (4, 5) and r.batch_size == 2 and r.tokens_per_image == 20
    logits = x.reshape(-1, 8) @ layer.router.gate.weight.T
    torch.testing.assert_close(r.logits, logits)
    # rank order: the first index holds the larger logit
    assert torch.all(r.logits.gather(1, r.topk_indices[:, :1]) >= r.logits.gather(1, r.topk_indices[:, 1:]))
    torch.testing.assert_close(r.combine_weights, logits.gather(1, r.topk_indices))


def test_drop_experts_receive_no_tokens_and_k_shrinks():
    torch.manual_seed(4)
    layer = MoELayer(8, 16, 3, 2).eval()
    x = torch.randn(2, 30, 8)
    with override_routing(layer, RoutingOverride(dropped=(0,))):
        _, r = _routes(layer, x)
        assert not (r.topk_indices == 0).any() and r.k == 2
    with override_routing(layer, RoutingOverride(dropped=(0, 2))):
        out, r = _routes(layer, x)
        assert layer.effective_k == 1 and r.k == 1 and (r.topk_indices == 1).all()
        torch.testing.assert_close(out, dense_reference(layer, x, indices=torch.ones(60, 1, dtype=torch.long)))
    with pytest.raises(ValueError, match="cannot drop all 3 experts"):
        with override_routing(layer, RoutingOverride(dropped=(0, 1, 2))):
            pass
    with pytest.raises(ValueError, match="expert 5 out of range.*3 experts"):
        with override_routing(layer, RoutingOverride(dropped=(5,))):
            pass


def test_switch_permutes_experts_after_topk():
    torch.manual_seed(5)
    layer = MoELayer(8, 16, 3, 2).eval()
    x = torch.randn(2, 11, 8)
    perm = (1, 2, 0)
    with override_routing(layer, RoutingOverride(permutation=perm)):
        out, r = _routes(layer, x)
    torch.testing.assert_close(r.topk_indices, torch.tensor(perm)[r.router_indices])
    torch.testing.assert_close(out, dense_reference(layer, x, perm=perm))
    assert not torch.allclose(out, layer(x))


def test_random_routing_is_seeded_and_differs_from_router():
    torch.manual_seed(6)
    layer = MoELayer(8, 16, 4, 2).eval()
    x = torch.randn(4, 50, 8)
    with override_routing(layer, RoutingOverride(random_seed=7)):
        a, ra = _routes(layer, x)
    with override_routing(layer, RoutingOverride(random_seed=7)):
        b, rb = _routes(layer, x)
    torch.testing.assert_close(a, b)
    assert torch.equal(ra.topk_indices, rb.topk_indices)
    assert (ra.topk_indices != ra.router_indices).any()
    counts = torch.bincount(ra.topk_indices.flatten(), minlength=4).float()
    assert counts.min() > 0.15 * counts.sum()  # roughly uniform over 4 experts


def test_override_restored_on_exception():
    layer = MoELayer(8, 16, 3, 2)
    with pytest.raises(RuntimeError):
        with override_routing(layer, RoutingOverride(dropped=(1,))):
            assert layer.override is not None
            raise RuntimeError("boom")
    assert layer.override is None


def test_router_gets_gradients_through_logit_weights():
    torch.manual_seed(8)
    layer = MoELayer(8, 16, 3, 2)
    out = layer(torch.randn(2, 5, 8))
    (out.sum() + layer.aux_loss).backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0


# --- route(), the frozen override, timm's Mlp, the shared MoE config --------------------------


def test_route_returns_a_router_output_and_experts_are_timm_mlps():
    from timm.layers import Mlp

    from facemoe_model.moe import RouterOutput

    torch.manual_seed(9)
    layer = MoELayer(8, 16, 3, 2)
    r = layer.route(torch.randn(12, 8), batch_size=3, grid=(2, 2))
    assert isinstance(r, RouterOutput) and r.batch_size == 3 and r.tokens_per_image == 4 and r.grid == (2, 2)
    assert all(type(e) is Mlp for e in layer.experts)
    assert {k.split(".", 2)[2] for k in layer.state_dict() if k.startswith("experts.")} == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_routing_override_holds_no_mutable_state():
    import dataclasses

    o = RoutingOverride(random_seed=3, dropped=(1,))
    assert [f.name for f in dataclasses.fields(o)] == ["dropped", "permutation", "random_seed", "k"]
    assert hash(o) == hash(RoutingOverride(random_seed=3, dropped=(1,)))  # frozen, comparable values only
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.random_seed = 4


@pytest.mark.parametrize("name,grid_tokens", [("facemoe_swin_tiny", None), ("facemoe_vit_tiny", 196)])
def test_swin_and_vit_share_one_moe_config(name, grid_tokens):
    from facemoe_model import MoEConfig, create_model, moe_layers

    model = create_model(name, top_k=1, weighting="softmax", renormalize=True, aux_loss="switch", num_experts=4, depth=2) if "vit" in name \
        else create_model(name, top_k=1, weighting="softmax", renormalize=True, aux_loss="switch", num_experts=4)
    assert model.moe_config == MoEConfig(num_experts=4, top_k=1, weighting="softmax", renormalize=True, aux_loss="switch")
    for layer in moe_layers(model).values():
        assert (layer.num_experts, layer.k, layer.weighting, layer.renormalize, layer.aux_loss_kind) == (4, 1, "softmax", True, "switch")
    with pytest.raises(TypeError, match="no_such_option"):
        create_model(name, no_such_option=1)


# --- random routing: a pure function of (seed, layer, image key, token, expert) ---------------

MASK64 = (1 << 64) - 1


def splitmix_reference(x: int) -> int:
    """splitmix64's step on Python ints (uint64 arithmetic, written from the published constants)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def test_random_scores_are_splitmix64_of_seed_layer_image_token_expert():
    from facemoe_model.moe import random_scores

    seed, salt, keys, tokens, experts = 12345, -987654321987, torch.tensor([0, 7, -3, 2**40]), 5, 3
    scores = random_scores(seed, salt, keys, tokens, experts)
    assert scores.shape == (4 * 5, 3) and (scores >= 0).all()
    base = splitmix_reference(splitmix_reference(seed) ^ (salt & MASK64))
    for b, key in enumerate(keys.tolist()):
        image = splitmix_reference(base ^ (key & MASK64))
        for t in range(tokens):
            for e in range(experts):
                assert scores[b * tokens + t, e].item() == splitmix_reference(image ^ (t * experts + e)) >> 1


def _random_topk(layer, x, keys=None):
    from facemoe_model.moe import sample_keys

    with sample_keys(layer, keys):
        return _routes(layer, x)[1].topk_indices.reshape(len(x), -1, layer.effective_k)


def test_random_routing_does_not_depend_on_batching():
    from facemoe_model.moe import sample_keys

    torch.manual_seed(10)
    layer = MoELayer(8, 16, 4, 2).eval()
    x = torch.randn(12, 9, 8)
    with override_routing(layer, RoutingOverride(random_seed=5, dropped=(3,))):
        whole = _random_topk(layer, x)
    with override_routing(layer, RoutingOverride(random_seed=5, dropped=(3,))):
        pieces = torch.cat([_random_topk(layer, x[a:b]) for a, b in ((0, 1), (1, 5), (5, 12))])
    assert torch.equal(whole, pieces) and not (whole == 3).any()
    order = torch.randperm(12)
    with override_routing(layer, RoutingOverride(random_seed=5, dropped=(3,))):
        shuffled = _random_topk(layer, x[order], keys=order)  # explicit keys: the images' own numbers
    assert torch.equal(shuffled, whole[order])
    with override_routing(layer, RoutingOverride(random_seed=6, dropped=(3,))):
        other_seed = _random_topk(layer, x)
    assert (other_seed != whole).float().mean() > 0.3
    with pytest.raises(ValueError, match="3 keys for a batch of 12"):
        with override_routing(layer, RoutingOverride(random_seed=5)), sample_keys(layer, [0, 1, 2]):
            layer(x)


def test_random_routing_differs_between_layers_and_restores_exactly():
    from facemoe_model import create_model, moe_layers

    torch.manual_seed(11)
    model = create_model("facemoe_vit_tiny", depth=2).eval()
    first, second = moe_layers(model)
    seen = {}
    handles = [layer.hook_routing.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.topk_indices))
               for n, layer in moe_layers(model).items()]
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad(), override_routing(model, RoutingOverride(random_seed=1)):
        model(x)
        layer = moe_layers(model)[first]
        state = (layer.override, layer._images_seen, layer.random_salt)
        with override_routing(model, RoutingOverride(dropped=(0,)), layers=[first]):
            model(x)
        assert (layer.override, layer._images_seen, layer.random_salt) == state  # the outer override continues
    for h in handles:
        h.remove()
    assert layer.override is None and layer.random_salt == 0
    assert (seen[first] != seen[second]).any()  # layer names salt the draws


# --- the per-expert output hook point -------------------------------------------------------


def _expert_outputs(layer, x):
    return _observe(layer.hook_expert_outputs, layer, x)


def test_expert_outputs_hook_k1_norms_add_up_and_unused_experts_are_zero():
    torch.manual_seed(12)
    layer = MoELayer(8, 16, 3, 1).eval()
    x = torch.randn(2, 3, 4, 8)
    out, rec = _expert_outputs(layer, x)
    assert rec.contributions.shape == (24, 3, 8) and rec.batch_size == 2 and rec.grid == (3, 4)
    flat = out.reshape(-1, 8)
    torch.testing.assert_close(rec.contributions.norm(dim=-1).sum(-1), flat.norm(dim=-1))
    ran = torch.zeros(24, 3, dtype=torch.bool).scatter_(1, rec.topk_indices, True)
    assert (rec.contributions[~ran] == 0).all() and (rec.contributions[ran].norm(dim=-1) > 0).all()


@pytest.mark.parametrize("override", [None, RoutingOverride(permutation=(2, 0, 1)), RoutingOverride(dropped=(1,))])
def test_expert_outputs_sum_to_the_layer_output_and_match_a_dense_reference(override):
    torch.manual_seed(13)
    layer = MoELayer(8, 16, 3, 2).eval()
    x = torch.randn(2, 7, 8)
    with override_routing(layer, override or RoutingOverride()):
        out, rec = _expert_outputs(layer, x)
        routing = _routes(layer, x)[1]
    flat = x.reshape(-1, 8)
    expected = torch.zeros(14, 3, 8)
    for t in range(14):
        for e, w in zip(routing.topk_indices[t].tolist(), routing.combine_weights[t]):
            expected[t, e] += w * layer.experts[e](flat[t])
    torch.testing.assert_close(rec.contributions, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rec.contributions.sum(1), out.reshape(-1, 8), atol=1e-6, rtol=1e-5)


def test_expert_outputs_are_computed_only_when_observed(monkeypatch):
    layer = MoELayer(8, 16, 3, 2).eval()
    calls = []
    original = layer._dispatch
    monkeypatch.setattr(layer, "_dispatch", lambda *a, contributions: calls.append(contributions) or original(*a, contributions=contributions))
    x = torch.randn(1, 5, 8)
    plain = layer(x)
    observed, _ = _expert_outputs(layer, x)
    assert calls == [False, True] and torch.equal(plain, observed)


# --- ExpertUsage: the one expert-usage counter ------------------------------------------------


def test_expert_usage_counts_grid_tokens_as_an_independent_count():
    from facemoe_model.hooks import ExpertUsage

    torch.manual_seed(14)
    layer = MoELayer(8, 16, 4, 2, token_grid=(2, 3), num_prefix_tokens=1).eval()
    xs = [torch.randn(3, 7, 8), torch.randn(2, 7, 8)]
    with ExpertUsage(layer) as usage:
        for x in xs:
            layer(x)
    expected = torch.zeros(4, dtype=torch.int64)
    for x in xs:  # router top-k recomputed from the weights, prefix token (position 0) left out
        logits = x[:, 1:].reshape(-1, 8) @ layer.router.gate.weight.T
        expected += torch.bincount(logits.topk(2, -1).indices.flatten(), minlength=4)
    assert usage.counts[""].tolist() == expected.tolist() and usage.total.tolist() == expected.tolist()
    assert usage.counts[""].sum() == 2 * (3 + 2) * 6
    torch.testing.assert_close(torch.as_tensor(usage.shares()[""]), expected.double() / expected.sum())
    assert not layer.hook_routing._forward_hooks  # removed on exit; counts kept
    usage.reset()
    assert usage.counts[""].tolist() == [0, 0, 0, 0] and all(map(__import__("math").isnan, usage.shares()[""]))


def test_expert_usage_training_only_and_hooks_removed_on_error():
    from facemoe_model.hooks import ExpertUsage

    layer = MoELayer(8, 16, 3, 2)
    x = torch.randn(2, 5, 8)
    with ExpertUsage(layer, training_only=True) as usage:
        layer.eval()(x)
        assert usage.counts[""].sum() == 0
        layer.train()(x)
        assert usage.counts[""].sum() == 2 * 5 * 2
    with pytest.raises(RuntimeError):
        with ExpertUsage(layer):
            raise RuntimeError("boom")
    assert not layer.hook_routing._forward_hooks
