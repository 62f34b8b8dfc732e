"""Margin heads against their defining formulas, computed independently (via angles in float64)."""
from __future__ import annotations

import math

import pytest
import torch

from facemoe_model.margin_heads import AdaFace, ArcFace, CosFace, margin_head


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.randn(6, 16), torch.tensor([0, 1, 2, 3, 4, 0])


def reference_cos(head, emb):
    e = emb.double() / emb.double().norm(dim=1, keepdim=True)
    w = head.weight.double() / head.weight.double().norm(dim=1, keepdim=True)
    return e @ w.T


def test_cosface_subtracts_margin_from_target_cosine(batch):
    emb, labels = batch
    head = CosFace(16, 5)
    cos = reference_cos(head, emb)
    expected = 64 * cos
    expected[torch.arange(6), labels] -= 64 * 0.4
    torch.testing.assert_close(head(emb, labels).double(), expected, atol=1e-3, rtol=1e-5)


def test_arcface_adds_angular_margin(batch):
    emb, labels = batch
    head = ArcFace(16, 5)
    cos = reference_cos(head, emb)
    expected = 64 * cos
    for i, y in enumerate(labels.tolist()):
        expected[i, y] = 64 * math.cos(min(math.acos(cos[i, y].item()) + 0.5, math.pi))
    torch.testing.assert_close(head(emb, labels).double(), expected, atol=1e-3, rtol=1e-5)


def test_adaface_margin_follows_feature_norm(batch):
    emb, labels = batch
    head = AdaFace(16, 5).eval()
    head.batch_mean.fill_(emb.norm(dim=1).mean())
    head.batch_std.fill_(emb.norm(dim=1).std())
    # high-norm (high-quality) embeddings get a larger additive margin than low-norm ones
    low = head(emb * 0.5, labels)
    high = head(emb * 2.0, labels)
    cos = reference_cos(head, emb)
    rows = torch.arange(6)
    assert torch.all(high[rows, labels] < low[rows, labels] + 1e-4)
    # non-target logits are the plain scaled cosine
    mask = torch.ones_like(cos, dtype=torch.bool)
    mask[rows, labels] = False
    torch.testing.assert_close(high.double()[mask], 64 * cos[mask], atol=1e-3, rtol=1e-5)


def test_margin_head_by_name_and_unknown():
    assert isinstance(margin_head("ArcFace", 8, 3), ArcFace)
    with pytest.raises(ValueError, match="unknown margin head 'sphereface'"):
        margin_head("sphereface", 8, 3)
