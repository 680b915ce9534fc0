#!/usr/bin/env bash
# The time budget at full resolution (issue 19, item 3): a 512x512 store of the real-mask
# cohort, `kitstrain fit --patch 128 --time-limit TIME --width 16` with the last 15 cases as
# validation cases, then how the budget was spent: steps trained, seconds in training steps
# and in validation, and validation's share of the limit (goal: >= 85 % of it trains).
#   bash benchmarks/budget.sh                                  # 10 minutes, 512x512
#   TIME=20s SIZE=64 NVAL=3 bash benchmarks/budget.sh          # a try in under a minute
# Settings (environment):
#   DATA   KiTS19-layout cases (data/realmasks-kits19, painted by real_masks.sh)
#   SIZE   stored slice side (512)          STORE  the store (data/budget-SIZE.h5; built once)
#   TIME   --time-limit (10m)               WIDTH  U-Net width (16)     PATCH  --patch (128)
#   NVAL   validation cases: the last NVAL cases of the store (15)
#   VAL_BUDGET  --val-budget (the default, 0.15)       OUT   run directory (runs/budget-DATE)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
DATA=${DATA:-data/realmasks-kits19} SIZE=${SIZE:-512}
STORE=${STORE:-data/budget-$SIZE.h5} TIME=${TIME:-10m} WIDTH=${WIDTH:-16}
PATCH=${PATCH:-128} NVAL=${NVAL:-15} OUT=${OUT:-runs/budget-$(date +%Y%m%d-%H%M%S)}

if [ ! -f "$STORE" ]; then
  [ -d "$DATA" ] || { echo "budget: $DATA is absent (paint it with benchmarks/real_masks.sh)" >&2; exit 1; }
  echo "budget: building $STORE (${SIZE}x$SIZE) from $DATA" >&2
  kitsprep build --src "$DATA" --out "$STORE" --size "$SIZE" >&2
fi
val=$(python - "$STORE" "$NVAL" <<'PY'
import sys

from kitsprep.store import open_store

cases = sorted(open_store(sys.argv[1]).labelled_cases)
n = int(sys.argv[2])
if not 0 < n < len(cases):
    sys.exit(f"budget: NVAL={n} needs a store of more than {n} labelled cases ({len(cases)})")
print(",".join(cases[-n:]))
PY
)
echo "budget: fit $STORE --patch $PATCH --time-limit $TIME --width $WIDTH, $NVAL validation cases" >&2
kitstrain fit "$STORE" --out "$OUT" --patch "$PATCH" --time-limit "$TIME" --width "$WIDTH" \
  --val-cases "$val" ${VAL_BUDGET:+--val-budget "$VAL_BUDGET"} >&2

python - "$OUT" <<'PY'
import sys
from pathlib import Path

from kitstrain.core.metricslog import read_metrics
from kitstrain.core.record import read_record

run = Path(sys.argv[1])
record = read_record(run)
end = [r for r in read_metrics(run) if r["kind"] == "end"][-1]
vals = [r for r in read_metrics(run) if r["kind"] == "val"]
limit = record.train.time_limit
v = record.validation
print(f"run {run}: --time-limit {limit:g} s, --val-budget {record.train.val_budget:g}")
print(
    f"validated {len(v.get('cases', []))} of {v.get('all_cases', '?')} cases "
    f"({v.get('slices', 0)} slices, priced {v.get('seconds_per_slice', 0):.3f} s a slice), "
    f"{len(vals)} validation(s)"
)
print(f"steps trained      {end['step']}")
print(f"training seconds   {end['train_seconds']:.1f}  ({100 * end['train_seconds'] / limit:.1f}% of the limit)")
print(f"validation seconds {end['val_seconds']:.1f}  ({100 * end['val_seconds'] / limit:.1f}% of the limit)")
print(f"elapsed seconds    {end['elapsed']:.1f}  (stopped: {end['reason']})")
print(f"warning            {end.get('warning') or 'none'}")
PY
