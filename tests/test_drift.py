"""Drift between checkpoints (`moescope cka`, B.12-B.14) on real face crops and small models."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import skimage.data
import torch

from facemoe_model import create_model, load_checkpoint, moe_layers, save_checkpoint
from facemoe_model.data.images import list_images, preprocess, read_image
from moescope.cli import main
from moescope.features import drift_layers
from moescope.runners.drift import analyse_drift, expert_shift
from moescope.stats.cka import hsic1, layer_features, zero_diagonal_gram

SWIN_TINY_LAYERS = [
    "patch_embed", "layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0", "layers.1.blocks.1",
    "layers.2.blocks.0", "layers.2.blocks.1", "norm", "feature_layer",
]


def write_faces(folder, count, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i, face in enumerate(skimage.data.lfw_subset()[start : start + count]):
        cv2.imwrite(str(folder / f"{start + i:03d}.png"), (face * 255).astype(np.uint8))
    return folder


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """8 real LFW face crops (25x25 grey PNGs)."""
    return list_images(write_faces(tmp_path_factory.mktemp("faces"), 8))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(create_model("facemoe_swin_tiny"), tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def drifted_ckpt(ckpt):
    """The tiny model with every weight perturbed by seeded noise (a stand-in for fine-tuning)."""
    model = load_checkpoint(ckpt)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * p.std().nan_to_num(0.02) * torch.randn(p.shape, generator=gen))
    return save_checkpoint(model, ckpt.parent / "drifted.pt")


def drift(a, b, paths, **kwargs):
    result = analyse_drift(a, b, ["a", "b"], paths, progress=False, **kwargs)
    assert set(result.figures) == {"cka_by_depth"}
    return result


@pytest.mark.parametrize("kind", ["moescope", "official", "vit"])
def test_model_with_itself(kind, ckpt, official_model_pt, faces, tmp_path):
    if kind == "vit":
        torch.manual_seed(0)
        path = save_checkpoint(create_model("facemoe_vit_tiny", depth=2), tmp_path / "vit.pt")
    else:
        path = ckpt if kind == "moescope" else official_model_pt
    a, b = load_checkpoint(path), load_checkpoint(path)  # two separate copies of one checkpoint
    result = drift(a, b, faces, batch_size=4)
    table = result.tables["cka"]
    expected = SWIN_TINY_LAYERS if kind != "vit" else ["patch_embed", "blocks.0", "blocks.1", "norm", "feature_layer"]
    assert table["layer"].tolist() == expected
    assert np.allclose(table["cka"], 1.0, rtol=0, atol=1e-9)
    assert (table["images"] == 8).all() and (table["batches"] == 2).all()
    assert (result.tables["expert_shift"]["l2_shift"] == 0).all()
    assert (result.tables["expert_shift_total"]["shift_pct"] == 0).all()
    routing = result.tables["routing_agreement"]
    assert routing["layer"].tolist() == list(moe_layers(a))
    assert (routing["top1_agreement"] == 1).all() and (routing["topk_agreement"] == 1).all()
    assert len(result.tables["lowest_cka"]) == 5
    if kind == "moescope":  # the figure is drawn when asked for (or saved), as a pyplot-free Figure
        from matplotlib.figure import Figure

        assert callable(result.figures["cka_by_depth"]) and isinstance(result.figure("cka_by_depth"), Figure)


def reference_layer_outputs(model, x):
    """Every compared layer's output, computed by calling the Swin parts in order (no hooks)."""
    with torch.inference_mode():
        out = {"patch_embed": model.patch_embed(x)}
        h = model.forward_patch_embed(x)  # with the absolute position embedding
        out["patch_embed+ape"] = h
        for i, stage in enumerate(model.layers):
            for j, block in enumerate(stage.blocks):
                h = out[f"layers.{i}.blocks.{j}"] = block(h)
            if stage.downsample is not None:
                h = stage.downsample(h)
        h = out["norm"] = model.norm(h)
        out["feature_layer"] = model.feature_layer(h.flatten(1))
    return out


def reference_cka(x, y, batch, mode):
    sums = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(x), batch):
        k = zero_diagonal_gram(layer_features(x[start : start + batch], mode))
        l = zero_diagonal_gram(layer_features(y[start : start + batch], mode))
        sums += torch.stack([hsic1(k, l), hsic1(k, k), hsic1(l, l)])
    return float(sums[0] / (sums[1] * sums[2]).sqrt())


@pytest.mark.parametrize("mode", ["flatten", "mean"])
def test_streaming_equals_reference_on_all_images_at_once(mode, ckpt, drifted_ckpt, faces):
    a, b = load_checkpoint(ckpt), load_checkpoint(drifted_ckpt)
    images = torch.stack([preprocess(read_image(p), a.img_size) for p in faces])
    ref_a, ref_b = reference_layer_outputs(a, images), reference_layer_outputs(b, images)  # one batch of 8
    for batch_size in (4, 8):
        result = drift(a, b, faces, features=mode, batch_size=batch_size)
        got = dict(zip(result.tables["cka"]["layer"], result.tables["cka"]["cka"]))
        expected = {name: reference_cka(ref_a[name], ref_b[name], batch_size, mode) for name in SWIN_TINY_LAYERS}
        assert got == pytest.approx(expected, abs=1e-6)
        assert min(got.values()) < 0.99  # a real drift, so the comparison is not vacuous
        # the absolute position embedding is a shift shared by all images: CKA ignores it
        with_ape = reference_cka(ref_a["patch_embed+ape"], ref_b["patch_embed+ape"], batch_size, mode)
        assert with_ape == pytest.approx(got["patch_embed"], abs=1e-6)


def test_hooks_removed_and_modes_restored_on_exception(ckpt, faces):
    a, b = load_checkpoint(ckpt), load_checkpoint(ckpt)
    a.train()
    hooks_before = [sum(len(m._forward_hooks) for m in model.modules()) for model in (a, b)]

    def fail(x):
        raise RuntimeError("boom in layers.1.blocks.0")

    b.layers[1].blocks[0].forward = fail
    with pytest.raises(RuntimeError, match="boom"):
        drift(a, b, faces, batch_size=4)
    assert [sum(len(m._forward_hooks) for m in model.modules()) for model in (a, b)] == hooks_before == [0, 0]
    assert all(m.training for m in a.modules()) and not any(m.training for m in b.modules())


def test_expert_shift_of_a_hand_made_perturbation(ckpt):
    a = load_checkpoint(ckpt)
    b = copy.deepcopy(a)
    target = "layers.1.blocks.1.mlp"
    weight = moe_layers(b)[target].experts[2].fc2.weight
    delta = torch.full_like(weight, 0.25)
    with torch.no_grad():
        weight += delta
    per_layer, total = expert_shift(a, b)
    per_layer = per_layer.set_index(["layer", "expert"])
    assert per_layer.loc[(target, 2), "l2_shift"] == pytest.approx(delta.double().norm().item(), rel=1e-6)
    assert (per_layer.drop(index=(target, 2))["l2_shift"] == 0).all()
    own_norm = torch.cat([p.detach().double().flatten() for p in moe_layers(a)[target].experts[2].parameters()]).norm().item()
    assert per_layer.loc[(target, 2), "shift_pct"] == pytest.approx(100 * delta.norm().item() / own_norm, rel=1e-6)
    total = total.set_index("expert")
    every_expert2 = torch.cat([p.detach().double().flatten() for layer in moe_layers(a).values() for p in layer.experts[2].parameters()])
    assert total.loc[2, "l2_shift"] == pytest.approx(delta.double().norm().item(), rel=1e-6)
    assert total.loc[2, "shift_pct"] == pytest.approx(100 * delta.norm().item() / every_expert2.norm().item(), rel=1e-6)
    assert (total.loc[[0, 1], "l2_shift"] == 0).all() and (total["layers"] == 6).all()


def test_routing_agreement_after_reversing_one_router(ckpt, faces):
    a = load_checkpoint(ckpt)
    b = copy.deepcopy(a)
    target = "layers.1.blocks.0.mlp"
    with torch.no_grad():
        moe_layers(b)[target].router.gate.weight.neg_()  # top-1 becomes the least likely expert
    result = drift(a, b, faces, batch_size=4)
    routing = result.tables["routing_agreement"].set_index("layer")
    upstream = ["layers.0.blocks.0.mlp", "layers.0.blocks.1.mlp"]
    assert (routing.loc[upstream, ["top1_agreement", "topk_agreement"]] == 1).all().all()
    # 3 experts, k=2: the two largest of the negated logits are never the two largest of the logits
    assert routing.loc[target, "top1_agreement"] == 0 and routing.loc[target, "topk_agreement"] == 0
    assert result.summary["routing_top1_agreement"] < 1
    cka = result.tables["cka"].set_index("layer")["cka"]
    assert np.allclose(cka[["patch_embed", "layers.0.blocks.0", "layers.0.blocks.1"]], 1.0, atol=1e-9)
    assert cka["layers.1.blocks.0"] < 1 - 1e-6
    assert (result.tables["expert_shift"]["l2_shift"] == 0).all()  # routers are not experts


@pytest.mark.parametrize("policy,analysed,batches", [("fold", 9, 2), ("drop", 8, 2)])
def test_short_last_batch(policy, analysed, batches, ckpt, tmp_path):
    paths = list_images(write_faces(tmp_path, 9))  # 4 + 4 + 1
    result = drift(load_checkpoint(ckpt), load_checkpoint(ckpt), paths, batch_size=4, last_batch=policy)
    assert result.summary["images_analysed"] == analysed and result.summary["batches"] == batches
    assert result.summary["images_dropped"] == 9 - analysed
    assert ("folded" if policy == "fold" else "dropped") in result.settings["last_batch_note"]
    assert any(("folded" if policy == "fold" else "dropped") in w for w in result.warnings)


def test_layer_names_follow_the_model():
    assert drift_layers(create_model("facemoe_swin_tiny")) == SWIN_TINY_LAYERS


def test_command_json_and_files(ckpt, drifted_ckpt, faces, tmp_path):
    data = faces[0].parent
    (data / "broken.png").write_bytes(b"\x89PNG but not really")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "moescope", "cka", ckpt, drifted_ckpt, "--data", data, "--batch-size", "4",
             "--json", "--out", tmp_path / "out"],
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    finally:
        (data / "broken.png").unlink()
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert result["command"] == "cka" and result["checkpoints"] == [str(ckpt), str(drifted_ckpt)]
    assert set(result["tables"]) == {"cka", "lowest_cka", "expert_shift", "expert_shift_total", "routing_agreement"}
    assert [r["layer"] for r in result["tables"]["cka"]] == SWIN_TINY_LAYERS
    lowest = [r["cka"] for r in result["tables"]["lowest_cka"]]
    assert lowest == sorted(lowest) and lowest[0] == min(r["cka"] for r in result["tables"]["cka"])
    s = result["summary"]
    # 9 files in batches of 4 (the short last one folded): the unreadable one is skipped
    assert s["images_found"] == 9 and s["images_unreadable"] == 1 and s["images_analysed"] == 8
    assert any("unreadable" in w for w in result["warnings"])
    assert result["settings"]["features"] == "flatten" and "position embedding" in result["settings"]["patch_embed"]
    assert all(r["shift_pct"] > 0 for r in result["tables"]["expert_shift_total"])
    assert "B.12" in proc.stderr and "B.14" in proc.stderr  # the human tables go to stderr with --json
    for name in ("cka.csv", "cka.md", "cka.tex", "expert_shift_total.csv", "result.json", "cka_by_depth.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


@pytest.mark.parametrize("case,message", [
    ("architecture", "differ in architecture: parameter 'absolute_pos_embed' has shape [1, 400, 32]"),
    ("few_images", "at least 4 images, got 3"),
    ("corrupt", "truncated or corrupt"),
    ("one_checkpoint", "give two checkpoints"),
])
def test_bad_input_is_one_line_exit_2(case, message, ckpt, official_model_pt, tmp_path, capsys):
    data = write_faces(tmp_path / "faces", 3 if case == "few_images" else 4)
    args = {
        "architecture": [ckpt, official_model_pt],
        "few_images": [ckpt, ckpt],
        "corrupt": [ckpt, tmp_path / "corrupt.pt"],
        "one_checkpoint": [ckpt],
    }[case]
    (tmp_path / "corrupt.pt").write_bytes(ckpt.read_bytes()[:2000])
    assert main(["cka", *map(str, args), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moescope: error:") and message in err[0]


# --- routing-set distance (moescope.stats.agreement), against plain Python sets ---------------


def test_routing_set_distance_equals_set_arithmetic():
    from moescope.stats.agreement import routing_set_distance, top1_changed

    rng = np.random.default_rng(0)
    experts, k = 5, 2
    a = np.stack([rng.permutation(experts)[:k] for _ in range(60)]).reshape(3, 20, k)
    b = np.stack([rng.permutation(experts)[:k] for _ in range(60)]).reshape(3, 20, k)
    b[0, :5] = a[0, :5]  # some tokens routed alike
    b[0, 5:8] = a[0, 5:8, ::-1]  # same set, other order
    expected = np.array([1 - len(set(x) & set(y)) / len(set(x) | set(y)) for x, y in zip(a.reshape(-1, k), b.reshape(-1, k))])
    got = routing_set_distance(a, b)
    assert got.shape == (3, 20) and np.allclose(got.reshape(-1), expected, rtol=0, atol=1e-12)
    assert (got[0, :8] == 0).all() and np.isclose(got[..., None], [0, 2 / 3, 1], rtol=0, atol=1e-12).any(-1).all()  # k=2: 0, 2/3, 1
    assert (top1_changed(a, b) == (a[..., 0] != b[..., 0])).all() and not top1_changed(a, b)[0, :5].any()
    assert top1_changed(a, b)[0, 5:8].all()  # same set, other rank-1 expert
    # different k per side (a dropped expert shrinks k): {0, 1} vs {1} -> 1 - 1/2
    assert routing_set_distance(np.array([[0, 1]]), np.array([[1]])).tolist() == [0.5]


def test_routing_change_of_a_reversed_router(ckpt, faces):
    from moescope.forward import forward_passes
    from moescope.stats.agreement import RoutingChange

    a = load_checkpoint(ckpt)
    b = copy.deepcopy(a)
    target = "layers.1.blocks.0.mlp"
    with torch.no_grad():
        moe_layers(b)[target].router.gate.weight.neg_()
    images = torch.stack([preprocess(read_image(p), a.img_size) for p in faces])
    change = RoutingChange()
    for step in forward_passes([a, b], [images]):
        change.update(step.passes[0].routing, step.passes[1].routing)
    table = change.to_frame().set_index("layer")
    assert (table.loc[["layers.0.blocks.0.mlp", "layers.0.blocks.1.mlp"], ["set_distance", "top1_changed"]] == 0).all().all()
    # 3 experts, k=2: the reversed router's two largest logits share exactly one expert with the original's
    assert table.loc[target, "top1_changed"] == 1 and table.loc[target, "set_distance"] == pytest.approx(2 / 3)
    assert (table["tokens"] == len(faces) * np.array([400, 400, 100, 100, 25, 25])).all()
