"""Expert interventions (B.17 / B.7): exact restoration, what the routing really does, the table."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

import moescope.forward as forward_module
from facemoe_model import create_model, moe_layers
from facemoe_model.data.images import preprocess
from facemoe_model.hooks import ExpertUsage
from facemoe_model.evaluate import embed_images
from facemoe_model.margin_heads import CosFace
from facemoe_model.protocols import evaluate, load_protocols, write_split
from moescope.errors import MoescopeError
from moescope.interventions import plan_interventions
from moescope.runners.ablate import ablate_experts
from moescope.stats.usage import usage_table
from moescope.trace import RoutingTrace

IDENTITIES, SHOTS = 6, 2


def lfw_faces(n: int) -> list[np.ndarray]:
    """Real LFW face crops (25x25 grey) as RGB uint8."""
    return [cv2.cvtColor((f * 255).round().astype(np.uint8), cv2.COLOR_GRAY2RGB) for f in skimage.data.lfw_subset()[:n]]


def shot(face: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Another 'photo' of a face: shifted a pixel or two, brighter or darker, noisy."""
    dx, dy = rng.integers(-2, 3, size=2)
    moved = cv2.warpAffine(face, np.float32([[1, 0, dx], [0, 1, dy]]), face.shape[1::-1], borderMode=cv2.BORDER_REFLECT)
    return np.clip(moved * rng.uniform(0.8, 1.2) + rng.normal(0, 10, face.shape), 0, 255).astype(np.uint8)


def write_identity_split(root, identities: int = IDENTITIES, shots: int = SHOTS, seed: int = 0):
    """Gallery/probe split with pairs.txt: ``identities`` LFW faces x ``shots`` photos each."""
    rng = np.random.default_rng(seed)
    for i, face in enumerate(lfw_faces(identities)):
        for j in range(shots):
            (root / "ids" / f"person{i}").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "ids" / f"person{i}" / f"{j}.png"), shot(face, rng)[:, :, ::-1])
    return write_split(root / "ids", root / "split")


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    return write_identity_split(tmp_path_factory.mktemp("ablate"))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("facemoe_swin_tiny").eval()


@pytest.fixture(scope="module")
def data(split_dir, tiny):
    return load_protocols(split=split_dir, size=tiny.img_size)


@pytest.fixture(scope="module")
def trained():
    """The tiny model after a few CosFace steps on the split's identities (fresh photos): trained a little."""
    torch.manual_seed(0)
    model = create_model("facemoe_swin_tiny")
    head = CosFace(512, IDENTITIES, s=16.0, m=0.2)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=2e-3)
    rng = np.random.default_rng(1)
    faces = lfw_faces(IDENTITIES)
    labels = torch.arange(IDENTITIES).repeat(2)
    model.train()
    for _ in range(6):
        images = torch.stack([preprocess(shot(faces[i], rng), model.img_size) for i in labels.tolist()])
        loss = F.cross_entropy(head(model(images), labels), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def images(tiny):
    rng = np.random.default_rng(2)
    return torch.stack([preprocess(shot(face, rng), tiny.img_size) for face in lfw_faces(4)])


def snapshot(model):
    """Everything an intervention could leave behind: tensors, hooks, overrides, modes."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()},
        "params": [p.detach().clone() for p in model.parameters()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
        "overrides": [layer.override for layer in moe_layers(model).values()],
        "training": [m.training for m in model.modules()],
    }


def assert_same(before, after):
    assert before["state"].keys() == after["state"].keys()
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])
    assert all(torch.equal(a, b) for a, b in zip(before["params"], after["params"]))
    for key in ("hooks", "overrides", "training"):
        assert before[key] == after[key], key


def forward(model, x):
    with torch.no_grad():
        return model(x)


# --- specs and their expansion ------------------------------------------------------------


def test_drop_singles_and_pairs_expand_to_n_and_n_choose_2():
    model = create_model("facemoe_swin_tiny", num_experts=4)
    singles = plan_interventions(model, drop=["singles"])
    pairs = plan_interventions(model, drop=["pairs"])
    assert [i.name for i in singles] == [f"drop {e}" for e in range(4)]
    assert len(pairs) == math.comb(4, 2) and {i.override.dropped for i in pairs} == {(a, b) for a in range(4) for b in range(a + 1, 4)}
    (switch,) = plan_interventions(model, switch=[None])
    assert switch.override.permutation == (1, 2, 3, 0)  # cyclic shift e -> (e + 1) % N
    (custom,) = plan_interventions(model, switch=["3,2,1,0"])
    assert custom.override.permutation == (3, 2, 1, 0)
    (rand,) = plan_interventions(model, random=True, seed=7)
    assert rand.override.random_seed == 7
    combined = plan_interventions(model, drop=["singles", "0", "1,2"], switch=[None], random=True)
    assert [i.name for i in combined] == ["drop 0", "drop 1", "drop 2", "drop 3", "drop 1,2", "switch 1,2,3,0", "random seed 0"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(drop=["0,x"]), "--drop '0,x'"),
        (dict(drop=["0,0"]), "listed twice"),
        (dict(drop=["3"]), "3 experts"),
        (dict(drop=["-1"]), "3 experts"),
        (dict(drop=["0,1,2"]), "cannot drop all 3 experts"),
        (dict(switch=["0,0,1"]), "not a permutation of 0..2"),
        (dict(switch=["1,0"]), "not a permutation of 0..2"),
        (dict(drop=["0"], layers=["layers.7"]), "unknown MoE layer 'layers.7'"),
    ],
)
def test_bad_specs_are_one_line_errors(tiny, kwargs, message):
    with pytest.raises(MoescopeError) as exc:
        plan_interventions(tiny, **kwargs)
    assert message in str(exc.value) and "\n" not in str(exc.value)


# --- exact restoration --------------------------------------------------------------------


@pytest.mark.parametrize("spec", [dict(drop=["0,1"]), dict(drop=["2"]), dict(switch=[None]), dict(random=True)])
def test_intervention_restores_the_model_exactly(tiny, images, spec):
    (intervention,) = plan_interventions(tiny, **spec)
    before, clean = snapshot(tiny), forward(tiny, images)
    with intervention.apply(tiny) as affected:
        assert all(layer.override is intervention.override for layer in affected.values())
        assert not torch.equal(forward(tiny, images), clean)  # the intervention is really active
    assert_same(before, snapshot(tiny))
    assert torch.equal(forward(tiny, images), clean)
    with pytest.raises(RuntimeError, match="boom"):
        with intervention.apply(tiny, layers=["layers.1"]):
            forward(tiny, images)
            raise RuntimeError("boom")
    assert_same(before, snapshot(tiny))
    assert torch.equal(forward(tiny, images), clean)


def test_ablation_restores_the_model_after_an_exception_mid_run(tiny, data, images, monkeypatch):
    real = forward_module.evaluate  # the protocols' evaluation, as the ablation runs it

    def failing(model, *args, **kwargs):
        if any(layer.override is not None for layer in moe_layers(model).values()):
            raise RuntimeError("failure while an intervention is active")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(forward_module, "evaluate", failing)
    before, clean = snapshot(tiny), forward(tiny, images)
    with pytest.raises(RuntimeError, match="intervention is active"):
        ablate_experts(tiny, data, plan_interventions(tiny, switch=[None]), progress=False)
    assert_same(before, snapshot(tiny))
    assert torch.equal(forward(tiny, images), clean)


# --- what the routing really does (observed through the trace) ----------------------------


def test_dropped_expert_receives_zero_tokens(tiny, images):
    (intervention,) = plan_interventions(tiny, drop=["1"])
    calls = {}
    handles = [
        expert.register_forward_hook(lambda m, i, o, key=(name, e): calls.__setitem__(key, calls.get(key, 0) + i[0].shape[0]))
        for name, layer in moe_layers(tiny).items()
        for e, expert in enumerate(layer.experts)
    ]
    try:
        with intervention.apply(tiny), RoutingTrace(tiny) as trace:
            forward(tiny, images)
            routing = trace.pop()
    finally:
        for h in handles:
            h.remove()
    assert len(routing) == 6
    for name, r in routing.items():
        assert r.k == 2 and not (r.topk == 1).any() and (r.topk == 0).any() and (r.topk == 2).any()
        assert (name, 1) not in calls and calls[(name, 0)] > 0 and calls[(name, 2)] > 0  # expert 1 never ran


def test_usage_counts_every_forward_pass_once(tiny, images):
    """Assignments per layer = images x 2 (flip) x grid tokens x k, as the trace observed them."""
    with ExpertUsage(tiny) as usage:
        embed_images(tiny, images, batch_size=3)
    forwards = 2 * len(images)
    for name, layer in moe_layers(tiny).items():
        rows, cols = layer.token_grid
        assert usage.counts[name].sum() == forwards * rows * cols * layer.k
    assert all(len(m._forward_hooks) == 0 for m in tiny.modules())  # hooks removed on exit


def test_switch_on_one_layer_permutes_its_usage(tiny, data):
    """Scoped to the first MoE layer the router's choices are unchanged, so usage moves e -> perm[e] exactly."""
    first = next(iter(moe_layers(tiny)))
    result = ablate_experts(tiny, data, plan_interventions(tiny, switch=["2,0,1"], layers=[first]), layers=[first], flip=False, progress=False)
    table = result.tables["ablation"].set_index("intervention")
    base = table.loc["baseline", ["Expert 0 (%)", "Expert 1 (%)", "Expert 2 (%)"]].to_numpy()
    switched = table.loc["switch 2,0,1", ["Expert 0 (%)", "Expert 1 (%)", "Expert 2 (%)"]].to_numpy()
    assert np.allclose(switched[[2, 0, 1]], base) and not np.allclose(switched, base)
    assert result.summary["moe_layers"] == 1 and set(result.tables["expert_usage"]["layer"]) == {first, "all"}


def test_random_routing_is_deterministic_for_a_seed(tiny, images):
    def usage(seed):
        (intervention,) = plan_interventions(tiny, random=True, seed=seed)
        with intervention.apply(tiny), ExpertUsage(tiny) as counter:
            embed_images(tiny, images, batch_size=3)
        return usage_table(counter.counts)

    a, b, c = usage(3), usage(3), usage(4)
    assert a.equals(b) and not a["assignments"].equals(c["assignments"])


# --- the B.17 table -----------------------------------------------------------------------


def test_table_baseline_equals_protocols_evaluate_and_k_shrinks(tiny, data):
    expected = evaluate(tiny, data, batch_size=64)
    result = ablate_experts(tiny, data, plan_interventions(tiny, drop=["0,2", "1"]), progress=False)
    table = result.tables["ablation"]
    base = table.iloc[0]
    assert base["intervention"] == "baseline" and base["kind"] == "baseline"
    for rank in ("Rank-1", "Rank-5", "Rank-10", "Rank-20"):
        assert base[rank] == expected["identification"][rank]
    assert base["Verification accuracy"] == expected["verification"]["accuracy"]
    assert result.summary["identification"] == expected["identification"]
    metrics = result.tables["metrics"]
    baseline = metrics[metrics["intervention"] == "baseline"]
    got = {(p, m): v for p, m, v in zip(baseline["protocol"], baseline["metric"], baseline["value"])}
    want = {(p, m): v for p, ms in expected.items() for m, v in ms.items()}
    assert got.keys() == want.keys() and all(got[k] == want[k] or (np.isnan(got[k]) and np.isnan(want[k])) for k in want)
    assert result.to_json()  # JSON-clean (NaN -> null)

    # fewer than k experts left: k shrinks to 1, said in a warning, the one expert left takes every token
    table = table.set_index("intervention")
    assert list(table.index) == ["baseline", "drop 0,2", "drop 1"]
    assert table.loc["baseline", "k"] == 2 and table.loc["drop 1", "k"] == 2 and table.loc["drop 0,2", "k"] == 1
    assert table.loc["drop 0,2", ["Expert 0 (%)", "Expert 1 (%)", "Expert 2 (%)"]].tolist() == [0.0, 100.0, 0.0]
    assert table.loc["drop 1", "Expert 1 (%)"] == 0.0
    assert [w for w in result.warnings if "k shrinks" in w] == [
        "drop 0,2: only 1 of 3 experts left in the chosen layers, so k shrinks from 2 to 1 (every token is processed by all remaining experts)"
    ]
    usage = result.tables["expert_usage"]
    assert np.allclose(usage.groupby(["intervention", "layer"])["percent"].sum(), 100.0)


def test_interventions_change_accuracy_of_a_trained_model(trained, tmp_path):
    split = write_identity_split(tmp_path, shots=5, seed=5)  # 6 gallery images, 24 probes
    (split / "pairs.txt").unlink()
    data = load_protocols(split=split, size=trained.img_size)
    result = ablate_experts(trained, data, plan_interventions(trained, drop=["pairs"], switch=[None]), flip=False, progress=False)
    table = result.tables["ablation"].set_index("intervention")
    ranks = ["Rank-1", "Rank-5"]
    base = table.loc["baseline", ranks].to_numpy(dtype=float)
    changed = [name for name in table.index[1:] if not np.array_equal(table.loc[name, ranks].to_numpy(dtype=float), base)]
    assert len(changed) >= 3, table[ranks]
