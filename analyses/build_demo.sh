#!/usr/bin/env bash
# Rebuild the bundled demo in facemoe_model/assets/demo from nothing (CPU, 30-60 minutes):
#   split/     held-out synthetic identities: gallery/<id>/ (1 image), probe/<id>/ (2), pairs.txt
#   images/    more held-out identities (one folder each) for `moescope regions` and friends
#   before.pt  trained on high-resolution synthetic identities
#   after.pt   before.pt fine-tuned on low-resolution versions of the same identities
# Each checkpoint's metadata records its exact `moescope train` command line, the data, the
# training time and its figures on split/ with high-resolution and with 16x16 probes, which
# `moescope eval demo:NAME` and `moescope eval demo:NAME --lowres 16` reproduce.
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO=facemoe_model/assets/demo
RUNS=${RUNS:-runs/demo}
export MOESCOPE_CACHE=${MOESCOPE_CACHE:-$PWD/.cache}
# Every demo face (training, split, images) comes from this renderer setting (all SyntheticConfig
# knobs pinned): the full range of face shapes and little colour variety, so that identity lives
# in facial geometry that a 16x16 probe loses, plus pose, light, expression and occlusion nuisances.
SYNTHETIC="shape_spread=1.0,colour_spread=0.25,facial_hair_prob=0.25,yaw_deg=35,pitch_deg=12,roll_deg=8,\
scale_jitter=0.08,shift_jitter=0.04,light_azimuth_deg=75,light_elevation_deg=-20:55,light_strength=0.5:1.2,\
ambient=0.12:0.5,white_balance=0.15,exposure=0.7:1.3,expression=0.7,background_texture=0.6,occlusion_prob=0.2,\
blur_prob=0.1,blur_sigma=0.4:1.0,noise_prob=0.3,noise_std=2:8"
TRAINING="--synthetic 600:12 --synthetic-config $SYNTHETIC --synthetic-seed 0"
HEAD="--scale 32 --margin 0.2"  # CosFace with a softer scale and margin than the official 64 / 0.4: converges in minutes
VALIDATION="--val $DEMO/split --val-lowres 16 --half"

rm -rf "$DEMO" "$RUNS"
mkdir -p "$DEMO"

# 1. Held-out identities (far from the training identities 0..599). Verification impostor pairs
#    join look-alikes: two identities with the same hair style and facial hair (as in CPLFW).
python - "$DEMO" "$SYNTHETIC" <<'PYTHON'
import os, shutil, sys
from pathlib import Path
from facemoe_model.data.synthetic import generate_dataset, sample_identity
from facemoe_model.protocols import write_split
from moescope.commands.train import synthetic_config
from moescope.results import atomic_path

demo, config = Path(sys.argv[1]), synthetic_config(sys.argv[2])
cache = Path(os.environ["MOESCOPE_CACHE"]) / "demo"


def look(name: str) -> tuple[str, str]:
    face = sample_identity(0, int(name), config)
    return face.hair_style, face.facial_hair


split = generate_dataset(cache / "split", 100, 3, seed=0, config=config, identity_offset=100_000)
write_split(split, demo / "split", impostor_group=look)
images = generate_dataset(cache / "images", 40, 4, seed=0, config=config, identity_offset=200_000)
for png in sorted(images.glob("*/*.png")):
    atomic_path(demo / "images" / png.parent.name / png.name, lambda tmp, src=png: shutil.copyfile(src, tmp))
PYTHON

# 2. before: high-resolution training from scratch.
moescope train $TRAINING --model-arg embedding_dim=128 --epochs 10 --lr 3e-3 $HEAD \
    $VALIDATION --val-every 2 --out "$RUNS/before"
cp "$RUNS/before/model.pt" "$DEMO/before.pt"

# 3. after: fine-tune before.pt on low-resolution versions of the same identities (its margin head is reused).
moescope train $TRAINING --init "$DEMO/before.pt" --lowres 12:64 --epochs 3 --lr 1e-3 --warmup-epochs 0.3 $HEAD \
    $VALIDATION --out "$RUNS/after"
cp "$RUNS/after/model.pt" "$DEMO/after.pt"

du -sh "$DEMO"
for name in before after; do
    moescope eval "demo:$name"
    moescope eval "demo:$name" --lowres 16
done
