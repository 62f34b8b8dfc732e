"""Streaming linear CKA against an independent U-centred HSIC reference, and its invariances."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from skimage.data import lfw_subset

from moescope.stats.cka import StreamingCKA, hsic1, layer_features, plan_batches, zero_diagonal_gram
from moescope.errors import DataError, MoescopeError


def u_centred(a: np.ndarray) -> np.ndarray:
    """U-centring of Székely & Rizzo (2014), written entry by entry (diagonal of ``a`` ignored)."""
    n = len(a)
    a = a.copy()
    np.fill_diagonal(a, 0.0)
    row, col, total = a.sum(axis=1), a.sum(axis=0), a.sum()
    out = np.zeros_like(a)
    for i in range(n):
        for j in range(n):
            if i != j:
                out[i, j] = a[i, j] - row[i] / (n - 2) - col[j] / (n - 2) + total / ((n - 1) * (n - 2))
    return out


def reference_hsic(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased HSIC (Song et al. 2012) as the U-centred inner product <K~, L~> / (n (n - 3))."""
    n = len(x)
    return float((u_centred(x @ x.T) * u_centred(y @ y.T)).sum() / (n * (n - 3)))


def reference_cka(batches: list[tuple[np.ndarray, np.ndarray]]) -> float:
    xy = sum(reference_hsic(x, y) for x, y in batches)
    xx = sum(reference_hsic(x, x) for x, _ in batches)
    yy = sum(reference_hsic(y, y) for _, y in batches)
    return xy / np.sqrt(xx * yy)


def streaming_cka(x: torch.Tensor, y: torch.Tensor, batch_size: int, mode: str = "flatten") -> float:
    cka = StreamingCKA(mode)
    for batch in plan_batches(len(x), batch_size)[0]:
        cka.update("layer", x[batch.start : batch.stop], y[batch.start : batch.stop])
    return cka.compute()["layer"]


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    """48 real LFW face crops (25x25 grey pixels) as [48, 625] float64 features."""
    return torch.from_numpy(lfw_subset()[:48].reshape(48, -1))


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_hsic1_matches_u_centred_reference_on_real_faces(faces):
    x = faces[:12].numpy()
    y = np.tanh(x @ np.random.default_rng(0).normal(size=(625, 40)))  # a nonlinear view of the same faces
    k, l = zero_diagonal_gram(torch.from_numpy(x)), zero_diagonal_gram(torch.from_numpy(y))
    assert hsic1(k, l).item() == pytest.approx(reference_hsic(x, y), rel=1e-9, abs=1e-9)
    assert hsic1(k, k).item() == pytest.approx(reference_hsic(x, x), rel=1e-9)


def test_streaming_equals_sum_of_reference_batch_statistics(faces):
    x = faces
    y = torch.relu(faces @ torch.randn(625, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    # 48 images in batches of 10: the last batch has 8 >= 4 images, so nothing is folded
    batches, note = plan_batches(48, 10)
    assert note is None and [len(b) for b in batches] == [10, 10, 10, 10, 8]
    expected = reference_cka([(x[b.start : b.stop].numpy(), y[b.start : b.stop].numpy()) for b in batches])
    assert streaming_cka(x, y, 10) == pytest.approx(expected, abs=1e-6)
    # a single full batch is the full-batch unbiased CKA
    assert streaming_cka(x, y, 48) == pytest.approx(reference_cka([(x.numpy(), y.numpy())]), abs=1e-6)


def test_batch_order_does_not_matter(faces):
    y = faces**2
    forward, backward = StreamingCKA(), StreamingCKA()
    batches = plan_batches(48, 8)[0]
    for b in batches:
        forward.update("l", faces[b.start : b.stop], y[b.start : b.stop])
    for b in reversed(batches):
        backward.update("l", faces[b.start : b.stop], y[b.start : b.stop])
    assert forward.compute()["l"] == pytest.approx(backward.compute()["l"], abs=1e-12)


def test_cka_of_a_representation_with_itself_is_one(faces):
    assert streaming_cka(faces, faces, 12) == pytest.approx(1.0, abs=1e-12)
    as_float32 = (faces * 1000).float()  # float32 inputs are accumulated in float64
    assert streaming_cka(as_float32, as_float32, 12) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("side", ["x", "y"])
def test_invariant_to_orthogonal_transforms_and_isotropic_scaling(faces, side):
    other = torch.tanh(faces @ torch.randn(625, 50, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    rotated = faces @ random_orthogonal(625, seed=3) * 7.5
    if side == "x":
        base, changed = streaming_cka(faces, other, 12), streaming_cka(rotated, other, 12)
    else:
        base, changed = streaming_cka(other, faces, 12), streaming_cka(other, rotated, 12)
    assert 0.05 < base < 0.999  # a non-trivial value, so the invariance is not vacuous
    assert changed == pytest.approx(base, abs=1e-10)


def test_not_invariant_to_anisotropic_scaling(faces):
    """Guards the invariance test: a non-isotropic map does change CKA."""
    other = faces**2
    scaled = faces * torch.linspace(0.01, 10, 625, dtype=torch.float64)
    assert abs(streaming_cka(scaled, other, 12) - streaming_cka(faces, other, 12)) > 1e-3


def test_independent_high_dimensional_data_gives_near_zero():
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(256, 2000, generator=gen), torch.randn(256, 2000, generator=gen)
    assert abs(streaming_cka(x, y, 32)) < 0.05
    # the same data is far from 0 under the biased (centred Gram) estimator, which the unbiased one corrects
    kx, ky = (lambda h: h @ h.T)(x.double() - x.double().mean(0)), (lambda h: h @ h.T)(y.double() - y.double().mean(0))
    biased = (kx * ky).sum() / torch.sqrt((kx * kx).sum() * (ky * ky).sum())
    assert biased > 0.3


def test_mean_mode_pools_tokens(faces):
    tokens_x = faces[:, :600].reshape(48, 24, 25)  # [B, N=24, C=25]
    tokens_y = torch.sin(tokens_x * 3)
    pooled = streaming_cka(tokens_x.mean(1), tokens_y.mean(1), 12)
    assert streaming_cka(tokens_x, tokens_y, 12, mode="mean") == pytest.approx(pooled, abs=1e-12)
    assert streaming_cka(tokens_x, tokens_y, 12) == pytest.approx(streaming_cka(tokens_x.reshape(48, -1), tokens_y.reshape(48, -1), 12), abs=1e-12)


def test_layer_features_shapes():
    t = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)  # [B, H, W, C]
    assert layer_features(t).shape == (2, 60)
    assert torch.equal(layer_features(t, "mean"), t.reshape(2, 12, 5).mean(1))
    assert torch.equal(layer_features(t.reshape(2, 12, 5)), t.reshape(2, 60))
    assert torch.equal(layer_features(t.reshape(2, 60), "mean"), t.reshape(2, 60))
    with pytest.raises(ValueError):
        layer_features(torch.zeros(2, 3, 4, 5, 6))
    with pytest.raises(ValueError):
        layer_features(t, "max")


@pytest.mark.parametrize("n_images,batch_size", list(itertools.product([4, 5, 7, 63, 64, 65, 66, 67, 68, 130], [4, 5, 16, 64])))
@pytest.mark.parametrize("short_last", ["fold", "drop"])
def test_plan_batches_covers_images_with_batches_of_at_least_four(n_images, batch_size, short_last):
    batches, note = plan_batches(n_images, batch_size, short_last)
    covered = [i for b in batches for i in b]
    remainder = n_images % batch_size
    short = 0 < remainder < 4 and n_images > batch_size
    assert all(len(b) >= 4 for b in batches)
    assert covered == list(range(len(covered)))  # consecutive, each image once
    if short_last == "drop" and short:
        assert len(covered) == n_images - remainder and "dropped" in note
    else:
        assert len(covered) == n_images
        assert (note is not None and "folded" in note) == short


def test_errors():
    with pytest.raises(MoescopeError, match="at least 4"):
        plan_batches(100, 3)
    with pytest.raises(DataError, match="got 3"):
        plan_batches(3, 64)
    cka = StreamingCKA()
    with pytest.raises(MoescopeError, match="blocks.0"):
        cka.update("blocks.0", torch.randn(3, 8), torch.randn(3, 8))
    with pytest.raises(ValueError):
        cka.update("blocks.0", torch.randn(5, 8), torch.randn(6, 8))


def test_constant_features_give_nan_and_table_columns():
    cka = StreamingCKA()
    cka.update("flat", torch.ones(6, 4), torch.randn(6, 4))
    cka.update("same", torch.arange(24.0).reshape(6, 4) ** 2, torch.arange(24.0).reshape(6, 4) ** 2)
    table = cka.to_frame()
    assert list(table.layer) == ["flat", "same"]
    assert np.isnan(table.cka[0]) and table.cka[1] == pytest.approx(1.0)
    assert table.images.tolist() == [6, 6] and table.batches.tolist() == [1, 1]
