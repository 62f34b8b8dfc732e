"""Shared fixtures: the official test vector and small real inputs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep caches out of the user's home; one torch thread (tiny models run fastest on one,
    and OpenMP spin-waits stall badly on a shared 2-core machine), also in CLI subprocesses."""
    os.environ.setdefault("MOESCOPE_CACHE", str(tmp_path_factory.mktemp("moescope-cache")))
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def official_vector() -> dict:
    return torch.load(DATA / "official_swin_moe_tiny_vector.pt", weights_only=True)


@pytest.fixture(scope="session")
def official_model_pt(official_vector, tmp_path_factory) -> Path:
    """The tiny test vector's state_dict saved as a bare official ``model.pt``."""
    path = tmp_path_factory.mktemp("official") / "model.pt"
    torch.save(official_vector["state_dict"], path)
    return path
