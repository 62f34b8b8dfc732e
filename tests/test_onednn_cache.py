"""Importing the model package bounds oneDNN's primitive cache, so memory stays flat over a long CPU run.

Each MoE expert sees a different number of tokens in every batch, and oneDNN keeps one compiled
primitive per matmul shape; with its default 1,024 entries resident memory climbs batch after
batch. The comparison runs the demo model on the same varied inputs with the default capacity
and with the package's, each in a fresh process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_GROWTH = r"""
import json, torch
from moescope.demo import load_model  # imports facemoe_model first

def rss_mib():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith('VmRSS'))

torch.set_num_threads(1)
model = load_model('demo:after').eval()
g = torch.Generator().manual_seed(0)
with torch.inference_mode():
    sizes = []
    for i in range(120):
        model(torch.randn(16, 3, model.img_size, model.img_size, generator=g))  # new routing, new expert shapes
        sizes.append(rss_mib())
print(json.dumps({'capacity': __import__('os').environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'],
                  'growth': sizes[-1] - sizes[29]}))  # after the heap has warmed up
"""


def _run(code: str, **env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**base, "OMP_NUM_THREADS": "1", **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_sets_the_capacity_unless_the_user_did():
    code = "import json, os, facemoe_model; print(json.dumps({'capacity': os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY']}))"
    import facemoe_model

    assert _run(code)["capacity"] == str(facemoe_model.ONEDNN_CACHE_CAPACITY)
    assert _run(code, ONEDNN_PRIMITIVE_CACHE_CAPACITY="7")["capacity"] == "7"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_stays_flat_over_batches_with_new_expert_shapes():
    unbounded = _run(_GROWTH, ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024")
    if unbounded["growth"] < 40:
        pytest.skip(f"this torch build does not grow per shape ({unbounded['growth']:.0f} MiB over 90 batches)")
    bounded = _run(_GROWTH)
    assert bounded["capacity"] == "64"
    assert bounded["growth"] < unbounded["growth"] / 2, (bounded, unbounded)  # heap noise: some 10-20 MiB
