"""Evaluation protocols: hand-worked cases, brute-force references and real photos end to end."""
from __future__ import annotations

import cv2
import matplotlib.cbook
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.data import astronaut, lfw_subset
from torch import nn

from facemoe_model.data.datasets import LabelledImages, gallery_probe_split, preprocess
from facemoe_model.evaluate import (
    best_threshold,
    cmc_curve,
    consecutive_folds,
    embed_dataset,
    embed_images,
    identification_metrics,
    mate_ranks,
    tar_at_far,
    verification_accuracy,
    verification_metrics,
)
from facemoe_model.errors import DataError


def real_photos() -> list[np.ndarray]:
    """Astronaut, Grace Hopper and 8 LFW faces as RGB uint8 images."""
    hopper = cv2.cvtColor(cv2.imread(str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))), cv2.COLOR_BGR2RGB)
    faces = [cv2.cvtColor((f * 255).round().astype(np.uint8), cv2.COLOR_GRAY2RGB) for f in lfw_subset()[:8]]
    return [astronaut(), hopper, *faces]


def perturbed(image: np.ndarray, seed: int) -> np.ndarray:
    """A mildly degraded copy: slight blur and noise, like a second shot of the same face."""
    noise = np.random.default_rng(seed).normal(0, 4, image.shape)
    return np.clip(cv2.GaussianBlur(image, (3, 3), 0.8) + noise, 0, 255).astype(np.uint8)


class PixelEmbedder(nn.Module):
    """A fixed 'model': mean-centred 8x8 thumbnails, so cosine similarity is image correlation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = F.adaptive_avg_pool2d(x, 8).flatten(1)
        return flat - flat.mean(dim=1, keepdim=True)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=4), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 16),
    )


@pytest.fixture(scope="module")
def photo_batch() -> torch.Tensor:
    return torch.stack([preprocess(p, 64) for p in real_photos()])


# --- embeddings ---------------------------------------------------------------------------


def test_embeddings_are_flip_fused_and_normalised(photo_batch):
    model = small_net().eval()
    with torch.no_grad():
        reference = F.normalize(model(photo_batch) + model(photo_batch.flip(3)), dim=1).numpy()
        unflipped = F.normalize(model(photo_batch), dim=1).numpy()
    embeddings = embed_images(model, photo_batch, batch_size=4)
    np.testing.assert_allclose(embeddings, reference, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(embed_images(model, photo_batch.flip(3)), embeddings, atol=1e-5)  # mirror-invariant
    np.testing.assert_allclose(embed_images(model, photo_batch, batch_size=1), embeddings, atol=1e-5)
    np.testing.assert_allclose(embed_images(model, photo_batch, flip=False), unflipped, atol=1e-5)
    assert not np.allclose(unflipped, embeddings, atol=1e-3)  # the flip does contribute


def test_embedding_uses_eval_mode_and_restores_every_module_mode(photo_batch):
    model = small_net().train()
    model[3].eval()  # a mixed state: dropout frozen while the rest trains
    modes = [m.training for m in model.modules()]
    running_mean = model[1].running_mean.clone()
    first = embed_images(model, photo_batch)
    np.testing.assert_allclose(embed_images(model, photo_batch), first)  # dropout off: deterministic
    assert torch.equal(model[1].running_mean, running_mean)  # batch norm was not updated
    assert [m.training for m in model.modules()] == modes


def test_embed_dataset_matches_embed_images(photo_batch):
    photos = real_photos()
    dataset = LabelledImages([(cv2.imencode(".png", p[:, :, ::-1])[1].tobytes(), i) for i, p in enumerate(photos)], [], "photos", size=64)
    model = small_net()
    np.testing.assert_allclose(embed_dataset(model, dataset, batch_size=3), embed_images(model, photo_batch), atol=1e-5)


# --- the forward-pass loop (facemoe_model.inference) ------------------------------------------


def test_eval_mode_restores_every_flag_also_on_errors():
    from facemoe_model.inference import eval_mode

    a, b = small_net().train(), small_net().train()
    b[3].eval()
    before = [m.training for m in (*a.modules(), *b.modules())]
    with pytest.raises(RuntimeError):
        with eval_mode(a, b):
            assert not any(m.training for m in (*a.modules(), *b.modules()))
            raise RuntimeError("boom")
    assert [m.training for m in (*a.modules(), *b.modules())] == before


def test_run_batches_inference_and_grad_paths(photo_batch):
    from facemoe_model.data.images import normalise
    from facemoe_model.inference import model_device, run_batches

    model = small_net().train()
    assert model_device(model) == torch.device("cpu") and model_device(nn.ReLU()) == torch.device("cpu")
    outputs = run_batches(model, photo_batch.split(4))
    first = next(outputs)
    assert not model.training and first.is_inference() and not torch.is_inference_mode_enabled()  # not leaked between batches
    rest = list(outputs)
    assert model.training and [len(o) for o in [first, *rest]] == [4, 4, 2]
    with torch.no_grad():
        reference = model.eval()(photo_batch)
    model.train()
    torch.testing.assert_close(torch.cat([first, *rest]), reference)
    # grad=True: a leaf in [0, 1] pixels, normalised on the way in, receives the gradient
    x01 = ((photo_batch[:3] + 1) / 2).requires_grad_(True)
    (out,) = run_batches(model, [normalise(x01)], grad=True)
    out.pow(2).sum().backward()
    assert x01.grad is not None and x01.grad.abs().sum() > 0 and model.training
    # a batch that does not require grad becomes a leaf that does
    (inputs, out), = run_batches(model, [photo_batch[:2].clone()], grad=True, with_inputs=True)
    out.sum().backward()
    assert inputs.requires_grad and inputs.grad.shape == (2, 3, 64, 64)


def test_random_routing_embeddings_do_not_depend_on_batch_size():
    """``ablate --random`` style: the same embeddings with batches of 7 and of 64."""
    from facemoe_model.hooks import ExpertUsage
    from facemoe_model.moe import RoutingOverride, override_routing
    from moescope.demo import load_model

    model = load_model("demo:after")
    faces = [cv2.cvtColor((f * 255).round().astype(np.uint8), cv2.COLOR_GRAY2RGB) for f in lfw_subset()[:20]]
    images = torch.stack([preprocess(f, model.img_size) for f in faces])
    runs, usages = {}, {}
    for batch_size in (7, 64):
        with override_routing(model, RoutingOverride(random_seed=3)), ExpertUsage(model) as usage:
            runs[batch_size] = embed_images(model, images, batch_size=batch_size)
        usages[batch_size] = usage.counts
    assert all(np.array_equal(usages[7][name], usages[64][name]) for name in usages[7])  # the same experts ran
    np.testing.assert_allclose(runs[7], runs[64], atol=1e-5)
    plain = embed_images(model, images)
    assert np.abs(runs[64] - plain).max() > 100 * np.abs(runs[7] - runs[64]).max()  # random routing did change them
    with override_routing(model, RoutingOverride(random_seed=4)):
        assert np.abs(embed_images(model, images) - runs[64]).max() > 100 * np.abs(runs[7] - runs[64]).max()


# --- verification: hand-worked cases -------------------------------------------------------


def test_best_threshold_hand_cases():
    # sorted: 0.1 (diff), 0.35 (diff), 0.4 (same), 0.8 (same) -> cut between 0.35 and 0.4, all correct
    assert best_threshold(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, True, False, True])) == (pytest.approx(0.375), 1.0)
    # same pair at 0.2, different at 0.6: accept all (1 right), cut at 0.4 (0 right), reject all (1 right);
    # the tie between accept-all and reject-all goes to the lowest threshold, -inf
    assert best_threshold(np.array([0.2, 0.6]), np.array([True, False])) == (-np.inf, 0.5)


def test_ten_fold_accuracy_hand_case():
    # 10 folds of two pairs (same, different). Folds 1-9: same 0.8, different 0.2. Fold 0 inverted: same 0.1, different 0.9.
    scores = np.array([0.1, 0.9] + [0.8, 0.2] * 9)
    issame = np.array([True, False] * 10)
    result = verification_accuracy(scores, issame)
    # Held-out fold 0: folds 1-9 separate perfectly at 0.5; fold 0 then gets both pairs wrong -> 0.
    # Held-out fold k > 0: the candidates on the other folds score 9/18 (accept all), 8/18 (0.15), 16/18 (0.5),
    # 8/18 (0.85), 9/18 (reject all) -> 0.5 again, and fold k is all right -> 1.
    np.testing.assert_allclose(result.fold_accuracies, [0.0] + [1.0] * 9)
    np.testing.assert_allclose(result.thresholds, 0.5)
    assert result.mean == pytest.approx(0.9)
    assert result.std == pytest.approx(0.3)  # sqrt((0.9^2 + 9 * 0.1^2) / 10)


def test_tar_at_far_hand_case():
    impostor = np.arange(10) / 10  # 0.0 ... 0.9
    genuine = np.array([0.95, 0.85, 0.75, 0.65, 0.5])
    tar = tar_at_far(genuine, impostor, fars=(0.01, 0.1, 0.3, 1.0))
    assert np.isnan(tar[0.01])  # 0.01 * 10 impostors < 1: not measurable
    assert tar[0.1] == pytest.approx(0.4)  # 1 impostor may pass: threshold 0.8 (2nd highest); 0.95, 0.85 pass
    assert tar[0.3] == pytest.approx(0.8)  # 3 may pass: threshold 0.6; 0.95, 0.85, 0.75, 0.65 pass
    assert tar[1.0] == 1.0


def test_consecutive_folds():
    np.testing.assert_array_equal(consecutive_folds(20, 10), np.repeat(np.arange(10), 2))
    assert np.all(np.diff(consecutive_folds(6000)) >= 0) and np.bincount(consecutive_folds(6000)).tolist() == [600] * 10
    assert consecutive_folds(4, 10).tolist() == [0, 2, 5, 7]  # fewer pairs than folds: one pair per fold


# --- verification: brute-force references --------------------------------------------------


def brute_force_fold_accuracy(scores, issame, folds):
    """Try every cut of the training scores explicitly; keep the first (lowest) best one."""
    accuracies, thresholds = [], []
    for fold in sorted(set(folds.tolist())):
        train, test = folds != fold, folds == fold
        values = sorted(set(scores[train].tolist()))
        candidates = [-np.inf] + [(a + b) / 2 for a, b in zip(values, values[1:])] + [np.inf]
        best, best_correct = None, -1
        for t in candidates:
            correct = sum((s >= t) == same for s, same in zip(scores[train], issame[train]))
            if correct > best_correct:
                best, best_correct = t, correct
        thresholds.append(best)
        accuracies.append(np.mean([(s >= best) == same for s, same in zip(scores[test], issame[test])]))
    return np.array(accuracies), np.array(thresholds)


def brute_force_tar(genuine, impostor, far):
    """The lowest impostor-score threshold whose measured FAR (score > t) stays within far."""
    allowed = np.floor(far * len(impostor) * (1 + 1e-9))
    if allowed < 1:
        return np.nan
    for t in [-np.inf] + sorted(impostor):
        if sum(s > t for s in impostor) <= allowed:
            return np.mean([g > t for g in genuine])


@pytest.mark.parametrize("seed", range(5))
def test_verification_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    issame = rng.random(200) < 0.5
    scores = np.round(rng.normal(issame * 0.8, 0.5), 1)  # rounded: many ties
    folds = np.sort(rng.integers(0, 10, 200))
    result = verification_accuracy(scores, issame, folds)
    accuracies, thresholds = brute_force_fold_accuracy(scores, issame, folds)
    np.testing.assert_allclose(result.fold_accuracies, accuracies)
    np.testing.assert_allclose(result.thresholds, thresholds)
    genuine, impostor = scores[issame], scores[~issame]
    for far, tar in tar_at_far(genuine, impostor, fars=(1e-3, 1e-2, 0.05, 0.1, 0.5)).items():
        np.testing.assert_allclose(tar, brute_force_tar(genuine, impostor, far))


# --- identification ------------------------------------------------------------------------


def test_identification_hand_case():
    # Gallery: identities 10, 11, 12, a distractor (-1) and a second image of 11.
    # Embeddings are chosen so that probe @ gallery.T is exactly the score table below.
    gallery_labels = np.array([10, 11, 12, -1, 11])
    scores = np.array(
        [
            [0.9, 0.1, 0.2, 0.3, 0.0],  # id 10: mate 0.9 is the top score -> rank 1
            [0.5, 0.2, 0.1, 0.8, 0.6],  # id 11: best mate 0.6, only the distractor (0.8) is above -> rank 2
            [0.7, 0.6, 0.1, 0.65, 0.5],  # id 12: mate 0.1, all 4 others are above -> rank 5
            [0.4, 0.4, 0.0, 0.0, 0.0],  # id 10: mate 0.4 tied with id 11's 0.4; ties count against -> rank 2
        ]
    )
    probe_labels = np.array([10, 11, 12, 10])
    ranks = mate_ranks(scores, probe_labels, np.eye(5), gallery_labels)
    np.testing.assert_array_equal(ranks, [1, 2, 5, 2])
    np.testing.assert_allclose(cmc_curve(ranks, 6), [0.25, 0.75, 0.75, 0.75, 1.0, 1.0])
    metrics = identification_metrics(scores, probe_labels, np.eye(5), gallery_labels, ranks=(1, 2, 5))
    assert metrics == {"probes": 4, "gallery": 5, "distractors": 1, "Rank-1": 0.25, "Rank-2": 0.75, "Rank-5": 1.0}


def brute_force_ranks(scores, probe_labels, gallery_labels):
    """Sort each probe's gallery by score (non-mates first on ties) and find the first mate."""
    ranks = []
    for row, label in zip(scores, probe_labels):
        order = sorted(range(len(row)), key=lambda g: (-row[g], gallery_labels[g] == label))
        ranks.append(1 + next(i for i, g in enumerate(order) if gallery_labels[g] == label))
    return np.array(ranks)


@pytest.mark.parametrize("seed", range(5))
def test_identification_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    gallery_labels = np.concatenate([np.arange(15), rng.integers(0, 15, 10), -np.ones(20, dtype=int)])
    probe_labels = rng.integers(0, 15, 40)
    gallery, probes = rng.integers(-2, 3, (45, 6)).astype(float), rng.integers(-2, 3, (40, 6)).astype(float)  # integer scores: ties
    ranks = mate_ranks(probes, probe_labels, gallery, gallery_labels, chunk_size=7)
    np.testing.assert_array_equal(ranks, brute_force_ranks(probes @ gallery.T, probe_labels, gallery_labels))


def test_probes_without_a_gallery_mate_are_an_error():
    gallery_labels = np.array([0, 1, -1])
    with pytest.raises(DataError, match=r"2 probe images have no gallery mate \(identities \[7\]\)"):
        mate_ranks(np.eye(3)[:3], np.array([0, 7, 7]), np.eye(3), gallery_labels)
    with pytest.raises(DataError, match="no gallery mate"):  # a distractor label is no identity
        mate_ranks(np.eye(3)[:1], np.array([-1]), np.eye(3), gallery_labels)


# --- real photos end to end ----------------------------------------------------------------


def write_png(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image[:, :, ::-1])


def test_identification_on_real_photos(tmp_path):
    photos = real_photos()
    for i, photo in enumerate(photos[:8]):
        write_png(tmp_path / "gallery" / f"person{i}" / "a.png", photo)
        write_png(tmp_path / "probe" / f"person{i}" / "b.png", perturbed(photo, i))
    for j, photo in enumerate(photos[8:]):
        write_png(tmp_path / "distractors" / f"d{j}.png", photo)
    split = gallery_probe_split(tmp_path, size=64)
    model = PixelEmbedder()
    metrics = identification_metrics(
        embed_dataset(model, split.probe), split.probe.labels, embed_dataset(model, split.gallery), split.gallery.labels
    )
    assert metrics["distractors"] == 2 and metrics["gallery"] == 10 and metrics["probes"] == 8
    assert metrics["Rank-1"] == 1.0  # every mildly degraded photo finds itself first


def test_verification_on_real_photos():
    faces = real_photos()
    model = PixelEmbedder()
    originals = embed_images(model, torch.stack([preprocess(f, 64) for f in faces]))
    copies = embed_images(model, torch.stack([preprocess(perturbed(f, 1), 64) for f in faces]))
    embeddings = np.concatenate([originals, copies])
    n = len(faces)
    genuine = [(i, n + i) for i in range(n)]  # a face and its degraded copy
    impostor = [(i, n + (i + 1) % n) for i in range(n)]  # a face and another face's copy
    pairs = np.array([p for g, m in zip(genuine, impostor) for p in (g, m)])
    issame = np.array([True, False] * n)
    metrics = verification_metrics(embeddings, pairs, issame)  # 10 consecutive folds of (genuine, impostor)
    assert metrics["pairs"] == 20 and metrics["accuracy"] == 1.0 and metrics["accuracy_std"] == 0.0
    # 10 impostors: FAR 1e-1 lets 1 through and every genuine pair beats the 2nd best impostor; 1e-2 is unmeasurable
    assert metrics["TAR@FAR=1e-01"] == 1.0 and np.isnan(metrics["TAR@FAR=1e-02"])


def test_random_routing_keys_follow_the_image_not_its_position():
    """Through the protocols' cache an image's random routing is a function of its content."""
    from facemoe_model.moe import RoutingOverride, override_routing
    from facemoe_model.protocols import EmbeddingCache, source_key
    from moescope.demo import load_model

    model = load_model("demo:after")
    encoded = [cv2.imencode(".png", (f * 255).round().astype(np.uint8))[1].tobytes() for f in lfw_subset()[:10]]
    forward = LabelledImages([(e, i) for i, e in enumerate(encoded)], [], "forward", size=model.img_size)
    backward = LabelledImages([(e, i) for i, e in enumerate(encoded[::-1])], [], "backward", size=model.img_size)
    assert len({source_key(e) for e in encoded}) == 10 and all(0 <= source_key(e) < 2**62 for e in encoded)
    with override_routing(model, RoutingOverride(random_seed=5)):
        a = EmbeddingCache(model, batch_size=3)(forward)
        b = EmbeddingCache(model, batch_size=64)(backward)
    np.testing.assert_allclose(a, b[::-1], atol=1e-5)


def test_embedding_keeps_no_earlier_input_batch_alive():
    """The model's input batches are freed as it goes: (an itertools.tee of inputs and keys once
    kept up to 57 batches of images alive, ~275 MB at 16 images per batch on the demo model)."""
    import weakref

    seen: list[weakref.ref] = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(weakref.ref(x))
            assert sum(r() is not None for r in seen) <= 2, "earlier input batches are still alive"
            return x.flatten(1)[:, :8] * self.scale

    images = torch.randn(40, 3, 4, 4)
    out = embed_images(Probe(), images, batch_size=2, flip=True)
    assert len(seen) == 20 and out.shape == (40, 8)
    expected = F.normalize(images.flatten(1)[:, :8] + images.flip(-1).flatten(1)[:, :8], dim=1)
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-6, atol=1e-6)
