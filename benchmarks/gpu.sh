#!/usr/bin/env bash
# The CUDA check (issues 4 and 13), one call of at most ~8 minutes on a GPU machine:
#   1. synthesise and build a 512x512 store (skipped when $WORK already holds it)
#   2. bench-loader on it: store path (preadv) against the in-RAM ceiling, CRC-32 cost
#   3. `fit --batch-size auto` on one GPU for $TIME: patches/s, loader stall after the
#      loader's start-up, the batch chosen and why, lr scaling, peak memory since the search
#   4. where more than one GPU is visible: the same on 2 GPUs under torchrun for $TIME2,
#      then an injected OOM on rank 1 only, which must stop both ranks within seconds
#   bash benchmarks/gpu.sh                 # uses .venv/bin/python if present, else python3
#   CASES=12 TIME=150s TIME2=60s WORKERS=8 bash benchmarks/gpu.sh   # the defaults
# Targets: loader stall under 5 % after start-up; store/in-RAM ratio >= 1.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1
CASES=${CASES:-12} TIME=${TIME:-150s} TIME2=${TIME2:-60s}
WORKERS=${WORKERS:-$(( $(nproc) > 8 ? 8 : $(nproc) ))}
WORK=${WORK:-/tmp/kits-gpu}
T_START=$(date +%s)
say() { printf '\n=== %s (%ss since start)\n' "$*" "$(( $(date +%s) - T_START ))"; }

say "environment"
"$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'GPUs', torch.cuda.device_count()); \
sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
"$PY" -c "import kitsprep" 2>/dev/null || "$PY" -m pip install -q -e . --no-deps
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "CPUs: $(nproc), loader workers per rank: $WORKERS"

say "store"
mkdir -p "$WORK"
rm -rf "$WORK/run1" "$WORK/run2" "$WORK/run-oom"
if [ ! -f "$WORK/s.h5" ]; then
    [ -d "$WORK/synth" ] || "$PY" -m kitsprep.cli synth --out "$WORK/synth" --cases "$CASES" \
        --size 512
    "$PY" -m kitsprep.cli build --src "$WORK/synth" --out "$WORK/s.h5" --size 512 \
        --overwrite --no-fsync --workers "$WORKERS"
fi
"$PY" -m kitsprep.cli info "$WORK/s.h5" | head -5

say "bench-loader (batch 16, $WORKERS workers, context 2, 8 s per side)"
"$PY" -m kitstrain bench-loader "$WORK/s.h5" --batch-size 16 --workers "$WORKERS" \
    --context 2 --seconds 8

# One summary per run directory: what the issue asks to see.
report() {
    "$PY" - "$1" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
cfg = json.loads((run / "config.json").read_text())
recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
log_every = cfg["train"]["log_every"]
train = [r for r in recs if r["kind"] == "train"]
# after the loader's start-up: workers forked, first batches built, kernels loaded
steady = [r for r in train if r["step"] > 2 * log_every] or train[1:] or train
end = [r for r in recs if r["kind"] == "end"][-1]
vals = [r for r in recs if r["kind"] == "val"]
wall = sum(r["wall_s"] for r in steady) or 1.0
sps = sum(r.get("samples_per_s", r["slices_per_s"]) * r["wall_s"] for r in steady) / wall
stall = sum(r["data_wait_s"] for r in steady) / wall
unit = steady[-1].get("unit", "slices") if steady else "slices"
b, lr = cfg["batch"], cfg.get("lr_scaling", {})
print(f"GPU: {cfg['env'].get('gpu')} x {cfg['env']['world_size']} rank(s), "
      f"device {cfg['device']}, precision {cfg['train']['precision']}")
print(f"batch chosen: {cfg['batch_size']} {unit} of {cfg['patch_size']}x{cfg['patch_size']} "
      f"per rank ({b.get('mode')}); why: {b.get('reason', 'fixed on the command line')}")
for t in b.get("tried", []):
    print(f"    tried {t}")
if lr:
    print(f"lr: {lr['lr']:.4g} ({lr['rule']} from {lr['base_lr']:.4g} at batch "
          f"{lr['reference_batch']}, effective batch {lr['effective_batch']})")
print(f"steps: {end['step']} ({cfg['steps_per_epoch']} per epoch), stop: {end['reason']}, "
      f"elapsed {end['elapsed']:.0f} s")
print(f"throughput after start-up (steps > {2 * log_every}): {sps:.0f} {unit}/s "
      f"(all ranks together)")
print(f"loader stall after start-up: {100 * stall:.1f}% (target < 5%); "
      f"whole run: {100 * end['stall']:.1f}%")
first = train[0] if train else None
if first:
    print(f"start-up: first step waited {first['data_wait_s']:.1f} s for its batch")
peak = end.get("peak_memory_mb")
print(f"peak GPU memory since the batch search: "
      + (f"{peak:.0f} MiB, per rank {end.get('peak_memory_mb_ranks')}" if peak else "n/a"))
if vals:
    share = sum(v["seconds"] for v in vals) / max(end["elapsed"], 1e-9)
    print(f"validations: {len(vals)}, {100 * share:.0f}% of the run; last: kidney Dice "
          f"{vals[-1]['kidney_dice']:.3f}, tumour Dice {vals[-1]['tumour_dice']:.3f}")
PY
}

say "fit on 1 GPU, --batch-size auto, --time-limit $TIME"
"$PY" -m kitstrain fit "$WORK/s.h5" --out "$WORK/run1" --batch-size auto --time-limit "$TIME" \
    --workers "$WORKERS" --device cuda
say "summary, 1 GPU"
report "$WORK/run1"

if [ "$NGPU" -gt 1 ]; then
    W2=$(( WORKERS / 2 > 1 ? WORKERS / 2 : 1 ))
    say "fit on 2 GPUs (torchrun), --batch-size auto, --time-limit $TIME2, $W2 workers/rank"
    CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1} "$PY" -m torch.distributed.run \
        --standalone --nproc_per_node 2 -m kitstrain fit "$WORK/s.h5" --out "$WORK/run2" \
        --batch-size auto --time-limit "$TIME2" --workers "$W2" --device cuda
    say "summary, 2 GPUs"
    report "$WORK/run2"

    say "2 GPUs, OOM injected on rank 1 only at step 5: both ranks must stop within seconds"
    t0=$(date +%s)
    set +e
    KITS_INJECT_RANK=1 KITS_INJECT_OOM_AT_STEP=5 timeout 240 "$PY" -m torch.distributed.run \
        --standalone --nproc_per_node 2 -m kitstrain fit "$WORK/s.h5" --out "$WORK/run-oom" \
        --batch-size 16 --max-steps 50 --workers 2 --device cuda > "$WORK/oom.log" 2>&1
    rc=$?
    set -e
    grep -E "^Error|ran out of GPU memory|another rank stopped" "$WORK/oom.log" | head -4 || true
    echo "exit code $rc after $(( $(date +%s) - t0 )) s (expected: non-zero, well under 240;" \
         "124 means it hung)"
    [ -f "$WORK/run-oom/oom.json" ] && echo "oom.json: $(cat "$WORK/run-oom/oom.json")"
else
    say "one GPU visible: the 2-GPU torchrun leg is skipped"
fi
say "done"
