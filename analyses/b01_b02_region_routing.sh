#!/usr/bin/env bash
# Tables B.1 / B.2: routing frequency (%) of each expert per facial region, before vs after fine-tuning.
set -euo pipefail
BEFORE=${BEFORE:-demo:before}
AFTER=${AFTER:-demo:after}
OUT=${OUT:-results/b01_b02}
moescope regions "$BEFORE" --compare "$AFTER" ${DATA:+--data "$DATA"} --seed 0 --out "$OUT"
