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


# --- the forward helper (moescope.forward) ---------------------------------------------------


def _faces(n: int):
    import numpy as np
    import skimage.data

    grey = np.round(skimage.data.lfw_subset()[:n] * 255).astype(np.uint8)
    return [np.repeat(face[..., None], 3, axis=2) for face in grey]


def test_forward_passes_without_grad_equal_a_plain_traced_pass(model):
    from facemoe_model.data.images import preprocess
    from moescope.forward import forward_passes

    x = torch.stack([preprocess(face, model.img_size) for face in _faces(3)])
    with torch.no_grad(), RoutingTrace(model) as trace:
        expected_out = model(x)
        expected = trace.pop()
    other = create_model("facemoe_swin_tiny").eval()
    steps = list(forward_passes([model, other], [x, x[:2]], features=["norm"]))
    assert [s.batch.shape[0] for s in steps] == [3, 2] and all(len(s.passes) == 2 for s in steps)
    first = steps[0].passes[0]
    assert torch.equal(first.outputs, expected_out) and not first.outputs.requires_grad
    assert list(first.routing) == list(expected)
    for name, r in expected.items():
        assert (first.routing[name].topk == r.topk).all()
    assert first.features["norm"].shape[0] == 3
    assert _hook_count(model) == _hook_count(other) == 0
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_forward_passes_hand_the_heap_back_by_the_clock(model, monkeypatch):
    import moescope.forward as forward

    calls = []
    monkeypatch.setattr(forward, "release_free_memory", lambda: calls.append(1))
    monkeypatch.setattr(forward, "_next_hand_back", None)
    x = torch.zeros(2, 3, model.img_size, model.img_size)
    monkeypatch.setattr(forward, "HAND_BACK_EVERY_S", 0.0)
    for _ in range(3):  # one call per batch, as attack and degrade make: the clock spans calls
        list(forward.forward_passes([model], [x, x]))
    assert len(calls) == 5  # every batch but the one that starts the clock
    monkeypatch.setattr(forward, "HAND_BACK_EVERY_S", 3600.0)
    monkeypatch.setattr(forward, "_next_hand_back", None)
    list(forward.forward_passes([model], [x] * 4))
    assert len(calls) == 5


def test_forward_passes_grad_path_and_restored_modes():
    from facemoe_model.data.images import normalise, to_unit_tensor
    from moescope.forward import forward_passes

    torch.manual_seed(0)
    model = create_model("facemoe_swin_tiny").train()
    x01 = torch.stack([to_unit_tensor(face, model.img_size) for face in _faces(2)]).requires_grad_()
    for keep_graph in (False, True):
        (step,) = list(forward_passes([model], [normalise(x01)], features=["norm"], grad=True, keep_graph=keep_graph))
        (p,) = step.passes
        assert p.inputs.requires_grad and p.outputs.requires_grad
        assert p.features["norm"].requires_grad == keep_graph  # captured tensors detached unless asked
        assert all(r.topk.shape[0] == 2 for r in p.routing.values())
        x01.grad = None
        p.outputs.sum().backward()
        assert x01.grad is not None and x01.grad.abs().sum() > 0  # gradients reach the [0, 1] image
        assert all(m.training for m in model.modules())  # ran in eval mode, train mode restored
    with torch.no_grad():
        model.eval()
        reference = model(normalise(x01))
    model.train()
    (step,) = list(forward_passes([model], [normalise(x01).detach()], grad=True))
    torch.testing.assert_close(step.passes[0].outputs.detach(), reference)  # same numbers as inference


def test_forward_passes_restore_model_when_the_forward_fails():
    from moescope.forward import forward_passes

    torch.manual_seed(0)
    model = create_model("facemoe_swin_tiny").train()

    def fail(x):
        raise RuntimeError("boom")

    model.layers[1].blocks[0].forward = fail
    with pytest.raises(RuntimeError, match="boom"):
        list(forward_passes([model], [torch.zeros(1, 3, 120, 120)], features=["norm"]))
    assert all(m.training for m in model.modules())
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_forward_passes_hold_numpy_blas_to_one_thread_and_restore_it(model):
    """While the model runs, numpy's BLAS runs on one thread (its idle pool spins and takes a core
    from the model); afterwards, and after a failed forward, it is as it was. torch's threads
    are not touched."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from moescope.forward import forward_passes

    numpy_blas = [lib for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas" and "numpy" in lib["filepath"]]
    if not numpy_blas:
        pytest.skip("numpy's BLAS is not one threadpoolctl controls here")
    path = numpy_blas[0]["filepath"]

    def numpy_threads() -> int:
        return next(lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["filepath"] == path)

    x = torch.zeros(2, 3, model.img_size, model.img_size)
    torch_threads = torch.get_num_threads()
    with threadpoolctl.threadpool_limits(limits={path: 2}):
        before = numpy_threads()
        seen = [(numpy_threads(), torch.get_num_threads()) for _ in forward_passes([model], [x, x])]
        assert seen == [(1, torch_threads)] * 2
        assert numpy_threads() == before

        def fail(x):
            raise RuntimeError("boom")

        broken = create_model("facemoe_swin_tiny").eval()
        broken.layers[1].blocks[0].forward = fail
        with pytest.raises(RuntimeError, match="boom"):
            list(forward_passes([broken], [x]))
        assert numpy_threads() == before
