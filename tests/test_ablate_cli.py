"""`moescope ablate` end to end: JSON/files, pairs lists, official checkpoints, the demo, bad input."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from facemoe_model import create_model, save_checkpoint
from facemoe_model.protocols import evaluate, load_protocols
from moescope.cli import main
from moescope.demo import demo_dir, load_model
from test_interventions import write_identity_split


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    return write_identity_split(tmp_path_factory.mktemp("ablate-cli"), identities=4, shots=2)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(create_model("facemoe_swin_tiny"), tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def run_json(capsys, *args):
    status = main(["ablate", *map(str, args), "--json"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return json.loads(captured.out), captured.err


def test_ablate_json_and_files(tiny_ckpt, split_dir, tmp_path, capsys):
    result, err = run_json(capsys, tiny_ckpt, "--data", split_dir, "--drop", "singles", "--switch", "--random", "--seed", "3", "--out", tmp_path / "out")
    rows = result["tables"]["ablation"]
    assert [r["intervention"] for r in rows] == ["baseline", "drop 0", "drop 1", "drop 2", "switch 1,2,0", "random seed 3"]
    assert [r["k"] for r in rows] == [2] * 6
    assert all(abs(sum(r[f"Expert {e} (%)"] for e in range(3)) - 100) < 1e-9 for r in rows)
    assert [rows[1 + e][f"Expert {e} (%)"] for e in range(3)] == [0.0, 0.0, 0.0]  # a dropped expert gets no token
    assert {"Rank-1", "Rank-5", "Rank-10", "Rank-20", "Verification accuracy"} <= rows[0].keys()
    assert result["command"] == "ablate" and result["settings"]["seed"] == 3 and result["summary"]["experts"] == 3
    assert "switch 1,2,0" in err and "intervention" in err  # the table goes to stderr with --json
    for name in ("ablation.csv", "ablation.md", "ablation.tex", "metrics.csv", "expert_usage.csv", "result.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert json.loads((tmp_path / "out" / "result.json").read_text())["tables"]["ablation"] == rows

    # the baseline row is exactly what protocols.evaluate (and `moescope eval`) give for this checkpoint and split
    model = load_model(tiny_ckpt)
    expected = evaluate(model, load_protocols(split=split_dir, size=model.img_size))
    assert result["summary"]["identification"] == expected["identification"]
    assert [rows[0][r] for r in ("Rank-1", "Rank-5", "Rank-10", "Rank-20")] == [expected["identification"][f"Rank-{r}"] for r in (1, 5, 10, 20)]
    assert rows[0]["Verification accuracy"] == expected["verification"]["accuracy"]
    if importlib.util.find_spec("moescope.commands.eval") is not None:
        assert main(["eval", str(tiny_ckpt), "--split", str(split_dir), "--json"]) == 0
        figures = json.loads(capsys.readouterr().out)["summary"]
        assert result["summary"]["identification"] == figures["identification"]
        assert result["summary"]["verification"] == figures["verification"]


def test_ablate_pairs_list_on_official_checkpoint(official_model_pt, split_dir, tmp_path, capsys):
    pairs = tmp_path / "list" / "pairs.txt"
    pairs.parent.mkdir()
    shutil.copy(split_dir / "pairs.txt", pairs)
    result, err = run_json(capsys, official_model_pt, "--protocol", pairs, "--root", split_dir, "--drop", "0,1", "--layers", "layers.0", "--no-flip")
    base, drop = result["tables"]["ablation"]
    assert "Rank-1" not in base and 0 <= base["Verification accuracy"] <= 1
    assert drop["intervention"] == "drop 0,1" and drop["k"] == 1 and drop["Expert 2 (%)"] == 100.0
    assert result["summary"]["moe_layers"] == 2 and result["settings"]["format"] == "official"
    assert {r["layer"] for r in result["tables"]["expert_usage"]} == {"layers.0.blocks.0.mlp", "layers.0.blocks.1.mlp", "all"}
    assert any("k shrinks from 2 to 1" in w for w in result["warnings"]) and "warning: drop 0,1" in err


def test_ablate_text_output(tiny_ckpt, split_dir, capsys):
    assert main(["ablate", str(tiny_ckpt), "--data", str(split_dir), "--drop", "1", "--no-flip"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith(f"moescope ablate: {tiny_ckpt}")
    header = next(l for l in lines if l.startswith("intervention"))
    assert "Rank-1 (%)" in header and "Expert 2 %" in header
    assert any(l.startswith("baseline") for l in lines) and any(l.startswith("drop 1") for l in lines)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--drop", "0,x"], "--drop '0,x': expected comma-separated expert indices"),
        (["--drop", "5"], "expert 5 out of range"),
        (["--drop", "5"], "it has 3 experts"),
        (["--switch", "0,0,1"], "not a permutation of 0..2"),
        (["--drop", "0", "--layers", "layers.7"], "unknown MoE layer 'layers.7'"),
        ([], "give at least one intervention"),
        (["--drop", "0", "--root", "{split}"], "--root applies to --pairs only"),
        (["--drop", "0", "--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_ablate_bad_input(args, message, tiny_ckpt, split_dir, capsys):
    status = main(["ablate", str(tiny_ckpt), "--data", str(split_dir), *[a.format(split=split_dir) for a in args]])
    err = capsys.readouterr().err
    assert status == 2, err
    error_lines = [l for l in err.splitlines() if l.startswith("moescope: error:")]
    assert len(error_lines) == 1 and message in error_lines[0]


def test_ablate_bad_input_exits_2_without_traceback(tiny_ckpt, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moescope", "ablate", str(tiny_ckpt), "--data", str(tmp_path), "--switch", "0,0,1"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("moescope: error: switch 0,0,1: switch permutation [0, 0, 1] is not a permutation")


@pytest.mark.skipif(not (demo_dir() / "after.pt").exists() or not (demo_dir() / "split").is_dir(),
                    reason="the bundled demo (demo:after + its evaluation split) is not in this installation yet")
def test_demo_default_drop_changes_accuracy(capsys):
    result, _ = run_json(capsys, "--drop", "0,1")
    base, drop = result["tables"]["ablation"]
    model = load_model("demo:after")
    expected = evaluate(model, load_protocols(split=demo_dir() / "split", size=model.img_size))
    assert result["summary"]["identification"] == expected["identification"]
    assert result["checkpoints"] == ["demo:after"] and drop["k"] == 1
    columns = [c for c in base if c.startswith("Rank-") or c == "Verification accuracy"]
    assert [drop[c] for c in columns] != [base[c] for c in columns]  # a trained model notices losing two experts


def test_ablate_takes_eval_s_evaluation_options(tiny_ckpt, split_dir, tmp_path, capsys):
    """--split / --pairs [--root] as in eval; the older --data / --protocol spellings give the same result."""
    common = ["--drop", "0", "--no-flip", "--layers", "layers.2"]
    by_split, _ = run_json(capsys, tiny_ckpt, "--split", split_dir, *common)
    by_data, _ = run_json(capsys, tiny_ckpt, "--data", split_dir, *common)
    assert by_split == by_data and by_split["settings"]["data"] == str(split_dir)
    pairs = tmp_path / "list" / "pairs.txt"
    pairs.parent.mkdir()
    shutil.copy(split_dir / "pairs.txt", pairs)
    by_pairs, _ = run_json(capsys, tiny_ckpt, "--pairs", pairs, "--root", split_dir, *common)
    by_protocol, _ = run_json(capsys, tiny_ckpt, "--protocol", pairs, "--root", split_dir, *common)
    assert by_pairs == by_protocol and "Rank-1" not in by_pairs["tables"]["ablation"][0]
    assert by_pairs["summary"]["verification"] == by_split["summary"]["verification"]  # the same pairs
    with pytest.raises(SystemExit) as exit_info:  # one evaluation source at a time (argparse: usage error)
        main(["ablate", str(tiny_ckpt), "--split", str(split_dir), "--pairs", str(pairs), "--drop", "0"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
