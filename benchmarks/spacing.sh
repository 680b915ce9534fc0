#!/usr/bin/env bash
# A target spacing against none (issue 20): two stores of the same cases, one built with
# `--spacing auto` (each slice resampled to the cohort's median in-plane mm, cropped to the
# body, padded) and one with `--spacing none` (each slice resized whole to SIZE), the same
# fit on each, both scored in SOURCE geometry (`score --src`, the official setting), the
# mean Dice of every region side by side.
#   bash benchmarks/spacing.sh                         # painted real masks, 5 min of training each
#   TIME=10s TRAIN=4-7 VAL=40-49 bash benchmarks/spacing.sh   # a smoke run
# Settings (environment):
#   DATA        KiTS19-layout folder (data/realmasks-kits19: CT painted around the
#               real masks by benchmarks/real_masks.sh)
#   TRAIN, VAL  case specs (0-39, 40-49); only the cases present in DATA are used
#   SIZE        stored slice side (128)          TIME   training time limit per store (5m)
#   WIDTH       U-Net width (16)                 WORKERS  DataLoader workers (2)
#   SEED        fit seed (0)                     OUT    where stores and runs go (runs/spacing)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && export PATH="$PWD/.venv/bin:$PATH"
DATA=${DATA:-data/realmasks-kits19}
TRAIN=${TRAIN:-0-39} VAL=${VAL:-40-49} SIZE=${SIZE:-128} TIME=${TIME:-5m}
WIDTH=${WIDTH:-16} WORKERS=${WORKERS:-2} SEED=${SEED:-0} OUT=${OUT:-runs/spacing}
[ -d "$DATA" ] || { echo "spacing: $DATA is absent; paint it with benchmarks/real_masks.sh" >&2; exit 1; }

# The requested cases that DATA holds: "<train ids> <val ids>" (comma lists of numbers).
selected=$(python - "$DATA" "$TRAIN" "$VAL" <<'PY'
import sys
from pathlib import Path

from kitsprep.cases import case_number, parse_case_spec

data, train_spec, val_spec = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
have = sorted(p.parent.name for p in data.glob("case_*/imaging.nii.gz"))
# the ranges name what the real masks hold; only the painted cases among them are used
train = [c for c in parse_case_spec(train_spec) if c in have]
val = [c for c in parse_case_spec(val_spec) if c in have]
if set(train) & set(val):
    sys.exit(f"TRAIN {train_spec} and VAL {val_spec} share cases; make them disjoint")
if not train or not val:
    sys.exit(f"{data} holds no {'training' if not train else 'validation'} case of "
             f"{train_spec if not train else val_spec}")
print(",".join(str(case_number(c)) for c in train), ",".join(str(case_number(c)) for c in val))
PY
)
read -r train val <<< "$selected"
echo "spacing: $DATA, train $train, validate $val, ${SIZE}x$SIZE, $TIME each, width $WIDTH," \
     "seed $SEED"
mkdir -p "$OUT"
for spacing in auto none; do
  store=$OUT/$spacing-$SIZE.h5 run=$OUT/run-$spacing-$SIZE
  kitsprep build --src "$DATA" --out "$store" --size "$SIZE" --spacing "$spacing" \
      --cases "$train,$val" --overwrite
  rm -rf "$run"
  kitstrain fit "$store" --preset default --out "$run" --time-limit "$TIME" --seed "$SEED" \
      --workers "$WORKERS" --width "$WIDTH" --train-cases "$train" --val-cases "$val"
  kitstrain score "$run" --src "$DATA" --cases "$val" --json "$run/score-src.json" > /dev/null
done

python - "$OUT" "$SIZE" <<'PY'
import json, subprocess, sys
from pathlib import Path

out, size = Path(sys.argv[1]), sys.argv[2]
rows = {}
for spacing in ("auto", "none"):
    run = out / f"run-{spacing}-{size}"
    score = json.loads((run / "score-src.json").read_text())
    info = json.loads(subprocess.run(["kitsprep", "info", str(out / f"{spacing}-{size}.h5"),
                                      "--json"], check=True, capture_output=True).stdout)
    steps = [json.loads(x) for x in open(run / "metrics.jsonl")][-1].get("step")
    dice = {r["name"]: score["mean"][f"{r['name']}_dice"] for r in score["regions"]}
    rows[spacing] = (dice, info, steps, len(score["cases"]))
auto_info = rows["auto"][1]
print(f"\nsource-geometry mean Dice, {rows['auto'][3]} validation cases at {size}x{size}")
print(f"  --spacing auto resolved to {auto_info['target_spacing']:.4f} mm per pixel; "
      f"{len(auto_info['shrunk'])} of {auto_info['cases']} cases resized further to fit")
regions = list(rows["auto"][0])
print(f"  {'':8s}" + "".join(f"{r:>12s}" for r in regions) + f"{'steps':>10s}")
for spacing, (dice, _, steps, _) in rows.items():
    print(f"  {spacing:8s}" + "".join(f"{dice[r]:12.4f}" for r in regions) + f"{steps:>10}")
PY
