#!/usr/bin/env bash
# Rebuild the bundled demo in facemoe_model/assets/demo from nothing (CPU, about an hour):
#   split/   held-out synthetic identities: gallery/<id>/ (1 image), probe/<id>/ (2), pairs.txt
#   images/  more held-out identities (one folder each) for `moescope regions` and friends
#   before.pt  trained on high-resolution synthetic identities
#   after.pt   before.pt fine-tuned on low-resolution versions of the same identities
# Each checkpoint's metadata records its exact `moescope train` command line, the data, the
# training time and its figures on split/ (high-resolution and 16x16 probes), which
# `moescope eval demo:before` / `moescope eval demo:before --lowres 16` reproduce.
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO=facemoe_model/assets/demo
RUNS=${RUNS:-runs/demo}
export MOESCOPE_CACHE=${MOESCOPE_CACHE:-$PWD/.cache}
# Every demo face (training, split, images) comes from this renderer setting (SyntheticConfig):
# the full range of face shapes, little colour variety, so identity lives in the facial
# geometry that a 16x16 probe loses, plus the usual nuisances (pose, light, expression, occlusion).
SYNTHETIC="shape_spread=1.0,colour_spread=0.25,blur_prob=0.1"
TRAINING="--synthetic 600:12 --synthetic-config $SYNTHETIC --synthetic-seed 0"
VALIDATION="--val $DEMO/split --val-lowres 16 --half"

rm -rf "$DEMO" "$RUNS"
mkdir -p "$DEMO"

# 1. Held-out identities (offsets far from the training identities 0..599).
python - "$DEMO" "$SYNTHETIC" <<'EOF'
import shutil, sys
from pathlib import Path
from facemoe_model.data.synthetic import generate_dataset
from facemoe_model.protocols import write_split
from moescope.commands.train import synthetic_config
from moescope.results import atomic_path

demo, config = Path(sys.argv[1]), synthetic_config(sys.argv[2])
cache = Path(__import__("os").environ["MOESCOPE_CACHE"]) / "demo"
write_split(generate_dataset(cache / "split", 100, 3, seed=0, config=config, identity_offset=100_000), demo / "split")
images = generate_dataset(cache / "images", 40, 4, seed=0, config=config, identity_offset=200_000)
for png in sorted(images.glob("*/*.png")):
    atomic_path(demo / "images" / png.parent.name / png.name, lambda tmp, src=png: shutil.copyfile(src, tmp))
EOF

# 2. before: high-resolution training from scratch.
moescope train $TRAINING --model-arg embedding_dim=128 --epochs 8 --lr 3e-3 --scale 32 --margin 0.2 \
    $VALIDATION --val-every 2 --out "$RUNS/before"
cp "$RUNS/before/model.pt" "$DEMO/before.pt"

# 3. after: fine-tune before.pt on low-resolution versions of the same identities (its margin head is reused).
moescope train $TRAINING --init "$DEMO/before.pt" --lowres 12:64 --epochs 3 --lr 1e-3 --scale 32 --margin 0.2 \
    $VALIDATION --out "$RUNS/after"
cp "$RUNS/after/model.pt" "$DEMO/after.pt"

du -sh "$DEMO"
moescope eval demo:before && moescope eval demo:before --lowres 16
moescope eval demo:after && moescope eval demo:after --lowres 16
