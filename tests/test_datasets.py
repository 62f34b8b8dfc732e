"""Real-data loaders: preprocessing, identity folders, pairs lists, gallery/probe splits, .bin sets."""
from __future__ import annotations

import logging
import os
import pickle
import struct

import cv2
import matplotlib.cbook
import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.data import astronaut, lfw_subset
from torch.utils.data import DataLoader

from facemoe_model.data.datasets import ImageFolder, VerificationPairs, decode_image, gallery_probe_split, preprocess
from facemoe_model.evaluate import consecutive_folds
from facemoe_model.data import images as image_path
from facemoe_model.errors import DataError

GREY_LEVEL = 1 / 127.5  # one uint8 step after normalisation to [-1, 1]
LOGGER = "facemoe_model.data.datasets"


def lfw_face(i: int) -> np.ndarray:
    """LFW face crop ``i`` (25x25) as RGB uint8."""
    return cv2.cvtColor((lfw_subset()[i] * 255).round().astype(np.uint8), cv2.COLOR_GRAY2RGB)


def hopper_jpeg() -> bytes:
    with open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), "rb") as fh:
        return fh.read()


def jpeg(image: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def write(path, data: bytes | np.ndarray) -> None:
    """Write bytes, or an RGB image as a lossless PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else cv2.imencode(".png", data[:, :, ::-1])[1].tobytes())


# --- preprocessing -------------------------------------------------------------------------


@pytest.mark.parametrize("image,size", [(astronaut(), 120), (lfw_face(0), 120), (astronaut(), 37)])
def test_preprocess_matches_bilinear_reference(image, size):
    out = preprocess(image, size)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    reference = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].double(), size=(size, size), mode="bilinear", align_corners=False)[0]
    assert (out - (reference / 127.5 - 1)).abs().max() <= GREY_LEVEL  # OpenCV rounds back to uint8


def test_preprocess_is_rgb_and_exact_at_native_size():
    image = astronaut()
    out = preprocess(image, 512)
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), image / 127.5 - 1, atol=1e-6)
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    assert torch.equal(preprocess(red, 4)[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    grey = lfw_face(3)[..., 0]
    assert torch.equal(preprocess(grey, 50), preprocess(lfw_face(3), 50))
    with pytest.raises(ValueError):
        preprocess(image.astype(np.float32), 120)


def test_decode_image_returns_rgb_or_none():
    hopper = decode_image(hopper_jpeg())
    reference = matplotlib.image.imread(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))  # Pillow
    assert hopper.shape == reference.shape and np.abs(hopper.astype(int) - reference).mean() < 1.0
    assert decode_image(b"") is None and decode_image(b"GIF89a not really") is None


# --- the image path (facemoe_model.data.images) ---------------------------------------------


def previous_preprocess(image: np.ndarray, size: int) -> torch.Tensor:
    """datasets.preprocess as it was before the image path moved (the outputs must not change)."""
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(resized).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


@pytest.mark.parametrize("image,size", [(astronaut(), 120), (astronaut(), 37), (lfw_face(1), 120), (lfw_face(2)[..., 0], 64)])
def test_preprocess_unchanged_and_equal_to_the_gradient_path(image, size):
    out = image_path.preprocess(image, size)
    assert preprocess is image_path.preprocess and torch.equal(out, previous_preprocess(image, size))
    unit = image_path.to_unit_tensor(image, size)
    assert unit.dtype == torch.float32 and unit.shape == (3, size, size) and 0 <= unit.min() and unit.max() <= 1
    assert torch.equal(image_path.normalise(unit), out)  # bit for bit
    every_level = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert torch.equal(image_path.normalise(image_path.to_unit_tensor(every_level, 16)), previous_preprocess(every_level, 16))


def test_gradient_path_is_differentiable():
    x01 = image_path.to_unit_tensor(astronaut(), 8)[None].requires_grad_(True)
    image_path.normalise(x01).sum().backward()
    assert torch.equal(x01.grad, torch.full_like(x01, 2.0))  # d(2x - 1)/dx
    with pytest.raises(ValueError, match="to_unit_tensor expects a uint8"):
        image_path.to_unit_tensor(astronaut().astype(np.float32), 8)


def test_decode_handles_grey_rgba_16bit_and_exif_orientation():
    from PIL import Image, ImageOps
    import io

    rgb = astronaut()[::8, ::8].copy()
    grey = rgb[..., 1].copy()
    assert np.array_equal(decode_image(cv2.imencode(".png", grey)[1].tobytes()), np.repeat(grey[..., None], 3, axis=2))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    assert np.array_equal(decode_image(cv2.imencode(".png", rgba[..., [2, 1, 0, 3]])[1].tobytes()), rgb)  # alpha dropped
    deep = rgb.astype(np.uint16) * 257 + 3
    assert np.array_equal(decode_image(cv2.imencode(".png", deep[..., ::-1].copy())[1].tobytes()), (deep >> 8).astype(np.uint8))
    # EXIF orientation 6 (rotate 90 clockwise to display), applied as Pillow's exif_transpose does
    plain = Image.fromarray(rgb)
    exif = plain.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    plain.save(buffer, "JPEG", quality=95, exif=exif)
    decoded = decode_image(buffer.getvalue())
    reference = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue()))).convert("RGB"))
    assert decoded.shape == reference.shape == (rgb.shape[1], rgb.shape[0], 3)
    assert np.abs(decoded.astype(int) - reference).mean() < 1.0


def test_read_image_one_line_errors(tmp_path):
    write(tmp_path / "ok.png", astronaut())
    assert np.array_equal(image_path.read_image(tmp_path / "ok.png"), astronaut())
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"^cannot decode image .*bad\.jpg: not an image file or corrupt$"):
        image_path.read_image(tmp_path / "bad.jpg")
    with pytest.raises(DataError, match=r"^cannot read image .*missing\.png: No such file"):
        image_path.read_image(tmp_path / "missing.png")
    assert image_path.unreadable_reason(tmp_path / "bad.jpg") == "not a decodable image"
    assert image_path.unreadable_reason(tmp_path / "missing.png") == "missing"
    assert image_path.unreadable_reason(tmp_path / "ok.png") is None


def test_list_images_recursive_sorted_hidden_skipped(tmp_path):
    for rel in ["b/2.PNG", "b/10.jpg", "a.jpeg", "b/c/1.webp", ".hidden/x.png", "b/.y.png", "notes.txt", "b-c/0.png"]:
        write(tmp_path / rel, b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in image_path.list_images(tmp_path)]
    assert found == sorted(found) == ["a.jpeg", "b-c/0.png", "b/10.jpg", "b/2.PNG", "b/c/1.webp"]
    assert image_path.list_images(tmp_path / "a.jpeg") == [tmp_path / "a.jpeg"]
    with pytest.raises(DataError, match="^not an image file: "):
        image_path.list_images(tmp_path / "notes.txt")
    with pytest.raises(DataError, match="^image folder not found: "):
        image_path.list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"^no image files \(\.bmp, .*\) found under "):
        image_path.list_images(tmp_path / "empty")


def test_identity_listing_reports_stray_files(tmp_path):
    for rel in ["bob/1.png", "bob/sub/2.png", "alice/x.txt", ".trash/3.png", "loose.png", ".DS_Store"]:
        write(tmp_path / rel, b"x")
    listing = image_path.list_identity_folders(tmp_path)
    assert listing.classes == ["alice", "bob"] and listing.stray == [tmp_path / "loose.png"]
    assert [(p.relative_to(tmp_path).as_posix(), label) for p, label in listing.files] == [("alice/x.txt", 0), ("bob/1.png", 1), ("bob/sub/2.png", 1)]
    with pytest.raises(DataError, match="not a folder"):
        image_path.list_identity_folders(tmp_path / "loose.png")


# --- identity folders ----------------------------------------------------------------------


@pytest.fixture
def identity_tree(tmp_path):
    root = tmp_path / "faces"
    write(root / "bob" / "hopper.jpg", hopper_jpeg())
    write(root / "bob" / "notes.txt", b"taken in 1984\n")
    write(root / "alice" / "astronaut.png", astronaut())
    write(root / "alice" / "more" / "face.png", lfw_face(1))
    write(root / "alice" / ".DS_Store", b"\x00\x01")
    write(root / "carol" / "empty.jpg", b"")
    write(root / "carol" / "corrupt.jpg", np.random.default_rng(0).bytes(500))
    write(root / ".cache" / "x.png", lfw_face(2))
    write(root / "list.txt", b"stray file")
    return root


def test_image_folder_labels_items_and_skipped_files(identity_tree, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = ImageFolder(identity_tree, size=64)
    assert dataset.classes == ["alice", "bob", "carol"]  # sorted; hidden .cache ignored; carol kept though empty
    assert [p.name for p in dataset.sources] == ["astronaut.png", "face.png", "hopper.jpg"]
    assert dataset.labels.tolist() == [0, 0, 1] and len(dataset) == 3
    skipped = {p.name: reason for p, reason in dataset.skipped}
    assert skipped == {
        "notes.txt": "not a decodable image",
        "empty.jpg": "not a decodable image",
        "corrupt.jpg": "not a decodable image",
        "list.txt": "not inside an identity folder",
    }
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1 and "skipped 4 of 7 images" in records[0].getMessage()
    image, label = dataset[0]
    assert label == 0 and torch.equal(image, preprocess(astronaut(), 64))  # lossless PNG: exact, RGB order kept
    images, labels = next(iter(DataLoader(dataset, batch_size=3)))
    assert images.shape == (3, 3, 64, 64) and labels.tolist() == [0, 0, 1]


def test_image_folder_transform_receives_the_rgb_image(identity_tree):
    dataset = ImageFolder(identity_tree, transform=lambda image: torch.tensor(image.shape))
    assert dataset[0][0].tolist() == [512, 512, 3] and dataset[2][0].tolist() == [600, 512, 3]


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no readable images"):
        ImageFolder(tmp_path / "empty")
    write(tmp_path / "junk" / "id" / "a.jpg", b"junk")
    with pytest.raises(DataError, match=r"junk: no readable images \(1 found\)"):
        ImageFolder(tmp_path / "junk")


def test_a_file_that_breaks_after_loading_is_a_clear_error(identity_tree):
    dataset = ImageFolder(identity_tree)
    os.remove(dataset.sources[2])
    with pytest.raises(DataError, match="hopper.jpg"):
        dataset[2]


# --- gallery / probe -----------------------------------------------------------------------


def test_gallery_probe_split_shares_labels_and_marks_distractors(tmp_path):
    write(tmp_path / "gallery" / "ann" / "1.png", lfw_face(0))
    write(tmp_path / "gallery" / "cid" / "1.png", lfw_face(1))
    write(tmp_path / "probe" / "cid" / "2.png", lfw_face(2))
    write(tmp_path / "probe" / "ann" / "2.png", lfw_face(3))
    write(tmp_path / "probe" / "bea" / "1.png", lfw_face(4))  # probe-only identity: labelled, an error only at evaluation
    write(tmp_path / "distractors" / "batch1" / "x.png", lfw_face(5))
    write(tmp_path / "distractors" / "y.jpg", jpeg(lfw_face(6)))
    split = gallery_probe_split(tmp_path, size=32)
    assert split.gallery.classes == split.probe.classes == ["ann", "bea", "cid"]
    assert split.gallery.labels.tolist() == [0, 2, -1, -1]
    assert split.probe.labels.tolist() == [0, 1, 2]
    assert torch.equal(split.probe[2][0], preprocess(lfw_face(2), 32))
    (tmp_path / "distractors").rename(tmp_path / "unused")
    assert gallery_probe_split(tmp_path).gallery.labels.tolist() == [0, 2]  # distractors are optional
    (tmp_path / "gallery").rename(tmp_path / "galleries")
    with pytest.raises(DataError, match="gallery: not a folder"):
        gallery_probe_split(tmp_path)


# --- pairs lists ---------------------------------------------------------------------------


@pytest.fixture
def lfw_tree(tmp_path):
    """LFW layout: root/<name>/<name>_%04d.jpg with real face crops."""
    for name, faces in {"Ann_Lee": [0, 1], "Bo_Yi": [2, 3], "Cy_Ma": [4]}.items():
        for number, face in enumerate(faces, 1):
            write(tmp_path / "lfw" / name / f"{name}_{number:04d}.jpg", jpeg(lfw_face(face)))
    return tmp_path


def test_lfw_pairs_file(lfw_tree):
    pairs_file = lfw_tree / "pairs.txt"
    pairs_file.write_text("2\t1\nAnn_Lee\t1\t2\nAnn_Lee\t1\tBo_Yi\t1\nBo_Yi\t1\t2\nBo_Yi\t2\tCy_Ma\t1\n")
    data = VerificationPairs.from_pairs_file(pairs_file, lfw_tree / "lfw", size=25)
    names = [p.name for p in data.sources]
    assert names == ["Ann_Lee_0001.jpg", "Ann_Lee_0002.jpg", "Bo_Yi_0001.jpg", "Bo_Yi_0002.jpg", "Cy_Ma_0001.jpg"]
    assert data.pairs.tolist() == [[0, 1], [0, 2], [2, 3], [3, 4]]
    assert data.issame.tolist() == [True, False, True, False]
    assert data.folds.tolist() == [0, 0, 1, 1]  # 2 sets of 1 same + 1 different
    assert data[4][1] == 4 and (data[4][0] - preprocess(lfw_face(4), 25)).abs().mean() < 3 * GREY_LEVEL  # JPEG q95


def test_pairs_with_a_missing_image_are_dropped_and_reported(lfw_tree, caplog):
    pairs_file = lfw_tree / "pairs.txt"
    pairs_file.write_text("2 1\nAnn_Lee 1 2\nAnn_Lee 1 Bo_Yi 1\nCy_Ma 1 2\nBo_Yi 2 Cy_Ma 1\n")  # Cy_Ma_0002 does not exist
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        data = VerificationPairs.from_pairs_file(pairs_file, lfw_tree / "lfw")
    assert data.issame.tolist() == [True, False, False] and data.folds.tolist() == [0, 0, 1]  # folds stay the file's
    assert data.dropped_pairs == 1 and [(p.name, r) for p, r in data.skipped] == [("Cy_Ma_0002.jpg", "missing")]
    assert [data.sources[i].name for i in data.pairs[2]] == ["Bo_Yi_0002.jpg", "Cy_Ma_0001.jpg"]
    (record,) = [r for r in caplog.records if r.name == LOGGER]
    assert "dropped 1 of 4 pairs" in record.getMessage()


def test_simple_pairs_file_and_its_errors(lfw_tree):
    pairs_file = lfw_tree / "list.txt"
    lines = ["lfw/Ann_Lee/Ann_Lee_0001.jpg lfw/Ann_Lee/Ann_Lee_0002.jpg 1", "lfw/Ann_Lee/Ann_Lee_0001.jpg lfw/Cy_Ma/Cy_Ma_0001.jpg 0"] * 10
    pairs_file.write_text("\n".join(lines) + "\n")
    data = VerificationPairs.from_pairs_file(pairs_file)  # paths relative to the list's folder
    assert len(data) == 3 and data.issame.tolist() == [True, False] * 10
    np.testing.assert_array_equal(data.folds, consecutive_folds(20))
    pairs_file.write_text("a.jpg b.jpg 1\na.jpg c.jpg yes\n")
    with pytest.raises(DataError, match=r"list.txt:2: expected 'path1 path2 label'"):
        VerificationPairs.from_pairs_file(pairs_file)
    pairs_file.write_text("1 1\nAnn_Lee 1 2\nAnn_Lee 1 Bo_Yi\n")
    with pytest.raises(DataError, match=r"list.txt:3: expected 'name i j' or 'name1 i name2 j'"):
        VerificationPairs.from_pairs_file(pairs_file, lfw_tree / "lfw")
    pairs_file.write_text("10 300\nAnn_Lee 1 2\n")
    with pytest.raises(DataError, match="header promises 10 sets"):
        VerificationPairs.from_pairs_file(pairs_file, lfw_tree / "lfw")


# --- insightface .bin ----------------------------------------------------------------------


def py2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """The protocol-2 stream Python 2 writes for ``(list_of_str, list_of_bool)``: no globals at all."""
    out = bytearray(b"\x80\x02](")  # PROTO 2, EMPTY_LIST, MARK
    for data in images:
        out += b"T" + struct.pack("<I", len(data)) + data  # BINSTRING (a Python 2 str)
    out += b"e](" + b"".join(b"\x88" if same else b"\x89" for same in issame) + b"e"  # APPENDS; bools
    return bytes(out + b"\x86.")  # TUPLE2, STOP


@pytest.fixture(scope="module")
def bin_images() -> list[bytes]:
    """Four pairs of real photos, JPEG-encoded as in insightface .bin files."""
    return [jpeg(lfw_face(i)) for i in range(6)] + [hopper_jpeg(), jpeg(astronaut())]


def test_bin_written_by_python2_loads(tmp_path, bin_images):
    path = tmp_path / "lfw.bin"
    path.write_bytes(py2_pickle(bin_images, [True, False, False, True]))
    data = VerificationPairs.from_bin(path, size=32)
    assert len(data) == 8 and data.pairs.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert data.issame.tolist() == [True, False, False, True]
    np.testing.assert_array_equal(data.folds, consecutive_folds(4))
    assert torch.equal(data[6][0], preprocess(decode_image(hopper_jpeg()), 32))
    assert (data[7][0] - preprocess(astronaut(), 32)).abs().mean() < 3 * GREY_LEVEL


def test_bin_with_numpy_issame_and_an_unreadable_image(tmp_path, bin_images, caplog):
    path = tmp_path / "cfp.bin"
    images = bin_images[:3] + [b"not a jpeg"] + bin_images[4:]
    path.write_bytes(pickle.dumps((images, np.array([True, False, True, False])), protocol=4))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        data = VerificationPairs.from_bin(path)
    assert data.issame.tolist() == [True, True, False] and data.dropped_pairs == 1
    assert data.pairs.tolist() == [[0, 1], [3, 4], [5, 6]]  # image 3 gone: later indices shift down
    assert data.skipped == [(f"{path}[3]", "not a decodable image")]
    assert sum(r.name == LOGGER for r in caplog.records) == 1


class RunsShell:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class CallsEval:
    def __reduce__(self):
        return eval, ("1 + 1",)


class CallsNumpyLoad:
    def __reduce__(self):
        return np.load, ("/etc/passwd",)


@pytest.mark.parametrize(
    "payload,refused",
    [
        (lambda marker: pickle.dumps(([b"x", RunsShell(f"touch {marker}")], [True])), "posix.system"),
        (lambda marker: f"cos\nsystem\n(S'touch {marker}'\ntR.".encode(), "os.system"),  # classic protocol-0 exploit
        (lambda marker: pickle.dumps(([b"x", b"y"], [CallsEval()])), "builtins.eval"),
        (lambda marker: pickle.dumps((CallsNumpyLoad(), [True])), "numpy.*load"),
    ],
)
def test_malicious_bin_is_refused_without_running_anything(tmp_path, payload, refused):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(payload(marker))
    with pytest.raises(DataError, match=rf"evil.bin: refused to unpickle global {refused}"):
        VerificationPairs.from_bin(path)
    assert not marker.exists()


def test_bin_that_is_no_verification_set(tmp_path, bin_images):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x00garbage, not a pickle")
    with pytest.raises(DataError, match="odd.bin: not an insightface .bin"):
        VerificationPairs.from_bin(path)
    path.write_bytes(pickle.dumps({"images": bin_images}))
    with pytest.raises(DataError, match=r"odd.bin: expected a pickled \(images, issame\) pair"):
        VerificationPairs.from_bin(path)
    path.write_bytes(pickle.dumps((bin_images, [True, False])))  # 8 images need 4 flags
    with pytest.raises(DataError, match="odd.bin: expected 4 same/different booleans"):
        VerificationPairs.from_bin(path)
    path.write_bytes(pickle.dumps(([b"junk", b"junk"], [True])))
    with pytest.raises(DataError, match="odd.bin: no readable images"):
        VerificationPairs.from_bin(path)
