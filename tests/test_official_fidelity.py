"""Proof of fidelity to the official FaceMoE network (shared/test-vectors)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from facemoe_model import create_model, load_checkpoint, moe_layers, model_defaults
from facemoe_model.checkpoint import infer_official_config

DATA = Path(__file__).parent / "data"


def _run_with_routes(model, x):
    routes = {}
    handles = [
        layer.hook_routing.register_forward_hook(lambda m, i, o, name=name: routes.__setitem__(name, o))
        for name, layer in moe_layers(model).items()
    ]
    try:
        with torch.no_grad():
            emb = model(x)
    finally:
        for h in handles:
            h.remove()
    return emb, routes


def test_official_vector_embeddings_aux_loss_and_routes(official_vector, official_model_pt):
    model = load_checkpoint(official_model_pt)
    assert model.checkpoint_format == "official"
    assert not model.training
    emb, routes = _run_with_routes(model, official_vector["input"])
    assert (emb - official_vector["embedding"]).abs().max().item() <= 1e-4
    assert math.isclose(model.aux_loss().item(), float(official_vector["aux_loss"]), rel_tol=1e-5)
    assert set(routes) == set(official_vector["routes"])
    for name, expected in official_vector["routes"].items():
        got = routes[name].topk_indices.reshape(expected.shape)
        assert torch.equal(got, expected.long()), name


def test_official_config_inferred_from_keys(official_vector):
    cfg = infer_official_config(official_vector["state_dict"])
    vc = official_vector["config"]
    assert cfg["embed_dim"] == vc["embed_dim"] and list(cfg["depths"]) == vc["depths"]
    assert list(cfg["num_heads"]) == vc["num_heads"] and cfg["window_size"] == vc["window_size"]
    assert cfg["img_size"] == vc["img_size"] and cfg["patch_size"] == vc["patch_size"]
    assert cfg["num_experts"] == vc["num_experts"] and cfg["top_k"] == vc["k"] and cfg["ape"] == vc["ape"]


def test_wrapped_vector_file_loads_directly(official_vector):
    # The vector file wraps the official state_dict under "state_dict": accepted as is.
    model = load_checkpoint(DATA / "official_swin_moe_tiny_vector.pt")
    with torch.no_grad():
        assert (model(official_vector["input"]) - official_vector["embedding"]).abs().max() <= 1e-4


def _full_size_official_keys() -> dict[str, list[int]]:
    return json.loads((DATA / "official_swin_moe_full_keys.json").read_text())


def test_full_size_official_architecture_matches_key_list():
    """Build the 464M-parameter model on the meta device and compare every key and shape."""
    expected = _full_size_official_keys()
    with torch.device("meta"):
        model = create_model("facemoe_swin_official")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    # Official files also store the derived buffers our timm blocks keep non-persistent.
    ours.update({k: list(v.shape) for k, v in model.named_buffers() if k.endswith(("relative_position_index", "attn_mask"))})
    assert ours == expected
    n_params = sum(p.numel() for p in model.parameters())
    assert 460e6 < n_params < 470e6


def test_full_size_config_inferred_from_key_shapes():
    shapes = _full_size_official_keys()
    meta_state = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    cfg = infer_official_config(meta_state)
    defaults = model_defaults("facemoe_swin_official")
    for key in ("img_size", "patch_size", "embed_dim", "window_size", "num_experts", "top_k", "ape"):
        assert cfg[key] == defaults[key], key
    assert tuple(cfg["depths"]) == defaults["depths"] and tuple(cfg["num_heads"]) == defaults["num_heads"]
