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


@pytest.mark.parametrize("batch", [1, 16, 64, 100, 600])
@pytest.mark.parametrize("n", [0, 1, 99, 513, 2000])
def test_landmark_chunks_are_whole_batches_in_order(n, batch):
    from moescope.faces import CHUNK_SIZE, chunk_plan

    chunks = chunk_plan(n, batch)
    assert [i for c in chunks for i in c] == list(range(n))
    assert all(c.stop % batch == 0 for c in chunks[:-1]) and (not chunks or len(chunks[0]) == min(batch, n))
    full = batch * max(1, CHUNK_SIZE // batch)  # then twice as many each time, up to the chunk size
    assert all(len(b) == min(2 * len(a), full) for a, b in zip(chunks[:-2], chunks[1:-1]))


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


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_accumulator_runs_calls_in_order_and_raises_their_first_error(depth):
    from moescope.forward import Accumulator

    seen, threads = [], set()
    with Accumulator(depth) as acc:
        for i in range(200):
            acc.submit(lambda i=i: (seen.append(i), threads.add(threading.current_thread().name)))
    assert seen == list(range(200))
    assert threads == ({"moescope-accumulate"} if depth else {threading.current_thread().name})

    def fail():
        raise ValueError("mismatched expert counts")

    done = []
    with pytest.raises(ValueError, match="mismatched"):
        with Accumulator(depth) as acc:
            acc.submit(fail)
            for i in range(50):
                acc.submit(lambda i=i: done.append(i))
    assert done == []  # nothing after the failing call runs
    assert not [t for t in threading.enumerate() if t.name == "moescope-accumulate"]


# --- fast start ----------------------------------------------------------------------------------

_PROBE = (
    "import sys\nfrom moescope.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
    "    print('HEAVY', sorted(m for m in ('torch', 'timm', 'mediapipe', 'seaborn', 'pandas') if m in sys.modules))\n"
)


@pytest.mark.parametrize("argv", [["--help"], ["regions", "--batch-size", "x"], ["cka", "--features", "bogus"]])
def test_help_and_argument_errors_import_no_torch_or_pandas(argv):
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


def _this_moescope() -> dict:
    """The environment for a child process that imports the moescope this test imports (a
    checkout or the installed package), whatever its working directory or script folder."""
    import moescope

    root = str(Path(moescope.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def _single(argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "moescope", *argv, "--json"], capture_output=True, text=True, timeout=900,
                          env=_this_moescope())
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


# --- torchrun: maps, attack, degrade (sharded: each rank analyses its own images) ----------------

_TRACED = '''
import json, os, sys
from moescope import cost
from moescope.runners import maps, stability

seen, benched = [], []
image_batches, decode, benchmark = maps.image_batches, stability._decode, cost.benchmark_model

def traced_batches(*args, **kwargs):
    for batch in image_batches(*args, **kwargs):
        seen.extend(batch.ids)
        yield batch

def traced_decode(source):
    seen.append(str(source))
    return decode(source)

def traced_benchmark(*args, **kwargs):
    benched.append(os.environ["RANK"])
    return benchmark(*args, **kwargs)

maps.image_batches, stability._decode, cost.benchmark_model = traced_batches, traced_decode, traced_benchmark
from moescope.cli import main
try:
    status = main(sys.argv[2:])
finally:
    with open(os.path.join(sys.argv[1], "rank" + os.environ["RANK"] + ".json"), "w") as f:
        json.dump({"images": seen, "benchmarked": benched}, f)
sys.exit(status)
'''


def _torchrun_traced(argv: list[str], tmp_path: Path, nproc: int = 2) -> tuple[list[str], list[dict]]:
    """``torchrun ... moescope ARGV`` with each rank recording the images it read (and whether it benchmarked)."""
    script, logs, trace = tmp_path / "traced.py", tmp_path / "logs", tmp_path / "trace"
    script.write_text(_TRACED)
    trace.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--log-dir", str(logs), "--redirects", "3", str(script), str(trace), *argv, "--json", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_this_moescope())
    errors = "".join(p.read_text() for p in sorted(logs.glob("*/attempt_0/*/stderr.log")))
    assert proc.returncode == 0, (proc.stderr + errors)[-3000:]
    stdout = [next(logs.glob(f"*/attempt_0/{r}/stdout.log")).read_text() for r in range(nproc)]
    return stdout, [json.loads((trace / f"rank{r}.json").read_text()) for r in range(nproc)]


def _without_timing(doc: dict) -> dict:
    doc["summary"].pop("seconds", None)  # wall-clock time: the one number that may differ
    return doc


@pytest.fixture(scope="module")
def identity_folders(tmp_path_factory) -> Path:
    """Four bundled demo identities (4 images each)."""
    import shutil

    from moescope.demo import demo_images_dir

    root = tmp_path_factory.mktemp("faces")
    for identity in sorted(p for p in Path(demo_images_dir()).iterdir() if p.is_dir())[:4]:
        shutil.copytree(identity, root / identity.name)
    return root


_SHARDED = {  # small settings: 5-6 images or probes in batches of 2, so both ranks get some
    "maps-weight": ["maps", "--kind", "weight", "--by", "layer", "--images", "6", "--batch-size", "2"],
    "maps-gradcam": ["maps", "--kind", "gradcam", "--images", "5", "--batch-size", "2"],
    "maps-cases": ["maps", "--cases", "success,failure", "--lowres", "6", "--images", "3", "--kind", "input", "--steps", "2",
                   "--bootstrap", "50", "--batch-size", "2"],
    "attack": ["attack", "--attack", "pgd,mim", "--eps", "8/255", "--steps", "2", "--max-probes", "6", "--batch-size", "2"],
    "degrade": ["degrade", "--noise", "20", "--occlude", "mouth", "--jpeg", "30", "--max-probes", "6", "--batch-size", "2"],
}


@pytest.mark.parametrize("name", list(_SHARDED))
def test_sharded_commands_under_two_gloo_processes_give_the_single_process_result(name, identity_folders, tmp_path):
    """maps (routing-weight, Grad-CAM with folder references, success/failure cases with the
    bootstrap), attack (PGD/MIM random starts) and degrade (seeded noise, occlusion): the JSON of
    2 gloo ranks equals one process (integers exactly, floats to RTOL), each rank read a
    contiguous share of the images (together all of them, once), only rank 0 printed."""
    argv = list(_SHARDED[name])
    if name.startswith("maps"):
        argv[1:1] = ["--data", str(identity_folders)]
    single = _without_timing(_single(argv))
    (rank0, rank1), traces = _torchrun_traced(argv, tmp_path)
    assert rank1.strip() == "", "only rank 0 prints"
    assert _close(single, _without_timing(json.loads(rank0))) == []
    shares = [list(dict.fromkeys(t["images"])) for t in traces]  # maps: the gradient references read them again
    assert all(shares) and not set(shares[0]) & set(shares[1]), "each rank reads its own images"
    if name.startswith("maps"):
        ids = [row["image"] for row in single["tables"]["images"]]
        assert [i for share in shares for i in share if i in ids] == ids, "contiguous shares, in image order"
    else:
        assert len(shares[0]) + len(shares[1]) == single["summary"]["probes"]


@pytest.mark.parametrize("command, options, views", [
    ("maps", ["--images", "6", "--batch-size", "2"], 6),
    ("regions", ["--batch-size", "4", "--null", "0", "--bootstrap", "0"], 16),
])
def test_under_torchrun_each_aligned_view_is_written_once_named_as_one_process_does(identity_folders, tmp_path, command, options, views):
    argv = [command, "--data", str(identity_folders), *options]
    _single([*argv, "--save-aligned", str(tmp_path / "one")])
    _torchrun_traced([*argv, "--save-aligned", str(tmp_path / "two")], tmp_path)
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.png"))
    two = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.png"))
    assert len(one) == views and one == two
    assert len({p.parent for p in one}) > 1, "views keep their identity folder"


def test_bench_under_torchrun_measures_on_rank_0_alone(tmp_path):
    argv = ["bench", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0", "--no-router-time"]
    (rank0, rank1), traces = _torchrun_traced(argv, tmp_path)
    assert rank1.strip() == "" and [t["benchmarked"] for t in traces] == [["0"], []]
    result = json.loads(rank0)
    assert "rank 0 alone" in result["settings"]["torchrun"] and len(result["tables"]["latency"]) == 2
