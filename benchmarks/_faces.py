"""Generated face folders for the scale benchmarks (the synthetic renderer, cached)."""
from __future__ import annotations

import os
from pathlib import Path

from facemoe_model.data.synthetic import generate_dataset
from moescope.cache import cache_dir


def face_folder(images: int, *, seed: int = 3, per_identity: int = 10, workers: int | None = None) -> Path:
    """A folder of ``images`` generated faces (``images / per_identity`` identities), rendered once
    into the moescope cache (``$MOESCOPE_CACHE/bench-faces``) and reused afterwards."""
    identities = max(1, -(-images // per_identity))
    out = cache_dir("bench-faces", f"{identities}x{per_identity}-seed{seed}")
    generate_dataset(out, identities, per_identity, seed=seed, workers=workers)
    return out


def linked_folder(source: Path, images: int, out: Path) -> Path:
    """``out`` holding ``images`` hard links cycling over the PNGs of ``source`` (distinct names,
    the same pixels: for memory measurements that need many files but not many renders), in
    identity folders of 10 as the generated faces are (``eval --data`` splits them)."""
    files = sorted(source.rglob("*.png"))
    out.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        target = out / f"{i // 10:05d}" / f"{i:06d}.png"
        if not target.exists():
            target.parent.mkdir(exist_ok=True)
            try:
                os.link(files[i % len(files)], target)
            except OSError:
                target.write_bytes(files[i % len(files)].read_bytes())
    return out
