"""Attacks on the demo model and real demo faces: budgets, exactness, MIM vs PGD, flat state."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.robust import PGD as CaptumPGD
from captum.robust import AttackComparator

from facemoe_model.data.images import preprocess, read_image, to_unit_tensor
from moescope.attacks import (
    ATTACKS,
    LOSSES,
    MIM,
    PGD,
    AttackSetting,
    EmbeddingModel,
    attack_mode,
    get_loss,
    parse_eps,
    reference_embeddings,
    run_attack,
)
from moescope.demo import demo_split_dir, load_model
from moescope.errors import DataError, MoescopeError

N_IDS = 6
SETTINGS = [  # every attack and norm; L2 budgets in pixel units (an L2 ball of radius 0.5 on [0, 1] images)
    AttackSetting("fgsm"),
    AttackSetting("pgd", steps=4),
    AttackSetting("pgd", eps=0.5, alpha=0.2, steps=4, norm="L2"),
    AttackSetting("mim", steps=4),
    AttackSetting("mim", eps=0.5, alpha=0.2, steps=4, norm="L2"),
]
ULP = 2.0**-23  # float32 spacing at 1.0: (x + d) - x differs from d by at most this per pixel


def read_x01(path: Path, size: int) -> torch.Tensor:
    """Independent reference: a face as [0, 1] [3, size, size], datasets.preprocess without its normalisation."""
    rgb = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    resized = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(resized).permute(2, 0, 1).float() / 255.0


@pytest.fixture(scope="module")
def model():
    return load_model("demo:after")


@pytest.fixture(scope="module")
def faces(model):
    """First probe image and the gallery image of the first N_IDS demo identities, [0, 1]."""
    root = demo_split_dir()
    ids = sorted(p.name for p in (root / "probe").iterdir() if p.is_dir())[:N_IDS]
    probe_paths = [sorted((root / "probe" / i).glob("*.png"))[0] for i in ids]
    gallery_paths = [sorted((root / "gallery" / i).glob("*.png"))[0] for i in ids]
    probe = torch.stack([to_unit_tensor(read_image(p), model.img_size) for p in probe_paths])
    gallery = torch.stack([to_unit_tensor(read_image(p), model.img_size) for p in gallery_paths])
    return {"probe": probe, "gallery": gallery, "labels": np.arange(N_IDS), "probe_paths": probe_paths}


@pytest.fixture(scope="module")
def embedder(model):
    return EmbeddingModel(model)


@pytest.fixture(scope="module")
def embeddings(embedder, faces):
    with attack_mode(embedder.model), torch.no_grad():
        return {"probe": embedder(faces["probe"]), "gallery": embedder(faces["gallery"])}


def references(name, faces, embeddings):
    return reference_embeddings(name, faces["labels"], embeddings["probe"], embeddings["gallery"], faces["labels"], seed=0)


def test_embedding_model_matches_the_dataset_path(model, faces, embedder):
    """[0, 1] input through the wrapper == datasets.preprocess through the model, L2-normalised."""
    path = faces["probe_paths"][0]
    assert torch.equal(faces["probe"][0], read_x01(path, model.img_size))
    normalised = preprocess(read_image(path), model.img_size)
    with attack_mode(model), torch.no_grad():
        ours = embedder(faces["probe"][:1])
        direct = F.normalize(model(normalised[None]), dim=1)
    assert torch.equal(ours, direct)
    assert torch.allclose(ours.norm(dim=1), torch.ones(1))


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("setting", SETTINGS + [AttackSetting("pgd", steps=3, random_start=True), AttackSetting("mim", eps=0.5, alpha=0.2, steps=3, norm="L2", random_start=True)], ids=repr)
def test_eps_zero_is_exactly_clean(setting, loss_name, faces, embedder, embeddings):
    zero = AttackSetting(setting.attack, eps=0.0, alpha=setting.alpha, steps=setting.steps, norm=setting.norm, random_start=setting.random_start)
    out = run_attack(zero, embedder, get_loss(loss_name), faces["probe"], references(loss_name, faces, embeddings))
    assert torch.equal(out.adversarial, faces["probe"])
    with attack_mode(embedder.model), torch.no_grad():
        assert torch.equal(embedder(out.adversarial), embeddings["probe"])
    assert torch.equal(out.loss_after, out.loss_before)
    assert float(out.linf.max()) == 0.0 and float(out.l2.max()) == 0.0


@pytest.mark.parametrize("setting", SETTINGS + [AttackSetting("pgd", eps=0.5, alpha=0.2, steps=3, norm="L2", random_start=True), AttackSetting("mim", steps=3, random_start=True)], ids=repr)
def test_attacks_stay_in_their_ball_and_in_the_unit_box(setting, faces, embedder, embeddings):
    out = run_attack(setting, embedder, get_loss("mate-away"), faces["probe"], references("mate-away", faces, embeddings))
    delta = (out.adversarial - faces["probe"]).flatten(1)
    assert out.adversarial.min() >= 0.0 and out.adversarial.max() <= 1.0
    assert torch.equal(out.linf, delta.abs().amax(1)) and torch.equal(out.l2, delta.norm(dim=1))
    if setting.norm == "Linf":
        assert float(out.linf.max()) <= setting.eps + ULP
    else:
        assert float(out.l2.max()) <= setting.eps + ULP * delta.shape[1] ** 0.5
    assert float(out.linf.min()) > 0.0  # it did move every probe


CAPTUM_GRAD_WARNING = "ignore:Input Tensor .* did not already require gradients"  # captum's FGSM, on every step


@pytest.mark.filterwarnings(CAPTUM_GRAD_WARNING)
@pytest.mark.parametrize("norm,radius,step", [("Linf", 8 / 255, 2 / 255), ("L2", 0.5, 0.2)])
def test_mim_without_momentum_is_captum_pgd_step_for_step(norm, radius, step, faces, embedder, embeddings):
    loss, ref = get_loss("mate-away"), references("mate-away", faces, embeddings)
    x = faces["probe"][:3]
    with attack_mode(embedder.model):
        for steps in range(1, 5):
            pgd = CaptumPGD(embedder, loss, 0.0, 1.0).perturb(x, radius, step, steps, ref[:3], random_start=False, norm=norm)
            mim = MIM(embedder, loss, 0.0, 1.0).perturb(x, radius, step, steps, ref[:3], random_start=False, norm=norm, decay=0.0)
            assert torch.equal(mim, pgd), f"step {steps}"
        momentum = MIM(embedder, loss, 0.0, 1.0).perturb(x, radius, step, 4, ref[:3], norm=norm, decay=1.0)
    assert not torch.equal(momentum, pgd)  # the comparison is not vacuous: momentum changes the path


def test_mim_without_momentum_is_pgd_with_the_same_random_start(faces, embedder, embeddings):
    loss, ref = get_loss("clean-away"), references("clean-away", faces, embeddings)
    pgd = run_attack(AttackSetting("pgd", steps=3), embedder, loss, faces["probe"], ref, seed=3)
    mim = run_attack(AttackSetting("mim", steps=3, decay=0.0), embedder, loss, faces["probe"], ref, seed=3)
    assert torch.equal(mim.adversarial, pgd.adversarial)


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_loss_does_not_decrease(attack, loss_name, faces, embedder, embeddings):
    loss = get_loss(loss_name)
    setting = AttackSetting(attack)  # defaults: 8/255, alpha 2/255, 10 steps, mu 1
    out = run_attack(setting, embedder, loss, faces["probe"], references(loss_name, faces, embeddings))
    assert (out.loss_after >= out.loss_before).all()
    if loss.zero_gradient_at_start and attack == "fgsm":
        assert torch.equal(out.adversarial, faces["probe"])  # zero gradient, no random start: nothing moves
        assert "unchanged" in loss.start_note(attack)
    else:
        assert float((out.loss_after - out.loss_before).mean()) > 0.05


def test_clean_away_says_it_needs_a_random_start():
    clean = get_loss("clean-away")
    assert clean.needs_random_start and AttackSetting("pgd").uses_random_start(clean)
    assert "random point" in clean.start_note("pgd")
    mate = get_loss("mate-away")
    assert not mate.needs_random_start and mate.start_note("pgd") is None
    assert not AttackSetting("pgd").uses_random_start(mate) and AttackSetting("pgd", random_start=True).uses_random_start(mate)


def _hook_counts(model):
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return [len(getattr(m, n)) for m in model.modules() for n in names]


def test_model_left_as_found(model, faces, embedder, embeddings):
    """Parameters, .grad, requires_grad, train/eval flags and hooks are unchanged; attacks run in eval."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _hook_counts(model)
    ref = references("mate-away", faces, embeddings)
    eval_result = run_attack(AttackSetting("mim", steps=2), embedder, get_loss("mate-away"), faces["probe"], ref)
    model.train()
    model.layers[0].requires_grad_(False)
    flags = [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]
    try:
        for setting in SETTINGS:
            out = run_attack(setting, embedder, get_loss("mate-away"), faces["probe"], ref)
            assert out.adversarial.grad_fn is None and not out.adversarial.requires_grad
        train_result = run_attack(AttackSetting("mim", steps=2), embedder, get_loss("mate-away"), faces["probe"], ref)

        def failing(embeddings, reference):
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):  # flags restored on an exception too
            with attack_mode(model):
                MIM(embedder, failing, 0.0, 1.0).perturb(faces["probe"], 8 / 255, 2 / 255, 2, ref)
        assert ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]) == flags
    finally:
        model.eval()
        model.requires_grad_(True)
    assert torch.equal(train_result.adversarial, eval_result.adversarial)  # dropout/batch-norm in eval during the attack
    assert all(p.grad is None for p in model.parameters())
    assert _hook_counts(model) == hooks
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("setting", [AttackSetting("fgsm"), AttackSetting("pgd", steps=3), AttackSetting("mim", steps=3), AttackSetting("mim", eps=0.5, alpha=0.2, steps=3, norm="L2")], ids=repr)
def test_batch_of_one_equals_batch_of_n(setting, faces, model):
    """Each probe is attacked on its own: in float64, where the batch size cannot flip a gradient's
    sign (in float32, kernels that round differently for another batch size flip 1-2 of 259,200
    pixels of an FGSM/PGD step)."""
    model64 = load_model("demo:after").double()  # a fresh copy: earlier tests leave a graph in each layer's aux_loss
    embedder = EmbeddingModel(model64)
    faces = {**faces, "probe": faces["probe"].double(), "gallery": faces["gallery"].double()}
    with attack_mode(model64), torch.no_grad():
        embeddings = {"probe": embedder(faces["probe"]), "gallery": embedder(faces["gallery"])}
    loss, ref = get_loss("mate-away"), references("mate-away", faces, embeddings)
    batch = run_attack(setting, embedder, loss, faces["probe"], ref).adversarial
    single = torch.cat([run_attack(setting, embedder, loss, faces["probe"][i : i + 1], ref[i : i + 1]).adversarial for i in range(N_IDS)])
    assert batch.dtype == torch.float64 and torch.equal(batch, single)


def test_random_start_is_seeded_and_leaves_the_global_rng_alone(faces, embedder, embeddings):
    loss, ref = get_loss("clean-away"), references("clean-away", faces, embeddings)
    setting = AttackSetting("pgd", eps=0.5, alpha=0.2, steps=2, norm="L2")
    state = torch.random.get_rng_state()
    a, b = (run_attack(setting, embedder, loss, faces["probe"], ref, seed=1).adversarial for _ in range(2))
    c = run_attack(setting, embedder, loss, faces["probe"], ref, seed=2).adversarial
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_l2_random_start_is_per_example_inside_the_ball(faces, embedder):
    """captum's own L2 start broadcasts the radii along the image width; ours draws one per example."""
    x = faces["probe"]
    torch.manual_seed(0)
    point = PGD(embedder)._random_point(x, 0.5, "L2", 1)
    norms = (point - x).flatten(1).norm(dim=1)
    assert (norms <= 0.5 * (1 + 1e-5)).all() and (norms > 0.4).all()  # uniform in 43200 dims: near the sphere
    assert len(set(norms.tolist())) == N_IDS


@pytest.mark.filterwarnings(CAPTUM_GRAD_WARNING)
def test_mim_composes_with_attack_comparator(faces, embedder, embeddings):
    loss, ref = get_loss("mate-away"), references("mate-away", faces, embeddings)

    def similarity(embedding, target):
        return F.cosine_similarity(embedding, target, dim=1)

    comparator = AttackComparator(embedder, similarity)
    kwargs = {"radius": 8 / 255, "step_size": 2 / 255, "step_num": 3}
    comparator.add_attack(MIM(embedder, loss, 0.0, 1.0), "MIM", attack_kwargs=kwargs, additional_attack_arg_names=["target"])
    comparator.add_attack(PGD(embedder, loss, 0.0, 1.0), "PGD", attack_kwargs=kwargs, additional_attack_arg_names=["target"])
    with attack_mode(embedder.model):
        batch = comparator.evaluate(faces["probe"], target=ref)
    assert torch.allclose(batch["Original"], similarity(embeddings["probe"], ref), atol=1e-6)  # per probe
    summary = {name: float(value["mean"]) for name, value in comparator.summary().items()}
    assert summary["MIM"] < summary["Original"] - 0.1 and summary["PGD"] < summary["Original"] - 0.1


def test_reference_embeddings(faces, embeddings):
    labels = np.array([2, 0, 0, 5])
    gallery, probe = embeddings["gallery"], embeddings["probe"][:4]
    mate = reference_embeddings("mate-away", labels, probe, gallery, faces["labels"])
    assert torch.allclose(mate, gallery[labels], atol=1e-6)
    assert torch.allclose(reference_embeddings("clean-away", labels, probe, gallery, faces["labels"]), probe, atol=1e-6)
    imp = reference_embeddings("impostor-toward", labels, probe, gallery, faces["labels"], seed=4)
    chosen = [int(torch.argmax(gallery @ e)) for e in imp]
    assert all(c != l for c, l in zip(chosen, labels))
    assert torch.equal(imp, reference_embeddings("impostor-toward", labels, probe, gallery, faces["labels"], seed=4))
    two_images = np.array([0, 0, 1, -1])  # identity 0 has two gallery images: their mean; -1 is a distractor
    template = reference_embeddings("mate-away", np.array([0]), probe[:1], gallery[:4], two_images)
    assert torch.allclose(template[0], F.normalize(gallery[:2].mean(0), dim=0), atol=1e-6)
    for _ in range(5):
        imp = reference_embeddings("impostor-toward", np.array([0]), probe[:1], gallery[:4], two_images, seed=_)
        assert torch.allclose(imp[0], gallery[2], atol=1e-6)  # never itself, never the distractor
    with pytest.raises(DataError, match="no gallery image"):
        reference_embeddings("mate-away", np.array([9]), probe[:1], gallery, faces["labels"])


def test_bad_settings_are_one_line_errors():
    for kwargs in ({"attack": "cw"}, {"attack": "fgsm", "norm": "L2"}, {"attack": "pgd", "eps": -1.0},
                   {"attack": "pgd", "steps": 0}, {"attack": "mim", "decay": -0.5}, {"attack": "pgd", "norm": "L1"}):
        with pytest.raises(MoescopeError):
            AttackSetting(**kwargs)
    with pytest.raises(MoescopeError, match="unknown attack loss"):
        get_loss("cross-entropy")
    assert parse_eps("1/255, 2/255,0.5,0") == [1 / 255, 2 / 255, 0.5, 0.0]
    for bad in ("8/0", "x", "-1/255", "nan"):
        with pytest.raises(MoescopeError):
            parse_eps(bad)
