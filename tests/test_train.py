"""``moescope train``: the loss goes down, resuming is exact, two processes stay in sync."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from facemoe_model import read_checkpoint
from facemoe_model.train import LAST_CHECKPOINT, LOG_FILE
from moescope.cli import main

# A small but real set-up: 6 synthetic identities x 6 renders, a 60 px FaceMoE Swin (10x10 tokens).
TINY = ["--synthetic", "6:6", "--model-arg", "img_size=60", "--model-arg", "embedding_dim=32", "--batch-size", "12"]


def train_cli(out, *extra: str) -> int:
    argv = ["train", *TINY, "--out", str(out), "--epochs", "3", "--lr", "2e-3", "--warmup-epochs", "0.5", *extra]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["moescope", *argv])  # as the console script would see it
        return main(argv)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 3-epoch run in one go, with its --json output."""
    out = tmp_path_factory.mktemp("train") / "full"
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        assert train_cli(out, "--json") == 0
    return out, json.loads(capture.getvalue())


def test_training_reduces_the_loss_and_records_the_run(uninterrupted):
    out, result = uninterrupted
    log = pd.read_csv(out / LOG_FILE)
    assert list(log["epoch"]) == [1, 2, 3]
    assert log["face_loss"].iloc[-1] < 0.6 * log["face_loss"].iloc[0]
    assert (log["aux_loss"] > 0).all()
    load = log.filter(like="load_layers.0.blocks.0.mlp_e")
    assert load.shape[1] == 3 and load.sum(axis=1).round(6).eq(1).all()
    assert result["tables"]["log"][-1]["face_loss"] == pytest.approx(log["face_loss"].iloc[-1])

    meta = read_checkpoint(out / "model.pt")["metadata"]
    assert meta["command"].startswith("moescope train --synthetic 6:6 --model-arg img_size=60")
    assert meta["seed"] == 0 and meta["steps"] == 3 * 3 and meta["training_seconds"] > 0
    assert meta["data"]["kind"] == "synthetic" and meta["data"]["identities"] == 6
    assert meta["train_config"]["aux_weight"] == 10.0 and meta["train_config"]["head"] == "cosface"


def test_resume_continues_exactly_where_an_uninterrupted_run_would_be(uninterrupted, tmp_path, monkeypatch):
    import facemoe_model.train as training

    real_write = training.atomic_write

    def write_then_crash(path, data):  # killed right after epoch 1 was checkpointed
        real_write(path, data)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "atomic_write", write_then_crash)
    assert train_cli(tmp_path) == 130
    monkeypatch.undo()
    assert read_checkpoint(tmp_path / LAST_CHECKPOINT)["train"]["step"] == 3
    assert train_cli(tmp_path) == 2  # refuses to overwrite without --resume
    assert train_cli(tmp_path, "--resume", "--epochs", "4") == 2  # a different schedule is refused
    assert train_cli(tmp_path, "--resume") == 0

    full, resumed = (read_checkpoint(path / "model.pt")["state_dict"] for path in (uninterrupted[0], tmp_path))
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    logs = [pd.read_csv(path / LOG_FILE).drop(columns="seconds") for path in (uninterrupted[0], tmp_path)]
    pd.testing.assert_frame_equal(*logs)


def test_two_processes_end_with_identical_weights(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "moescope", "train", *TINY, "--batch-size", "6", "--epochs", "1", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    meta = read_checkpoint(out / "model.pt")["metadata"]
    assert meta["world_size"] == 2
    digests = meta["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert meta["steps"] == 36 // (6 * 2)  # each process trained on its own half of the images
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".pt", ".csv")) == ["last.pt", "log.csv", "model.pt"]


def test_bad_training_inputs_fail_in_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--data", str(empty), "--out", str(tmp_path / "a")]) == 2
    assert main(["train", "--synthetic", "6", "--out", str(tmp_path / "b")]) == 2
    assert main(["train", "--synthetic", "6:6", "--init", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "c")]) == 2
    assert main(["train", "--synthetic", "6:6", "--synthetic-config", "no_such_knob=1", "--out", str(tmp_path / "d")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len([e for e in errors if e.startswith("moescope: error: ")]) == 4
    assert "Traceback" not in "\n".join(errors)


def test_log_csv_is_what_pandas_reads_back():
    """log.csv is written without pandas: columns in first-appearance order, blanks for missing/NaN."""
    from facemoe_model.train import _log_csv

    rows = [
        {"epoch": 1, "lr": 1e-3, "face_loss": 2.5, "load_l_e0": 0.25, "seconds": 1.5},
        {"epoch": 2, "lr": 5.000000000000001e-4, "face_loss": 2.0, "load_l_e0": 1 / 3, "val_hr_rank1": float("nan"), "seconds": 3.0},
        {"epoch": 3, "lr": 0.0, "face_loss": 1.0, "load_l_e0": 0.5, "val_hr_rank1": 0.75, "seconds": 4.0},
    ]
    text = _log_csv(rows)
    assert text.splitlines()[0] == "epoch,lr,face_loss,load_l_e0,seconds,val_hr_rank1"
    ours = pd.read_csv(io.StringIO(text))
    pd.testing.assert_frame_equal(ours, pd.read_csv(io.StringIO(pd.DataFrame(rows).to_csv(index=False))))
    assert ours["load_l_e0"][1] == 1 / 3  # full precision
