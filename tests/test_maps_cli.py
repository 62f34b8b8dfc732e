"""`moescope maps` end to end: consistency with `moescope regions`, routing maps of a known spatial
rule through a routing override, expert output maps against the layer's own output, the
success/failure cases against `moescope eval`, cleanliness, and the CLI's default run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from facemoe_model.geometry import REGIONS
from facemoe_model.moe import MoELayer, RoutingOverride, override_routing
from moescope.cli import main
from moescope.demo import load_model
from moescope.faces import image_batches
from moescope.runners.maps import analyse_maps, select_paths

DEMO_IMAGES = Path(__file__).resolve().parents[1] / "facemoe_model" / "assets" / "demo" / "images"
DEMO_PATHS = sorted(DEMO_IMAGES.glob("*/*.png"))


def run_json(capsys, *argv) -> dict:
    assert main(list(argv) + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    """Eight demo faces of four identities (two each) in identity folders."""
    root = tmp_path_factory.mktemp("faces")
    for path in DEMO_PATHS[::40] + DEMO_PATHS[1::40]:
        (root / path.parent.name).mkdir(exist_ok=True)
        (root / path.parent.name / path.name).symlink_to(path)
    return root


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_clean(model: nn.Module, before: dict[str, torch.Tensor], training: bool) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks, name
        if isinstance(module, MoELayer):
            assert module.override is None and not module.hook_expert_outputs.observed
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
    assert model.training == training


# -- consistency with `moescope regions` --------------------------------------------------------------
def test_top1_maps_reproduce_regions_command(capsys, small_folder):
    """Averaging the top-1 routing maps over each region's tokens (area-weighted) gives
    `moescope regions --count top1 --by layer` on the same images: both through the CLI."""
    regions = run_json(capsys, "regions", "--data", str(small_folder), "--count", "top1", "--by", "layer",
                       "--bootstrap", "0", "--null", "0")
    maps = run_json(capsys, "maps", "--data", str(small_folder), "--kind", "routing", "--by", "layer")
    assert maps["summary"]["images_analysed"] == regions["summary"]["images_analysed"] == 8
    theirs = pd.DataFrame(regions["tables"]["region_routing"])
    mine = pd.DataFrame(maps["tables"]["region_mass"])
    mine = mine[mine["case"] == "all"]
    merged = mine.merge(theirs, on=["group", "region", "expert"], how="outer", indicator=True)
    assert (merged["_merge"] == "both").all() and len(merged) == 6 * len(REGIONS) * 3
    np.testing.assert_allclose(100 * merged["mass"].to_numpy(dtype=float), merged["percent"].to_numpy(dtype=float), rtol=1e-12, atol=1e-12)
    # the same images, in the maps' own image table
    assert len(maps["tables"]["images"]) == 8


# -- a known spatial rule, through a routing override ---------------------------------------------
class SpatialToy(nn.Module):
    """A one-layer MoE 'face model' whose router sends token (i, j) to expert ``3 * j // cols``
    (left, middle, right third of the grid): its tokens carry a one-hot code of their third
    (plus a faint trace of the image), and the router gate is ``10 * identity``."""

    img_size = 48

    def __init__(self, grid=(4, 6)):
        super().__init__()
        rows, cols = grid
        self.grid = grid
        self.rule = np.tile(3 * np.arange(cols) // cols, (rows, 1))  # [rows, cols]
        code = torch.zeros(rows * cols, 3)
        code[torch.arange(rows * cols), torch.from_numpy(self.rule.reshape(-1))] = 1.0
        self.register_buffer("code", code)
        self.moe = MoELayer(3, 8, num_experts=3, k=1, token_grid=grid)
        with torch.no_grad():
            self.moe.router.gate.weight.copy_(10 * torch.eye(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trace = nn.functional.adaptive_avg_pool2d(x, self.grid).flatten(2).transpose(1, 2)  # [B, N, 3]
        return self.moe(self.code + 0.01 * trace).mean(1)


def test_routing_maps_equal_a_spatial_rule_and_its_permutation():
    toy = SpatialToy().eval()
    paths = DEMO_PATHS[:3]
    plain = analyse_maps([toy], ["toy"], paths, kind="routing", by="layer", region_source="template", align="none", progress=False)
    top1 = plain.maps["toy"]["moe"]
    assert top1.shape == (3, 3, 4, 6)
    for e in range(3):
        np.testing.assert_array_equal(top1[:, e], np.broadcast_to(toy.rule == e, (3, 4, 6)).astype(float))
    perm = (2, 0, 1)
    with override_routing(toy, RoutingOverride(permutation=perm)):
        switched = analyse_maps([toy], ["toy"], paths, kind="routing", by="layer", region_source="template", align="none", progress=False)
    expected = np.asarray(perm)[toy.rule]
    for e in range(3):
        np.testing.assert_array_equal(switched.maps["toy"]["moe"][:, e], np.broadcast_to(expected == e, (3, 4, 6)).astype(float))
    weight = analyse_maps([toy], ["toy"], paths, kind="weight", by="layer", region_source="template", align="none", progress=False)
    np.testing.assert_array_equal(weight.maps["toy"]["moe"], top1)  # k = 1: the one weight normalises to 1
    prob = analyse_maps([toy], ["toy"], paths, kind="prob", by="layer", region_source="template", align="none", progress=False)
    np.testing.assert_array_equal(prob.maps["toy"]["moe"].argmax(1), np.broadcast_to(toy.rule, (3, 4, 6)))


def test_drop_override_sends_every_token_to_the_remaining_expert():
    model = load_model("demo:after").eval()
    with override_routing(model, RoutingOverride(dropped=(0, 2))):
        result = analyse_maps([model], ["after"], DEMO_PATHS[:2], kind="topk", by="layer", progress=False)
    for group, m in result.maps["after"].items():
        np.testing.assert_array_equal(m[:, 1], 1.0)
        np.testing.assert_array_equal(m[:, [0, 2]], 0.0)


# -- expert output maps ------------------------------------------------------------------------------
def _layer_output_norms(model, paths, ids):
    """Per MoE layer, the norm of the layer's combined output per grid token ``[B, rows, cols]``."""
    from facemoe_model.moe import moe_layers

    seen = {}
    handles = [layer.register_forward_hook(lambda m, i, o, name=name: seen.update({name: o.detach()}))
               for name, layer in moe_layers(model).items()]
    try:
        batch = next(image_batches(paths, model.img_size, [range(len(paths))]))
        keep = [batch.ids.index(i) for i in ids]
        with torch.inference_mode():
            model(batch.images[keep])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, y in seen.items():
        rows, cols = moe_layers(model)[name].token_grid
        out[name] = torch.linalg.vector_norm(y.float(), dim=-1).reshape(len(ids), rows, cols).numpy()
    return out


def test_output_maps_zero_where_not_run_and_sum_to_the_layer_output_for_k1():
    model = load_model("demo:after").eval()
    before = state(model)
    paths = DEMO_PATHS[5:8]
    out = analyse_maps([model], ["after"], paths, kind="output", by="layer", progress=False)
    member = analyse_maps([model], ["after"], paths, kind="topk", by="layer", progress=False)
    assert out.image_ids == member.image_ids
    for group, m in out.maps["after"].items():
        assert ((m == 0) == (member.maps["after"][group] == 0)).all(), group  # zero exactly where it did not run
        assert (m >= 0).all()
    with override_routing(model, RoutingOverride(k=1)):
        out1 = analyse_maps([model], ["after"], paths, kind="output", by="layer", progress=False)
        reference = _layer_output_norms(model, paths, out1.image_ids)
    for group, m in out1.maps["after"].items():
        assert ((m > 0).sum(1) == 1).all()
        np.testing.assert_allclose(m.sum(1), reference[group], rtol=1e-5, atol=1e-6)
    assert_clean(model, before, training=False)


# -- gradient maps and cleanliness -----------------------------------------------------------------
def test_gradient_maps_leave_model_untouched_and_use_the_mate_reference(small_folder):
    model = load_model("demo:after")
    model.train()  # the runner evaluates in eval mode and restores the flags
    before = state(model)
    paths = select_paths(sorted(small_folder.glob("*/*.png")), ids=["200000", "200010"])
    cam = analyse_maps([model], ["after"], paths, kind="gradcam", layers=["layers.1"], by="layer", progress=False)
    assert "same identity" in cam.settings["reference"] and "4 of 4 images had an identity mate" in cam.settings["reference"]
    topk = analyse_maps([model], ["after"], paths, kind="topk", layers=["layers.1"], by="layer", progress=False)
    for group, m in cam.maps["after"].items():
        assert m.shape == topk.maps["after"][group].shape
        assert (m[topk.maps["after"][group] == 0] == 0).all()  # no contribution, no Grad-CAM
        assert m.max() > 0  # the mate reference gives real gradients (the self-reference would not)
    ig = analyse_maps([model], ["after"], paths[:2], kind="input", ig_steps=4, progress=False)
    assert ig.maps["after"]["input"].shape == (2, 1, model.img_size, model.img_size)
    assert set(ig.tables["region_mass"]["group"]) == {"input"}
    assert_clean(model, before, training=True)
    for kind in ("routing", "output"):
        analyse_maps([model], ["after"], paths[:1], kind=kind, progress=False)
    assert_clean(model, before, training=True)


def test_select_paths_by_ids_and_count():
    assert select_paths(DEMO_PATHS, images=4) == [DEMO_PATHS[i] for i in (0, 53, 106, 159)]
    by_identity = select_paths(DEMO_PATHS, ids=["200003"])
    assert len(by_identity) == 4 and {p.parent.name for p in by_identity} == {"200003"}
    from moescope.errors import MoescopeError

    with pytest.raises(MoescopeError, match="no image matches"):
        select_paths(DEMO_PATHS, ids=["nobody"])


# -- success and failure cases -----------------------------------------------------------------------
def test_cases_follow_eval_rank1_and_compare_with_intervals(capsys, tmp_path):
    evaluation = run_json(capsys, "eval")
    rank1 = evaluation["summary"]["identification"]["Rank-1"]
    out = tmp_path / "cases"
    result = run_json(capsys, "maps", "--cases", "success,failure", "--images", "3", "--kind", "weight",
                      "--bootstrap", "200", "--out", str(out))
    s = result["summary"]
    assert s["rank1_all_probes"] == pytest.approx(rank1, abs=1e-12)  # the same Rank-1 decisions as `moescope eval`
    assert s["images_success"] == 3 and s["images_failure"] == 3
    images = pd.DataFrame(result["tables"]["images"])
    assert ((images["case"] == "success") == (images["mate_rank"] == 1)).all()
    cases = pd.DataFrame(result["tables"]["cases"])
    assert set(cases["case"]) == {"success", "failure", "failure - success"}
    assert set(cases["metric"]) == {"entropy_normalised", "face_share"}
    assert "reference" not in result["settings"]  # routing-type maps need no score
    assert (out / "maps_cases.png").is_file() and (out / "maps.png").is_file()
    mass = pd.DataFrame(result["tables"]["region_mass"])
    assert set(mass["case"]) == {"all", "success", "failure"}


# -- the command line -------------------------------------------------------------------------------
def test_default_run_prints_tables_and_writes_figures(capsys, tmp_path):
    out = tmp_path / "maps"
    assert main(["maps", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "map mass per facial region" in text and "concentration" in text
    assert "bilinear (align_corners=False)" in text
    assert (out / "maps.png").is_file() and (out / "region_mass.csv").is_file() and (out / "concentration.csv").is_file()
    saved = json.loads((out / "result.json").read_text())
    assert saved["summary"]["images_analysed"] == 4
    assert "maps" not in saved and (out / "result.json").stat().st_size < 200_000  # no arrays in JSON
    table = pd.read_csv(out / "region_mass.csv")
    assert set(table["group"]) == {"layers.0", "layers.1", "layers.2"}


def test_compare_draws_both_checkpoints_on_one_scale(tmp_path):
    before, after = load_model("demo:before"), load_model("demo:after")
    result = analyse_maps([after, before], ["demo:after", "demo:before"], DEMO_PATHS[:2], kind="output", progress=False)
    assert list(result.maps) == ["after", "before"]
    assert set(result.tables["concentration"]["checkpoint"]) == {"after", "before"}
    fig = result.figure("maps")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert any("after" in t for t in titles) and any("before" in t for t in titles)
    limits = {im.get_clim() for ax in fig.axes for im in ax.get_images() if im.get_cmap().name == "inferno"}
    assert len(limits) == 1  # one colour scale for the whole figure


@pytest.mark.parametrize("argv, message", [
    (["--cases", "good,bad"], "--cases takes success,failure"),
    (["--split", "x"], "apply with --cases only"),
    (["--ids", "nobody"], "no image matches"),
    (["--cases", "success,failure", "--ids", "200000"], "does not apply with --cases"),
])
def test_bad_options_are_one_line_errors(capsys, argv, message):
    assert main(["maps", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


# -- streaming ---------------------------------------------------------------------------------------
def test_statistics_stream_over_batches_and_only_the_shown_maps_are_kept(small_folder):
    """Batches of 3 keeping the figures' 2 images give the tables of one batch keeping all 8, and
    the kept maps are those images' maps; with cases the first of each case are kept."""
    from moescope.runners.maps import _split_from_folder

    model = load_model("demo:after")
    paths = sorted(small_folder.glob("*/*.png"))
    full = analyse_maps([model], ["after"], paths, kind="weight", batch_size=8, keep_maps=len(paths), progress=False)
    streamed = analyse_maps([model], ["after"], paths, kind="weight", batch_size=3, rows=2, progress=False)
    assert len(full.image_ids) == 8 and streamed.image_ids == full.image_ids[:2]
    assert list(streamed.tables["images"]["image"]) == full.image_ids
    for name in ("region_mass", "concentration"):
        a, b = streamed.tables[name], full.tables[name]
        assert a.shape == b.shape and (a.select_dtypes(exclude="number") == b.select_dtypes(exclude="number")).all().all()
        np.testing.assert_allclose(a.select_dtypes("number").to_numpy(), b.select_dtypes("number").to_numpy(), rtol=1e-5, atol=1e-7)
    for group, m in streamed.maps["after"].items():
        np.testing.assert_allclose(m, full.maps["after"][group][:2], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(streamed.images, full.images[:2])

    split = _split_from_folder(DEMO_IMAGES, model.img_size)
    cases = analyse_maps([model], ["after"], cases=True, split=split, per_case=3, kind="routing", batch_size=2, rows=1, n_boot=0, progress=False)
    assert cases.cases == ["success", "failure"] and len(cases.images) == 2
    table = cases.tables["images"]
    assert len(table) == 6 and cases.image_ids == [table[table["case"] == c]["image"].iloc[0] for c in ("success", "failure")]
