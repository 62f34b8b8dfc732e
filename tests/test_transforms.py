"""Degradation transforms on real photos: properties and independent references."""
from __future__ import annotations

import io

import cv2
import matplotlib.cbook
import numpy as np
import pytest
import skimage.data
import skimage.filters
from PIL import Image

from facemoe_model.data.transforms import (
    INTERPOLATIONS,
    DownUp,
    GaussianBlur,
    GaussianNoise,
    JpegCompression,
    RandomLowResolution,
)
from moescope.errors import DataError, MoescopeError


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()


@pytest.fixture(scope="module")
def hopper() -> np.ndarray:
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        return np.asarray(Image.open(fh).convert("RGB"))


def high_frequency_energy(image: np.ndarray) -> float:
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float64)
    return float((cv2.Laplacian(grey, cv2.CV_64F) ** 2).mean())


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "area"])
@pytest.mark.parametrize("size", [16, 32, 64])
def test_low_resolution_has_no_more_high_frequencies(astronaut, hopper, interpolation, size):
    for image in (astronaut, hopper):
        out = DownUp(size, interpolation)(image)
        assert out.shape == image.shape and out.dtype == np.uint8
        assert high_frequency_energy(out) < high_frequency_energy(image)


def test_smaller_sizes_lose_more_detail(astronaut):
    energies = [high_frequency_energy(DownUp(size, "bicubic")(astronaut)) for size in (16, 32, 64, 128, 256)]
    assert energies == sorted(energies)


def test_down_up_matches_block_average_reference(astronaut):
    """Nearest upsampling of an area-averaged image = repeated block means (factor 16)."""
    size, factor = 32, astronaut.shape[0] // 32
    blocks = astronaut.reshape(size, factor, size, factor, 3).astype(np.float64).mean(axis=(1, 3))
    reference = np.repeat(np.repeat(blocks, factor, axis=0), factor, axis=1)
    out = DownUp(size, "nearest")(astronaut)
    assert np.abs(out - reference).max() <= 1


def test_random_interpolation_is_seeded(astronaut):
    image = astronaut[::4, ::4].copy()
    a, b = DownUp(16, interpolation=None, rng=3), DownUp(16, interpolation=None, rng=3)
    outputs = [a(image) for _ in range(12)]
    assert all(np.array_equal(x, b(image)) for x in outputs)
    assert 2 <= len({x.tobytes() for x in outputs}) <= len(INTERPOLATIONS)


def test_blur_sigma_zero_is_identity_and_sigma_smooths(hopper):
    assert np.array_equal(GaussianBlur(0)(hopper), hopper)
    energies = [high_frequency_energy(GaussianBlur(s)(hopper)) for s in (0, 0.5, 1, 2, 4)]
    assert all(a > b for a, b in zip(energies, energies[1:]))


def test_blur_matches_scikit_image(astronaut):
    sigma = 1.5
    reference = skimage.filters.gaussian(astronaut, sigma=sigma, mode="mirror", truncate=3.0, channel_axis=-1,
                                         preserve_range=True)
    assert np.abs(GaussianBlur(sigma)(astronaut) - reference).mean() < 0.5


def test_jpeg_error_decreases_with_quality(astronaut, hopper):
    # hopper is itself a JPEG: shift it off its 8x8 block grid, or re-encoding near its own
    # quality would reproduce it almost exactly
    for image in (astronaut, np.ascontiguousarray(hopper[3:, 5:])):
        errors = [np.abs(JpegCompression(q)(image).astype(float) - image).mean() for q in (5, 20, 50, 80, 95)]
        assert all(a > b for a, b in zip(errors, errors[1:]))


def test_jpeg_matches_pillow_and_keeps_colours(astronaut):
    buffer = io.BytesIO()
    Image.fromarray(astronaut).save(buffer, format="JPEG", quality=40)
    reference = np.asarray(Image.open(buffer).convert("RGB")).astype(float)
    out = JpegCompression(40)(astronaut)
    assert np.abs(out - reference).mean() < 2.0
    assert np.abs(out.astype(float).mean((0, 1)) - astronaut.mean((0, 1))).max() < 2.0  # no RGB/BGR swap


def test_noise_has_the_requested_std_and_is_seeded(hopper):
    clean = np.clip(hopper, 60, 195).astype(np.uint8)  # no clipping at 5 sigma
    noisy = GaussianNoise(10.0, rng=0)(clean)
    assert abs((noisy.astype(float) - clean).std() - 10.0) < 0.3
    assert abs((noisy.astype(float) - clean).mean()) < 0.1
    assert np.array_equal(noisy, GaussianNoise(10.0, rng=0)(clean))
    assert not np.array_equal(noisy, GaussianNoise(10.0, rng=1)(clean))
    assert np.array_equal(GaussianNoise(0.0, rng=0)(clean), clean)


def test_random_low_resolution(astronaut):
    image = astronaut[::2, ::2].copy()
    a = RandomLowResolution((8, 48), interpolations=("bilinear", "bicubic", "area"), rng=7)
    b = RandomLowResolution((8, 48), interpolations=("bilinear", "bicubic", "area"), rng=7)
    for _ in range(8):
        out = a(image)
        assert np.array_equal(out, b(image))
        assert out.shape == image.shape
        assert high_frequency_energy(out) < high_frequency_energy(image)
    plain = RandomLowResolution((24, 24), interpolations=("bicubic",), blur_prob=0, jpeg_prob=0, rng=0)
    assert np.array_equal(plain(image), DownUp(24, "bicubic")(image))


def test_reprs_name_parameters():
    assert repr(DownUp(16, "area")) == "DownUp(size=16, interpolation='area')"
    assert "random" in repr(DownUp(16, None))
    assert repr(GaussianBlur(1.5)) == "GaussianBlur(sigma=1.5)"
    assert repr(JpegCompression(30)) == "JpegCompression(quality=30)"
    assert repr(GaussianNoise(4)) == "GaussianNoise(std=4)"
    text = repr(RandomLowResolution((8, 32), blur_prob=0.5, jpeg_quality=(20, 60)))
    assert "size_range=(8, 32)" in text and "blur_prob=0.5" in text and "jpeg_quality=(20, 60)" in text


def test_bad_inputs_raise_one_line_errors(astronaut):
    with pytest.raises(DataError, match="uint8"):
        GaussianBlur(1)(astronaut.astype(np.float32))
    with pytest.raises(DataError, match="H, W, 3"):
        JpegCompression(50)(astronaut[..., 0])
    for make, match in (
        (lambda: DownUp(0), "size"),
        (lambda: DownUp(16, "lanczos"), "lanczos"),
        (lambda: GaussianBlur(-1), "sigma"),
        (lambda: JpegCompression(101), "quality"),
        (lambda: GaussianNoise(-2), "std"),
        (lambda: RandomLowResolution((32, 8)), "size_range"),
        (lambda: RandomLowResolution(blur_prob=2), "blur_prob"),
    ):
        with pytest.raises(MoescopeError, match=match):
            make()
