"""The notebooks run top to bottom on the bundled demo (their code cells, in order)."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import nbformat
import pandas as pd
import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def test_notebooks_are_current():
    """The committed notebooks are exactly what notebooks/make_notebooks.py writes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOKS[0].parent / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert sorted(module.NOTEBOOKS) == [p.name for p in NOTEBOOKS]
    for path in NOTEBOOKS:
        committed = [c.source for c in nbformat.read(path, as_version=4).cells]
        assert committed == [c.source for c in module.NOTEBOOKS[path.name]], path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    matplotlib.use("Agg")
    namespace: dict = {}
    last = None
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "code":
            code = compile(cell.source, f"{path.name}:cell", "exec")
            exec(code, namespace)
            last = cell.source.strip().splitlines()[-1]
    shown = eval(last, namespace)  # the value the last cell displays
    assert shown is not None
    if isinstance(shown, pd.DataFrame):
        assert len(shown) > 0 and not shown.isna().all(axis=None)
