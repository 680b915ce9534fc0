#!/usr/bin/env bash
# Five-fold cross-validation on the real KiTS19 masks (issue 20): the painted cases of
# benchmarks/real_masks.sh (data/realmasks-kits19/, painted there once), all present cases
# in one store, every fold trained under a time limit, each case scored out of fold.
#   bash benchmarks/cv.sh                                 # 5 folds, 2 min each
#   TIME=5s FOLDS=3 CASES=4,6,7,9,10,11 SIZE=64 bash benchmarks/cv.sh   # a quick try
# Settings (environment):
#   DATA     KiTS19-layout folder (/work/main/data/realmasks-kits19)
#   SIZE     stored slice side (128)                   TIME     training time limit per fold (2m)
#   FOLDS    folds (5)                                 WIDTH    U-Net width (16)
#   CASES    case spec of DATA to use (all present)    WORKERS  DataLoader workers (2)
#   OUT      the cross-validation folder (runs/cv-realmasks); removed first unless RESUME=1,
#            which goes on with a stopped one (the same settings)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
DATA=${DATA:-/work/main/data/realmasks-kits19}
SIZE=${SIZE:-128} TIME=${TIME:-2m} FOLDS=${FOLDS:-5} WIDTH=${WIDTH:-16} WORKERS=${WORKERS:-2}
CASES=${CASES:-} OUT=${OUT:-runs/cv-realmasks} RESUME=${RESUME:-0}
# bf16 autocast where the CPU has it in hardware (AMX / AVX512-BF16), fp32 elsewhere.
if [ -z "${PRECISION:-}" ]; then
  PRECISION=fp32
  grep -qwE 'amx_bf16|avx512_bf16' /proc/cpuinfo 2>/dev/null && PRECISION=bf16
fi
[ -d "$DATA" ] || { echo "cv.sh: $DATA is absent; paint it with benchmarks/real_masks.sh" >&2; exit 1; }

store=data/realmasks-kits19-cv-$SIZE.h5
# The store holds exactly the chosen cases: rebuilt when the choice changes.
if [ ! -f "$store" ] || [ "$(cat "$store.cases" 2>/dev/null)" != "${CASES:-all}" ]; then
  kitsprep build --src "$DATA" --out "$store" --size "$SIZE" --edition kits19 \
      ${CASES:+--cases "$CASES"} --overwrite
  echo "${CASES:-all}" > "$store.cases"
fi
[ "$RESUME" = 1 ] || rm -rf "$OUT"
echo "cv.sh: $FOLDS folds of $store, $TIME each, width $WIDTH, precision $PRECISION -> $OUT"
kitstrain cv "$store" --out "$OUT" --folds "$FOLDS" --time-limit "$TIME" --preset default \
    --width "$WIDTH" --workers "$WORKERS" --precision "$PRECISION"
kitstrain score "$OUT" --json "$OUT/score.json"
