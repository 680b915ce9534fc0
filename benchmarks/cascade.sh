#!/usr/bin/env bash
# The two-stage cascade against single-stage training at equal budget (issue 19), on CT
# painted around the real KiTS19 masks (benchmarks/real_masks.sh paints $DATA):
#   (a) fit --cascade on the full-size store, (b) single stage on the small store,
#   (c) single stage on the full-size store with --patch $PATCH;
# each scored on the validation cases in source geometry (official Dice), printed per case
# side by side, then `predict` of those cases timed for (a) and (c), with the fine stage's
# voxel share from (a).
#   bash benchmarks/cascade.sh                            # 512² and 128², 10 min each
#   TIME=10s SIZE=64 SMALL=32 PATCH=32 NTRAIN=2 NVAL=1 bash benchmarks/cascade.sh   # a try
# Settings (environment):
#   DATA    KiTS19-layout folder (data/realmasks-kits19)   OUT   work folder (runs/bench-cascade)
#   TIME    --time-limit of every run (10m)                SIZE, SMALL  store sides (512, 128)
#   WIDTH   U-Net width (16)        PATCH  (c)'s --patch (128)       SEED  (0)
#   TRAIN, VAL  case numbers (0-39, 40-49), of the cases present in DATA
#   NTRAIN, NVAL  at most this many of them (all)           WORKERS  loader workers (2)
#   PY      the Python with kits installed (python)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/realmasks-kits19} OUT=${OUT:-runs/bench-cascade} PY=${PY:-python}
TIME=${TIME:-10m} SIZE=${SIZE:-512} SMALL=${SMALL:-128} WIDTH=${WIDTH:-16} PATCH=${PATCH:-128}
TRAIN=${TRAIN:-0-39} VAL=${VAL:-40-49} NTRAIN=${NTRAIN:-0} NVAL=${NVAL:-0}
SEED=${SEED:-0} WORKERS=${WORKERS:-2}
if [ -z "${PRECISION:-}" ]; then  # bf16 where the CPU has it in hardware, as real_masks.sh
  PRECISION=fp32
  grep -qwE 'amx_bf16|avx512_bf16' /proc/cpuinfo 2>/dev/null && PRECISION=bf16
fi
kitsprep() { "$PY" -c 'import sys; from kitsprep.cli import main; sys.argv[0] = "kitsprep"; main()' "$@"; }
kitstrain() { "$PY" -m kitstrain "$@"; }
[ -d "$DATA" ] || { echo "cascade: $DATA is absent; paint it with benchmarks/real_masks.sh" >&2; exit 1; }
mkdir -p "$OUT"

# The present cases among TRAIN and VAL, as comma lists: "<train> <val>".
read -r train val < <("$PY" - "$DATA" "$TRAIN" "$VAL" "$NTRAIN" "$NVAL" <<'PY'
import sys
from kitsprep.cases import find_cases, parse_case_spec

data, train, val, ntrain, nval = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
present = {r.case_id for r in find_cases(data) if r.segmentation is not None}
pick = lambda spec, n: [c for c in parse_case_spec(spec) if c in present][: n or None]
print(",".join(pick(train, ntrain)), ",".join(pick(val, nval)))
PY
)
echo "cascade: train $train"
echo "cascade: val   $val"
for side in "$SIZE" "$SMALL"; do
  store=$OUT/store$side.h5
  [ -f "$store" ] || kitsprep build --src "$DATA" --out "$store" --size "$side" --cases "$train,$val"
done

common=(--time-limit "$TIME" --width "$WIDTH" --seed "$SEED" --workers "$WORKERS"
        --precision "$PRECISION" --train-cases "$train" --val-cases "$val")
declare -A runs=([a]="$OUT/a-cascade-$SIZE" [b]="$OUT/b-single-$SMALL" [c]="$OUT/c-single-$SIZE")
[ -f "${runs[a]}/config.json" ] || kitstrain fit "$OUT/store$SIZE.h5" --out "${runs[a]}" --cascade "${common[@]}"
[ -f "${runs[b]}/config.json" ] || kitstrain fit "$OUT/store$SMALL.h5" --out "${runs[b]}" "${common[@]}"
[ -f "${runs[c]}/config.json" ] || kitstrain fit "$OUT/store$SIZE.h5" --out "${runs[c]}" --patch "$PATCH" "${common[@]}"
# Each arm is fitted, scored and timed once: delete an arm's run folder (and score-K.json,
# predict-K.s) to redo it alone.
for k in a b c; do
  [ -f "$OUT/score-$k.json" ] ||
    kitstrain score "${runs[$k]}" --src "$DATA" --json "$OUT/score-$k.json" > /dev/null
done
for k in a c; do
  [ -f "$OUT/predict-$k.s" ] && continue
  rm -rf "$OUT/pred-$k"
  start=$(date +%s.%N)
  kitstrain predict "${runs[$k]}" --src "$DATA" --cases "$val" --out "$OUT/pred-$k" > /dev/null
  "$PY" -c "print($(date +%s.%N) - $start)" > "$OUT/predict-$k.s"
done

"$PY" - "$OUT" "$SIZE" "$SMALL" <<'PY'
import json, sys
from pathlib import Path

out, size, small = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
names = {"a": f"cascade {size}", "b": f"single {small}", "c": f"single {size}"}
reports = {k: json.loads((out / f"score-{k}.json").read_text()) for k in names}
cases = {k: {c["case"]: c for c in r["cases"]} for k, r in reports.items()}
print(f"{'case':12}" + "".join(f"{n + ' kidney':>20}{'tumour':>8}" for n in names.values()))
for case in cases["a"]:
    row = "".join(f"{cases[k][case]['kidney_dice']:20.3f}{cases[k][case]['tumour_dice']:8.3f}" for k in names)
    print(f"{case:12}{row}")
mean = "".join(f"{reports[k]['mean']['kidney_dice']:20.3f}{reports[k]['mean']['tumour_dice']:8.3f}" for k in names)
print(f"{'mean':12}{mean}")
share = [c["cascade"]["fine_voxel_share"] for c in cases["a"].values()]
fallback = [c for c, v in cases["a"].items() if v["cascade"]["fallback"]]
ta, tc = (float((out / f"predict-{k}.s").read_text()) for k in "ac")
print(f"predict of {len(share)} case(s): cascade {ta:.1f} s, single {size} {tc:.1f} s ({ta / tc:.2f}x);"
      f" fine stage on {100 * sum(share) / len(share):.1f} % of the voxels (mean per case);"
      f" coarse found no kidney in: {', '.join(fallback) or 'none'}")
PY
