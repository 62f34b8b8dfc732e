"""NMI per layer and its within-image permutation null: calibrated when routing ignores regions,
decisive when it follows them; an independent reference for the shuffle; the regions command's view."""
from __future__ import annotations

import numpy as np
import pytest

from moescope.regions import REGIONS
from moescope.stats.regions import RegionRoutingCounts
from moescope.stats.specialisation import PermutationNull, mutual_information, nmi_of_joints, null_sample
from moescope.trace import LayerRouting

R = len(REGIONS)


def routing(top1: np.ndarray, num_experts: int, grid: tuple[int, int]) -> LayerRouting:
    B, N = top1.shape
    topk = np.stack([top1, (top1 + 1) % num_experts], axis=-1)
    probs = np.full((B, N, num_experts), 1.0 / num_experts)
    return LayerRouting(topk=topk, weights=np.ones(topk.shape), probs=probs, logits=np.log(probs), grid=grid, weighting="logits")


def synthetic(seed: int, follows_regions: bool, images: int = 12, grid=(6, 6), experts: int = 3):
    """Images with different region compositions AND an image-level expert bias tied to that
    composition (the confound within-image shuffling must not mistake for specialisation)."""
    rng = np.random.default_rng(seed)
    N = grid[0] * grid[1]
    labels = np.empty((images, N), dtype=int)
    top1 = np.empty((images, N), dtype=int)
    for b in range(images):
        background = rng.uniform(0.2, 0.8)  # share of hair/background tokens of this image
        labels[b] = np.where(rng.random(N) < background, R - 1, rng.integers(0, R - 1, N))
        bias = np.array([background, 1 - background, 0.5])  # images with more background use expert 0 more
        if follows_regions:
            top1[b] = np.where(rng.random(N) < 0.6, labels[b] % experts, rng.integers(0, experts, N))
        else:
            top1[b] = rng.choice(experts, size=N, p=bias / bias.sum())
    fractions = np.zeros((images, R, N))
    np.put_along_axis(fractions, labels[:, None, :], 1.0, axis=1)
    return {"m.mlp": routing(top1, experts, grid)}, {grid: fractions.reshape(images, R, *grid)}


def null_p(routing_, fractions, resamples=99, seed=0) -> float:
    null = PermutationNull(["m.mlp"], 3, R, resamples=resamples, seed=seed)
    null.update(routing_, fractions)
    return float(null.table({"m.mlp": ["m.mlp"]})["p_value"].item())


def test_nmi_of_joints_matches_the_scalar_definition():
    rng = np.random.default_rng(0)
    joints = rng.random((5, R, 3)) * (rng.random((5, R, 3)) > 0.3)
    np.testing.assert_allclose(nmi_of_joints(joints), [mutual_information(j)[1] for j in joints])
    assert np.isnan(nmi_of_joints(np.zeros((R, 3))))
    assert np.isnan(nmi_of_joints(np.eye(R, 3)[:, [0, 0, 0]]))  # one expert only: H(E) = 0


def test_null_is_calibrated_when_routing_ignores_regions_even_with_image_confounds():
    ps = np.array([null_p(*synthetic(seed, follows_regions=False)) for seed in range(20)])
    assert (ps < 0.05).sum() <= 3 and 0.3 < ps.mean() < 0.7, ps
    # a global shuffle (labels across all images) would call the confound significant
    routing_, fractions = synthetic(0, follows_regions=False, images=40)
    counts = RegionRoutingCounts(["m.mlp"], 3)
    counts.update(routing_, fractions)
    observed = counts.specialisation().query("metric == 'nmi'")["value"].item()
    rng = np.random.default_rng(0)
    frac = fractions[(6, 6)].reshape(40, R, -1).transpose(0, 2, 1).reshape(-1, R)
    contrib = routing_["m.mlp"].contributions("top1").reshape(-1, 3)
    global_null = [mutual_information(frac[rng.permutation(len(frac))].T @ contrib)[1] for _ in range(99)]
    assert observed > max(global_null)
    assert null_p(routing_, fractions) > 0.05


def test_null_rejects_routing_that_follows_regions():
    for seed in range(3):
        assert null_p(*synthetic(seed, follows_regions=True), resamples=99) == pytest.approx(1 / 100)


def test_shuffle_against_an_independent_reference():
    """Same seed, same draws: the null tables equal an explicit loop that permutes each image's fractions."""
    from moescope.stats.specialisation import _id_hash

    routing_, fractions = synthetic(3, follows_regions=True, images=5)
    ids = [f"face{b}.png" for b in range(5)]
    null = PermutationNull(["m.mlp"], 3, R, resamples=7, seed=11)
    null.update(routing_, fractions, ids)
    observed, tables = null.joints()
    frac = fractions[(6, 6)].reshape(5, R, -1).transpose(0, 2, 1)
    contrib = routing_["m.mlp"].contributions("top1")
    np.testing.assert_allclose(observed[0], np.einsum("bnr,bne->re", frac, contrib))
    perms = [np.random.default_rng([11, 0x9E11, _id_hash(i), 6, 6]).permuted(np.broadcast_to(np.arange(36), (7, 36)), axis=1) for i in ids]
    for s in range(7):
        # permuting experts by perm == permuting fractions by its inverse: the same null law, here the same table
        expected = sum(frac[b].T @ contrib[b][perms[b][s]] for b in range(5))
        np.testing.assert_allclose(tables[s, 0], expected)
        # the marginals are untouched by the shuffle
        np.testing.assert_allclose(tables[s, 0].sum(1), observed[0].sum(1))
        np.testing.assert_allclose(tables[s, 0].sum(0), observed[0].sum(0))


def test_null_sample_is_seeded_and_the_draws_do_not_depend_on_batching():
    routing_, fractions = synthetic(1, follows_regions=True, images=30)
    ids = [f"img{b:02d}" for b in range(30)]
    drawn = null_sample(ids, 8, seed=4)
    assert drawn == null_sample(ids, 8, seed=4) != null_sample(ids, 8, seed=5)
    assert len(drawn) == 8 and drawn == sorted(drawn) and set(drawn) <= set(ids)
    assert null_sample(ids[:5], 8, seed=4) == ids[:5]
    runs = []
    for step in (7, 30, 1):  # the same images in other batches (or ranks): the same null, to rounding
        null = PermutationNull(["m.mlp"], 3, R, resamples=5, images=drawn, seed=4)
        for start in range(0, 30, step):
            sl = slice(start, start + step)
            r = routing_["m.mlp"]
            part = LayerRouting(r.topk[sl], r.weights[sl], r.probs[sl], r.logits[sl], r.grid, r.weighting)
            null.update({"m.mlp": part}, {(6, 6): fractions[(6, 6)][sl]}, ids[sl])
        assert null.kept == 8 and null.seen == 30
        runs.append(null.joints())
    for observed, tables in runs[1:]:
        np.testing.assert_allclose(observed, runs[0][0], rtol=1e-12)
        np.testing.assert_allclose(tables, runs[0][1], rtol=1e-12)


def test_token_counts_and_face_share():
    routing_, fractions = synthetic(2, follows_regions=False, images=4)
    counts = RegionRoutingCounts(["m.mlp"], 3)
    counts.update(routing_, fractions)
    tokens = counts.region_tokens()
    per_region = fractions[(6, 6)].sum(axis=(0, 2, 3))
    np.testing.assert_allclose(tokens["tokens"].to_numpy(), per_region)
    assert counts.face_token_share() == pytest.approx(1 - per_region[-1] / per_region.sum())
    layer = counts.layer_specialisation()
    assert layer["tokens"].item() == 4 * 36
    assert layer["nmi"].item() == pytest.approx(counts.specialisation().query("metric == 'nmi'")["value"].item())


# --- on the demo model: random routing vs the trained router ---------------------------------


@pytest.fixture(scope="module")
def demo_batch():
    from moescope.demo import demo_images_dir, load_model
    from moescope.faces import face_batches
    from facemoe_model.data.images import list_images
    from moescope.trace import select_layers

    model = load_model("demo:after")
    grids = [layer.token_grid for layer in select_layers(model).values()]
    batches = list(face_batches(list_images(demo_images_dir())[:48], grids, model.img_size, batch_size=48, progress=False))
    return model, batches


def layer_p_values(model, batches, resamples=99):
    from moescope.forward import forward_passes
    from moescope.trace import select_layers

    names = list(select_layers(model))
    null = PermutationNull(names, 3, R, resamples=resamples, seed=0)
    for step in forward_passes([model], batches):
        null.update(step.passes[0].routing, step.batch.fractions)
    return null.table({n: [n] for n in names})


def test_random_routing_is_not_specialised_and_the_trained_router_is(demo_batch):
    from facemoe_model.moe import RoutingOverride, override_routing

    model, batches = demo_batch
    trained = layer_p_values(model, batches)
    assert (trained["p_value"] <= 0.01).all()
    with override_routing(model, RoutingOverride(random_seed=3)):
        shuffled = layer_p_values(model, batches)
    assert (shuffled["p_value"] > 0.01).all() and (shuffled["observed"] < 3 * shuffled["null_mean"] + 1e-3).all(), shuffled


def test_regions_command_leads_with_the_per_layer_view_and_the_init_baseline(tmp_path, capsys):
    import json
    import shutil

    from moescope.cli import main
    from moescope.demo import demo_images_dir

    for folder in sorted(p for p in demo_images_dir().iterdir() if p.is_dir())[:4]:
        shutil.copytree(folder, tmp_path / folder.name)
    argv = ["regions", "demo:after", "--data", str(tmp_path), "--baseline", "init", "--null", "19", "--bootstrap", "0"]
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    nmi = result["tables"]["nmi"]
    assert {r["checkpoint"] for r in nmi} == {"after", "init"}
    layers = [r for r in nmi if r["scope"] == "layer" and r["checkpoint"] == "after"]
    assert len(layers) == result["summary"]["moe_layers"] and all(r["null_resamples"] == 19 and r["null_images"] == 16 for r in layers)
    assert all(r["p_value"] == pytest.approx(1 / 20) for r in layers)  # the trained router beats every shuffle
    view = result["summary"]["specialisation_after"]
    assert view["most_specialised"] == max(layers, key=lambda r: r["nmi"])["group"]
    assert 0.3 < result["summary"]["face_token_share"] < 0.6
    assert result["settings"]["baseline"]["kind"] == "init" and "paper_init" in result["tables"]
    assert all("Tokens" in row for row in result["tables"]["paper_after"])
    assert main(argv) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[1].startswith("face tokens: ") and text[3].startswith("specialisation per MoE layer")
    assert "init NMI" in text[4]
