#!/usr/bin/env bash
# Tables B.17 / B.7: drop single experts and pairs, switch experts, random routing, next to the baseline.
set -euo pipefail
AFTER=${AFTER:-demo:after}
OUT=${OUT:-results/b17_b07}
moescope ablate "$AFTER" ${DATA:+--split "$DATA"} --drop singles --drop pairs --switch --random --seed 0 --out "$OUT"
