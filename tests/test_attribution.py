"""Gradient attributions (moescope.attribution): per-expert Grad-CAM on a hand-built toy MoE with
an analytic answer, Integrated Gradients completeness on the demo model, and cleanliness."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from facemoe_model.moe import HookPoint
from moescope.attribution import CosineScore, ExpertTap, embed, expert_gradcam, grid_contributions, input_attribution

DEMO_IMAGES = Path(__file__).resolve().parents[1] / "facemoe_model" / "assets" / "demo" / "images"


class ToyMoE(nn.Module):
    """Linear experts with fixed routing on a ``rows x cols`` grid, optionally after a prefix token.

    Expert ``e`` maps a token ``x_n`` to ``W_e x_n``; token ``n`` runs the experts ``route[n]``
    with weights ``gate[n]``. The per-expert contributions ``[B, E, N, C]`` go through
    ``hook_expert_outputs`` (observed only: the output is computed without its return value),
    and the output is their sum (plus a prefix token when ``prefix``).
    """

    def __init__(self, grid=(3, 4), cin=5, c=6, experts=3, k=2, prefix=False, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = grid[0] * grid[1]
        self.token_grid, self.num_experts = grid, experts
        self.num_prefix_tokens = int(prefix)
        self.weight = nn.Parameter(torch.randn(experts, c, cin, generator=g, dtype=torch.float64))
        self.register_buffer("route", torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(n)]))
        self.register_buffer("gate", torch.randn(n, k, generator=g, dtype=torch.float64))
        self.hook_expert_outputs = HookPoint()

    def contributions(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x[:, self.num_prefix_tokens:]
        out = torch.einsum("eci,bni->benc", self.weight, tokens)
        mask = torch.zeros(tokens.shape[1], self.num_experts, dtype=x.dtype)
        mask.scatter_(1, self.route, self.gate)
        return out * mask.T[None, :, :, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        contrib = self.contributions(x)
        self.hook_expert_outputs(contrib)
        y = contrib.sum(1)
        if self.num_prefix_tokens:
            y = torch.cat([y.new_full((y.shape[0], 1, y.shape[-1]), 1.5), y], dim=1)
        return y


def tap_for(toy: ToyMoE) -> ExpertTap:
    return ExpertTap.for_moe_layer(toy, read=lambda contributions: contributions)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_clean(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks, name
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert all(p.grad is None for p in model.parameters())


# -- Grad-CAM --------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", [False, True])
def test_gradcam_of_linear_toy_equals_analytic_value(prefix):
    toy = ToyMoE(prefix=prefix).double()
    rows, cols = toy.token_grid
    n, c = rows * cols, 6
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, n + toy.num_prefix_tokens, 5, generator=g, dtype=torch.float64)
    v = torch.randn(n + toy.num_prefix_tokens, c, generator=g, dtype=torch.float64)
    score = lambda inp: (toy(inp) * v).sum((1, 2))  # noqa: E731  linear: d score / d A_e[n, c] = v[n, c]
    before = state(toy)
    maps = expert_gradcam(score, x, tap_for(toy), relu=False)
    relu_maps = expert_gradcam(score, x, tap_for(toy))
    assert maps.shape == (2, 3, rows, cols)
    # analytic: alpha_c = mean_n v[n, c] over the grid tokens; map_e[n] = sum_c alpha_c A_e[b, n, c]
    contrib = toy.contributions(x).detach().numpy()  # [B, E, N, C]
    alpha = v[toy.num_prefix_tokens:].numpy().mean(0)
    expected = np.einsum("benc,c->ben", contrib, alpha).reshape(2, 3, rows, cols)
    np.testing.assert_allclose(maps.numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(relu_maps.numpy(), np.maximum(expected, 0.0), rtol=1e-10, atol=1e-12)
    # zero exactly where the expert did not run
    ran = np.zeros((n, 3), bool)
    ran[np.arange(n)[:, None], toy.route.numpy()] = True
    assert (maps.numpy().reshape(2, 3, n)[:, ~ran.T] == 0).all()
    assert_clean(toy, before)


def test_gradcam_gradient_is_the_true_gradient_of_a_nonlinear_score():
    """With a non-linear score the map uses d score / d A_e from autograd on the contributions."""
    toy = ToyMoE(seed=3).double()
    rows, cols = toy.token_grid
    x = torch.randn(3, rows * cols, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    score = lambda inp: torch.tanh(toy(inp)).pow(2).sum((1, 2))  # noqa: E731
    maps = expert_gradcam(score, x, tap_for(toy), experts=[2, 0], relu=False)
    contrib = toy.contributions(x).detach().requires_grad_()
    s = torch.tanh(contrib.sum(1)).pow(2).sum((1, 2))
    (grad,) = torch.autograd.grad(s.sum(), contrib)  # [B, E, N, C]
    alpha = grad.mean(2, keepdim=True)
    expected = (alpha * contrib).sum(-1).detach().reshape(3, 3, rows, cols)[:, [2, 0]]
    np.testing.assert_allclose(maps.numpy(), expected.numpy(), rtol=1e-10, atol=1e-12)


def test_splice_leaves_forward_values_bit_identical_and_cleans_up_on_error():
    from moescope.attribution import _GridSplice

    toy = ToyMoE(prefix=True).double()
    before = state(toy)
    x = torch.randn(2, 13, 5, dtype=torch.float64)
    plain = toy(x)
    with _GridSplice(tap_for(toy)):
        spliced = toy(x)
    assert torch.equal(plain, spliced)
    broken = ExpertTap(toy, toy.hook_expert_outputs, lambda c: c[:, :2], toy.token_grid, toy.num_experts, 1)
    with pytest.raises(RuntimeError, match="do not match"):
        expert_gradcam(lambda inp: toy(inp).sum((1, 2)), x, broken)
    assert_clean(toy, before)


def test_captum_nchw_requirement_and_interpolation():
    """Why the NCHW view: captum's LayerGradCam on a [B, N, C] token output averages over C and
    sums over N, returning [B, 1, C]; on our [B, C, rows, cols] view it returns a token map
    that LayerAttribution.interpolate upsamples."""
    from captum.attr import LayerAttribution, LayerGradCam

    toy = ToyMoE().double()
    x = torch.randn(2, 12, 5, dtype=torch.float64)
    score = lambda inp: toy(inp).pow(2).sum((1, 2))  # noqa: E731
    naive = LayerGradCam(score, toy).attribute(x)
    assert naive.shape == (2, 1, 6)  # one value per channel: not a map
    maps = expert_gradcam(score, x, tap_for(toy), experts=[1])
    assert maps.shape == (2, 1, 3, 4)
    assert LayerAttribution.interpolate(maps, (30, 40), "bilinear").shape == (2, 1, 30, 40)


def test_tap_needs_the_hook_point():
    with pytest.raises(ValueError, match="no hook_expert_outputs"):
        ExpertTap.for_moe_layer(nn.Linear(2, 2), read=lambda c: c)


# -- the score and input attributions on the demo model --------------------------------------
@pytest.fixture(scope="module")
def demo():
    import cv2

    from facemoe_model.data.datasets import preprocess
    from moescope.demo import load_model

    model = load_model("demo:after").eval()
    paths = sorted(DEMO_IMAGES.glob("*/*.png"))[::40]  # 4 faces, 4 identities
    images = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]
    return model, torch.stack([preprocess(im, model.img_size) for im in images])


def test_cosine_score_references(demo):
    model, x = demo
    ref = embed(model, x)
    score = CosineScore(model)
    with torch.no_grad():
        own = score(x, ref)
        mate = score(x, ref.roll(1, 0))
    np.testing.assert_allclose(own.numpy(), 1.0, atol=1e-5)
    assert (mate < 0.999).all()
    with pytest.raises(ValueError, match="do not match"):
        score(x, ref[:2])
    model.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            score(x, ref)
    finally:
        model.eval()


def test_gradcam_on_demo_moe_layer_matches_direct_autograd(demo):
    """Through the layer's own hook_expert_outputs: the map equals ReLU(sum_c alpha_c A_e) with
    alpha from autograd on the layer output (d y / d A_e = identity), is zero where the expert
    did not run, and leaves the model untouched (hooks gone, parameters and outputs unchanged)."""
    model, x = demo
    name = "layers.1.blocks.0.mlp"
    layer = model.get_submodule(name)
    before = state(model)
    with torch.no_grad():
        plain = model(x)
    mate = embed(model, x).roll(1, 0)  # gallery-mate style reference (another identity)
    score = CosineScore(model)
    maps = expert_gradcam(score, x, ExpertTap.for_moe_layer(layer), args=(mate,))
    rows, cols = layer.token_grid
    assert maps.shape == (4, layer.num_experts, rows, cols)
    assert_clean(model, before)
    with torch.no_grad():
        assert torch.equal(model(x), plain)

    seen = {}
    handles = [
        layer.hook_expert_outputs.register_forward_hook(lambda m, i, o: seen.update(c=grid_contributions(o).detach(), topk=o.topk_indices)),
        layer.register_forward_hook(lambda m, i, o: seen.update(y=o)),
    ]
    try:
        s = score(x, mate)
        (grad,) = torch.autograd.grad(s.sum(), seen["y"])  # [B, N, C]
    finally:
        for h in handles:
            h.remove()
    alpha = grad.mean(1)  # [B, C]
    expected = torch.relu(torch.einsum("benc,bc->ben", seen["c"], alpha)).reshape(maps.shape)
    scale = expected.abs().max()
    assert scale > 0
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-5 * scale.item())
    ran = torch.zeros(4 * rows * cols, layer.num_experts, dtype=torch.bool)
    ran.scatter_(1, seen["topk"], True)
    ran = ran.reshape(4, rows * cols, -1).transpose(1, 2).reshape(maps.shape)
    assert (maps[~ran] == 0).all()
    assert_clean(model, before)


def test_integrated_gradients_completeness_on_demo(demo):
    """Completeness: sum of attributions = score(x) - score(baseline) up to captum's delta.

    Stated tolerance: |delta| <= 3% of |score(x) - score(baseline)| with 32 Gauss-Legendre steps
    (measured 1.3-2.0% on these faces, unchanged from 16 to 128 steps). The residual is the
    top-k routing: along the path from the grey baseline, tokens switch experts (~1 in 4 of
    4000 path steps changes some token's expert set) and each switch is a jump the integrated
    gradient cannot see. With every expert running (k = E, no switching) the score is smooth
    and completeness holds to float32 precision: |delta| <= 1e-5 |gap|.
    """
    from facemoe_model.moe import RoutingOverride, override_routing

    model, x = demo
    before = state(model)
    score = CosineScore(model)
    ref = embed(model, x)
    out = input_attribution(score, x, args=(ref,), n_steps=32)
    gap = out.score - out.baseline_score
    assert out.attributions.shape == x.shape
    np.testing.assert_allclose(out.score.numpy(), 1.0, atol=1e-5)
    assert (gap.abs() > 0.3).all()
    np.testing.assert_allclose((out.attributions.sum((1, 2, 3)) - gap).numpy(), out.delta.numpy(), atol=1e-5)
    assert (out.delta.abs() <= 0.03 * gap.abs()).all(), (out.delta / gap).tolist()
    with override_routing(model, RoutingOverride(k=model.get_submodule("layers.0.blocks.0.mlp").num_experts)):
        ref_all = embed(model, x)
        smooth = input_attribution(score, x, args=(ref_all,), n_steps=32)
    smooth_gap = smooth.score - smooth.baseline_score
    assert (smooth.delta.abs() <= 1e-5 * smooth_gap.abs() + 1e-6).all(), smooth.delta.tolist()
    assert out.pixel_map().shape == (4, *x.shape[2:])
    assert_clean(model, before)


def test_input_x_gradient_and_the_self_reference_trap(demo):
    """At the clean image the self-reference cosine is at its maximum: its gradient (hence
    InputXGradient and Grad-CAM) vanishes; a gallery mate's reference gives a real gradient."""
    model, x = demo
    before = state(model)
    score = CosineScore(model)
    ref = embed(model, x)
    own = input_attribution(score, x, args=(ref,), method="input_x_gradient")
    mate = input_attribution(score, x, args=(ref.roll(1, 0),), method="input_x_gradient")
    assert own.delta is None and own.attributions.shape == x.shape
    assert (own.attributions.abs().sum((1, 2, 3)) < 1e-4).all()
    assert (mate.attributions.abs().sum((1, 2, 3)) > 100 * own.attributions.abs().sum((1, 2, 3))).all()
    with pytest.raises(ValueError, match="unknown attribution method"):
        input_attribution(score, x, args=(ref,), method="saliency")
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        input_attribution(score, x, args=(ref,))
    assert_clean(model, before)
