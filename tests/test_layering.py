"""The dependency rule: facemoe_model stands alone (never imports moescope, pandas or mediapipe)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import facemoe_model

PACKAGE = Path(facemoe_model.__file__).parent

PROBE = r"""
import importlib, importlib.abc, pkgutil, sys

class NoMoescope(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "moescope" or name.startswith("moescope."):
            raise ImportError(f"{name} is not importable in this test")
        return None

sys.meta_path.insert(0, NoMoescope())
import facemoe_model
names = ["facemoe_model"]
for info in pkgutil.walk_packages(facemoe_model.__path__, "facemoe_model."):
    importlib.import_module(info.name)
    names.append(info.name)
try:
    import moescope
except ImportError:
    pass
else:
    raise SystemExit("moescope was importable")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("moescope", "pandas", "mediapipe"))
print(" ".join(names))
print("LOADED:" + ",".join(loaded))
"""


def test_every_module_imports_without_moescope_pandas_or_mediapipe():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names_line, loaded_line = proc.stdout.strip().splitlines()[-2:]
    names = set(names_line.split())
    expected = {"facemoe_model.data.synthetic", "facemoe_model.train", "facemoe_model.data.images", "facemoe_model.hooks",
                "facemoe_model.inference", "facemoe_model.protocols", "facemoe_model.checkpoint", "facemoe_model.models.swin"}
    assert expected <= names, expected - names
    assert loaded_line == "LOADED:", loaded_line


def test_moescope_is_named_only_in_comments_docstrings_and_the_legacy_format():
    """No code line of the model package mentions moescope (``grep -rn moescope facemoe_model/``)."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        in_docstring = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            quotes = stripped.count('"""')
            was_in_docstring = in_docstring
            if quotes % 2:
                in_docstring = not in_docstring
            if "moescope" not in line or was_in_docstring or in_docstring or quotes or stripped.startswith("#"):
                continue
            code = line.split("#", 1)[0]
            if "moescope" not in code or re.search(r"""LEGACY_FORMATS = frozenset\(\{"moescope\.facemoe"\}\)""", code):
                continue
            offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {stripped}")
    assert not offenders, "\n".join(offenders)
