"""Build the notebooks: every ``notebooks/NN_name.py`` (jupytext "percent" script) becomes
``NN_name.ipynb``, executed top to bottom through a real Jupyter kernel (nbclient), outputs kept.

    python notebooks/make_notebooks.py              # all notebooks
    python notebooks/make_notebooks.py 02_drift     # some
    python notebooks/make_notebooks.py --check      # re-execute; fail if a committed table changed

Percent format: cells start at ``# %%`` lines; ``# %% [markdown]`` cells hold markdown as ``# ``
comments; ``# %% tags=["volatile"]`` marks a cell whose outputs vary between runs (timings), which
the currency check does not compare. Code before the first marker is ignored when it is only
comments (a file header). Magics are written commented out, as jupytext does
(``# %matplotlib inline``). Cell ids are derived from positions, timings are not recorded, so a
notebook re-executed on the same machine differs only where its outputs do.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
SOURCE = re.compile(r"^\d\d_[A-Za-z0-9_]+\.py$")
MARKER = re.compile(r"^# %%(?P<rest>.*)$")
VOLATILE = "volatile"
_MAGIC = re.compile(r"^# %(matplotlib|config|time|timeit)\b")
_NOISE = re.compile(r".*(TqdmWarning: IProgress not found|from \.autonotebook import tqdm|No CUDA runtime is found).*\n?")
CELL_TIMEOUT_S = 600
KERNEL = "python3"


def sources(names: list[str] | None = None) -> list[Path]:
    """The percent sources ``NN_name.py`` in this folder (all, or those whose stem is in ``names``)."""
    found = sorted(p for p in HERE.iterdir() if SOURCE.match(p.name))
    if names:
        wanted = {Path(n).stem for n in names}
        unknown = wanted - {p.stem for p in found}
        if unknown:
            raise SystemExit(f"make_notebooks: no notebook source {', '.join(sorted(unknown))} in {HERE}")
        found = [p for p in found if p.stem in wanted]
    return found


def _tags(rest: str) -> list[str]:
    match = re.search(r"tags=(\[.*?\])", rest)
    return json.loads(match.group(1)) if match else []


def _markdown(lines: list[str]) -> str:
    out = []
    for line in lines:
        if line.startswith("# "):
            out.append(line[2:])
        elif line.startswith("#"):
            out.append(line[1:])
        else:
            out.append(line)
    return "\n".join(out).strip("\n")


def read_percent(path: Path) -> nbformat.NotebookNode:
    """The notebook (unexecuted) of one percent script."""
    cells: list[tuple[str, list[str], list[str]]] = []  # (kind, tags, lines)
    kind, tags, lines = "header", [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = MARKER.match(line)
        if m:
            cells.append((kind, tags, lines))
            rest = m.group("rest")
            kind = "markdown" if "[markdown]" in rest else "code"
            tags, lines = _tags(rest), []
        else:
            lines.append(line)
    cells.append((kind, tags, lines))
    nb_cells = []
    for kind, tags, lines in cells:
        if kind == "header":
            if any(l.strip() and not l.lstrip().startswith("#") for l in lines):
                raise SystemExit(f"make_notebooks: {path.name}: code before the first '# %%' marker")
            continue
        if kind == "code":  # jupytext comments magics out in scripts: "# %matplotlib inline"
            lines = [l[2:] if _MAGIC.match(l) else l for l in lines]
        text = _markdown(lines) if kind == "markdown" else "\n".join(lines).strip("\n")
        if not text.strip():
            continue
        cell = new_markdown_cell(text) if kind == "markdown" else new_code_cell(text)
        cell["id"] = f"{path.stem}-{len(nb_cells):02d}"
        if tags:
            cell.metadata["tags"] = tags
        nb_cells.append(cell)
    return new_notebook(cells=nb_cells, metadata={
        "kernelspec": {"name": KERNEL, "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "jupytext": {"formats": "ipynb,py:percent"},
    })


def execute(nb: nbformat.NotebookNode, *, timeout: int = CELL_TIMEOUT_S) -> nbformat.NotebookNode:
    """Run every cell through a fresh ``python3`` kernel in this folder (one torch thread, Agg-free
    inline figures); raises ``nbclient.exceptions.CellExecutionError`` on the first failing cell."""
    from nbclient import NotebookClient

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    client = NotebookClient(nb, timeout=timeout, kernel_name=KERNEL, record_timing=False,
                            extra_arguments=["--matplotlib=inline"],  # figures as PNG, as after %matplotlib inline
                            resources={"metadata": {"path": str(HERE)}})
    client.execute()
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":  # environment noise on stderr (no ipywidgets, no CUDA) is not the notebook's
            for output in cell.outputs:
                if output.output_type == "stream" and output.name == "stderr":
                    output.text = _NOISE.sub("", output.text)
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and not o.text.strip())]
    return nb


_ADDRESS = re.compile(r" at 0x[0-9a-f]+")
_STYLER_ID = re.compile(r"T_[0-9a-f]{5}")


def tables(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
    """What the currency check compares: per code cell not tagged volatile, its displayed values
    (HTML tables, or text) with memory addresses stripped."""
    out = []
    for cell in nb.cells:
        if cell.cell_type != "code" or VOLATILE in cell.metadata.get("tags", []):
            continue
        for output in cell.get("outputs", []):
            if output.output_type not in ("execute_result", "display_data"):
                continue
            data = output.get("data", {})
            text = data.get("text/html") or data.get("text/plain")
            if text is None:
                continue
            text = "".join(text) if isinstance(text, list) else text
            out.append((cell.get("id", ""), _STYLER_ID.sub("T_", _ADDRESS.sub("", text))))
    return out


def build(path: Path, target: Path | None = None, timeout: int = CELL_TIMEOUT_S) -> Path:
    """Execute ``path`` and write its ``.ipynb`` (next to it, or to ``target``)."""
    nb = execute(read_percent(path), timeout=timeout)
    target = target or path.with_suffix(".ipynb")
    tmp = target.with_name(f".{target.name}.tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebook stems (default: all NN_*.py here)")
    parser.add_argument("--check", action="store_true", help="re-execute into a temporary file and compare tables with the committed .ipynb")
    parser.add_argument("--to", metavar="DIR", help="write the executed notebooks to DIR instead of next to their sources")
    parser.add_argument("--timeout", type=int, default=CELL_TIMEOUT_S, help=f"seconds per cell (default {CELL_TIMEOUT_S})")
    args = parser.parse_args(argv)
    stale = []
    for path in sources(args.names):
        start = time.perf_counter()
        if args.check:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                fresh = nbformat.read(build(path, Path(tmp) / path.with_suffix(".ipynb").name, args.timeout), as_version=4)
            committed = path.with_suffix(".ipynb")
            if not committed.exists() or tables(nbformat.read(committed, as_version=4)) != tables(fresh):
                stale.append(path.stem)
            print(f"checked {path.stem} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        else:
            target = Path(args.to) / path.with_suffix(".ipynb").name if args.to else None
            written = build(path, target, args.timeout)
            print(f"wrote {written} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if stale:
        print(f"stale notebooks (tables differ from a fresh run): {', '.join(stale)}; run python notebooks/make_notebooks.py {' '.join(stale)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
