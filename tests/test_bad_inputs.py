"""The bad-input matrix (issue 13): every input a hostile user can give ends as ONE stderr line
``moescope: error: ...`` with exit status 2 — never a traceback — and never after the work ran.

The command-line cases run in this process (``moescope.cli.main(argv)``) on a tiny official
checkpoint, so the whole matrix stays fast. ``test_matrix_messages`` prints every case with its
message (``pytest -s``) for the issue's closing note.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facemoe_model.checkpoint import load_checkpoint, save_checkpoint
from moescope.cli import describe_error, main

MESSAGES: list[tuple[str, str]] = []


# --- fixtures: checkpoints, image folders ------------------------------------------------------


@pytest.fixture(scope="module")
def bad(tmp_path_factory, official_model_pt) -> dict[str, Path]:
    """Every bad checkpoint of the matrix, by case name, plus a few good ones."""
    d = tmp_path_factory.mktemp("bad-checkpoints")
    data = official_model_pt.read_bytes()
    sd = torch.load(official_model_pt, weights_only=True)
    files: dict[str, Path] = {}

    def put(name: str, content: bytes) -> None:
        files[name] = d / f"{name}.pt"
        files[name].write_bytes(content)

    def save(name: str, obj, suffix: str = ".pt") -> None:
        files[name] = d / f"{name}{suffix}"
        torch.save(obj, files[name])

    put("empty", b"")
    put("truncated", data[: len(data) // 2])
    put("random bytes", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    put("text", b"this is not a checkpoint at all\n")

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    save("pickled code", {"state_dict": {}, "evil": Payload()})
    save("a bare tensor", torch.zeros(3))
    save("no tensors", {"a": 1})
    wrong = dict(sd)
    wrong["norm.weight"] = torch.zeros(7)
    save("wrong shape", wrong)
    missing = {k: v for k, v in sd.items() if k != "norm.weight"}
    save("missing key", missing)
    mismatched = {k: v for k, v in sd.items() if ".experts.2." not in k or not k.startswith("layers.1.blocks.1.")}
    save("mismatched expert counts", mismatched)
    own = d / "own.pt"
    save_checkpoint(load_checkpoint(official_model_pt), own)
    files["own"] = own
    obj = torch.load(own, weights_only=True)
    for name, change in (("img_size -5", {"img_size": -5}), ("embed_dim 0", {"embed_dim": 0}),
                         ("depths 'abc'", {"depths": "abc"}), ("num_experts 0", {"num_experts": 0})):
        save(f"own config {name}", {**obj, "config": {**obj["config"], **change}})
    save("own config not a dict", {**obj, "config": 5})
    save("own without name", {**obj, "config": {k: v for k, v in obj["config"].items() if k != "name"}})
    from safetensors.torch import save_file

    files["safetensors"] = d / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(files["safetensors"]))
    files["damaged safetensors"] = d / "damaged.safetensors"
    files["damaged safetensors"].write_bytes(files["safetensors"].read_bytes()[:5000])
    fifo = d / "fifo.pt"
    os.mkfifo(fifo)
    files["FIFO"] = fifo
    files["folder"] = d
    files["missing"] = d / "nope.pt"
    return files


def _jpeg(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]))
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, photo) -> dict[str, Path]:
    """Image folders of the matrix, by case name."""
    root = tmp_path_factory.mktemp("bad-images")
    out: dict[str, Path] = {}

    def folder(name: str, files: dict[str, bytes] | None = None) -> Path:
        path = root / name.replace(" ", "_")
        path.mkdir()
        for fname, content in (files or {}).items():
            (path / fname).write_bytes(content)
        out[name] = path
        return path

    jpeg = _jpeg(photo)
    folder("empty folder")
    folder("non-image files only", {"notes.txt": b"hello", "data.csv": b"a,b\n"})
    folder("zero-byte image", {"a.jpg": b""})
    folder("truncated image", {"a.jpg": jpeg[: len(jpeg) // 3]})
    folder("fake image", {"a.png": b"I am text, not a PNG"})
    loop = folder("symlink loops")
    os.symlink(".", loop / "sub")
    os.symlink("self.jpg", loop / "self.jpg")
    folder("1x1 image", {"dot.png": cv2.imencode(".png", np.zeros((1, 1, 3), np.uint8))[1].tobytes()})
    folder("no face", {"grey.png": cv2.imencode(".png", np.full((64, 64, 3), 128, np.uint8))[1].tobytes()})
    grey = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    folder("grey, RGBA and 16-bit photos", {
        "grey.png": cv2.imencode(".png", grey)[1].tobytes(),
        "rgba.png": cv2.imencode(".png", cv2.cvtColor(photo, cv2.COLOR_RGB2BGRA))[1].tobytes(),
        "deep.png": cv2.imencode(".png", photo[..., ::-1].astype(np.uint16) * 257)[1].tobytes(),
    })
    folder("odd file names", {"-dash.jpg": jpeg, "sp ace é.jpg": jpeg, "new\nline.jpg": b"not an image", "tab\tname.png": b"x"})
    (root / "a file.jpg").write_bytes(b"not an image")
    out["one fake image file"] = root / "a file.jpg"
    out["a text file"] = root / "non-image_files_only" / "notes.txt"
    out["missing folder"] = root / "nope"
    return out


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``moescope ARGV`` in this process: (status, stdout, stderr)."""
    capsys.readouterr()
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's errors exit (one line, status 2), as argparse does
        status = exc.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(capsys, case: str, *argv, expect: str | tuple[str, ...] | None = None) -> str:
    status, out, err = run_cli(capsys, *argv)
    lines = err.strip("\n").splitlines()
    assert status == 2, f"{case}: exit {status}, stderr {err!r}"
    assert len(lines) == 1 and lines[0].startswith("moescope: error: "), f"{case}: {err!r}"
    assert "Traceback" not in err and "internal error" not in err, f"{case}: {err!r}"
    for part in (expect,) if isinstance(expect, str) else expect or ():
        assert part in lines[0], f"{case}: {lines[0]!r} lacks {part!r}"
    MESSAGES.append((case, lines[0]))
    return lines[0]


# --- checkpoints --------------------------------------------------------------------------------

CHECKPOINT_CASES = {
    "missing": "checkpoint not found",
    "folder": "is a folder",
    "empty": "is empty (0 bytes)",
    "truncated": "truncated or corrupt",
    "random bytes": "not a readable checkpoint",
    "text": "not a readable checkpoint",
    "pickled code": "pickled objects or code",
    "a bare tensor": "not a FaceMoE checkpoint",
    "no tensors": "not a FaceMoE checkpoint",
    "wrong shape": "shape mismatch at norm.weight",
    "missing key": "missing key",
    "mismatched expert counts": "mismatched expert counts",
    "own config img_size -5": "cannot build model",
    "own config embed_dim 0": "cannot build model",
    "own config depths 'abc'": "cannot build model",
    "own config num_experts 0": "cannot build model",
    "own config not a dict": "'config' is a int",
    "own without name": "no model 'name'",
    "damaged safetensors": "damaged safetensors",
    "FIFO": "not a regular file",
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_bad_checkpoint(capsys, bad, case):
    message = assert_one_line_error(capsys, f"checkpoint: {case}", "info", bad[case], expect=CHECKPOINT_CASES[case])
    if case == "random bytes":
        assert "pickled" not in message


def test_fifo_as_any_input_file(capsys, bad, official_model_pt):
    fifo = bad["FIFO"]
    for case, argv in (("eval --pairs FIFO", ["eval", "--pairs", fifo]), ("eval --bin FIFO", ["eval", "--bin", fifo]),
                       ("cka FIFO AFTER", ["cka", fifo, official_model_pt]),
                       ("regions --compare FIFO", ["regions", official_model_pt, "--compare", fifo]),
                       ("regions --data FIFO", ["regions", official_model_pt, "--data", fifo])):
        assert_one_line_error(capsys, case, *argv, expect=str(fifo))


def test_bad_demo_name(capsys):
    assert_one_line_error(capsys, "checkpoint: demo:nope", "info", "demo:nope", expect="unknown demo checkpoint")


@pytest.mark.parametrize("k, expect", [("0", "--top-k must be >= 1, got 0"), ("-2", "--top-k must be >= 1"),
                                       ("4", "top_k=4 out of range for a checkpoint with 3 experts"),
                                       ("two", "invalid int value")])
def test_official_checkpoint_bad_top_k(capsys, official_model_pt, k, expect):
    assert_one_line_error(capsys, f"official checkpoint --top-k {k}", "info", official_model_pt, "--top-k", k, expect=expect)


def test_own_checkpoint_bad_top_k(capsys, bad):
    assert_one_line_error(capsys, "own checkpoint --top-k 9", "info", bad["own"], "--top-k", "9", expect="top_k=9 out of range")


def test_top_k_is_used_and_recorded(capsys, official_model_pt, bad):
    for ckpt in (official_model_pt, bad["own"], bad["safetensors"]):
        for k in (1, 3):
            status, out, err = run_cli(capsys, "info", ckpt, "--top-k", k, "--json")
            assert status == 0, err
            result = json.loads(out)
            assert result["settings"]["top_k"] == k
            assert {row["k"] for row in result["tables"]["moe_layers"]} == {k}
    status, out, _ = run_cli(capsys, "info", official_model_pt, "--json")
    assert json.loads(out)["settings"]["top_k"] == 2


def test_safetensors_official_loads_like_the_pt(official_model_pt, bad):
    a, b = load_checkpoint(official_model_pt), load_checkpoint(bad["safetensors"])
    x = torch.randn(2, 3, 120, 120)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


# --- image folders ------------------------------------------------------------------------------

DATA_CASES = {
    "missing folder": "image folder not found",
    "empty folder": "no image files",
    "non-image files only": "no image files",
    "a text file": "not an image file",
    "one fake image file": ("no image could be analysed: 1 found, 0 without a face", "1 unreadable"),
    "zero-byte image": ("no image could be analysed", "1 unreadable"),
    "truncated image": ("no image could be analysed", "1 unreadable"),
    "fake image": ("no image could be analysed", "1 unreadable"),
    "symlink loops": "no image files",  # a self-link is no file; a folder loop is not followed
    "1x1 image": "no image could be analysed",
    "no face": ("no image could be analysed: 1 found, 1 without a face", "0 unreadable", "(try --region-source template)"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_image_data(capsys, official_model_pt, folders, case):
    message = assert_one_line_error(capsys, f"--data: {case}", "regions", official_model_pt, "--data", folders[case],
                                    "--bootstrap", "0", "--workers", "0", "--json", expect=DATA_CASES[case])
    if "1 unreadable" in DATA_CASES[case]:
        assert "--region-source template" not in message  # the template cannot help unreadable files


def _ok(capsys, *argv) -> tuple[dict, list[str]]:
    status, out, err = run_cli(capsys, *argv, "--json")
    assert status == 0, err
    assert "Traceback" not in err
    return json.loads(out), err.strip("\n").splitlines()


def test_odd_but_valid_images_are_analysed(capsys, official_model_pt, folders):
    result, _ = _ok(capsys, "regions", official_model_pt, "--data", folders["grey, RGBA and 16-bit photos"], "--bootstrap", "0", "--workers", "0")
    assert result["summary"]["images_analysed"] == 3
    result, _ = _ok(capsys, "regions", official_model_pt, "--data", folders["1x1 image"], "--bootstrap", "0", "--region-source", "template")
    assert result["summary"]["images_analysed"] == 1


def test_odd_file_names_stay_on_one_warning_line(capsys, official_model_pt, folders):
    result, lines = _ok(capsys, "regions", official_model_pt, "--data", folders["odd file names"], "--bootstrap", "0", "--workers", "0")
    assert result["summary"]["images_analysed"] == 2 and result["summary"]["images_unreadable"] == 2
    warnings = [line for line in lines if line.startswith("warning: ")]
    assert any("line.jpg" in line or "name.png" in line for line in warnings), warnings
    assert not any(line.startswith(("line.jpg", "name.png")) for line in lines), lines  # no name split over two lines
    MESSAGES.append(("odd file names (newline, tab, dash, unicode)", warnings[0]))


# --- option values ------------------------------------------------------------------------------

OPTION_CASES = [
    ("--bootstrap -1", ["regions", "--bootstrap", "-1"], "--bootstrap must be >= 0, got -1"),
    ("--layers ,", ["regions", "--layers", ","], "--layers ',' names nothing"),
    ("--layers ' , '", ["ablate", "--random", "--layers", " , "], "names nothing"),
    ("--layers unknown", ["regions", "CKPT", "--layers", "nope", "--bootstrap", "0"], "nope"),
    ("--workers -3", ["regions", "--workers", "-3"], "--workers must be >= 0, got -3"),
    ("--batch-size 0", ["regions", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("eval --batch-size -1", ["eval", "--batch-size", "-1"], "--batch-size must be >= 1"),
    ("cka --batch-size 2", ["cka", "--batch-size", "2"], "--batch-size must be >= 4"),
    ("--seed -1", ["ablate", "--random", "--seed", "-1"], "--seed must be >= 0"),
    ("--lowres 0", ["eval", "--lowres", "0"], "--lowres must be >= 1"),
    ("train --epochs 0", ["train", "--synthetic", "4:2", "--epochs", "0", "--out", "OUT"], "--epochs must be >= 1"),
    ("train --workers -1", ["train", "--synthetic", "4:2", "--workers", "-1", "--out", "OUT"], "--workers must be >= 0"),
    ("--batch-size x (argparse)", ["regions", "--batch-size", "x"], "invalid int value: 'x'"),
    ("--by bogus (argparse)", ["regions", "--by", "bogus"], "invalid choice: 'bogus'"),
    ("unknown option (argparse)", ["info", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    ("unknown command (argparse)", ["frobnicate"], "invalid choice: 'frobnicate'"),
    ("ablate without intervention", ["ablate"], "give at least one intervention"),
    ("eval --root without --pairs", ["eval", "--root", "x"], "--root applies to --pairs only"),
    ("cka one checkpoint", ["cka", "CKPT"], "give two checkpoints"),
    ("--compare missing", ["regions", "CKPT", "--compare", "MISSING", "--bootstrap", "0"], "checkpoint not found"),
]


@pytest.mark.parametrize("case, argv, expect", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_bad_option_values(capsys, official_model_pt, tmp_path, monkeypatch, case, argv, expect):
    import moescope.demo

    loads = []
    monkeypatch.setattr(moescope.demo, "resolve_checkpoint", lambda spec, _r=moescope.demo.resolve_checkpoint: loads.append(spec) or _r(spec))
    argv = [str(official_model_pt) if a == "CKPT" else str(tmp_path / "missing.pt") if a == "MISSING"
            else str(tmp_path / "run") if a == "OUT" else a for a in argv]
    assert_one_line_error(capsys, f"option: {case}", *argv, expect=expect)
    if "CKPT" not in [*argv] and case not in ("--layers unknown", "--compare missing"):
        assert loads == [], f"{case}: a model was loaded before the options were checked"


# --- outputs ------------------------------------------------------------------------------------


def _immutable(path: Path) -> bool:
    """Make ``path`` immutable (chattr +i; needs root on a file system that supports it)."""
    try:
        return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    except OSError:
        return False


def test_out_is_an_existing_file(capsys, official_model_pt, tmp_path):
    f = tmp_path / "f"
    f.write_text("hi\n")
    for command in (["info", official_model_pt], ["regions", official_model_pt, "--bootstrap", "0"], ["train", "--synthetic", "4:2"]):
        assert_one_line_error(capsys, f"--out is a file ({command[0]})", *command, "--out", f, expect="exists and is not a folder")
    assert f.read_text() == "hi\n"


def test_out_holds_other_files(capsys, official_model_pt, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    assert_one_line_error(capsys, "--out holds non-result files", "info", official_model_pt, "--out", tmp_path,
                          expect="not an earlier moescope result")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_export_tokens_cannot_be_written(capsys, official_model_pt, tmp_path):
    assert_one_line_error(capsys, "--export-tokens is a folder", "regions", official_model_pt, "--export-tokens", tmp_path,
                          expect="is a folder")
    assert_one_line_error(capsys, "--export-tokens inside --out", "regions", official_model_pt, "--out", tmp_path / "o",
                          "--export-tokens", tmp_path / "o" / "t.csv", expect="inside --out")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(capsys, "--export-tokens under a file", "regions", official_model_pt, "--export-tokens", blocker / "t.csv",
                          expect="is not a folder")


def test_unwritable_out_folder(capsys, official_model_pt, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    if not _immutable(locked):
        pytest.skip("chattr +i is not available here")
    try:
        assert_one_line_error(capsys, "--out immutable folder", "info", official_model_pt, "--out", locked, expect="cannot write in")
        assert_one_line_error(capsys, "--out inside an immutable folder", "info", official_model_pt, "--out", locked / "sub",
                              expect="cannot write in")
        assert_one_line_error(capsys, "--export-tokens in an immutable folder", "regions", official_model_pt,
                              "--export-tokens", locked / "t.csv", expect="cannot write in")
    finally:
        subprocess.run(["chattr", "-i", str(locked)])


def test_stale_files_never_mix_with_new_ones(capsys, tmp_path):
    from moescope.results import AnalysisResult
    import pandas as pd

    out = tmp_path / "out"
    AnalysisResult("x", tables={"delta": pd.DataFrame({"a": [1]}), "paper_before": pd.DataFrame({"b": [2]})}).save(out)
    AnalysisResult("x", tables={"paper_after": pd.DataFrame({"b": [3]})}).save(out)
    assert sorted(p.name for p in out.iterdir()) == ["paper_after.csv", "paper_after.md", "paper_after.tex", "result.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder, no temp file


def test_out_replaces_an_earlier_result_and_records_top_k(capsys, official_model_pt, tmp_path):
    out = tmp_path / "out"
    for k in (1, 2):
        status, _, err = run_cli(capsys, "info", official_model_pt, "--top-k", k, "--out", out)
        assert status == 0, err
        assert json.loads((out / "result.json").read_text())["settings"]["top_k"] == k
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- environment, memory, pipes, debug ----------------------------------------------------------


def test_out_of_memory_is_one_line(capsys, official_model_pt, folders, monkeypatch):
    import moescope.faces

    try:
        np.empty((1 << 20, 1 << 20, 64), np.float64)
    except MemoryError as exc:
        oom = exc  # numpy's own _ArrayMemoryError, as a 10000x10000 image can raise
    else:  # pragma: no cover
        pytest.skip("this machine allocates 512 TiB")
    assert describe_error(oom)[1] == 2

    def huge(*args, **kwargs):
        raise oom

    monkeypatch.setattr(moescope.faces, "read_images", huge)
    assert_one_line_error(capsys, "out of memory on a huge image", "regions", official_model_pt, "--data",
                          folders["grey, RGBA and 16-bit photos"], "--bootstrap", "0", expect="out of memory")


def test_unusable_cache_location_is_not_a_traceback(capsys, official_model_pt, folders, tmp_path, monkeypatch):
    blocker = tmp_path / "cache-file"
    blocker.write_text("x")
    monkeypatch.setenv("MOESCOPE_CACHE", str(blocker))
    status, out, err = run_cli(capsys, "regions", official_model_pt, "--data", folders["grey, RGBA and 16-bit photos"],
                               "--bootstrap", "0", "--workers", "0", "--json")
    assert "Traceback" not in err
    lines = err.strip("\n").splitlines()
    if status == 2:
        assert len(lines) == 1 and lines[0].startswith("moescope: error: ")
        MESSAGES.append(("MOESCOPE_CACHE is a file", lines[0]))
    else:
        assert status == 0, err
        warnings = [line for line in lines if line.startswith("warning: ")]
        MESSAGES.append(("MOESCOPE_CACHE is a file", " / ".join(warnings) or "(exit 0, runs uncached, no warning)"))


class _ClosedPipe(io.TextIOBase):
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


def test_closed_stdout_exits_quietly(capsys, official_model_pt, monkeypatch):
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(["info", str(official_model_pt)]) == 141
    monkeypatch.undo()
    assert capsys.readouterr().err == ""
    MESSAGES.append(("closed stdout (moescope info | true)", "(nothing; exit 141)"))


def test_debug_shows_the_traceback(capsys, bad, monkeypatch):
    from moescope.errors import CheckpointError

    with pytest.raises(CheckpointError):
        main(["--debug", "info", str(bad["empty"])])
    with pytest.raises(CheckpointError):
        main(["info", str(bad["empty"]), "--debug"])
    monkeypatch.setenv("MOESCOPE_DEBUG", "1")
    with pytest.raises(CheckpointError):
        main(["info", str(bad["empty"])])


def test_unexpected_errors_are_one_line_too(capsys, official_model_pt, monkeypatch):
    import moescope.runners.info

    def broken(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(moescope.runners.info, "describe", broken)
    status, _, err = run_cli(capsys, "info", official_model_pt)
    assert status == 1 and err.count("\n") == 1
    assert err.startswith("moescope: error: internal error (ZeroDivisionError: a bug); rerun with --debug")


def test_argparse_error_in_a_real_process_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moescope", "regions", "--bootstrap", "x"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["moescope: error: argument --bootstrap: invalid int value: 'x' (see 'moescope regions --help')"]


def test_matrix_messages():
    """The closing note of issue 13: every case with its message (run with -s to see them)."""
    for case, message in MESSAGES:
        print(f"{case:45s} {message}")


# --- randomness independent of batching (issue 13, #12) ---------------------------------------


def test_random_routing_does_not_depend_on_batch_size(capsys, tmp_path):
    """``ablate --random --seed 3``: the same table for --batch-size 32, 5 and the default (64)."""
    import shutil

    from moescope.demo import demo_split_dir

    split = tmp_path / "split"
    for part in ("gallery", "probe"):
        for identity in sorted(os.listdir(demo_split_dir() / part))[:12]:
            shutil.copytree(demo_split_dir() / part / identity, split / part / identity)
    tables = []
    for extra in ([], ["--batch-size", "32"], ["--batch-size", "5"]):
        status, out, err = run_cli(capsys, "ablate", "--random", "--seed", "3", "--split", split, "--json", *extra)
        assert status == 0, err
        result = json.loads(out)
        tables.append(result["tables"])
    assert tables[0] == tables[1] == tables[2]
    rows = {r["intervention"]: r for r in tables[0]["ablation"]}
    usage = lambda row: {k: v for k, v in row.items() if k.startswith("Expert ")}
    assert usage(rows["random seed 3"]) and usage(rows["random seed 3"]) != usage(rows["baseline"])  # the draw changed routing
