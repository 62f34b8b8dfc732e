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


def _routes(layer, x):
    seen = []
    handle = layer.hook_routing.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        out = layer(x)
    finally:
        handle.remove()
    return out, seen[0]


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
