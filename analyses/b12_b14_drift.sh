#!/usr/bin/env bash
# Tables B.12 / B.13 / B.14: layer-wise CKA, the 5 most changed layers, per-expert parameter shift.
set -euo pipefail
BEFORE=${BEFORE:-demo:before}
AFTER=${AFTER:-demo:after}
OUT=${OUT:-results/b12_b14}
moescope cka "$BEFORE" "$AFTER" ${DATA:+--data "$DATA"} --out "$OUT"
