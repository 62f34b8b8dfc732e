"""Face Mesh detection, landmark cache, the image path (facemoe_model.data.images) and the aligned-face template, on real photos."""
from __future__ import annotations

import os
import subprocess

import cv2
import matplotlib.cbook
import numpy as np
import pytest
import skimage.data

from facemoe_model.data.images import list_images, read_image
from moescope import landmarks as lm
from moescope.errors import DataError


def lfw_faces() -> list[np.ndarray]:
    """The 100 face crops of ``lfw_subset()`` (its first 100 of 200) as uint8 RGB, as in
    ``benchmarks/build_face_template.py``."""
    grey = np.round(skimage.data.lfw_subset()[:100] * 255).astype(np.uint8)
    return [np.repeat(face[..., None], 3, axis=2) for face in grey]


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    grace_hopper = read_image(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    return {"astronaut": skimage.data.astronaut(), "grace_hopper": grace_hopper}


@pytest.fixture(scope="module")
def photo_landmarks(photos) -> dict[str, np.ndarray | None]:
    found = lm.detect_landmarks(list(photos.values()), use_cache=False, progress=False)
    return dict(zip(photos, found))


@pytest.fixture(scope="module")
def lfw_landmarks() -> list[np.ndarray | None]:
    return lm.detect_landmarks(lfw_faces(), use_cache=False, progress=False)


def _forbid_detection(monkeypatch) -> None:
    def refuse():
        raise AssertionError("mediapipe was run although every image is cached")

    monkeypatch.setattr(lm, "_create_face_mesh", refuse)


def _aligned_crop(image: np.ndarray, landmarks: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """ArcFace-aligned ``size`` crop of ``image`` and the 2x3 map of continuous pixel coordinates."""
    transform, _ = cv2.estimateAffinePartial2D(
        lm.five_points(landmarks).astype(np.float32), (lm.ALIGNED_FIVE_POINTS * size / lm.ALIGNED_SIZE).astype(np.float32),
        method=cv2.LMEDS,
    )
    # warpAffine maps pixel centres (index coordinates): shift by half a pixel both sides.
    crop = cv2.warpAffine(image, transform, (size, size), flags=cv2.INTER_AREA if size < 56 else cv2.INTER_LINEAR)
    to_crop = transform.copy()
    to_crop[:, 2] += 0.5 - 0.5 * transform[:, :2].sum(axis=1)
    return crop, to_crop


# ------------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_landmarks_found_inside_photo_in_face_layout(photos, photo_landmarks, name):
    points = photo_landmarks[name]
    assert points is not None and points.shape == (lm.NUM_LANDMARKS, 2) and points.dtype == np.float32
    height, width = photos[name].shape[:2]
    assert (points >= 0).all() and (points[:, 0] < width).all() and (points[:, 1] < height).all()
    right_eye, left_eye, nose, mouth_left, mouth_right = lm.five_points(points)
    assert right_eye[0] < nose[0] < left_eye[0]
    assert max(right_eye[1], left_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
    assert mouth_left[0] < nose[0] < mouth_right[0]


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
@pytest.mark.parametrize("size", [112, 25])
@pytest.mark.parametrize("pad_fraction", [0.0, 0.25])
def test_tight_aligned_crop_maps_back_to_crop_pixels(photos, photo_landmarks, name, size, pad_fraction, monkeypatch):
    """Crops with no context are upscaled (and padded) for detection; landmarks come back in
    crop pixels, where they match the full photo's landmarks carried into the crop."""
    monkeypatch.setitem(lm.DETECTION_SETTINGS, "pad_fractions", (pad_fraction,))
    crop, to_crop = _aligned_crop(photos[name], photo_landmarks[name], size)
    (found,) = lm.detect_landmarks([crop], use_cache=False, progress=False)
    assert found is not None
    expected = cv2.transform(photo_landmarks[name][None].astype(np.float64), to_crop)[0]
    error = np.linalg.norm(found - expected, axis=1).mean()
    assert error < {112: 2.0, 25: 1.5}[size]  # measured: 0.9-1.05 px at 112, 0.6-0.9 px at 25


def test_lfw_subset_detection_rate(lfw_landmarks):
    found = sum(points is not None for points in lfw_landmarks)
    assert found >= 97  # measured 100 of 100


def test_no_face_gives_none():
    non_faces = np.round(skimage.data.lfw_subset()[100:105] * 255).astype(np.uint8)  # lfw_subset's non-face crops
    rgb = [np.repeat(crop[..., None], 3, axis=2) for crop in non_faces]
    assert lm.detect_landmarks(rgb, use_cache=False, progress=False) == [None] * len(rgb)


def test_worker_pool_matches_in_process(photos, photo_landmarks):
    images = list(photos.values()) + lfw_faces()[:4]
    pooled = lm.detect_landmarks(images, use_cache=False, workers=2, progress=False)
    serial = [photo_landmarks[name] for name in photos] + lm.detect_landmarks(images[2:], use_cache=False, progress=False)
    for a, b in zip(pooled, serial):
        np.testing.assert_array_equal(a, b)


def test_rejects_non_rgb_uint8():
    with pytest.raises(ValueError, match=r"images\[1\]"):
        lm.detect_landmarks([skimage.data.astronaut(), skimage.data.camera()], use_cache=False)


# ------------------------------------------------------------------------------------------- cache


def test_cache_hit_skips_mediapipe(tmp_path, photos, photo_landmarks, monkeypatch):
    images = list(photos.values()) + [np.full((40, 40, 3), 127, np.uint8)]  # the last has no face
    first = lm.detect_landmarks(images, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.rglob("*.npz"))) == len(images)
    assert not list(tmp_path.rglob("*.tmp"))  # no temp files left behind
    _forbid_detection(monkeypatch)
    second = lm.detect_landmarks([image.copy() for image in images], cache_dir=tmp_path, progress=False)
    assert second[-1] is None
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(second[0], photo_landmarks["astronaut"])


def test_default_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESCOPE_CACHE", str(tmp_path / "elsewhere"))
    assert lm.default_cache_dir() == tmp_path / "elsewhere" / "landmarks"
    lm.detect_landmarks(lfw_faces()[:1], progress=False)
    assert len(list((tmp_path / "elsewhere" / "landmarks").rglob("*.npz"))) == 1


def test_npy_reader_equals_numpys_for_every_header_kind():
    """The cache's direct ``.npy`` reader gives numpy's array for the headers it reads itself (bool
    and 0-d included) and for those it hands on (Fortran order), copies that can be written, and
    refuses a file shorter than its header says."""
    import io

    rng = np.random.default_rng(0)
    arrays = [
        np.zeros((0, 2), np.float32), rng.random((468, 2)).astype(np.float32), np.frombuffer(b'{"faces": 1}', np.uint8),
        rng.random((3, 4, 5)), rng.integers(-5, 5, 7), rng.random((2, 3)).astype(">f4"),
        np.asfortranarray(rng.random((3, 4))), np.array([True, False]), np.array(3.5),
    ]
    for array in arrays:
        buffer = io.BytesIO()
        np.save(buffer, array)
        data = buffer.getvalue()
        read = lm._npy_array(data)
        expected = np.load(io.BytesIO(data))
        assert read.dtype == expected.dtype and read.shape == expected.shape and np.array_equal(read, expected)
        assert read.flags.writeable
        if array.size:
            with pytest.raises(ValueError):
                lm._npy_array(data[:-1])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_shape"])
def test_corrupt_cache_entry_is_recomputed(tmp_path, damage):
    faces = lfw_faces()[:3]
    first = lm.detect_landmarks(faces, cache_dir=tmp_path, progress=False)
    entry = lm._cache_path(tmp_path, lm._cache_key(faces[1]))
    if damage == "truncate":
        entry.write_bytes(entry.read_bytes()[:100])
    elif damage == "garbage":
        entry.write_bytes(b"not a numpy file")
    else:
        with open(entry, "wb") as handle:
            np.save(handle, np.zeros((5, 2), np.float32))
    calls = []
    original = lm._detect_one
    lm_detect = lambda face_mesh, image: calls.append(image) or original(face_mesh, image)  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lm, "_detect_one", lm_detect)
        second = lm.detect_landmarks(faces, cache_dir=tmp_path, progress=False)
    assert len(calls) == 1 and calls[0] is faces[1]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    with np.load(entry) as stored:
        np.testing.assert_array_equal(stored["landmarks"], first[1])


def _rewrite_entry(path, landmarks: np.ndarray, record_changes: dict | None = None, fix_checksum: bool = False) -> None:
    """Overwrite a cache entry with other landmarks (and record fields), as a tamperer would."""
    import json

    with np.load(path) as stored:
        record = json.loads(stored["record"].tobytes().decode())
    record.update(record_changes or {})
    if fix_checksum:
        record["checksum"] = lm._checksum(landmarks, record["confidence"], record["faces"])
    with open(path, "wb") as handle:
        np.savez(handle, landmarks=landmarks, record=np.frombuffer(json.dumps(record).encode(), np.uint8))


def _counting_detector(patch) -> list:
    calls = []
    original = lm._detect_one
    patch.setattr(lm, "_detect_one", lambda detector, image: calls.append(image) or original(detector, image))
    return calls


def test_tampered_landmarks_are_a_miss_and_rewritten(tmp_path, photos, photo_landmarks):
    """Landmarks shifted by 30 px inside a well-formed entry: the checksum fails, mediapipe runs
    again and the entry is rewritten with the true landmarks."""
    image = photos["grace_hopper"]
    (first,) = lm.detect_faces([image], cache_dir=tmp_path, progress=False)
    entry = lm._cache_path(tmp_path, lm._cache_key(image))
    _rewrite_entry(entry, first.landmarks + 30.0)
    with pytest.MonkeyPatch.context() as patch:
        calls = _counting_detector(patch)
        (second,) = lm.detect_faces([image], cache_dir=tmp_path, progress=False)
    assert len(calls) == 1
    np.testing.assert_array_equal(second.landmarks, photo_landmarks["grace_hopper"])
    with np.load(entry) as stored:
        np.testing.assert_array_equal(stored["landmarks"], first.landmarks)


def test_no_face_entry_written_over_a_face_is_a_miss(tmp_path, photos, photo_landmarks):
    """A valid "no face" entry (of another image) copied over a face's entry: it was made for
    other pixels, so it is not believed."""
    image, blank = photos["astronaut"], np.full((64, 64, 3), 90, np.uint8)
    lm.detect_faces([image, blank], cache_dir=tmp_path, progress=False)
    face_entry = lm._cache_path(tmp_path, lm._cache_key(image))
    face_entry.write_bytes(lm._cache_path(tmp_path, lm._cache_key(blank)).read_bytes())
    with pytest.MonkeyPatch.context() as patch:
        calls = _counting_detector(patch)
        (found,) = lm.detect_landmarks([image], cache_dir=tmp_path, progress=False)
    assert len(calls) == 1 and found is not None
    np.testing.assert_array_equal(found, photo_landmarks["astronaut"])


@pytest.mark.parametrize("field", ["mediapipe", "settings", "image_sha256"])
def test_entry_from_another_producer_is_a_miss(tmp_path, photos, field):
    """Even with a consistent checksum, an entry recording another mediapipe, other settings
    or other pixels is a miss."""
    image = photos["grace_hopper"]
    (first,) = lm.detect_faces([image], cache_dir=tmp_path, progress=False)
    entry = lm._cache_path(tmp_path, lm._cache_key(image))
    original = entry.read_bytes()
    _rewrite_entry(entry, first.landmarks, {field: "something else"}, fix_checksum=True)
    assert lm._read_cache(entry, lm._content_hash(image)) == (False, None)
    entry.write_bytes(original)  # control: the same rewrite without the changed field is a hit
    _rewrite_entry(entry, first.landmarks, fix_checksum=True)
    hit, again = lm._read_cache(entry, lm._content_hash(image))
    assert hit and np.array_equal(again.landmarks, first.landmarks)


@pytest.mark.parametrize("case", ["cache_is_a_file", "read_only_folder", "entry_is_a_folder"])
def test_unusable_cache_location_warns_once_and_goes_on(tmp_path, photos, photo_landmarks, case):
    image = photos["grace_hopper"]
    root = tmp_path / "cache"
    immutable = []
    if case == "cache_is_a_file":
        root.write_text("not a folder")
    elif case == "read_only_folder":
        root.mkdir()
        root.chmod(0o500)
        if os.access(root, os.W_OK):  # root ignores permissions; an immutable folder stops root too
            if subprocess.run(["chattr", "+i", str(root)], capture_output=True).returncode:
                pytest.skip("neither permissions nor chattr +i can make a read-only folder here")
            immutable.append(root)
    else:
        entry = lm._cache_path(root, lm._cache_key(image))
        (entry / "inside").mkdir(parents=True)
    messages = []
    try:
        found = lm.detect_faces([image, lfw_faces()[0]], cache_dir=root, progress=False, on_warning=messages.append)
        with pytest.warns(lm.CacheWarning):
            lm.detect_faces([image], cache_dir=root, progress=False)
    finally:
        for folder in immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        if root.is_dir():
            root.chmod(0o700)
    assert len(messages) == 1 and "\n" not in messages[0] and str(root) in messages[0]
    np.testing.assert_array_equal(found[0].landmarks, photo_landmarks["grace_hopper"])
    assert found[1] is not None


def test_detection_reports_confidence_and_keeps_the_largest_face(photos, photo_landmarks):
    """Two faces side by side (grace_hopper and a half-size copy): both found, the large one
    kept, its landmarks in the composite's pixels; confidences as measured."""
    large = photos["grace_hopper"]
    small = cv2.resize(large, (large.shape[1] // 2, large.shape[0] // 2), interpolation=cv2.INTER_AREA)
    canvas = np.zeros((large.shape[0], large.shape[1] + small.shape[1], 3), np.uint8)
    canvas[:, : large.shape[1]] = large
    canvas[: small.shape[0], large.shape[1] :] = small
    (solo,) = lm.detect_faces([large], use_cache=False, progress=False)
    assert solo.faces == 1 and solo.confidence > 0.9  # measured 0.94
    (both,) = lm.detect_faces([canvas], use_cache=False, progress=False)
    assert both.faces == 2
    kept = lm.five_points(both.landmarks)
    assert (kept[:, 0] < large.shape[1]).all()
    eye_distance = np.linalg.norm(kept[1] - kept[0])
    assert np.linalg.norm(kept - lm.five_points(solo.landmarks), axis=1).max() < 0.1 * eye_distance
    assert both.confidence > 0.6


def test_cache_key_depends_on_pixels_shape_and_settings(monkeypatch):
    face = lfw_faces()[0]
    changed = face.copy()
    changed[0, 0, 0] ^= 1
    keys = {lm._cache_key(face), lm._cache_key(changed), lm._cache_key(face.reshape(5, 125, 3))}
    monkeypatch.setitem(lm.DETECTION_SETTINGS, "min_detection_confidence", 0.6)
    keys.add(lm._cache_key(face))
    assert len(keys) == 4


def test_five_points_equal_the_means_of_the_eye_contours(photo_landmarks, lfw_landmarks):
    """The reduce-and-divide means are numpy's means, to the bit, for float64, float32 and
    integer landmarks (reference: ndarray.mean over Face Mesh's eye sets, written out here)."""
    from moescope.mesh import FACEMESH_LEFT_EYE, FACEMESH_RIGHT_EYE

    def reference(points: np.ndarray) -> np.ndarray:
        eye = lambda connections: points[sorted({i for pair in connections for i in pair})].mean(axis=0)
        return np.stack([eye(FACEMESH_RIGHT_EYE), eye(FACEMESH_LEFT_EYE), points[1], points[61], points[291]])

    real = [p for p in [*photo_landmarks.values(), *lfw_landmarks] if p is not None]
    rng = np.random.default_rng(0)
    cases = [p.astype(dtype) for p in real for dtype in (np.float64, np.float32)]
    cases += [(rng.random((lm.NUM_LANDMARKS, 2)) * 4000 - 1000).astype(dtype) for dtype in (np.float64, np.float32) for _ in range(200)]
    cases += [rng.integers(0, 500, (lm.NUM_LANDMARKS, 2))]
    for points in cases:
        got, want = lm.five_points(points), reference(points)
        assert got.dtype == want.dtype and got.shape == (5, 2)
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------------------- files


def test_read_image_round_trips_png_and_greyscale(tmp_path):
    astronaut = skimage.data.astronaut()
    cv2.imwrite(str(tmp_path / "a.png"), cv2.cvtColor(astronaut, cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), astronaut)
    camera = skimage.data.camera()
    cv2.imwrite(str(tmp_path / "g.png"), camera)
    loaded = read_image(tmp_path / "g.png")
    assert loaded.shape == camera.shape + (3,) and (loaded == camera[..., None]).all()


@pytest.mark.parametrize("case", ["text", "empty", "truncated", "missing", "folder"])
def test_read_image_raises_data_error_naming_file(tmp_path, case):
    path = tmp_path / "face.jpg"
    if case == "text":
        path.write_text("this is not a JPEG\n")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        ok, encoded = cv2.imencode(".jpg", skimage.data.astronaut())
        path.write_bytes(encoded.tobytes()[:200])
    elif case == "folder":
        path.mkdir()
    with pytest.raises(DataError) as error:
        read_image(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message


def test_list_images_recursive_sorted(tmp_path):
    ok, png = cv2.imencode(".png", lfw_faces()[0])
    for name in ["b/2.PNG", "b/10.png", "a/x.jpg", "top.webp", ".hidden/y.png", "a/._z.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(png.tobytes())
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a/x.jpg", "b/10.png", "b/2.PNG", "top.webp"]


def test_list_images_raises_on_missing_or_empty(tmp_path):
    with pytest.raises(DataError, match="not found"):
        list_images(tmp_path / "nope")
    (tmp_path / "only.txt").write_text("text")
    with pytest.raises(DataError, match=str(tmp_path)):
        list_images(tmp_path)


# ------------------------------------------------------------------------------------------- template


def test_shipped_template_is_reproducible_from_lfw_subset(lfw_landmarks):
    rebuilt = lm.build_template([points for points in lfw_landmarks if points is not None])
    np.testing.assert_allclose(lm.template_landmarks(1, 1), rebuilt, atol=1e-3)


def test_template_is_in_aligned_face_frame():
    template = lm.template_landmarks(lm.ALIGNED_SIZE, lm.ALIGNED_SIZE)
    assert template.shape == (lm.NUM_LANDMARKS, 2)
    eye_error = np.linalg.norm(lm.five_points(template)[:2] - lm.ALIGNED_FIVE_POINTS[:2], axis=1)
    assert (eye_error < 2.0).all()  # aligned frame: eye centres on the ArcFace points
    np.testing.assert_allclose(lm.template_landmarks(50, 30), template * [30 / 112, 50 / 112], rtol=1e-5)


def test_build_template_undoes_similarity_transforms(lfw_landmarks):
    """Rotating, scaling and shifting a face does not move it in the aligned frame."""
    face = lfw_landmarks[0].astype(np.float64)
    rotation = cv2.getRotationMatrix2D((12.0, 12.0), 25.0, 3.0)
    moved = cv2.transform(face[None], rotation)[0] + 40.0
    np.testing.assert_allclose(lm.build_template([moved]), lm.build_template([face]), atol=1e-4)
