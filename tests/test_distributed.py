"""Analyses under torchrun (2 gloo processes) equal the single-process run; sharding, prefetching,
fast start (no torch for --help or an argument error)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from facemoe_model.distributed import DistributedContext, shard_range
from moescope import choices
from moescope.forward import prefetched

RTOL = 1e-9


# --- sharding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("block", [1, 4, 64])
@pytest.mark.parametrize("n", [0, 1, 7, 64, 65, 200])
def test_shards_cover_the_items_in_order_cut_at_blocks(n, block, world):
    shards = [shard_range(n, DistributedContext(rank=r, world_size=world), block) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    for s in shards:
        if len(s) and s.stop != n:
            assert s.start % block == 0 and s.stop % block == 0
    sizes = [-(-len(s) // block) for s in shards]  # blocks per rank differ by at most one
    assert max(sizes) - min(sizes) <= 1


def test_shard_groups_re_indexes_whole_batches(monkeypatch):
    from moescope import distributed

    paths = [f"p{i}" for i in range(10)]
    groups = [range(0, 4), range(4, 8), range(8, 10)]
    seen = []
    for r in range(2):
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        monkeypatch.setattr(distributed, "context", lambda device=None, r=r: DistributedContext(rank=r, world_size=2))
        mine, local = distributed.shard_groups(paths, groups)
        seen += [[mine[i] for i in g] for g in local]
    assert seen == [[paths[i] for i in g] for g in groups]


def test_option_vocabularies_agree_with_the_modules_using_them():
    from moescope import faces
    from moescope.stats import regions

    assert choices.REGION_SOURCES == faces.REGION_SOURCES and choices.ASSIGN_MODES == faces.ASSIGN_MODES
    assert choices.COUNT_MODES == regions.COUNT_MODES and choices.GROUPINGS == regions.GROUPINGS
    from moescope.runners import maps

    assert choices.MAP_KINDS == maps.KINDS


# --- prefetching ---------------------------------------------------------------------------------


def test_prefetched_keeps_order_and_raises_where_the_producer_failed():
    assert list(prefetched(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("bad image")

    out = []
    with pytest.raises(ValueError, match="bad image"):
        for item in prefetched(failing()):
            out.append(item)
    assert out == [1]


def test_prefetched_stops_and_closes_its_source_when_left_early():
    closed, produced = threading.Event(), []

    def source():
        try:
            for i in range(1000):
                produced.append(i)
                yield i
        finally:
            closed.set()

    it = prefetched(source(), depth=2)
    assert next(it) == 0
    it.close()
    assert closed.is_set() and len(produced) <= 5
    assert not [t for t in threading.enumerate() if t.name == "moescope-prefetch"]


# --- fast start ----------------------------------------------------------------------------------

_PROBE = (
    "import sys\nfrom moescope.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
    "    print('HEAVY', sorted(m for m in ('torch', 'timm', 'mediapipe', 'seaborn') if m in sys.modules))\n"
)


@pytest.mark.parametrize("argv", [["--help"], ["regions", "--batch-size", "x"], ["cka", "--features", "bogus"]])
def test_help_and_argument_errors_import_no_torch(argv):
    proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=300)
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:] + proc.stderr[-500:]


# --- torchrun: 2 gloo processes equal one --------------------------------------------------------


def _close(a, b, path="") -> list[str]:
    """Differences between two JSON documents: floats beyond RTOL (relative), anything else unequal."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _close(a.get(k), b.get(k), f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _close(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if abs(a - b) <= RTOL * max(abs(a), abs(b)) else [f"{path}: {a!r} vs {b!r}"]
    return [] if a == b and type(a) is type(b) else [f"{path}: {a!r} vs {b!r}"]


def _single(argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "moescope", *argv, "--json"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def _torchrun(argv: list[str], tmp_path: Path, nproc: int = 2) -> list[str]:
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--log-dir", str(logs), "--redirects", "3", "-m", "moescope", *argv, "--json", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    errors = "".join(p.read_text() for p in sorted(logs.glob("*/attempt_0/*/stderr.log")))
    assert proc.returncode == 0, (proc.stderr + errors)[-3000:]
    return [next(logs.glob(f"*/attempt_0/{r}/stdout.log")).read_text() for r in range(nproc)]


@pytest.mark.parametrize(
    "argv",
    [
        ["cka", "--batch-size", "16"],
        ["eval", "--batch-size", "16"],  # several batches per data set, so both ranks embed some
        ["ablate", "--drop", "0", "--switch", "--batch-size", "16"],
        ["regions", "--bootstrap", "200", "--null", "20"],
    ],
    ids=["cka", "eval", "ablate", "regions"],
)
def test_two_gloo_processes_give_the_single_process_result(argv, tmp_path):
    single = _single(argv)
    rank0, rank1 = _torchrun(argv, tmp_path)
    assert rank1.strip() == "", "only rank 0 prints"
    assert _close(single, json.loads(rank0)) == []


def test_device_option_errors_are_one_line(capsys):
    from moescope.cli import main

    assert main(["info", "--device", "tpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device must be auto, cpu, cuda or cuda:N" in err[0]


def test_device_auto_is_cuda_when_present():
    import torch

    from moescope.distributed import analysis_device

    assert analysis_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert analysis_device("cpu").type == "cpu"
