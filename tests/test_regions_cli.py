"""`moescope regions` end to end on real photos, official checkpoints and bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import cv2
import matplotlib.cbook
import numpy as np
import pytest
import skimage.data
import torch

from facemoe_model import create_model, save_checkpoint
from moescope.cli import main


def moescope(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "moescope", *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """Real faces: astronaut, Grace Hopper and 12 LFW crops (in an identity sub-folder), one text file."""
    root = tmp_path_factory.mktemp("photos")
    cv2.imwrite(str(root / "astronaut.png"), cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))
    shutil.copy(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), root / "hopper.jpg")
    (root / "lfw").mkdir()
    for i, face in enumerate(skimage.data.lfw_subset()[:12]):
        cv2.imwrite(str(root / "lfw" / f"{i:03d}.png"), (face * 255).astype(np.uint8))
    (root / "README.txt").write_text("not an image")
    (root / "broken.png").write_bytes(b"\x89PNG but not really")
    return root


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(create_model("facemoe_swin_tiny"), tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def test_regions_json_on_real_photos(photo_dir, tiny_ckpt, tmp_path):
    proc = moescope("regions", tiny_ckpt, "--data", photo_dir, "--json", "--bootstrap", "100", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    s = result["summary"]
    assert s["images_found"] == 15 and s["images_unreadable"] == 1
    assert s["images_analysed"] + s["images_no_face"] == 14 and s["images_analysed"] >= 13
    rows = result["tables"]["region_routing"]
    by_region = {}
    for row in rows:
        by_region.setdefault(row["region"], 0.0)
        by_region[row["region"]] += row["percent"]
    assert len(by_region) == 7 and all(abs(v - 100) < 1e-6 for v in by_region.values())
    paper = result["tables"]["paper_tiny"]
    assert [r["Facial Region"] for r in paper][0] == "eyes"
    assert any("unreadable" in w for w in result["warnings"])
    for name in ("region_routing.csv", "paper_tiny.md", "paper_tiny.tex", "result.json", "region_routing_heatmap.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_regions_compare_official_checkpoint(photo_dir, official_model_pt, tmp_path):
    other = tmp_path / "copy" / "model.pt"
    other.parent.mkdir()
    shutil.copy(official_model_pt, other)
    proc = moescope("regions", official_model_pt, "--compare", other, "--data", photo_dir / "lfw", "--bootstrap", "0", "--by", "stage")
    assert proc.returncode == 0, proc.stderr
    assert "difference model_2 - model" in proc.stdout
    assert "[layers.0]" in proc.stdout and "[layers.2]" in proc.stdout
    # the same checkpoint twice: every difference is exactly zero
    delta_block = proc.stdout.split("difference model_2 - model [layers.0]")[1].split("difference")[0]
    rows = [line.split() for line in delta_block.splitlines() if line.split() and line.split()[0] in ("eyes", "nose", "cheeks")]
    assert len(rows) == 3 and all(float(v) == 0.0 for row in rows for v in row[1:])


@pytest.mark.parametrize(
    "args,message",
    [
        (["missing.pt"], "checkpoint not found"),
        (["{ckpt}", "--data", "{empty}"], "no image files"),
        (["{ckpt}", "--data", "{nowhere}"], "image folder not found"),
        (["{ckpt}", "--data", "{photos}", "--layers", "layers.9"], "unknown MoE layer 'layers.9'"),
        (["{ckpt}", "--data", "{photos}/README.txt"], "not an image file"),
    ],
)
def test_regions_bad_input(args, message, tiny_ckpt, photo_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    fmt = {"ckpt": tiny_ckpt, "empty": tmp_path / "empty", "nowhere": tmp_path / "nowhere", "photos": photo_dir}
    status = main(["regions", *[a.format(**fmt) for a in args], "--bootstrap", "0"])
    err = capsys.readouterr().err
    assert status == 2, err
    error_lines = [l for l in err.splitlines() if l.startswith("moescope: error:")]
    assert len(error_lines) == 1 and message in error_lines[0]


def test_bad_input_exits_2_without_traceback(tmp_path):
    proc = moescope("regions", tmp_path / "missing.pt")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("moescope: error: checkpoint not found")


def test_export_tokens_parquet(photo_dir, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "tokens.parquet"
    status = main(["regions", str(tiny_ckpt), "--data", str(photo_dir / "lfw"), "--bootstrap", "0", "--export-tokens", str(out), "--layers", "layers.2"])
    assert status == 0, capsys.readouterr().err
    import pandas as pd

    frame = pd.read_parquet(out)
    assert set(frame["layer"]) == {"layers.2.blocks.0.mlp", "layers.2.blocks.1.mlp"}
    assert len(frame) == frame["image"].nunique() * 2 * 25
    assert frame["row"].between(0, 4).all() and frame["col"].between(0, 4).all()


def test_null_does_not_depend_on_where_the_images_lie(photo_dir, tiny_ckpt, tmp_path, capsys):
    """The same photos copied to another, deeper folder: the same permutation null (each image's
    draws are seeded by its path under the data folder, not by its absolute path)."""
    moved = tmp_path / "elsewhere" / "deeper"
    shutil.copytree(photo_dir / "lfw", moved / "lfw")
    tables = []
    for folder in (photo_dir / "lfw", moved / "lfw"):
        capsys.readouterr()
        assert main(["regions", str(tiny_ckpt), "--data", str(folder), "--json", "--bootstrap", "0", "--null", "20"]) == 0
        tables.append(json.loads(capsys.readouterr().out)["tables"]["nmi"])
    assert tables[0] == tables[1]
    assert all(row["null_resamples"] == 20 and row["null_images"] == 12 for row in tables[0])
