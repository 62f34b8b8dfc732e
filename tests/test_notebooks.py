"""The notebooks run through a real Jupyter kernel (nbclient) and their committed outputs are current.

Each ``notebooks/NN_name.py`` (percent script) is executed by ``notebooks/make_notebooks.py`` in a
subprocess with a per-notebook time limit; its tables (HTML/text of every displayed value, cells
tagged ``volatile`` — timings — excepted) must equal those committed in ``NN_name.ipynb``: the
same text, and every number the same up to the floating-point rounding of another CPU
(:func:`same_up_to_rounding`; float32 kernels differ between instruction sets, and an attack's
iterations carry such a difference into the last shown digits).
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

HERE = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK_LIMIT_S = 900
"""Wall-clock limit of one notebook, kernel start included (the demo notebooks take well under a minute on an idle core)."""

_spec = importlib.util.spec_from_file_location("make_notebooks", HERE / "make_notebooks.py")
make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make)
SOURCES = make.sources()

_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
LAST_DIGITS = 3
"""Units of the last shown digit two numbers may differ by (measured across two CPUs: up to 2)."""
RTOL = 2e-4
"""Relative difference allowed for numbers shown with more digits: float32 rounding, which another
torch build carries further (torch 2.14.1 against the build that made notebooks 00 and 01 before:
up to 1.1e-4, shares of router weight; every integer and text equal)."""


def _last_digit(token: str) -> float:
    mantissa, _, exponent = token.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def same_up_to_rounding(fresh: str, committed: str) -> bool:
    """The same text and integers, with each decimal number within ``LAST_DIGITS`` units of its
    last shown digit or ``RTOL`` of the committed value (names such as ``layers.0`` are text)."""
    if _NUMBER.split(fresh) != _NUMBER.split(committed):
        return False
    for a, b in zip(_NUMBER.findall(fresh), _NUMBER.findall(committed)):
        if not any(c in a + b for c in ".eE"):
            if a != b:
                return False
            continue
        x, y = float(a), float(b)
        if abs(x - y) > max(LAST_DIGITS * max(_last_digit(a), _last_digit(b)), RTOL * abs(y)):
            return False
    return True


def test_same_up_to_rounding():
    assert same_up_to_rounding("<td>34.638</td> NMI 0.05029289404132", "<td>34.640</td> NMI 0.05029289404073")
    assert same_up_to_rounding("6.824613e+06", "6.824612e+06")
    assert not same_up_to_rounding("<td>34.680</td>", "<td>34.640</td>")  # 40 units of the last digit, 1.2e-3
    assert same_up_to_rounding("31.874179", "31.870568")  # another torch build (1.1e-4)
    assert not same_up_to_rounding("31.880568", "31.870568")  # 3.1e-4
    assert not same_up_to_rounding("<td>0.80</td>", "<td>0.70</td>")
    assert not same_up_to_rounding("Expert 1", "Expert 2")  # integers are exact
    assert not same_up_to_rounding("layers.1", "layers.0")  # names are text
    assert not same_up_to_rounding("<td>34.640</td><td>1</td>", "<td>34.640</td>")
    assert not same_up_to_rounding("rank-1", "rank-5")


def test_every_source_has_its_executed_notebook():
    assert [p.stem for p in SOURCES][:4] == ["00_tour", "01_region_routing", "02_drift", "03_interventions"]
    assert "06_bench" in [p.stem for p in SOURCES]
    assert sorted(p.stem for p in HERE.glob("*.ipynb")) == [p.stem for p in SOURCES]
    for path in SOURCES:
        committed = nbformat.read(path.with_suffix(".ipynb"), as_version=4)
        nbformat.validate(committed)
        expected = make.read_percent(path)
        assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in expected.cells], \
            f"{path.name} changed since {path.stem}.ipynb was built: run python notebooks/make_notebooks.py {path.stem}"
        code = [c for c in committed.cells if c.cell_type == "code"]
        assert code and all(c.execution_count is not None for c in code), f"{path.stem}.ipynb is not executed"
        assert not [o for c in code for o in c.outputs if o.output_type == "error"]
        shown = {mime for c in code for o in c.outputs for mime in o.get("data", {})}
        assert "text/html" in shown, f"{path.stem}.ipynb shows no table"


def test_percent_format(tmp_path):
    src = tmp_path / "99_x.py"
    src.write_text('# a header comment\n# %% [markdown]\n# # Title\n#\n# text\n\n# %%\n# %matplotlib inline\nx = 1\n\n'
                   '# %% tags=["volatile"]\nx\n')
    nb = make.read_percent(src)
    assert [(c.cell_type, c.source) for c in nb.cells] == [("markdown", "# Title\n\ntext"), ("code", "%matplotlib inline\nx = 1"), ("code", "x")]
    assert nb.cells[2].metadata["tags"] == ["volatile"] and nb.cells[0]["id"] == "99_x-00"


@pytest.mark.parametrize("path", SOURCES, ids=[p.stem for p in SOURCES])
def test_notebook_executes_and_committed_outputs_are_current(path, tmp_path):
    try:
        run = subprocess.run([sys.executable, str(HERE / "make_notebooks.py"), path.stem, "--to", str(tmp_path)],
                             capture_output=True, text=True, timeout=NOTEBOOK_LIMIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{path.stem} did not finish within {NOTEBOOK_LIMIT_S} s")
    assert run.returncode == 0, run.stderr[-4000:]
    fresh = nbformat.read(tmp_path / f"{path.stem}.ipynb", as_version=4)
    assert not [o for c in fresh.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    committed = nbformat.read(path.with_suffix(".ipynb"), as_version=4)
    got, want = make.tables(fresh), make.tables(committed)
    assert [cell for cell, _ in got] == [cell for cell, _ in want]
    for (cell, a), (_, b) in zip(got, want):
        assert same_up_to_rounding(a, b), f"{path.stem}: the output of cell {cell} changed; rebuild with python notebooks/make_notebooks.py {path.stem}"
