"""`moescope bench` end to end: tables, the hooked/unhooked ratio, FLOPs, the machine line, bad input."""
from __future__ import annotations

import json
import math

import pytest
import torch

from facemoe_model.moe import moe_layers
from moescope.cli import main
from moescope.commands.bench import batch_sizes, load_bench_model
from moescope.cost import flops_table
from moescope.demo import load_model
from moescope.errors import MoescopeError


def run_bench(capsys, *args):
    status = main(["bench", *map(str, args)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return captured


@pytest.fixture(scope="module")
def demo_json(tmp_path_factory):
    import contextlib
    import io

    out = tmp_path_factory.mktemp("bench") / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(["bench", "demo:after", "--batch-sizes", "1,2", "--repeats", "2", "--warmup", "1", "--json", "--out", str(out)])
    assert status == 0, stderr.getvalue()
    return json.loads(stdout.getvalue()), stderr.getvalue(), out


def test_bench_demo_json_files_and_text(demo_json):
    result, text, out = demo_json
    assert result["command"] == "bench" and result["checkpoints"] == ["demo:after"]
    assert result["settings"]["batch_sizes"] == [1, 2] and result["settings"]["weights"] == "checkpoint"
    over = result["tables"]["capture_overhead"]
    assert [r["batch_size"] for r in over] == [1, 2]
    for row in over:  # the hooks' overhead, as a ratio hooked / unhooked
        assert math.isfinite(row["capture_ratio"]) and row["capture_ratio"] > 0
        assert row["latency_ms_routing"] > 0 and row["latency_ms_off"] > 0
    assert {r["capture"] for r in result["tables"]["latency"]} == {"off", "routing"}
    # the human text goes to stderr with --json; it names the threads and the machine
    assert f"{torch.get_num_threads()} torch threads" in text and "machine: cpu" in text
    assert "B.11" in text and "capture_ratio" in text and "dense" in text
    assert {"latency.csv", "capture_overhead.csv", "flops.csv", "router_time.csv", "result.json"} <= {p.name for p in out.iterdir()}


def test_bench_flops_are_the_library_count_of_the_demo_model(demo_json):
    """The command's FLOPs are FlopCounterMode's count; the MoE part equals the hand count."""
    result, _, _ = demo_json
    model = load_model("demo:after")
    expected, _ = flops_table(model.eval(), torch.randn(1, 3, model.img_size, model.img_size))
    flops = {r["routing"]: r for r in result["tables"]["flops"]}
    for routing in ("top-k", "dense"):
        assert flops[routing]["flops_per_image"] == expected.set_index("routing").loc[routing, "flops_per_image"]
    tokens = {"layers.0": 400, "layers.1": 100, "layers.2": 25}  # 20x20 grid, merged twice
    per_k = sum(tokens[n[:8]] * 4 * l.experts[0].fc1.in_features * l.experts[0].fc1.out_features for n, l in moe_layers(model).items())
    assert flops["top-k"]["expert_flops_per_image"] == 2 * per_k and flops["dense"]["expert_flops_per_image"] == 3 * per_k


def test_bench_a_model_name_uses_random_weights(capsys):
    captured = run_bench(capsys, "facemoe_swin_tiny", "--batch-sizes", "1", "--repeats", "1", "--warmup", "1", "--no-router-time")
    assert "weights: random" in captured.out and "facemoe_swin_tiny" in captured.out
    model, random_weights = load_bench_model("facemoe_swin_tiny", top_k=1)
    assert random_weights and all(layer.k == 1 for layer in moe_layers(model).values())


@pytest.mark.parametrize("args, message", [
    (["--batch-sizes", "0,2"], "--batch-sizes takes positive integers"),
    (["--batch-sizes", "one"], "--batch-sizes takes positive integers"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["no_such_model.pt"], "no_such_model.pt"),
])
def test_bad_input_is_one_line(capsys, args, message):
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moescope: error: ") and message in err and err.count("\n") == 1


def test_batch_sizes_parser():
    assert batch_sizes("1,8,32") == (1, 8, 32) and batch_sizes(None) is None
    with pytest.raises(MoescopeError):
        batch_sizes(",")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_without_cuda_is_one_line(capsys):
    assert main(["bench", "--device", "cuda", "--batch-sizes", "1"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
