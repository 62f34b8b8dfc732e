"""Routing stability under attacks and degradations (issue 12) on the demo model and demo faces.

Identity settings (eps 0, blur 0, native resolution) reproduce the clean row exactly; JPEG 100
within its own rounding; the routing change and its per-region split agree with brute-force
set arithmetic on routings recorded independently; attacks raise their loss, stay in budget and
lower Rank-1; the model is left as found; the commands print their tables.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from facemoe_model.data.images import preprocess, read_image
from facemoe_model.data.transforms import DownUp
from facemoe_model.protocols import evaluate_identification, load_protocols, lowres_probes
from moescope.attacks import AttackSetting
from moescope.cli import main
from moescope.demo import demo_split_dir, load_model
from moescope.errors import MoescopeError
from moescope.landmarks import detect_landmarks, template_landmarks
from moescope.occlusion import OCCLUSION_FILL, occlude
from moescope.regions import REGIONS, pool_to_grid, region_masks
from moescope.runners.stability import (
    ProbeDegradation,
    RegionRoutingChange,
    attack_stability,
    degradation_grid,
    degradation_stability,
)
from moescope.stats.agreement import routing_set_distance
from moescope.trace import RoutingTrace

NATIVE = 120  # the demo images' side (and the demo model's input)
IDENTITY = ["blur sigma=0", f"resolution {NATIVE}px"]


def _hook_counts(model):
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return [len(getattr(m, n)) for m in model.modules() for n in names]


@pytest.fixture(scope="module")
def model():
    return load_model("demo:after")


@pytest.fixture(scope="module")
def data(model):
    return load_protocols(split=demo_split_dir(), size=model.img_size)


@pytest.fixture(scope="module")
def degraded(model, data):
    """Every demo probe under identity degradations, JPEG 100, 16 px and an eye occlusion."""
    grid = degradation_grid(blur=[0], jpeg=[100], resolution=[NATIVE, 16], occlude=["eyes"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _hook_counts(model)
    result = degradation_stability(model, data, grid, batch_size=64, progress=False)
    assert _hook_counts(model) == hooks and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    return result


ATTACKS = [AttackSetting("fgsm", eps=0.0), AttackSetting("pgd", eps=0.0, steps=2), AttackSetting("mim", eps=0.0, steps=2),
           AttackSetting("fgsm"), AttackSetting("pgd", steps=4), AttackSetting("mim", steps=4)]


@pytest.fixture(scope="module")
def attacked(model, data):
    """Eight probes (two batches) under eps = 0 and 8/255 attacks, mate-away."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _hook_counts(model)
    flags = [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]
    result = attack_stability(model, data, ATTACKS, batch_size=4, max_probes=8, progress=False)
    assert _hook_counts(model) == hooks
    assert ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]) == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    return result


def _rows(result) -> pd.DataFrame:
    return result.tables["stability"].set_index("setting")


def _same_as_clean(result, names):
    table = _rows(result)
    cols = [c for c in table.columns if c.startswith(("Rank-", "Verification", "Expert "))]
    for name in names:
        assert (table.loc[name, cols] == table.loc["clean", cols]).all(), name
        assert table.loc[name, "routing change"] == 0.0 and table.loc[name, "top-1 changed"] == 0.0
        layer = result.tables["routing_change"].query("setting == @name")
        assert (layer["set_distance"] == 0).all() and (layer["top1_changed"] == 0).all()
        region = result.tables["region_change"].query("setting == @name")
        assert (region["set_distance"].fillna(0) == 0).all()
        usage = result.tables["expert_usage"]
        assert (usage.query("setting == @name")["assignments"].to_numpy() == usage.query("setting == 'clean'")["assignments"].to_numpy()).all()
        metrics = result.tables["metrics"]
        np.testing.assert_array_equal(metrics.query("setting == @name")["value"].to_numpy(float),
                                      metrics.query("setting == 'clean'")["value"].to_numpy(float))  # NaN (TAR at too small FAR) == NaN


def test_identity_degradations_are_exactly_clean(degraded):
    _same_as_clean(degraded, IDENTITY)
    assert _rows(degraded).loc[IDENTITY, "max usage deviation (pts)"].eq(0).all()


def test_eps_zero_attacks_are_exactly_clean(attacked):
    names = [n for n in _rows(attacked).index if "eps=0/255" in n]
    assert len(names) == 3
    _same_as_clean(attacked, names)
    assert (_rows(attacked).loc[names, ["Linf max (x255)", "L2 mean"]] == 0).all().all()


def test_jpeg_100_is_clean_within_its_rounding(degraded, data):
    """JPEG at quality 100 still rounds (YCbCr conversion, 4:2:0 chroma subsampling, DCT
    rounding): a few grey levels per pixel on average on these small synthetic faces, hence a
    little routing change, but far less than a real degradation and no usage shift."""
    image = read_image(data.split.probe.sources[0])
    from facemoe_model.data.transforms import JpegCompression

    assert 0 < np.abs(JpegCompression(100)(image).astype(int) - image).mean() <= 5
    table = _rows(degraded)
    jpeg, low = table.loc["jpeg q=100"], table.loc["resolution 16px"]
    assert 0 < jpeg["routing change"] < 0.05 and jpeg["routing change"] < low["routing change"] / 4
    assert abs(jpeg["Rank-1"] - table.loc["clean", "Rank-1"]) <= 0.05 < table.loc["clean", "Rank-1"] - low["Rank-1"]
    assert jpeg["max usage deviation (pts)"] < 0.5


def test_clean_and_lowres_rows_match_the_evaluation_protocol(model, data, degraded):
    """Identification is the protocols' (``moescope eval`` / ``--lowres``): same probes, same gallery."""
    table = _rows(degraded)
    for row, transform in (("clean", None), ("resolution 16px", lowres_probes(16))):
        expected = evaluate_identification(model, data.split, probe_transform=transform)
        for rank in ("Rank-1", "Rank-5", "Rank-10", "Rank-20"):
            assert table.loc[row, rank] == pytest.approx(expected[rank], abs=1e-12), (row, rank)
    assert table.loc["resolution 16px", "Rank-1"] < table.loc["clean", "Rank-1"]


def _recorded(model, images):
    with RoutingTrace(model) as trace, torch.inference_mode():
        model.eval()
        model(torch.stack([preprocess(im, model.img_size) for im in images]))
        return trace.pop()


def test_routing_change_agrees_with_brute_force_sets(model, data, degraded):
    """The 16-px row's per-layer and per-region routing change, recomputed from an independent
    trace of clean and down-up probes with Python sets; the raw-logit weights include values
    <= 0, so sets built from ``weight > 0`` (vmoe's construction) would be wrong."""
    images = [read_image(p) for p in data.split.probe.sources]
    clean = _recorded(model, images)
    low = _recorded(model, [DownUp(16, interpolation="bicubic")(im) for im in images])
    layers = degraded.tables["routing_change"].query("setting == 'resolution 16px'").set_index("layer")
    landmarks = [lm if lm is not None else template_landmarks(*im.shape[:2]) for im, lm in zip(images, detect_landmarks(images, progress=False))]
    masks = [region_masks(lm, *im.shape[:2]) for im, lm in zip(images, landmarks)]
    weights_at_most_zero = 0
    region_sums = np.zeros((2, len(REGIONS)))
    for name, a in clean.items():
        b = low[name]
        weights_at_most_zero += int((a.weights <= 0).sum())
        by_sets = np.array([[1 - len(set(x) & set(y)) / len(set(x) | set(y)) for x, y in zip(ta, tb)] for ta, tb in zip(a.topk, b.topk)])
        assert layers.loc[name, "set_distance"] == pytest.approx(by_sets.mean(), abs=1e-12)
        assert layers.loc[name, "top1_changed"] == pytest.approx((a.topk[..., 0] != b.topk[..., 0]).mean(), abs=1e-12)
        assert np.array_equal(routing_set_distance(a.topk, b.topk), by_sets)
        for i, m in enumerate(masks):
            frac = pool_to_grid(m, a.grid, input_hw=(model.img_size,) * 2).reshape(len(REGIONS), -1)
            region_sums += np.stack([frac.sum(1), frac @ by_sets[i]])
    assert weights_at_most_zero > 0
    regions = degraded.tables["region_change"].query("setting == 'resolution 16px' and layer == 'all'").set_index("region")
    assert np.allclose(regions.loc[list(REGIONS), "set_distance"].to_numpy(), region_sums[1] / region_sums[0], rtol=0, atol=1e-9)
    # sets from positive weights differ from the index sets on some tokens
    a = next(iter(clean.values()))
    positive = [set(t[w > 0]) for t, w in zip(a.topk.reshape(-1, a.k), a.weights.reshape(-1, a.k))]
    assert any(p != set(t) for p, t in zip(positive, a.topk.reshape(-1, a.k)))


def test_region_routing_change_against_loops():
    rng = np.random.default_rng(0)
    from moescope.trace import LayerRouting

    def routing(topk):
        b, n, k = topk.shape
        return {"L": LayerRouting(topk, np.zeros((b, n, k)), np.zeros((b, n, 4)), np.zeros((b, n, 4)), (2, 3), "logits")}

    a = np.stack([rng.permutation(4)[:2] for _ in range(12)]).reshape(2, 6, 2)
    b = np.stack([rng.permutation(4)[:2] for _ in range(12)]).reshape(2, 6, 2)
    frac = rng.dirichlet(np.ones(3), size=(2, 6)).transpose(0, 2, 1).reshape(2, 3, 2, 3)
    acc = RegionRoutingChange(["r0", "r1", "r2"])
    acc.update(routing(a), routing(b), {(2, 3): frac})
    got = acc.to_frame().query("layer == 'L'").set_index("region")
    for r in range(3):
        num = den = flips = 0.0
        for i in range(2):
            for n in range(6):
                w = frac[i, r].reshape(-1)[n]
                sa, sb = set(a[i, n]), set(b[i, n])
                num += w * (1 - len(sa & sb) / len(sa | sb))
                flips += w * (a[i, n, 0] != b[i, n, 0])
                den += w
        assert got.loc[f"r{r}", "set_distance"] == pytest.approx(num / den)
        assert got.loc[f"r{r}", "top1_changed"] == pytest.approx(flips / den)


def test_occluding_the_eyes_flips_the_eye_tokens_most(degraded):
    regions = degraded.tables["region_change"].query("setting == 'occlude eyes' and layer == 'all'").set_index("region")
    assert regions["set_distance"].idxmax() == "eyes"
    assert degraded.summary["most_changed_region"]["occlude eyes"] == "eyes"


def test_occlude_sets_exactly_the_region(data):
    image = read_image(data.split.probe.sources[0])
    (lm,) = detect_landmarks([image], progress=False)
    out = occlude(image, lm, "nose")
    mask = region_masks(lm, *image.shape[:2])[REGIONS.index("nose")]
    assert mask.any() and (out[mask] == OCCLUSION_FILL).all() and np.array_equal(out[~mask], image[~mask])
    with pytest.raises(MoescopeError, match="unknown region"):
        occlude(image, lm, "ears")


def test_attacks_raise_their_loss_stay_in_budget_and_lower_rank1(attacked):
    table = _rows(attacked)
    real = [n for n in table.index if "eps=8/255" in n]
    assert len(real) == 3
    assert (table.loc[real, "loss after"] > table.loc[real, "loss before"]).all()
    assert (table.loc[real, "loss increased (%)"] == 100).all()
    assert (table.loc[real, "Linf max (x255)"] <= 8 + 1e-3).all()
    assert (table.loc[real, "routing change"] > 0).all()
    assert table.loc["PGD Linf eps=8/255 4 steps", "Rank-1"] < table.loc["clean", "Rank-1"]
    assert attacked.summary["probes"] == 8 and any("subsampled 8 of 200" in n for n in attacked.settings["notes"])


def test_usage_tables_are_shares_of_the_recorded_assignments(attacked):
    usage = attacked.tables["expert_usage"]
    for (setting, layer), g in usage.groupby(["setting", "layer"]):
        assert g["percent"].sum() == pytest.approx(100.0)
    per_layer = attacked.tables["routing_change"].query("setting == 'clean'")
    assignments = usage.query("setting == 'clean' and layer != 'all'").groupby("layer", sort=False)["assignments"].sum()
    assert (assignments.loc[per_layer["layer"]].to_numpy() == 2 * per_layer["tokens"].to_numpy()).all()  # k = 2


def test_subsampling_takes_one_probe_per_identity_first(model, data):
    from moescope.runners.stability import _probe_side

    probes = _probe_side(data, 100)
    assert len(probes.sources) == 100 and len(set(probes.labels.tolist())) == 100


def test_bad_degradations_are_one_line_errors():
    for kind, value, message in (("blur", -1, "sigma"), ("jpeg", 0, "quality"), ("resolution", 0, ">= 1"),
                                 ("occlude", "ears", "unknown region"), ("sharpen", 1, "unknown degradation")):
        with pytest.raises(MoescopeError, match=message):
            ProbeDegradation(kind, value)


@pytest.mark.parametrize("argv, message", [
    (["degrade", "--occlude", "ears"], "unknown region"),
    (["degrade", "--jpeg", "high"], "--jpeg"),
    (["attack", "--lowres", "16"], "--lowres"),
    (["attack", "--eps", "8/0"], "--eps"),
    (["attack", "--attack", "cw"], "unknown attack"),
    (["attack", "--max-probes", "0"], "--max-probes"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moescope: error:") and message in err[0]


def test_cli_prints_the_tables_and_writes_files(tmp_path, capsys):
    assert main(["attack", "--attack", "pgd", "--eps", "8/255", "--steps", "2", "--max-probes", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "moescope attack: demo:after" in out and "PGD Linf eps=8/255 2 steps" in out and "per facial region" in out
    assert "note: subsampled 4 of 200 probes" in out and "time:" in out
    assert (tmp_path / "stability.csv").is_file() and (tmp_path / "attack_sweep.png").is_file()
    assert main(["degrade", "--resolution", "16", "--occlude", "mouth", "--max-probes", "4", "--json"]) == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert [r["setting"] for r in payload["tables"]["stability"]] == ["clean", "resolution 16px", "occlude mouth"]
    assert "moescope degrade" in captured.err


def test_clean_away_and_impostor_toward(model, data):
    """clean-away starts at a random point (and says so); impostor-toward pulls towards another identity."""
    settings = [AttackSetting("pgd", steps=2)]
    away = attack_stability(model, data, settings, loss="clean-away", max_probes=3, progress=False)
    assert any("random point" in n for n in away.settings["notes"])
    toward = attack_stability(model, data, settings, loss="impostor-toward", max_probes=3, progress=False)
    for result in (away, toward):
        row = _rows(result).iloc[1]
        assert row["loss after"] > row["loss before"] and row["Linf max (x255)"] <= 8 + 1e-3


def test_pairs_alone_perturb_the_second_images(model):
    """Without a split the probe side is each pair's second image; mate-away needs identities."""
    split = demo_split_dir()
    pairs = load_protocols(pairs=split / "pairs.txt", root=split, size=model.img_size)
    result = degradation_stability(model, pairs, [ProbeDegradation("resolution", 16)], max_probes=60, progress=False)
    table = _rows(result)
    assert "Rank-1" not in table.columns and table.loc["resolution 16px", "routing change"] > 0
    assert result.summary["probes"] == 60 and result.summary["gallery"] == 0
    with pytest.raises(MoescopeError, match="needs gallery identities"):
        attack_stability(model, pairs, [AttackSetting("fgsm")], loss="mate-away", max_probes=2, progress=False)


def test_attack_on_own_identity_folders_takes_every_probe(capsys):
    """The 100-probe default is for the bundled demo split only: --data DIR attacks all its probes."""
    from moescope.demo import demo_images_dir

    assert main(["attack", "--data", str(demo_images_dir()), "--attack", "fgsm", "--eps", "8/255", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    probes = payload["summary"]["probes"]
    assert probes > 100 and "subsampled" not in " ".join(payload["settings"].get("notes", []) + payload["warnings"])
