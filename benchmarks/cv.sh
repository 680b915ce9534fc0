#!/usr/bin/env bash
# Five-fold cross-validation on the real KiTS19 masks (issue 20): the painted cases of
# benchmarks/real_masks.sh (data/realmasks-kits19/, painted there once), all present cases
# in one store, every fold trained under a time limit, each case scored out of fold.
#   bash benchmarks/cv.sh                                 # 5 folds, 2 min each
#   TIME=5s FOLDS=3 CASES=4,6,7,9,10,11 SIZE=64 bash benchmarks/cv.sh   # a quick try
# Settings (environment):
#   DATA     KiTS19-layout folder (data/realmasks-kits19)
#   SIZE     stored slice side (128)                   TIME     training time limit per fold (2m)
#   FOLDS    folds (5)                                 WIDTH    U-Net width (16)
#   CASES    case spec of DATA to use (all present)    WORKERS  DataLoader workers (2)
#   OUT      the cross-validation folder (runs/cv-realmasks); removed first unless RESUME=1,
#            which goes on with a stopped one (the same settings)
#   HELDOUT  case spec of DATA that CASES leaves out (e.g. CASES=0-39 HELDOUT=40-49): the
#            folds' ensemble and each fold alone scored on them in source geometry, side by
#            side (none of the folds saw them)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
DATA=${DATA:-data/realmasks-kits19}
SIZE=${SIZE:-128} TIME=${TIME:-2m} FOLDS=${FOLDS:-5} WIDTH=${WIDTH:-16} WORKERS=${WORKERS:-2}
CASES=${CASES:-} OUT=${OUT:-runs/cv-realmasks} RESUME=${RESUME:-0} HELDOUT=${HELDOUT:-}
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
[ -n "$HELDOUT" ] || exit 0

# The ensemble of the folds against each fold alone, on cases no fold saw (source geometry).
held=$(python - "$DATA" "$HELDOUT" <<'PY'
import sys
from kitsprep.cases import find_cases, parse_case_spec

present = [r.case_id for r in find_cases(sys.argv[1]) if r.segmentation is not None]
print(",".join(parse_case_spec(sys.argv[2], present)))
PY
)
kitstrain score "$OUT" --src "$DATA" --cases "$held" --json "$OUT/heldout-ensemble.json" > /dev/null
for k in $(seq 0 $((FOLDS - 1))); do
  kitstrain score "$OUT/fold_$k" --src "$DATA" --cases "$held" --json "$OUT/heldout-fold$k.json" \
      > /dev/null
done
python - "$OUT" "$FOLDS" <<'PY'
import json, sys
from pathlib import Path

out, folds = Path(sys.argv[1]), int(sys.argv[2])
rows = [("ensemble", json.loads((out / "heldout-ensemble.json").read_text()))]
rows += [(f"fold {k}", json.loads((out / f"heldout-fold{k}.json").read_text())) for k in range(folds)]
regions = [r["name"] for r in rows[0][1]["regions"]]
n = len(rows[0][1]["cases"])
print(f"\nheld-out cases ({n}, none seen by any fold), source geometry, mean Dice:")
print(f"  {'model':10s}" + "".join(f"{r:>10s}" for r in regions))
for name, rep in rows:
    print(f"  {name:10s}" + "".join(f"{rep['mean'][f'{r}_dice']:10.4f}" for r in regions))
post = rows[0][1].get("postprocessing") or {}
print(f"  ensemble post-processing: {'; '.join(post.get('steps') or []) or 'none'}")
PY
