"""The procedural face generator: determinism, ground truth, data set cache, mediapipe detection."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from facemoe_model.data import synthetic
from facemoe_model.data.synthetic import (
    LANDMARK_NAMES,
    REGION_NAMES,
    SyntheticConfig,
    generate_dataset,
    load_ground_truth,
    render_face,
    sample_identity,
    sample_nuisance,
)
from moescope.errors import DataError, MoescopeError
from moescope.landmarks import ALIGNED_FIVE_POINTS, ALIGNED_SIZE, detect_landmarks, five_points

CLEAN = SyntheticConfig(occlusion_prob=0.0, blur_prob=0.0, noise_prob=0.0)
REGION = {name: i for i, name in enumerate(REGION_NAMES)}


@pytest.fixture(scope="module")
def faces():
    """Default-config faces of a few identities (occlusions, blur and noise included)."""
    return [render_face(7, identity, sample) for identity in range(4) for sample in range(3)]


def test_render_is_deterministic_per_seed_identity_sample():
    a, b = render_face(3, 5, 2), render_face(3, 5, 2)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    assert np.array_equal(a.landmarks, b.landmarks)
    for other in (render_face(3, 5, 3), render_face(3, 6, 2), render_face(4, 5, 2)):
        assert np.abs(other.image.astype(int) - a.image).mean() > 5


def test_identity_is_fixed_across_samples_and_nuisances_vary():
    assert sample_identity(1, 9) == sample_identity(1, 9)
    assert sample_identity(1, 9) != sample_identity(1, 10) != sample_identity(2, 9)
    # nuisance knobs do not change who the person is
    assert sample_identity(1, 9, dataclasses.replace(CLEAN, yaw_deg=0.0)) == sample_identity(1, 9, CLEAN)
    poses = {sample_nuisance(1, 9, s).yaw for s in range(10)}
    assert len(poses) == 10


def test_shape_spread_scales_identity_differences():
    def widths(spread: float) -> np.ndarray:
        config = SyntheticConfig(shape_spread=spread)
        return np.array([sample_identity(0, i, config).face_width for i in range(40)])

    assert np.ptp(widths(0.0)) == 0
    assert np.std(widths(0.3)) < np.std(widths(1.0))


def test_outputs_have_the_documented_shapes(faces):
    face = faces[0]
    assert face.image.dtype == np.uint8 and face.image.shape == (120, 120, 3)
    assert face.masks.dtype == bool and face.masks.shape == (len(REGION_NAMES), 120, 120)
    assert face.landmarks.dtype == np.float32 and face.landmarks.shape == (len(LANDMARK_NAMES), 2)
    small = render_face(0, 1, 1, size=64)
    assert small.image.shape == (64, 64, 3) and small.masks.shape == (7, 64, 64)


def test_masks_are_a_partition(faces):
    for face in faces + [render_face(0, 2, 0, size=96)]:
        assert (face.masks.sum(axis=0) == 1).all()


def test_masks_sit_where_the_landmarks_are(faces):
    for face in faces:
        labels = face.masks.argmax(0)
        (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = face.landmarks

        def at(x: float, y: float) -> int:
            return labels[int(y), int(x)]

        assert at(lx, ly) == at(rx, ry) == REGION["eyes"]
        assert at(nx, ny) == REGION["nose"]
        mouth = np.argwhere(face.masks[REGION["mouth"]])[:, ::-1] + 0.5
        interocular = np.hypot(rx - lx, ry - ly)
        for corner in face.landmarks[3:]:
            assert np.linalg.norm(mouth - corner, axis=1).min() < 0.08 * interocular
        eye_y, mouth_y = (ly + ry) / 2, (mly + mry) / 2
        rows = np.arange(labels.shape[0])[:, None] * np.ones_like(labels)
        assert rows[labels == REGION["forehead"]].mean() < eye_y < rows[labels == REGION["cheeks"]].mean()
        assert rows[labels == REGION["chin_jawline"]].mean() > mouth_y
        assert labels[0, 0] == labels[0, -1] == REGION["hair_background"]


def test_landmarks_are_aligned_to_the_arcface_template(faces):
    template = ALIGNED_FIVE_POINTS * 120 / ALIGNED_SIZE
    interocular = np.linalg.norm(template[1] - template[0])
    still = dataclasses.replace(CLEAN, roll_deg=0.0, scale_jitter=0.0, shift_jitter=0.0)
    aligned = np.array([render_face(0, i, 0, config=still).landmarks for i in range(6)])
    jittered = np.array([face.landmarks for face in faces])
    aligned_error = np.linalg.norm(aligned - template, axis=-1).mean()
    assert aligned_error < 0.1 * interocular
    assert aligned_error < np.linalg.norm(jittered - template, axis=-1).mean()


def test_masks_follow_the_painted_features():
    """Image and masks share the warp: closed lips are redder and eyes darker than the cheeks."""
    redder, darker = 0, 0
    for identity in range(6):
        face = render_face(1, identity, 0, config=dataclasses.replace(CLEAN, expression=0.0))
        rgb = face.image.astype(float)
        grey = rgb.mean(-1)
        redness = rgb[..., 0] / (rgb.sum(-1) + 1)  # red chromaticity
        cheeks, mouth, eyes = (face.masks[REGION[n]] for n in ("cheeks", "mouth", "eyes"))
        redder += redness[mouth].mean() > redness[cheeks].mean()
        darker += grey[eyes].mean() < grey[cheeks].mean()
    assert redder == darker == 6


def test_yaw_moves_the_face_and_its_masks_together():
    left = render_face(0, 3, 0, config=dataclasses.replace(CLEAN, yaw_deg=0.0, roll_deg=0.0))
    nuisance = sample_nuisance(0, 3, 0, SyntheticConfig(yaw_deg=30.0))
    turned = render_face(0, 3, 0, config=dataclasses.replace(CLEAN, yaw_deg=30.0, roll_deg=0.0))
    # the nose (in front of the eyes) shifts towards the turn relative to the eye midpoint
    def nose_offset(face):
        nose = np.argwhere(face.masks[REGION["nose"]])[:, 1].mean()
        return nose - face.landmarks[:2, 0].mean()

    assert np.sign(nose_offset(turned) - nose_offset(left)) == np.sign(nuisance.yaw)


def test_config_validation_and_round_trip():
    config = SyntheticConfig(yaw_deg=20.0, blur_sigma=(0.5, 0.8))
    assert SyntheticConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(config)))) == config
    with pytest.raises(MoescopeError, match="occlusion_prob"):
        SyntheticConfig(occlusion_prob=1.5)
    with pytest.raises(MoescopeError, match="noise_std"):
        SyntheticConfig(noise_std=(5.0, 1.0))
    with pytest.raises(MoescopeError, match="colour_spread"):
        SyntheticConfig(colour_spread=-0.1)
    with pytest.raises(MoescopeError, match="unknown"):
        SyntheticConfig.from_dict({"yaw": 3})


def test_dataset_cache_hit_and_regeneration(tmp_path):
    out = tmp_path / "faces"
    assert generate_dataset(out, 2, 2, seed=5, size=64, workers=1) == out
    images = sorted(out.glob("*/*.png"))
    assert [p.relative_to(out).as_posix() for p in images] == ["00000/000.png", "00000/001.png", "00001/000.png", "00001/001.png"]
    truth = load_ground_truth(out)
    face = render_face(5, 1, 0, size=64)
    assert np.array_equal(truth.masks(2), face.masks) and np.array_equal(truth.landmarks[2], face.landmarks)
    assert truth.masks(slice(None)).shape == (4, 7, 64, 64) and len(truth) == 4
    assert truth.identities.tolist() == [0, 0, 1, 1] and truth.samples.tolist() == [0, 1, 0, 1]

    stamp = os.stat(images[0]).st_mtime_ns
    generate_dataset(out, 2, 2, seed=5, size=64, workers=1)  # cache hit: nothing rewritten
    assert os.stat(images[0]).st_mtime_ns == stamp

    manifest = out / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])  # a damaged manifest
    with pytest.raises(DataError):
        load_ground_truth(out)
    generate_dataset(out, 2, 2, seed=5, size=64, workers=1)
    assert os.stat(images[0]).st_mtime_ns != stamp
    assert json.loads(manifest.read_text())["n_images"] == 4

    generate_dataset(out, 1, 1, seed=5, size=64, workers=1, identity_offset=3)  # other arguments
    assert [p.relative_to(out).as_posix() for p in sorted(out.glob("*/*.png"))] == ["00003/000.png"]


def test_interrupted_generation_is_detected_and_redone(tmp_path, monkeypatch):
    out = tmp_path / "faces"

    def crash(seed, identity, sample, size, config):
        if identity == 1:
            raise KeyboardInterrupt
        return render_face(seed, identity, sample, size, config)

    monkeypatch.setattr(synthetic, "render_face", crash)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(out, 2, 1, size=48, workers=1)
    assert (out / "00000" / "000.png").exists()
    with pytest.raises(DataError, match="no complete synthetic data set"):
        load_ground_truth(out)
    monkeypatch.undo()
    truth = load_ground_truth(generate_dataset(out, 2, 1, size=48, workers=1))
    assert truth.identities.tolist() == [0, 1] and all(p.exists() for p in truth.paths)


def test_dataset_refuses_foreign_folders_and_bad_sizes(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(MoescopeError, match="not empty"):
        generate_dataset(tmp_path, 1, 1, workers=1)
    with pytest.raises(MoescopeError, match="samples_per_identity"):
        generate_dataset(tmp_path / "new", 1, 0, workers=1)


def test_parallel_generation_matches_serial(tmp_path):
    serial = load_ground_truth(generate_dataset(tmp_path / "a", 2, 1, size=48, workers=1))
    parallel = load_ground_truth(generate_dataset(tmp_path / "b", 2, 1, size=48, workers=2))
    assert np.array_equal(serial.packed_masks, parallel.packed_masks)
    for p, q in zip(serial.paths, parallel.paths):
        assert p.read_bytes() == q.read_bytes()


def test_mediapipe_finds_generated_faces(faces, tmp_path):
    landmarks = detect_landmarks([face.image for face in faces], cache_dir=tmp_path, workers=1, progress=False)
    found = [(face, lm) for face, lm in zip(faces, landmarks) if lm is not None]
    assert len(found) >= 0.9 * len(faces)
    errors = [
        np.linalg.norm(five_points(lm) - face.landmarks, axis=1).mean() / np.linalg.norm(face.landmarks[1] - face.landmarks[0])
        for face, lm in found
    ]
    assert np.median(errors) < 0.12
