#!/usr/bin/env bash
# Quality on real masks (issue 10): synthetic CT painted around the real KiTS19 and KiTS23
# masks in ../shared (kitsprep.synth.paint_imaging), built into a store, the default preset
# fitted under a time limit, scored on held-out cases.
#   bash benchmarks/real_masks.sh                    # kits19 then kits23, 10 min of training each
#   EDITION=kits23 TIME=20s MAX_SLICES=40 TRAIN=0-29 VAL=30-49 bash benchmarks/real_masks.sh
# Settings (environment):
#   EDITION     kits19, kits23 or both (default "kits19 kits23"): masks from $SHARED/<edition>-masks
#   TIME        training time limit per edition (10m)      SIZE   stored slice side (128)
#   WIDTH       U-Net width (16, as quality.sh)            WORKERS  DataLoader workers (2)
#   TRAIN, VAL  case specs (0-39, 40-49); must not overlap
#   MAX_SLICES  only cases with at most this many slices (200: 36 cases, 3,635 slices;
#               0: all 50 cases, 10,046 slices). Painting costs ~0.1 s a slice on one core, so
#               the 200-slice cohort takes ~3 min with two painters, all 50 ~9 min; each case
#               is painted once and kept in data/realmasks-<edition>/ (git-ignored).
#   PAINT_WORKERS  painting processes (2)                  SEED   painting seed (0)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
EDITION=${EDITION:-kits19 kits23} SHARED=${SHARED:-../shared}
SIZE=${SIZE:-128} TIME=${TIME:-10m} WIDTH=${WIDTH:-16} WORKERS=${WORKERS:-2}
TRAIN=${TRAIN:-0-39} VAL=${VAL:-40-49} MAX_SLICES=${MAX_SLICES:-200}
PAINT_WORKERS=${PAINT_WORKERS:-2} SEED=${SEED:-0}
# bf16 autocast where the CPU has it in hardware (AMX / AVX512-BF16), fp32 elsewhere.
if [ -z "${PRECISION:-}" ]; then
  PRECISION=fp32
  grep -qwE 'amx_bf16|avx512_bf16' /proc/cpuinfo 2>/dev/null && PRECISION=bf16
fi

for ed in $EDITION; do
  masks=$SHARED/$ed-masks data=data/realmasks-$ed
  [ -d "$masks" ] || { echo "real_masks: $masks is absent, skipping $ed" >&2; continue; }
  echo "real_masks $ed: cases $TRAIN / $VAL with <= ${MAX_SLICES} slices (0: all), ${SIZE}x$SIZE," \
       "$TIME, width $WIDTH, precision $PRECISION"
  # Select the cases, paint the missing ones; prints "<train ids> <val ids>" (comma lists).
  selected=$(python - "$masks" "$data" "$TRAIN" "$VAL" "$MAX_SLICES" "$PAINT_WORKERS" \
      "$SEED" <<'PY'
import shutil, sys, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from kitsprep.cases import case_number, parse_case_spec
from kitsprep.geometry import axial_axes
from kitsprep.synth import paint_imaging

masks, data, train_spec, val_spec = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
max_slices, workers, seed = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])


def paint(cid: str) -> tuple[str, int, float]:
    """imaging.nii.gz painted around the mask (int16 HU, the mask's affine), beside a copy of
    the mask; written under a temporary name, so a killed run leaves no half case behind."""
    t = time.perf_counter()
    img = nib.load(masks / cid / "segmentation.nii.gz")
    seg = np.asarray(img.dataobj)
    affine = img.header.get_best_affine()
    axes = axial_axes(affine)  # paint_imaging wants (slices, rows, cols)
    zooms = img.header.get_zooms()
    hu = paint_imaging(seg.transpose(axes), tuple(float(zooms[a]) for a in axes),
                       np.random.default_rng([seed, case_number(cid)]))
    out = nib.Nifti1Image(hu.transpose(np.argsort(axes)).astype(np.int16), affine)
    out.set_sform(affine, code=2)
    out.set_qform(affine, code=0)
    folder = data / cid
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(masks / cid / "segmentation.nii.gz", folder / "segmentation.nii.gz")
    tmp = folder / "imaging.partial.nii.gz"
    out.to_filename(tmp)
    tmp.replace(folder / "imaging.nii.gz")
    return cid, seg.shape[axes[0]], time.perf_counter() - t


have = sorted(p.parent.name for p in masks.glob("case_*/segmentation.nii.gz"))
train, val = parse_case_spec(train_spec, have), parse_case_spec(val_spec, have)
if set(train) & set(val):
    sys.exit(f"TRAIN {train_spec} and VAL {val_spec} share cases; make them disjoint")
slices = {c: nib.load(masks / c / "segmentation.nii.gz").shape[0] for c in train + val}
keep = lambda ids: [c for c in ids if max_slices <= 0 or slices[c] <= max_slices]  # noqa: E731
train, val = keep(train), keep(val)
if not train or not val:
    sys.exit(f"no {'training' if not train else 'validation'} case has <= {max_slices} slices; "
             "raise MAX_SLICES")
todo = [c for c in train + val if not (data / c / "imaging.nii.gz").is_file()]
print(f"{len(train)} training and {len(val)} validation cases, "
      f"{sum(slices[c] for c in train + val)} slices; "
      f"painting {len(todo)} ({sum(slices[c] for c in todo)} slices)", file=sys.stderr)
t0 = time.perf_counter()
with ProcessPoolExecutor(max(1, workers)) as pool:
    for cid, n, s in pool.map(paint, sorted(todo, key=slices.get, reverse=True)):
        print(f"  painted {cid}: {n} slices in {s:.1f}s ({s / n:.3f} s/slice)", file=sys.stderr)
if todo:
    print(f"painted in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
num = lambda ids: ",".join(str(case_number(c)) for c in ids)  # noqa: E731
print(num(train), num(val))
PY
  )
  read -r train val <<< "$selected"
  store=data/realmasks-$ed-$SIZE.h5
  # The store holds exactly the selected cases: rebuilt when the selection changes.
  if [ ! -f "$store" ] || [ "$(cat "$store.cases" 2>/dev/null)" != "$train $val" ]; then
    kitsprep build --src "$data" --out "$store" --size "$SIZE" --edition "$ed" \
        --cases "$train,$val" --overwrite
    echo "$train $val" > "$store.cases"
  fi
  run=runs/realmasks-$ed-$SIZE
  rm -rf "$run"
  kitstrain fit "$store" --preset default --out "$run" --time-limit "$TIME" \
      --workers "$WORKERS" --width "$WIDTH" --precision "$PRECISION" \
      --train-cases "$train" --val-cases "$val"
  kitstrain score "$run" --json "$run/score.json" > /dev/null
done

# The mean record of each score, every numeric field (nested ones as a.b), whatever the
# scoring JSON holds for the edition.
python - "$SIZE" $EDITION <<'PY'
import json, sys
from pathlib import Path

size, editions = sys.argv[1], sys.argv[2:]


def numeric(d: dict, prefix: str = "") -> list[tuple[str, float]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += numeric(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append((f"{prefix}{k}", v))
    return out


for ed in editions:
    run = Path(f"runs/realmasks-{ed}-{size}")
    if not (run / "score.json").is_file():
        continue
    score = json.loads((run / "score.json").read_text())
    steps = [json.loads(x) for x in open(run / "metrics.jsonl")][-1].get("step")
    print(f"\n{ed}: painted CT around the real masks, {len(score['cases'])} validation cases "
          f"at {size}x{size}, {steps} steps")
    for key, value in numeric(score["mean"]):
        print(f"  {key:32s} {value:.4f}")
PY
