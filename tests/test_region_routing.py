"""Counting conventions and table maths on hand-made routing records."""
from __future__ import annotations

import numpy as np
import pytest

from moescope.regions import REGIONS
from moescope.stats.regions import RegionRoutingCounts, compare_tables, layer_group, paper_table
from moescope.trace import LayerRouting

R = len(REGIONS)


def record(topk, weights=None, num_experts=3, grid=(1, 2)):
    topk = np.asarray(topk)
    weights = np.ones(topk.shape) if weights is None else np.asarray(weights, dtype=float)
    B, N, _ = topk.shape
    probs = np.full((B, N, num_experts), 1.0 / num_experts)
    return LayerRouting(topk=topk, weights=weights, probs=probs, logits=np.log(probs), grid=grid, weighting="logits")


def fractions(labels, grid=(1, 2)):
    """One-hot region fractions [B, R, rows, cols] from region labels per token."""
    labels = np.asarray(labels)
    out = np.zeros((labels.shape[0], R, labels.shape[1]))
    for b, row in enumerate(labels):
        for n, region in enumerate(row):
            out[b, region, n] = 1.0
    return out.reshape(labels.shape[0], R, *grid)


def test_top1_topk_weighted_by_hand():
    # one image, two tokens: token 0 in "eyes" routed (0, 1) with weights (3, -1);
    # token 1 in "nose" routed (2, 0) with weights (1, 1)
    r = record([[[0, 1], [2, 0]]], weights=[[[3.0, -1.0], [1.0, 1.0]]])
    frac = {(1, 2): fractions([[0, 1]])}
    expected = {
        "top1": {0: [100, 0, 0], 1: [0, 0, 100]},
        "topk": {0: [50, 50, 0], 1: [50, 0, 50]},
        # |w| / sum |w|: token 0 -> 3/4 to expert 0, 1/4 to expert 1
        "weighted": {0: [75, 25, 0], 1: [50, 0, 50]},
    }
    for count, rows in expected.items():
        counts = RegionRoutingCounts(["blocks.0.mlp"], 3, count=count)
        counts.update({"blocks.0.mlp": r}, frac)
        table = counts.table(n_boot=0)
        for region, pct in rows.items():
            got = table[table["region"] == REGIONS[region]].sort_values("expert")["percent"].to_numpy()
            np.testing.assert_allclose(got, pct)


def test_soft_fractions_and_rows_sum_to_100():
    rng = np.random.default_rng(0)
    B, N = 5, 6
    topk = np.stack([rng.permutation(4)[:2] for _ in range(B * N)]).reshape(B, N, 2)
    soft = rng.dirichlet(np.ones(R), size=(B, N)).transpose(0, 2, 1).reshape(B, R, 2, 3)
    counts = RegionRoutingCounts(["a.mlp"], 4, count="topk")
    counts.update({"a.mlp": record(topk, num_experts=4, grid=(2, 3))}, {(2, 3): soft})
    table = counts.table(n_boot=200)
    sums = table.groupby("region")["percent"].sum()
    np.testing.assert_allclose(sums.to_numpy(), 100.0)
    # token mass equals the region's total area fraction
    np.testing.assert_allclose(table.groupby("region")["token_mass"].first().reindex(REGIONS).to_numpy(), soft.sum(axis=(0, 2, 3)))
    assert (table["ci_low"] <= table["percent"] + 1e-9).all() and (table["percent"] <= table["ci_high"] + 1e-9).all()


def test_streaming_equals_one_batch():
    rng = np.random.default_rng(1)
    topk = rng.integers(0, 3, size=(8, 2, 1))
    labels = rng.integers(0, R, size=(8, 2))
    one = RegionRoutingCounts(["x.mlp"], 3, count="top1")
    one.update({"x.mlp": record(topk)}, {(1, 2): fractions(labels)})
    many = RegionRoutingCounts(["x.mlp"], 3, count="top1")
    for s in range(0, 8, 3):
        many.update({"x.mlp": record(topk[s : s + 3])}, {(1, 2): fractions(labels[s : s + 3])})
    np.testing.assert_allclose(one.counts, many.counts)
    assert one.images == many.images == 8


def test_groups_layers_and_stages():
    assert layer_group("layers.1.blocks.17.mlp", "stage") == "layers.1"
    assert layer_group("blocks.3.mlp", "stage") == "blocks"
    assert layer_group("layers.1.blocks.17.mlp", "layer") == "layers.1.blocks.17.mlp"
    names = ["layers.0.blocks.0.mlp", "layers.0.blocks.1.mlp", "layers.1.blocks.0.mlp"]
    counts = RegionRoutingCounts(names, 3, by="stage")
    routing = {n: record([[[i % 3, (i + 1) % 3]] * 2]) for i, n in enumerate(names)}
    counts.update(routing, {(1, 2): fractions([[0, 0]])})
    table = counts.table(n_boot=0)
    assert list(table["group"].unique()) == ["layers.0", "layers.1"]
    eyes0 = table[(table["group"] == "layers.0") & (table["region"] == "eyes")]["percent"].to_numpy()
    np.testing.assert_allclose(eyes0, [50, 50, 0])


def test_paper_table_dominant_and_nmi_extremes():
    # perfectly specialised: region r -> expert r % 3 ; NMI = I/sqrt(H(R)H(E)) is maximal for a function R->E
    topk = np.array([[[r % 3, (r + 1) % 3] for r in range(R)]])
    labels = np.arange(R)[None]
    counts = RegionRoutingCounts(["m.mlp"], 3)
    counts.update({"m.mlp": record(topk, grid=(1, R))}, {(1, R): fractions(labels, grid=(1, R))})
    paper = paper_table(counts.table(n_boot=0))
    assert list(paper["Dominant Expert"]) == [f"Expert {r % 3}" for r in range(R)]
    spec = counts.specialisation()
    nmi = spec[spec["metric"] == "nmi"]["value"].item()
    hr, he = np.log2(R), -sum(p * np.log2(p) for p in np.bincount(np.arange(R) % 3) / R)
    assert nmi == pytest.approx(he / np.sqrt(hr * he))  # I(R;E) = H(E) when E is a function of R
    assert (spec[spec["metric"] == "entropy_bits"]["value"] == 0).all()
    # independent routing: every region spread the same way -> NMI 0
    flat = RegionRoutingCounts(["m.mlp"], 3)
    topk_flat = np.array([[[e, (e + 1) % 3] for e in range(3)] * R])
    labels_flat = np.repeat(np.arange(R), 3)[None]
    flat.update({"m.mlp": record(topk_flat, grid=(1, 3 * R))}, {(1, 3 * R): fractions(labels_flat, grid=(1, 3 * R))})
    spec = flat.specialisation()
    assert spec[spec["metric"] == "nmi"]["value"].item() == pytest.approx(0.0, abs=1e-12)


def test_compare_delta_and_expert_mismatch():
    a = RegionRoutingCounts(["m.mlp"], 3)
    a.update({"m.mlp": record([[[0, 1], [0, 1]]])}, {(1, 2): fractions([[0, 0]])})
    b = RegionRoutingCounts(["m.mlp"], 3)
    b.update({"m.mlp": record([[[1, 0], [0, 1]]])}, {(1, 2): fractions([[0, 0]])})
    delta = compare_tables(a.table(n_boot=0), b.table(n_boot=0), ("before", "after"))
    eyes = delta[delta["region"] == "eyes"].sort_values("expert")["delta"].to_numpy()
    np.testing.assert_allclose(eyes, [-50, 50, 0])
    with pytest.raises(ValueError, match="mismatched expert counts"):
        a.update({"m.mlp": record([[[0, 1], [0, 1]]], num_experts=4)}, {(1, 2): fractions([[0, 0]])})


def test_heatmap_is_a_figure_and_leaves_the_backend_alone():
    import matplotlib
    from matplotlib.figure import Figure

    from moescope.plotting import region_routing_heatmap

    counts = RegionRoutingCounts(["a", "b"], 3, by="layer")
    counts.update({"a": record([[[0, 1], [2, 0]]]), "b": record([[[1, 2], [1, 0]]])}, {(1, 2): fractions([[0, 1]])})
    backend = matplotlib.get_backend()
    fig = region_routing_heatmap({"m": paper_table(counts.table(n_boot=0))})
    assert isinstance(fig, Figure) and len(fig.axes) == 2 and matplotlib.get_backend() == backend
    assert [ax.get_title() for ax in fig.axes] == ["m [a]", "m [b]"]


def test_tables_carry_their_token_counts():
    """Every paper row says how many tokens back it; per layer and region too (soft fractions count by area)."""
    names = ["layers.0.blocks.0.mlp", "layers.1.blocks.0.mlp"]
    counts = RegionRoutingCounts(names, 3, by="all")
    routing = {names[0]: record([[[0, 1], [2, 0]]]), names[1]: record([[[1, 2], [1, 0]]])}
    soft = np.zeros((1, R, 1, 2))
    soft[0, 0, 0, 0], soft[0, R - 1, 0, 0] = 0.25, 0.75  # token 0: a quarter eyes, the rest background
    soft[0, 1, 0, 1] = 1.0  # token 1: nose
    counts.update(routing, {(1, 2): soft})
    paper = paper_table(counts.table(n_boot=0)).set_index("Facial Region")
    assert paper.loc["eyes", "Tokens"] == pytest.approx(0.5) and paper.loc["nose", "Tokens"] == pytest.approx(2.0)
    assert paper.loc["hair_background", "Tokens"] == pytest.approx(1.5) and paper["Tokens"].sum() == pytest.approx(4.0)
    tokens = counts.region_tokens().set_index(["layer", "region"])
    assert tokens.loc[(names[1], "nose"), "tokens"] == pytest.approx(1.0) and tokens.loc[(names[1], "nose"), "percent"] == pytest.approx(50.0)
    assert counts.face_token_share() == pytest.approx(1 - 1.5 / 4)
