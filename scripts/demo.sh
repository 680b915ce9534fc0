#!/usr/bin/env bash
# The main job end to end on the synthetic cohort: synth -> build -> verify -> fit ->
# predict (the unlabelled case, in its source geometry) -> score (table + overlays, last).
# A few minutes on a laptop CPU. Override with e.g. CASES=24 SIZE=128 TIME=10m.
set -euo pipefail
cd "$(dirname "$0")/.."
CASES=${CASES:-12} SIZE=${SIZE:-64} TIME=${TIME:-2m}
export PATH="$PWD/.venv/bin:$PATH"
rm -rf data/synthetic/demo data/demo.h5 runs/demo
kitsprep synth --out data/synthetic/demo --cases "$CASES" --size "$SIZE" --seed 0
kitsprep build --src data/synthetic/demo --out data/demo.h5 --size "$SIZE"
kitsprep info data/demo.h5
kitsprep verify data/demo.h5 --src data/synthetic/demo
kitstrain fit data/demo.h5 --out runs/demo --time-limit "$TIME"
kitstrain predict runs/demo --src data/synthetic/demo --out runs/demo/predictions \
    --cases "$(ls data/synthetic/demo | tail -n 1)"
kitstrain score runs/demo --overlays runs/demo/overlays
