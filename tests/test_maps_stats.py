"""Expert activation map statistics (moescope.stats.maps) against hand-made records, independent
numpy references, and the region routing table on the bundled demo faces."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from facemoe_model.geometry import REGIONS
from moescope.stats.maps import (
    ConcentrationRows,
    compare_cases,
    concentration,
    concentration_table,
    group_maps,
    region_mass,
    region_mass_table,
    routing_maps,
    shared_scale,
    token_maps,
    upsample,
)
from moescope.stats.regions import RegionRoutingCounts
from moescope.trace import LayerRouting, RoutingTrace

R = len(REGIONS)
DEMO_IMAGES = Path(__file__).resolve().parents[1] / "facemoe_model" / "assets" / "demo" / "images"


def read_rgb(path: Path) -> np.ndarray:
    import cv2

    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def random_routing(rng, B=4, grid=(3, 5), E=4, k=2) -> LayerRouting:
    N = grid[0] * grid[1]
    logits = rng.normal(size=(B, N, E))
    topk = np.argsort(-logits, axis=-1)[..., :k]
    weights = np.take_along_axis(logits, topk, -1)  # raw logits, may be negative ("logits" weighting)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return LayerRouting(topk=topk, weights=weights, probs=probs, logits=logits, grid=grid, weighting="logits")


def random_fractions(rng, B, grid):
    return rng.dirichlet(np.ones(R) * 0.3, size=(B, *grid)).transpose(0, 3, 1, 2)  # [B, R, rows, cols]


# -- routing maps --------------------------------------------------------------------------------
def test_routing_maps_match_per_token_loops():
    rng = np.random.default_rng(1)
    r = random_routing(rng, B=2, grid=(3, 5), E=4, k=2)
    maps = {kind: routing_maps(r, kind) for kind in ("top1", "topk", "weight", "prob")}
    rows, cols = r.grid
    for b in range(2):
        for n in range(rows * cols):
            i, j = divmod(n, cols)
            top = r.topk[b, n]
            w = np.abs(r.weights[b, n])
            for e in range(4):
                assert maps["top1"][b, e, i, j] == float(e == top[0])
                assert maps["topk"][b, e, i, j] == float(e in top)
                expected = w[list(top).index(e)] / w.sum() if e in top else 0.0
                assert maps["weight"][b, e, i, j] == pytest.approx(expected, abs=1e-12)
                assert maps["prob"][b, e, i, j] == pytest.approx(r.probs[b, n, e], abs=1e-12)
    np.testing.assert_allclose(maps["weight"].sum(1), 1.0)
    np.testing.assert_allclose(maps["top1"].sum(1), 1.0)
    np.testing.assert_allclose(maps["topk"].sum(1), 2.0)
    with pytest.raises(ValueError, match="unknown routing map kind"):
        routing_maps(r, "gradcam")


def test_spatial_rule_is_drawn_where_it_holds():
    # a known spatial rule on a non-square grid: the expert is the column's third (0, 1, 2)
    rows, cols = 4, 6
    rule = np.tile(np.arange(cols) // 2, (rows, 1))  # [rows, cols]
    topk = np.stack([rule.reshape(-1), (rule.reshape(-1) + 1) % 3], -1)[None]  # [1, N, 2]
    probs = np.full((1, rows * cols, 3), 1 / 3)
    r = LayerRouting(topk=topk, weights=np.ones(topk.shape), probs=probs, logits=np.log(probs), grid=(rows, cols), weighting="logits")
    top1 = routing_maps(r, "top1")[0]
    for e in range(3):
        np.testing.assert_array_equal(top1[e], (rule == e).astype(float))
    with pytest.raises(ValueError):
        token_maps(np.zeros((1, 5, 3)), (rows, cols))


def test_routing_override_maps_on_demo_model():
    """Dropping experts 0 and 1 sends every token to expert 2 (k shrinks to 1): its top-1 and
    top-k maps are all ones, the others all zeros; with only expert 0 dropped every token runs
    experts 1 and 2."""
    from facemoe_model.data.datasets import preprocess
    from facemoe_model.moe import RoutingOverride, override_routing
    from moescope.demo import load_model

    model = load_model("demo:after").eval()
    paths = sorted(DEMO_IMAGES.glob("*/*.png"))[:3]
    x = torch.stack([preprocess(read_rgb(p), model.img_size) for p in paths])
    with torch.inference_mode(), RoutingTrace(model) as trace:
        with override_routing(model, RoutingOverride(dropped=(0, 1))):
            model(x)
            only2 = trace.pop()
        with override_routing(model, RoutingOverride(dropped=(0,))):
            model(x)
            no0 = trace.pop()
    for name, r in only2.items():
        for kind in ("top1", "topk", "weight"):
            m = routing_maps(r, kind)
            assert m.shape == (3, 3, *r.grid)
            np.testing.assert_array_equal(m[:, 2], 1.0)
            np.testing.assert_array_equal(m[:, :2], 0.0)
        topk = routing_maps(no0[name], "topk")
        np.testing.assert_array_equal(topk[:, 0], 0.0)
        np.testing.assert_array_equal(topk[:, 1:], 1.0)


def test_group_maps_averages_blocks_of_a_stage():
    rng = np.random.default_rng(2)
    maps = {
        "layers.0.blocks.0.mlp": rng.random((2, 3, 4, 4)),
        "layers.0.blocks.1.mlp": rng.random((2, 3, 4, 4)),
        "layers.1.blocks.0.mlp": rng.random((2, 3, 2, 2)),
    }
    stages = group_maps(maps, "stage")
    assert list(stages) == ["layers.0", "layers.1"]
    np.testing.assert_allclose(stages["layers.0"], (maps["layers.0.blocks.0.mlp"] + maps["layers.0.blocks.1.mlp"]) / 2)
    np.testing.assert_array_equal(stages["layers.1"], maps["layers.1.blocks.0.mlp"])
    assert list(group_maps(maps, "layer")) == list(maps)
    with pytest.raises(ValueError, match="grids differ"):
        group_maps(maps, "all")
    custom = group_maps(maps, {name: "x" if "layers.0" in name else "y" for name in maps})
    np.testing.assert_allclose(custom["x"], stages["layers.0"])


# -- consistency with the region routing table --------------------------------------------------
def _independent_region_top1(routings, fractions):
    """Per layer, region x expert top-1 percentages by explicit loops over images and tokens."""
    out = {}
    for name, r in routings.items():
        frac = fractions[r.grid].reshape(r.topk.shape[0], R, -1)
        counts = np.zeros((R, r.num_experts))
        for b in range(r.topk.shape[0]):
            for n in range(r.topk.shape[1]):
                counts[:, r.topk[b, n, 0]] += frac[b, :, n]
        out[name] = 100 * counts / counts.sum(1, keepdims=True)
    return out


def _check_consistency(routings, fractions, names):
    maps = {name: routing_maps(r, "top1") for name, r in routings.items()}
    table = region_mass_table(maps, fractions)
    reference = _independent_region_top1(routings, fractions)
    counts = RegionRoutingCounts(names, next(iter(routings.values())).num_experts, count="top1", by="layer")
    counts.update(routings, fractions)
    tidy = counts.table(n_boot=0)
    for name in names:
        mine = table[table["group"] == name].pivot(index="region", columns="expert", values="mass").reindex(list(REGIONS))
        theirs = tidy[tidy["group"] == name].pivot(index="region", columns="expert", values="percent").reindex(list(REGIONS))
        np.testing.assert_allclose(100 * mine.to_numpy(), theirs.to_numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(100 * mine.to_numpy(), reference[name], rtol=1e-12, atol=1e-12)
    # stage maps (blocks averaged) reproduce the table grouped by stage
    by_stage = RegionRoutingCounts(names, next(iter(routings.values())).num_experts, count="top1", by="stage")
    by_stage.update(routings, fractions)
    stage_tidy = by_stage.table(n_boot=0)
    stage_table = region_mass_table(group_maps(maps, "stage"), fractions)
    merged = stage_table.merge(stage_tidy, on=["group", "region", "expert"])
    assert len(merged) == len(stage_tidy)
    np.testing.assert_allclose(100 * merged["mass"], merged["percent"], rtol=1e-12, atol=1e-12)


def test_top1_maps_reproduce_region_table_on_random_records():
    rng = np.random.default_rng(3)
    names = ["layers.0.blocks.0.mlp", "layers.0.blocks.1.mlp", "layers.1.blocks.0.mlp"]
    grids = [(4, 4), (4, 4), (2, 3)]
    routings = {n: random_routing(rng, B=6, grid=g, E=3, k=2) for n, g in zip(names, grids)}
    fractions = {g: random_fractions(rng, 6, g) for g in set(grids)}
    _check_consistency(routings, fractions, names)


def test_top1_maps_reproduce_region_table_on_demo_faces():
    """`moescope regions --count top1 --by layer` numbers from the same images and landmarks."""
    from moescope.demo import load_model
    from moescope.faces import face_batches

    model = load_model("demo:after").eval()
    names = list(RoutingTrace(model).layers)
    grids = [model.get_submodule(n).token_grid for n in names]
    paths = sorted(DEMO_IMAGES.glob("*/*.png"))[::10]  # 16 faces of 16 identities
    batch = next(face_batches(paths, grids, model.img_size, batch_size=len(paths), progress=False, workers=1))
    assert len(batch.ids) >= 12
    with torch.inference_mode(), RoutingTrace(model) as trace:
        model(batch.images)
        routings = trace.pop()
    _check_consistency(routings, batch.fractions, names)


# -- concentration ----------------------------------------------------------------------------------
def test_concentration_extremes_and_reference_entropy():
    rng = np.random.default_rng(4)
    B, E, rows, cols = 3, 4, 5, 6
    maps = np.zeros((B, E, rows, cols))
    maps[:, 0] = 1.0  # uniform
    maps[:, 1, 2, 3] = 7.0  # one token
    maps[:, 2] = rng.random((B, rows, cols))  # generic
    # expert 3: all zero (did not run)
    bg = rng.random((B, rows, cols))
    out = concentration(maps, bg)
    np.testing.assert_allclose(out["entropy_normalised"][:, 0], 1.0)
    np.testing.assert_allclose(out["entropy_bits"][:, 0], np.log2(rows * cols))
    np.testing.assert_array_equal(out["entropy_bits"][:, 1], 0.0)
    for b in range(B):
        ref = scipy.stats.entropy(maps[b, 2].ravel(), base=2)
        assert out["entropy_bits"][b, 2] == pytest.approx(ref, rel=1e-12)
        assert out["background_share"][b, 2] == pytest.approx((maps[b, 2] * bg[b]).sum() / maps[b, 2].sum(), rel=1e-12)
        assert out["background_share"][b, 1] == pytest.approx(bg[b, 2, 3])
    np.testing.assert_allclose(out["background_share"][:, 0], bg.mean((1, 2)))  # uniform map: share == area
    np.testing.assert_allclose(out["background_area"], bg.mean((1, 2)))
    ran = np.isfinite(out["face_share"])
    np.testing.assert_allclose((out["face_share"] + out["background_share"])[ran], 1.0)
    assert np.isnan(out["entropy_bits"][:, 3]).all() and np.isnan(out["face_share"][:, 3]).all()
    with pytest.raises(ValueError, match="non-negative"):
        concentration(-maps)


def test_concentration_table_is_tidy():
    rng = np.random.default_rng(5)
    maps = {"layers.0": rng.random((2, 3, 4, 4)), "layers.1": rng.random((2, 3, 2, 2))}
    fractions = {(4, 4): random_fractions(rng, 2, (4, 4)), (2, 2): random_fractions(rng, 2, (2, 2))}
    table = concentration_table(maps, fractions, ["a.png", "b.png"])
    assert len(table) == 2 * 2 * 3
    row = table[(table["image"] == "b.png") & (table["group"] == "layers.1") & (table["expert"] == 2)].iloc[0]
    direct = concentration(maps["layers.1"], fractions[(2, 2)][:, REGIONS.index("hair_background")])
    assert row["entropy_normalised"] == pytest.approx(direct["entropy_normalised"][1, 2])
    assert row["face_share"] == pytest.approx(direct["face_share"][1, 2])
    assert table[["image", "group", "expert"]].duplicated().sum() == 0
    assert concentration_table(maps, None, ["a", "b"])["face_share"].isna().all()


def test_streamed_concentration_rows_equal_the_table_of_all_images():
    """Batches added one by one (and split over two 'ranks', then joined) give the table of all
    images at once: group by group, images and experts in order, the same values."""
    rng = np.random.default_rng(6)
    n = 7
    maps = {"layers.0": rng.random((n, 3, 4, 4)), "layers.1": rng.random((n, 3, 2, 2))}
    maps["layers.0"][2, 1] = 0.0  # an expert that saw none of an image's tokens: NaN entropy
    fractions = {(4, 4): random_fractions(rng, n, (4, 4)), (2, 2): random_fractions(rng, n, (2, 2))}
    ids = [f"{i}.png" for i in range(n)]
    whole = concentration_table(maps, fractions, ids)

    def rows(start, stop, step):
        part = ConcentrationRows()
        for a in range(start, stop, step):
            b = min(a + step, stop)
            part.add({g: m[a:b] for g, m in maps.items()}, {k: f[a:b] for k, f in fractions.items()}, ids[a:b])
        return part

    pd.testing.assert_frame_equal(rows(0, n, 2).table(), whole)
    pd.testing.assert_frame_equal(ConcentrationRows.joined([rows(0, 4, 3), ConcentrationRows(), rows(4, n, 1)]).table(), whole)
    assert whole["entropy_bits"].isna().sum() == 1
    with pytest.raises(ValueError, match="groups"):
        rows(0, 2, 2).add({"layers.1": maps["layers.1"][:1]}, fractions, ids[:1])


def test_region_mass_is_area_normalised():
    # a map equal to 1 everywhere has mass 1 in every region, whatever its area
    rng = np.random.default_rng(6)
    frac = random_fractions(rng, 3, (4, 5))
    ones = np.ones((3, 2, 4, 5))
    np.testing.assert_allclose(region_mass(ones, frac), 1.0)
    per_image = region_mass(rng.random((3, 2, 4, 5)), frac, per_image=True)
    assert per_image.shape == (3, 2, R)
    empty = frac.copy()
    empty[:, 0] = 0.0
    assert np.isnan(region_mass(ones, empty)[:, 0]).all()


# -- success vs failure ------------------------------------------------------------------------
def _cases_table(rng, n_success=30, n_failure=20, shift=0.2):
    rows = []
    for i in range(n_success + n_failure):
        case = "success" if i < n_success else "failure"
        for expert in range(2):
            rows.append({"image": f"img{i}", "group": "layers.0", "expert": expert, "case": case,
                         "entropy_normalised": rng.normal(0.5 + (shift if case == "failure" else 0.0), 0.1),
                         "face_share": rng.uniform()})
    return pd.DataFrame(rows)


def test_compare_cases_means_intervals_and_seed():
    rng = np.random.default_rng(7)
    table = _cases_table(rng)
    out = compare_cases(table, n_boot=2000, seed=0)
    assert set(out["case"]) == {"success", "failure", "failure - success"}
    sel = lambda case, metric="entropy_normalised", expert=0: out[(out["case"] == case) & (out["metric"] == metric) & (out["expert"] == expert)].iloc[0]  # noqa: E731
    values = table[(table["expert"] == 0)]
    for case in ("success", "failure"):
        v = values[values["case"] == case]["entropy_normalised"].to_numpy()
        row = sel(case)
        assert row["images"] == len(v)
        assert row["mean"] == pytest.approx(v.mean(), rel=1e-12)
        # independent percentile bootstrap of the mean (another stream): bounds agree closely
        boot = np.random.default_rng(99).choice(v, size=(4000, len(v))).mean(1)
        assert row["ci_low"] == pytest.approx(np.percentile(boot, 2.5), abs=0.01)
        assert row["ci_high"] == pytest.approx(np.percentile(boot, 97.5), abs=0.01)
    diff = sel("failure - success")
    assert diff["mean"] == pytest.approx(sel("failure")["mean"] - sel("success")["mean"])
    assert diff["ci_low"] > 0  # a 0.2 shift with sd 0.1 and 20-30 images is detected
    null = sel("failure - success", metric="face_share")
    assert null["ci_low"] < 0 < null["ci_high"]
    pd.testing.assert_frame_equal(out, compare_cases(table, n_boot=2000, seed=0))
    assert not out.equals(compare_cases(table, n_boot=2000, seed=1))


def test_compare_cases_constant_nan_and_errors():
    rows = [{"image": f"i{i}", "group": "g", "expert": 0, "case": "success" if i < 5 else "failure",
             "entropy_normalised": 0.2 if i < 5 else 0.8, "face_share": np.nan if i == 0 else 0.5} for i in range(10)]
    table = pd.DataFrame(rows)
    out = compare_cases(table, n_boot=300, seed=0).set_index(["metric", "case"])
    assert out.loc[("entropy_normalised", "failure - success"), "mean"] == pytest.approx(0.6)
    assert out.loc[("entropy_normalised", "failure - success"), "ci_low"] == pytest.approx(0.6)
    assert out.loc[("face_share", "success"), "mean"] == pytest.approx(0.5)  # NaN image left out
    bad = table.copy()
    bad.loc[1, "case"] = "failure"
    bad = pd.concat([bad, bad.iloc[[1]].assign(case="success", expert=1)])
    with pytest.raises(ValueError, match="more than one case"):
        compare_cases(bad)
    with pytest.raises(ValueError, match="lacks"):
        compare_cases(table.drop(columns="case"))


# -- display helpers ------------------------------------------------------------------------------
def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] half-pixel-centre linear interpolation with edge clamping (align_corners=False)."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    return np.stack([np.interp(src, np.arange(n_in), np.eye(n_in)[i]) for i in range(n_in)], axis=1)


def test_upsample_bilinear_and_nearest_references():
    from captum.attr import LayerAttribution

    rng = np.random.default_rng(8)
    maps = rng.random((2, 3, 5, 4))
    up = upsample(maps, (120, 96))
    ref = np.einsum("Hh,behw,Ww->beHW", _bilinear_matrix(5, 120), maps, _bilinear_matrix(4, 96))
    np.testing.assert_allclose(up, ref, atol=1e-12)
    assert up.min() >= maps.min() and up.max() <= maps.max()
    via_captum = LayerAttribution.interpolate(torch.from_numpy(maps.reshape(6, 1, 5, 4)), (120, 96), "bilinear")
    np.testing.assert_allclose(up.reshape(6, 1, 120, 96), via_captum.numpy(), atol=1e-12)
    nearest = upsample(maps, (120, 96), mode="nearest")
    np.testing.assert_array_equal(nearest, np.kron(maps, np.ones((24, 24))))
    np.testing.assert_allclose(upsample(np.full((5, 5), 0.3), 120), 0.3)
    with pytest.raises(ValueError):
        upsample(maps, 120, mode="bicubic")


def test_shared_scale_spans_the_whole_figure():
    a, b = np.array([[0.2, 0.5]]), np.array([[0.1, 0.9], [np.nan, 0.4]])
    assert shared_scale([a, b]) == (0.0, 0.9)
    assert shared_scale([a, b], include_zero=False) == (0.1, 0.9)
    assert shared_scale([np.array([-0.3, 0.1]), np.array([0.2])], symmetric=True) == (-0.3, 0.3)
    assert shared_scale([np.zeros((2, 2))]) == (0.0, 1.0)
    assert shared_scale([np.full(3, np.nan)]) == (0.0, 1.0)
