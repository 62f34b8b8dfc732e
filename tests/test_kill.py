"""Outputs are complete or absent (issue 13): ``moescope regions --out DIR`` killed with SIGKILL
at several moments — while it starts, while it computes, and while it writes its files —
never leaves a partial result folder, a stray temporary file or a staging folder. DIR is the
previous complete result, or absent, or (when the kill came after the final rename) the new
complete result.

The moment of writing is found from the outside: the child's open file descriptors
(``/proc/PID/fd``) show when it holds a file in DIR's parent folder (its anonymous output
files), and the kill follows that moment after a few different delays.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
import skimage.data

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to watch the child")

EXPECTED = {"region_routing", "rank_routing", "specialisation", "paper_model"}


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kill-faces")
    photo = skimage.data.astronaut()
    for i, size in enumerate((512, 384, 300)):
        cv2.imwrite(str(root / f"a{i}.png"), cv2.cvtColor(cv2.resize(photo, (size, size)), cv2.COLOR_RGB2BGR))
    return root


def _command(ckpt: Path, faces: Path, out: Path, seed: int) -> list[str]:
    tokens = out.parent.parent / "tokens" / "tokens.csv"
    return [sys.executable, "-m", "moescope", "regions", str(ckpt), "--data", str(faces), "--out", str(out),
            "--bootstrap", "20", "--workers", "0", "--seed", str(seed), "--export-tokens", str(tokens), "--json"]


def _tokens_state(folder: Path) -> str:
    """The --export-tokens folder holds nothing or one complete CSV (no temporary file)."""
    names = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    assert names in ([], ["tokens.csv"]), names
    if not names:
        return "absent"
    import pandas as pd

    frame = pd.read_csv(folder / "tokens.csv")
    assert len(frame) > 0 and (folder / "tokens.csv").read_bytes().endswith(b"\n")
    return "complete"


def _holds_file_in(pid: int, folder: Path) -> bool:
    """True while process ``pid`` has a file of ``folder`` (or of a folder inside it) open."""
    prefix = str(folder) + os.sep
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(prefix):
            return True
    return False


def _state(parent: Path, out: Path) -> tuple[str, str | None]:
    """('absent' | 'complete', result.json text); fails on anything else in ``parent`` or ``out``."""
    others = sorted(p.name for p in parent.iterdir() if p != out)
    assert others == [], f"left behind beside the result: {others}"
    if not out.exists():
        return "absent", None
    names = {p.name for p in out.iterdir()}
    text = (out / "result.json").read_text()  # a folder without result.json fails here
    result = json.loads(text)
    tables = {f"{stem}.{ext}" for stem in result["tables"] for ext in ("csv", "md", "tex")}
    figures = {n for n in names if n.endswith(".png")}
    assert set(result["tables"]) >= EXPECTED and figures, names
    assert names == tables | figures | {"result.json"}, sorted(names)
    return "complete", text


def _kill_when(proc: subprocess.Popen, parent: Path, delay: float | None, after_write: float | None) -> None:
    """SIGKILL ``proc`` ``delay`` s after start, or ``after_write`` s after it first holds a file in ``parent``."""
    start = time.monotonic()
    while proc.poll() is None:
        now = time.monotonic() - start
        if delay is not None and now >= delay:
            break
        if after_write is not None and _holds_file_in(proc.pid, parent):
            time.sleep(after_write)
            break
        if now > 900:
            break
        time.sleep(0.0005 if after_write is not None else 0.01)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_killed_regions_runs_leave_the_previous_result_or_nothing(tmp_path, faces, official_model_pt):
    parent = tmp_path / "runs"
    parent.mkdir()
    out = parent / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    # a kill before anything was ever written: nothing at all
    proc = subprocess.Popen(_command(official_model_pt, faces, out, 1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _kill_when(proc, parent, delay=None, after_write=0.0)
    assert _state(parent, out)[0] in ("absent", "complete")
    if out.exists():
        import shutil

        shutil.rmtree(out)

    # the previous result
    done = subprocess.run(_command(official_model_pt, faces, out, 0), capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    state, previous = _state(parent, out)
    assert state == "complete"
    first_run = json.loads(previous)

    outcomes = []
    for seed, (delay, after_write) in enumerate([(1.0, None), (None, 0.0), (None, 0.005), (None, 0.05), (None, 0.3)], start=2):
        proc = subprocess.Popen(_command(official_model_pt, faces, out, seed), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env)
        _kill_when(proc, parent, delay, after_write)
        state, text = _state(parent, out)
        _tokens_state(tmp_path / "tokens")
        assert state == "complete", "a killed run removed the previous result without putting a new one in place"
        replaced = text != previous
        if replaced:  # the kill came after the final rename: the new result, complete
            assert json.loads(text)["settings"]["seed"] == seed
            previous = text
        outcomes.append((delay, after_write, proc.returncode, "new result" if replaced else "previous result"))
    print("kills (delay s, after first output file s, exit status, folder):", outcomes)
    assert first_run["command"] == "regions"
    # at least one kill hit a run that had started writing its files but not finished (the case that matters)
    assert any(o[3] == "previous result" and o[1] is not None and o[2] == -signal.SIGKILL for o in outcomes), outcomes
