"""Five-point alignment, the canonical-crop test, the quality gate and large-image decoding,
on real photos (astronaut, grace_hopper, lfw_subset), the bundled demo faces and references."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import matplotlib.cbook
import numpy as np
import pytest
import skimage.data
from skimage.transform import SimilarityTransform

from facemoe_model.data.images import read_image
from facemoe_model.geometry import ALIGNED_FIVE_POINTS, ALIGNED_SIZE
from moescope import align
from moescope.landmarks import detect_landmarks, template_landmarks
from moescope.regions import REGIONS, pool_to_grid, region_masks

REPO = Path(__file__).resolve().parents[1]
DEMO_IMAGES = sorted((REPO / "facemoe_model" / "assets" / "demo" / "images").rglob("*.png"))
INPUT = 120


def detect(images: list[np.ndarray]) -> list[np.ndarray | None]:
    return detect_landmarks(images, workers=1, progress=False)


def face_token_share(landmarks: np.ndarray, height: int, width: int) -> float:
    """Share of a 20x20 token grid's area (of a 120-px model input) that is not hair_background."""
    fractions = pool_to_grid(region_masks(landmarks, height, width), (20, 20), input_hw=(INPUT, INPUT))
    return float(1 - fractions[REGIONS.index("hair_background")].mean())


def template_error(landmarks_in_output: np.ndarray, size: int = INPUT) -> np.ndarray:
    """Distance of each alignment point from the template, in 112-frame px."""
    points = align.alignment_points(landmarks_in_output) * (ALIGNED_SIZE / size)
    return np.linalg.norm(points - ALIGNED_FIVE_POINTS, axis=1)


@pytest.fixture(scope="module")
def photos() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    images = {
        "astronaut": skimage.data.astronaut(),
        "grace_hopper": read_image(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)),
    }
    found = detect(list(images.values()))
    assert all(lm is not None for lm in found)
    return {name: (image, lm) for (name, image), lm in zip(images.items(), found)}


@pytest.fixture(scope="module")
def lfw_subset() -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    grey = np.round(skimage.data.lfw_subset() * 255).astype(np.uint8)  # 100 faces, then 100 non-faces
    images = [np.repeat(image[..., None], 3, axis=2) for image in grey]
    return images, detect(images)


# ---------------------------------------------------------------------------------------------
# Transforms against independent references


def test_similarity_matches_skimage_least_squares():
    rng = np.random.default_rng(0)
    for _ in range(20):
        source, target = rng.normal(size=(5, 2)) * 40, rng.normal(size=(5, 2)) * 40
        reference = SimilarityTransform.from_estimate(source, target).params[:2]
        np.testing.assert_allclose(align.similarity_transform(source, target), reference, atol=1e-9)


def test_similarity_recovers_an_exact_transform_without_reflection():
    rng = np.random.default_rng(1)
    source = rng.normal(size=(5, 2)) * 30
    angle, scale, shift = 0.7, 2.5, np.array([10.0, -4.0])
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = align.similarity_transform(source, source @ rotation.T + shift)
    np.testing.assert_allclose(matrix, np.hstack([rotation, shift[:, None]]), atol=1e-9)
    mirrored = align.similarity_transform(source, source * [-1, 1])
    assert np.linalg.det(mirrored[:, :2]) > 0
    with pytest.raises(ValueError):
        align.similarity_transform(np.zeros((5, 2)), source)


def blob_image(size: tuple[int, int], centre: np.ndarray, sigma: float) -> np.ndarray:
    rows, cols = np.mgrid[0 : size[0], 0 : size[1]]
    d2 = (cols + 0.5 - centre[0]) ** 2 + (rows + 0.5 - centre[1]) ** 2
    return np.repeat(np.round(255 * np.exp(-d2 / (2 * sigma**2))).astype(np.uint8)[..., None], 3, axis=2)


def centroid(image: np.ndarray) -> np.ndarray:
    weight = image[..., 0].astype(np.float64)
    rows, cols = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    return np.array([(weight * (cols + 0.5)).sum(), (weight * (rows + 0.5)).sum()]) / weight.sum()


@pytest.mark.parametrize("scale", [1.3, 0.8, 0.2])  # 0.2: below PREFILTER_BELOW_SCALE
def test_warp_moves_pixels_like_the_landmark_transform(scale):
    """A blob at continuous point p lands at matrix @ p in the crop (continuous coordinates,
    output resize included), also through the area prefilter for large sources."""
    source_size = round(ALIGNED_SIZE / scale) + 40
    point = np.array([source_size * 0.45, source_size * 0.55])
    image = blob_image((source_size, source_size), point, sigma=3.0 / scale)
    angle = 0.3
    a = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = np.hstack([a, (np.array([56.0, 56.0]) - a @ point)[:, None]])
    crop = align.warp_face(image, matrix, INPUT)
    expected = align.apply_transform(matrix, point[None])[0] * (INPUT / ALIGNED_SIZE)
    np.testing.assert_allclose(centroid(crop), expected, atol=0.15)


def test_prefiltered_warp_of_an_upscaled_photo_matches_the_original(photos):
    image, landmarks = photos["astronaut"]
    direct = align.align_face(image, landmarks, mode="always", output_size=INPUT)
    big = cv2.resize(image, (image.shape[1] * 4, image.shape[0] * 4), interpolation=cv2.INTER_CUBIC)
    enlarged = align.align_face(big, landmarks * 4, mode="always", output_size=INPUT)
    np.testing.assert_allclose(enlarged.landmarks, direct.landmarks, atol=1e-3)
    difference = np.abs(enlarged.image.astype(int) - direct.image.astype(int))
    assert difference.mean() < 3.0


# ---------------------------------------------------------------------------------------------
# Real photos


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_real_photo_alignment(photos, name):
    image, landmarks = photos[name]
    face = align.align_face(image, landmarks, mode="auto", output_size=INPUT)
    assert face.aligned and face.image.shape == (INPUT, INPUT, 3) and face.image.dtype == np.uint8
    # The landmarks moved with the pixels: Face Mesh on the crop finds them where the matrix put them.
    redetected = detect([face.image])[0]
    assert redetected is not None
    assert np.linalg.norm(redetected - face.landmarks, axis=1).mean() < 1.5
    # No similarity fits the five points better than the one used (least squares).
    errors = template_error(face.landmarks)
    points = align.alignment_points(landmarks)
    rng = np.random.default_rng(0)
    for _ in range(50):
        jittered = align.alignment_matrix(points) + rng.normal(scale=[[1e-3, 1e-3, 0.2]], size=(2, 3))
        jittered[1, :2] = [-jittered[0, 1], jittered[0, 0]]  # keep it a similarity
        other = np.linalg.norm(align.apply_transform(jittered, points) - ALIGNED_FIVE_POINTS, axis=1)
        assert (other**2).sum() >= (errors**2).sum() - 1e-9
    assert abs(errors.mean() - face.residual) < 1e-6
    if name == "grace_hopper":
        assert errors.max() < 3.0  # measured 1.0-1.5 px
        assert template_error(redetected).max() < 3.0
    else:
        # Her broad smile puts the mouth corners 6.3 / 6.6 px from the template's, and no
        # similarity can do better; eyes and nose: 3.2-3.4 px.
        assert errors[:3].max() < 4.0 and errors.max() < 7.5
    before = face_token_share(landmarks, *image.shape[:2])
    after = face_token_share(face.landmarks, INPUT, INPUT)
    assert before < 0.15 and after > 0.40  # measured astronaut 3% -> 49%, grace_hopper 10% -> 48%
    assert align.face_quality(landmarks).accepted


def test_align_face_given_the_gates_measures_is_the_same_alignment(photos, lfw_subset):
    """prepare_face hands the gate's five points and residual to align_face: the crop, landmarks,
    matrix and residual are those align_face computes on its own (aligned photos, canonical crops)."""
    images, found = lfw_subset
    cases = [photos["astronaut"], photos["grace_hopper"]]
    cases += [(cv2.resize(image, (120, 120)), landmarks * (120 / image.shape[0])) for image, landmarks in zip(images[:20], found[:20]) if landmarks is not None]
    outcomes = set()
    for image, landmarks in cases:
        for mode in ("auto", "always", "none"):
            alone = align.align_face(image, landmarks, mode=mode, output_size=INPUT)
            given = align.align_face(image, landmarks, mode=mode, output_size=INPUT, measured=align.face_quality(landmarks))
            outcomes.add(alone.aligned)
            assert alone.aligned == given.aligned and alone.residual == given.residual
            for a, b in ((alone.image, given.image), (alone.landmarks, given.landmarks), (alone.matrix, given.matrix)):
                np.testing.assert_array_equal(a, b)
    assert outcomes == {True, False}


def test_align_none_and_auto_keep_the_photo_as_is(photos):
    image, landmarks = photos["astronaut"]
    kept = align.align_face(image, landmarks, mode="none", output_size=INPUT)
    assert kept.image is image and not kept.aligned
    np.testing.assert_array_equal(kept.landmarks, landmarks)
    assert not align.is_canonical(image.shape, align.alignment_points(landmarks))
    assert align.use_alignment("auto", image.shape, align.alignment_points(landmarks))
    with pytest.raises(ValueError):
        align.use_alignment("sometimes", image.shape, align.alignment_points(landmarks))


def test_demo_faces_are_canonical_and_left_unchanged():
    images = [read_image(path) for path in DEMO_IMAGES]
    assert len(images) == 160
    found = detect(images)
    assert all(lm is not None for lm in found)
    for image, landmarks in zip(images, found):
        face = align.align_face(image, landmarks, mode="auto", output_size=INPUT)
        assert not face.aligned and face.image is image
        assert align.alignment_shift(image.shape, align.alignment_points(landmarks)) <= align.CANONICAL_MAX_SHIFT
        assert align.face_quality(landmarks).accepted
    forced = align.align_face(images[0], found[0], mode="always", output_size=INPUT)
    assert forced.aligned and not np.array_equal(forced.image, images[0])


@pytest.mark.parametrize("size", [112, 120, 224])
def test_template_crops_are_canonical_at_any_square_size(size):
    landmarks = template_landmarks(size, size)
    points = align.alignment_points(landmarks)
    assert align.is_canonical((size, size, 3), points)
    assert not align.is_canonical((size, round(size * 0.82), 3), points * [0.82, 1])  # not square
    shifted = points + 12 * size / ALIGNED_SIZE
    assert not align.is_canonical((size, size, 3), shifted)
    centre = np.array([size / 2, size / 2])
    turn = np.radians(25)
    rotated = (points - centre) @ np.array([[np.cos(turn), np.sin(turn)], [-np.sin(turn), np.cos(turn)]]) + centre
    assert not align.is_canonical((size, size, 3), rotated)


# ---------------------------------------------------------------------------------------------
# Quality gate and face choice


def test_lfw_subset_faces_pass_and_the_meshed_texture_is_rejected(lfw_subset):
    _, found = lfw_subset
    faces, non_faces = found[:100], found[100:]
    assert all(lm is not None for lm in faces)
    assert all(align.face_quality(lm).accepted for lm in faces)
    meshed = [i for i, lm in enumerate(non_faces) if lm is not None]
    assert meshed  # Face Mesh fits a mesh to texture 10 (image 110) after upscaling
    for i in meshed:
        quality = align.face_quality(non_faces[i])
        assert "implausible_landmarks" in quality.reasons, (i, quality)


def test_quality_reasons_are_named_and_independent(photos):
    _, landmarks = photos["grace_hopper"]
    assert align.face_quality(landmarks, confidence=0.9).reasons == ()
    assert align.face_quality(landmarks, confidence=0.3).reasons == ("low_confidence",)
    small = align.face_quality(landmarks * 0.05)  # eyes 4 px apart
    assert small.reasons == ("face_too_small",) and small.measures["interocular_px"] < align.MIN_INTEROCULAR_PX
    squashed = landmarks * [1.0, 0.5]  # eye-mouth distance halved
    assert align.face_quality(squashed).reasons == ("implausible_landmarks",)
    scrambled = landmarks.copy()
    scrambled[align.NOSE_LANDMARK] += [0, 60]  # nose far below the mouth
    assert "poor_fit" in align.face_quality(scrambled).reasons
    everything = align.face_quality(landmarks * 0.01, confidence=0.1)
    assert set(everything.reasons) <= set(align.REJECTION_REASONS) and not everything.accepted


def test_largest_face_is_chosen(photos):
    _, landmarks = photos["astronaut"]
    centre = landmarks.mean(axis=0)
    smaller = (landmarks - centre) * 0.6 + centre + [200, 0]
    assert align.largest_face([smaller, landmarks, smaller * 0.5]) == 1
    assert align.largest_face([landmarks]) == 0
    with pytest.raises(ValueError):
        align.largest_face([])


# ---------------------------------------------------------------------------------------------
# Large images


def test_reduced_jpeg_decode_scales_coordinates_exactly():
    size, point = (803, 1001), np.array([611.3, 402.7])
    image = blob_image(size, point, sigma=12.0)
    _, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 98])
    data = encoded.tobytes()
    assert align.encoded_size(data) == size
    for reduction in align.JPEG_REDUCTIONS:
        decoded, scale = align.decode_reduced(data, reduction)
        assert decoded.shape[:2] == tuple(-(-np.array(size) // reduction))  # libjpeg: ceil
        np.testing.assert_array_equal(scale, [reduction, reduction])
        np.testing.assert_allclose(centroid(decoded) * scale, point, atol=0.3)
    _, png = cv2.imencode(".png", image)
    assert align.encoded_size(png.tobytes()) == size
    decoded, scale = align.decode_reduced(png.tobytes(), 4)
    np.testing.assert_allclose(centroid(decoded) * scale, point, atol=0.3)
    assert align.decode_reduced(b"not an image", 2) is None and align.encoded_size(b"nope") is None


def test_reduction_choices(photos):
    assert align.detection_reduction(2048, 1500) == 1
    assert align.detection_reduction(2049, 100) == 2
    assert align.detection_reduction(10000, 10000) == 8
    assert align.detection_reduction(40000, 100) == 8
    _, landmarks = photos["grace_hopper"]  # eyes 84 px apart: the crop's scale is 0.42
    assert align.warp_reduction(landmarks) == 2
    assert align.warp_reduction(landmarks * 0.2) == 1
    assert align.warp_reduction(landmarks * 40) == 8


@pytest.mark.slow
def test_large_jpeg_stays_under_the_memory_bound():
    """benchmarks/bench_large_image.py on a 10000x10000 JPEG: decode at 1/8, detect, warp from
    the reduced decode (the face is large), masks on the crop: peak RSS under 1.5 GB, and far
    less above the imports than the 286 MiB the full-resolution pixels alone would take."""
    command = [sys.executable, "-m", "benchmarks.bench_large_image", "--size", "10000", "--variants", "reduced", "--json"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])
    assert run["size"] == [10000, 10000] and run["detect_reduction"] == 8
    assert run["peak_mib"] < 1.5 * 1024**3 / 2**20
    assert run["peak_mib"] - run["baseline_mib"] < 150
    assert run["face_token_share"] > 0.40


# ---------------------------------------------------------------------------------------------
# The shared image path (moescope.faces): detection -> gate -> alignment -> regions -> batches


GRID = (20, 20)


def write_images(folder: Path, images: dict[str, np.ndarray], suffix: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in images.items():
        path = folder / f"{name}{suffix}"
        assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 98])
        paths.append(path)
    return paths


def run_path(paths, align_mode="auto", **kwargs):
    from moescope.faces import FaceStats, face_batches

    stats = FaceStats()
    batches = list(face_batches(paths, [GRID], INPUT, stats=stats, align=align_mode, workers=1, progress=False, **kwargs))
    return stats, batches


def face_share(fractions: np.ndarray) -> float:
    return float(1 - fractions[REGIONS.index("hair_background")].mean())


def test_shared_path_aligns_real_photos(tmp_path, photos):
    """astronaut and grace_hopper through face_batches with --align auto: both aligned, the model
    sees a face over 40% of its tokens (3% and 10% unaligned), five points as measured."""
    from moescope.faces import prepare_face
    from moescope.landmarks import detect_faces

    images = {name: image for name, (image, _) in photos.items()}
    paths = write_images(tmp_path / "photos", images)
    stats, batches = run_path(paths)
    assert stats.aligned == [str(p) for p in paths] and not stats.rejected_images and not stats.no_face
    (batch,) = batches
    assert batch.images.shape == (2, 3, INPUT, INPUT)
    shares = [face_share(f) for f in batch.fractions[GRID]]
    assert min(shares) > 0.40, shares  # measured astronaut 0.49, grace_hopper 0.48
    _, unaligned = run_path(paths, "none")
    assert max(face_share(f) for f in unaligned[0].fractions[GRID]) < 0.15
    for (name, image), face in zip(images.items(), detect_faces(list(images.values()), workers=1, progress=False)):
        prep = prepare_face(image, face, "auto", output_size=INPUT)
        errors = template_error(prep.landmarks)
        print(name, "five-point error (112 px):", errors.round(2), "confidence", round(face.confidence, 3))
        if name == "grace_hopper":
            assert errors.max() < 3.0  # measured 1.0-1.5 px
        else:  # the broad smile: mouth corners ~6.5 px off, and no similarity transform does better
            assert errors[:3].max() < 4.0 and 5.0 < errors[3:].min() and errors.max() < 7.5


def test_demo_faces_give_the_same_tensors_under_auto(tmp_path):
    """The bundled demo faces are canonical: --align auto gives bit-identical model inputs and
    region fractions to --align none (today's path), and the inputs equal plain preprocessing."""
    from facemoe_model.data.images import preprocess

    paths = DEMO_IMAGES[::4]
    auto_stats, auto = run_path(paths, "auto", batch_size=64)
    _, none = run_path(paths, "none", batch_size=64)
    assert auto_stats.analysed == len(paths) and not auto_stats.aligned and not auto_stats.rejected_images
    for a, b in zip(auto, none):
        assert a.ids == b.ids and torch_equal(a.images, b.images)
        np.testing.assert_array_equal(a.fractions[GRID], b.fractions[GRID])
    expected = np.stack([preprocess(read_image(p), INPUT).numpy() for p in paths])
    np.testing.assert_array_equal(np.concatenate([b.images.numpy() for b in auto]), expected)


def torch_equal(a, b) -> bool:
    return bool((a == b).all()) and a.shape == b.shape


def test_shared_path_rejects_the_lfw_texture_and_counts_it(tmp_path, lfw_subset):
    """The lfw_subset texture Face Mesh meshes (image 110) is rejected on the shared path
    (low confidence and implausible landmarks), counted per reason, never batched."""
    images, _ = lfw_subset
    chosen = {"face_000": images[0], "face_001": images[1], "texture_110": images[110], "texture_101": images[101]}
    paths = write_images(tmp_path / "lfw", chosen)
    stats, batches = run_path(paths)
    texture = str(paths[2])
    assert stats.rejected_images == [texture] and stats.no_face == [str(paths[3])]
    assert texture in stats.rejected["low_confidence"] and texture in stats.rejected["implausible_landmarks"]
    analysed = [i for b in batches for i in b.ids]
    assert analysed == [str(p) for p in paths[:2]]
    summary = stats.summary("landmarks")
    assert summary["images_rejected"] == 1 and summary["rejected_by_reason"]["low_confidence"] == 1
    assert summary["images_no_face"] == 1 and summary["images_analysed"] == 2
    assert any("quality gate rejected" in w and "low_confidence 1" in w for w in stats.warnings())


def test_align_image_outcomes(photos, lfw_subset):
    from moescope.faces import ALIGN_OUTCOMES, align_image, align_images

    astronaut = photos["astronaut"][0]
    crop, outcome = align_image(astronaut, "auto")
    assert outcome == "aligned" and crop.shape == (INPUT, INPUT, 3) and crop.dtype == np.uint8
    demo = read_image(DEMO_IMAGES[0])
    same, outcome = align_image(demo, "auto")
    assert outcome == "canonical" and same is demo
    forced, outcome = align_image(demo, "always")
    assert outcome == "aligned" and forced.shape == (INPUT, INPUT, 3)
    assert align_image(astronaut, "none") == (astronaut, "unaligned")
    images, _ = lfw_subset
    results = align_images([np.full((80, 80, 3), 120, np.uint8), images[110]], "auto")
    assert results[0] == (None, "no_face") and results[1] == (None, "low_confidence")
    assert {o for _, o in results} <= set(ALIGN_OUTCOMES)
    with pytest.raises(ValueError):
        align_image(astronaut, "sideways")


def test_save_aligned_writes_what_the_model_sees(tmp_path, photos):
    images = {name: image for name, (image, _) in photos.items()}
    paths = write_images(tmp_path / "in" / "person", images, ".jpg")
    out = tmp_path / "aligned"
    _, (batch,) = run_path(paths, save_aligned=out)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["astronaut.jpg.png", "grace_hopper.jpg.png"]  # relative to the common folder; no temp files
    for path, tensor in zip(paths, batch.images):
        saved = read_image(out / f"{path.name}.png")
        np.testing.assert_array_equal(saved, ((tensor.numpy().transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8))


def test_align_none_warns_when_the_face_is_a_small_share(tmp_path, photos):
    paths = write_images(tmp_path / "p", {"astronaut": photos["astronaut"][0]})
    stats, _ = run_path(paths, "none")
    assert stats.low_face_share == [str(paths[0])]
    assert any("under 25% of the tokens" in w for w in stats.warnings())
    aligned_stats, _ = run_path(paths, "auto")
    assert not aligned_stats.low_face_share


def test_large_jpeg_is_read_reduced_and_aligned(tmp_path, photos, monkeypatch):
    """A 4200x4200 JPEG (grace_hopper enlarged 3x on a grey field): decoded at 1/4 (long side
    <= 2048) for detection and warping (eyes ~63 px apart there: enough for the 112 crop)."""
    from facemoe_model.data.images import read_image_scaled

    image, _ = photos["grace_hopper"]
    canvas = np.full((4200, 4200, 3), 40, np.uint8)
    big = cv2.resize(image, (image.shape[1] * 3, image.shape[0] * 3), interpolation=cv2.INTER_CUBIC)
    canvas[1000 : 1000 + big.shape[0], 1500 : 1500 + big.shape[1]] = big
    (path,) = write_images(tmp_path / "big", {"field": canvas}, ".jpg")
    reduced, scale = read_image_scaled(path)
    assert reduced.shape == (1050, 1050, 3) and list(scale) == [4.0, 4.0]
    full, one = read_image_scaled(path, None)
    assert full.shape == (4200, 4200, 3) and list(one) == [1.0, 1.0]
    np.testing.assert_array_equal(read_image_scaled(DEMO_IMAGES[0])[0], read_image(DEMO_IMAGES[0]))
    stats, (batch,) = run_path([path])
    assert str(path) in stats.reduced and stats.aligned == [str(path)]
    assert stats.summary("landmarks")["images_downscaled"] == 1
    assert face_share(batch.fractions[GRID][0]) > 0.40
    # A face needing more pixels than the 1/4 decode has is warped from a finer decode (here
    # forced: 1/2); the crop and its regions agree with the one warped from the 1/4 decode.
    import moescope.faces

    reads = []
    original = moescope.faces.read_image_scaled
    monkeypatch.setattr(moescope.faces, "warp_reduction", lambda landmarks: 2)
    monkeypatch.setattr(moescope.faces, "read_image_scaled", lambda *a, **k: reads.append(k) or original(*a, **k))
    _, (finer,) = run_path([path])
    assert {"reduction": 2} in reads
    assert (finer.images - batch.images).abs().mean() < 0.03
    np.testing.assert_allclose(finer.fractions[GRID], batch.fractions[GRID], atol=0.05)


@pytest.mark.slow
def test_large_jpeg_through_the_regions_command_stays_under_the_bound():
    """``moescope regions --data DIR`` on one 10000x10000 JPEG, measured with /usr/bin/time -v:
    exit 0, no traceback, peak RSS under 1.5 GB, and within 100 MiB of the same command on a
    64x64 image (the imports and the model: torch alone peaks near 0.9 GB)."""
    command = [sys.executable, "-m", "benchmarks.bench_large_image", "--size", "10000", "--variants", "cli", "--json"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])
    assert run["exit_ok"] and not run["traceback"], run
    assert run["peak_mib"] < 1.5 * 1024**3 / 2**20
    assert run["peak_mib"] - run["baseline_mib"] < 100


def test_regions_command_reports_rejections_alignment_and_an_unusable_cache(tmp_path, photos, lfw_subset, monkeypatch, capsys):
    """``moescope regions --data DIR --json`` on real photos, a meshed texture and a blank image,
    with MOESCOPE_CACHE naming a file: exit 0; the summary counts aligned / rejected (per reason)
    / no-face images; one warning line each on stderr; --save-aligned writes the analysed crops."""
    from moescope.cli import main

    images, _ = lfw_subset
    chosen = {name: image for name, (image, _) in photos.items()}
    chosen.update(texture=images[110], blank=np.full((64, 64, 3), 100, np.uint8))
    write_images(tmp_path / "data", chosen)
    (tmp_path / "cache").write_text("a file, not a folder")
    monkeypatch.setenv("MOESCOPE_CACHE", str(tmp_path / "cache"))
    status = main(["regions", "--data", str(tmp_path / "data"), "--bootstrap", "0", "--json",
                   "--save-aligned", str(tmp_path / "seen")])
    out, err = capsys.readouterr()
    assert status == 0 and "Traceback" not in err
    summary = json.loads(out)["summary"]
    assert summary["images_analysed"] == 2 and summary["images_aligned"] == 2 and summary["alignment"] == "auto"
    assert summary["images_rejected"] == 1 and summary["images_no_face"] == 1
    assert summary["rejected_by_reason"] == {"low_confidence": 1, "face_too_small": 0, "poor_fit": 0, "implausible_landmarks": 1}
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert sum("quality gate rejected" in w for w in warnings) == 1
    assert sum("no face found" in w for w in warnings) == 1
    assert sum("landmark cache" in w and "unusable" in w for w in warnings) == 1
    assert sorted(p.name for p in (tmp_path / "seen").iterdir()) == ["astronaut.png", "grace_hopper.png"]


def test_no_similarity_puts_all_of_astronauts_five_points_within_3px(photos):
    """The 3 px target is out of reach for astronaut's smile: the minimax similarity (smallest
    worst-point error over every rotation, scale and shift; Nelder-Mead from the least-squares
    fit, several starts) still leaves a point 5.2 px off (least squares: 6.6 px, mouth corner)."""
    from scipy.optimize import minimize

    _, landmarks = photos["astronaut"]
    points = align.alignment_points(landmarks)
    start = align.alignment_matrix(points)

    def worst(x: np.ndarray) -> float:
        a, b, tx, ty = x
        moved = align.apply_transform(np.array([[a, -b, tx], [b, a, ty]]), points)
        return float(np.linalg.norm(moved - ALIGNED_FIVE_POINTS, axis=1).max())

    x0 = np.array([start[0, 0], start[1, 0], start[0, 2], start[1, 2]])
    rng = np.random.default_rng(0)
    best = min(
        minimize(worst, x0 + rng.normal(scale=[0.01, 0.01, 2.0, 2.0]), method="Nelder-Mead",
                 options={"xatol": 1e-8, "fatol": 1e-8, "maxiter": 20000}).fun
        for _ in range(10)
    )
    assert 4.5 < best < worst(x0)  # measured 5.21 < 6.62


def test_cka_save_aligned_keeps_identity_folders_apart(tmp_path):
    """Identity folders reuse file names (000.png ...): the views are written at their path
    relative to the common folder, so none overwrites another."""
    import shutil

    from moescope.cli import main
    from moescope.demo import demo_images_dir

    for identity in sorted(p for p in demo_images_dir().iterdir() if p.is_dir())[:2]:
        shutil.copytree(identity, tmp_path / "faces" / identity.name)
    sources = sorted(p.relative_to(tmp_path / "faces") for p in (tmp_path / "faces").rglob("*.png"))
    assert main(["cka", "--data", str(tmp_path / "faces"), "--save-aligned", str(tmp_path / "seen"), "--json"]) == 0
    written = sorted(p.relative_to(tmp_path / "seen") for p in (tmp_path / "seen").rglob("*.png"))
    assert written == sources and len({p.name for p in written}) < len(written)


def test_png_size_from_its_header_equals_pillows(photos):
    """The PNG fast path reads what Pillow reads, on real photos of several shapes; a PNG whose
    header is cut short or says 0 goes to Pillow (which refuses it)."""
    import io

    from PIL import Image

    for photo, _ in photos.values():
        for shape in [photo.shape[:2], (photo.shape[0] // 3, photo.shape[1]), (37, 301)]:
            image = cv2.resize(photo, shape[::-1])
            data = cv2.imencode(".png", image)[1].tobytes()
            with Image.open(io.BytesIO(data)) as reference:
                assert align.encoded_size(data) == shape == reference.size[::-1]
    zero = bytearray(data)
    zero[16:20] = bytes(4)
    assert align.encoded_size(bytes(zero)) is None and align.encoded_size(data[:20]) is None
