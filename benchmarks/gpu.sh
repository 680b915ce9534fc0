#!/usr/bin/env bash
# The CUDA check (issue 4), one call of at most ~8 minutes on a GPU machine:
# synthesise and build a 512x512 store, run `fit --batch-size auto` for ~3 minutes, then
# print slices/s, loader-stall %, peak GPU memory and the batch size chosen.
#   bash benchmarks/gpu.sh                 # uses .venv/bin/python if present, else python3
#   CASES=12 TIME=3m WORKERS=8 bash benchmarks/gpu.sh
# Target: loader stall under 5 %.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1
CASES=${CASES:-12} TIME=${TIME:-3m} WORKERS=${WORKERS:-$(( $(nproc) > 8 ? 8 : $(nproc) ))}
WORK=${WORK:-/tmp/kits-gpu}
"$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda); \
sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
"$PY" -c "import kitsprep" 2>/dev/null || "$PY" -m pip install -q -e . --no-deps
rm -rf "$WORK/run"; mkdir -p "$WORK"
t0=$(date +%s)
[ -d "$WORK/synth" ] || "$PY" -m kitsprep.cli synth --out "$WORK/synth" --cases "$CASES" --size 512
"$PY" -m kitsprep.cli build --src "$WORK/synth" --out "$WORK/s.h5" --size 512 --overwrite \
    --no-fsync --workers "$WORKERS"
echo "synth + build: $(( $(date +%s) - t0 ))s"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -m kitstrain fit "$WORK/s.h5" --out "$WORK/run" --batch-size auto --time-limit "$TIME" \
    --workers "$WORKERS" --device cuda
"$PY" - "$WORK/run" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
cfg = json.loads((run / "config.json").read_text())
recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
train = [r for r in recs if r["kind"] == "train" and r["step"] > 20]  # after warm-up
end = [r for r in recs if r["kind"] == "end"][-1]
wall = sum(r["wall_s"] for r in train) or 1.0
sps = sum(r["slices_per_s"] * r["wall_s"] for r in train) / wall
stall = sum(r["data_wait_s"] for r in train) / wall
vals = [r for r in recs if r["kind"] == "val"]
print(f"\nGPU: {cfg['env'].get('gpu')}  dtype autocast: bf16 if supported, else fp16")
print(f"batch chosen (auto): {cfg['batch_size']} patches of {cfg['patch_size']}x"
      f"{cfg['patch_size']}  search: {cfg['batch'].get('tried')}")
print(f"steps: {end['step']}  throughput: {sps:.0f} slices/s (after 20 warm-up steps)")
print(f"loader stall: {100 * stall:.1f}% (target < 5%)   whole run: {100 * end['stall']:.1f}%")
print(f"peak GPU memory: {end['peak_memory_mb']:.0f} MiB")
if vals:
    print(f"last validation: kidney Dice {vals[-1]['kidney_dice']:.3f}, "
          f"tumour Dice {vals[-1]['tumour_dice']:.3f}")
PY
