"""Face Mesh's landmark connection sets without importing mediapipe.

``mediapipe.python.solutions.face_mesh_connections`` is plain data (frozensets of landmark index
pairs), but importing it runs mediapipe's package ``__init__`` (the whole framework, ~0.5 s).
This module loads that one file from the installed mediapipe, so region masks and alignment on a
warm landmark cache import no mediapipe; :data:`face_mesh_connections` is the module itself.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

__all__ = ["face_mesh_connections", "FACEMESH_LEFT_EYE", "FACEMESH_RIGHT_EYE"]


def _load() -> ModuleType:
    name = "mediapipe.python.solutions.face_mesh_connections"
    if name in sys.modules:  # mediapipe already imported (landmark detection ran): use its module
        return sys.modules[name]
    spec = importlib.util.find_spec("mediapipe")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("mediapipe is not installed (pip install mediapipe==0.10.21)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "python", "solutions", "face_mesh_connections.py")
    file_spec = importlib.util.spec_from_file_location("moescope._face_mesh_connections", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


face_mesh_connections = _load()
FACEMESH_LEFT_EYE = face_mesh_connections.FACEMESH_LEFT_EYE
FACEMESH_RIGHT_EYE = face_mesh_connections.FACEMESH_RIGHT_EYE
