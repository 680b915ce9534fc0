#!/usr/bin/env bash
# The GPU check, one prepared call of under 8 minutes on a bare GPU machine WITHOUT a
# package registry (the device tool's machines: their python3 has its own torch, and lacks
# nibabel, isal and zlib-ng). Once, where pip reaches PyPI:
#     bash benchmarks/gpu_wheels.sh           # -> .whl/ ; carry .whl with the call
# Then, on the GPU machine, from the repository's root:
#     bash benchmarks/gpu.sh                  # CASES=8 TIME=2m WORKERS=auto BATCH=auto
# 0. installs the carried wheels into /tmp/site (no registry needed)
# 1. checks imports, CUDA and /dev/shm: one line and exit 1 on a gap
# 2. synthesises and builds a 512x512 store
# 3. bench-loader on the default path (what fit feeds per sample, and per auto workers)
# 4. fit for $TIME, --batch-size auto, bf16: once with augmentation on the device, once in
#    the workers; each: samples/s, GPU busy %, loader stall %, peak memory, the batch chosen
# 5. the same step on a batch already on the GPU (the ceiling), and fit's share of it
# Goals (issue 21): loader stall < 5 %, samples/s >= 0.95 x the ceiling.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1
CASES=${CASES:-8} TIME=${TIME:-2m} WORKERS=${WORKERS:-auto} BATCH=${BATCH:-auto}
WORK=${WORK:-/tmp/kits-gpu}
T_START=$(date +%s)
say() { printf '\n=== %s (%ss since start)\n' "$*" "$(( $(date +%s) - T_START ))"; }
fail() { echo "gpu.sh: $*" >&2; exit 1; }

# ---- 0. carried wheels (a machine without a registry cannot pip install anything else)
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || fail "could not install the carried wheels in .whl/"
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---- 1. what the run needs, each gap in one line
say "checks"
"$PY" - <<'PY' || exit 1
import importlib.util, sys
need = ["torch", "numpy", "h5py", "numba", "click", "scipy", "matplotlib", "safetensors",
        "tqdm", "nibabel", "isal", "zlib_ng"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu.sh: missing Python packages {', '.join(missing)}; run "
             "`bash benchmarks/gpu_wheels.sh` where pip reaches PyPI and carry .whl/")
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu.sh: torch {torch.__version__} sees no CUDA device; run this on a GPU machine")
import kitsprep, kitstrain  # noqa: F401,E401 - the project itself imports
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}")
PY
SHM_MB=$(df -Pm /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')
[ "${SHM_MB:-0}" -ge 2048 ] || fail "/dev/shm has ${SHM_MB:-no} MB free; the loader's batch" \
    "pool needs up to 2048 MB: give the container more (docker run --shm-size=8g)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "CPUs usable: $("$PY" -c 'import os; print(len(os.sched_getaffinity(0)))'), /dev/shm free: ${SHM_MB} MB"

# ---- 2. the store
say "synth + build ($CASES cases, 512x512)"
mkdir -p "$WORK"
rm -rf "$WORK"/run-*
if [ ! -f "$WORK/s.h5" ]; then
    [ -d "$WORK/synth" ] || "$PY" -m kitsprep.cli synth --out "$WORK/synth" --cases "$CASES" \
        --size 512
    "$PY" -m kitsprep.cli build --src "$WORK/synth" --out "$WORK/s.h5" --size 512 \
        --overwrite --no-fsync
fi

# ---- 3. the loader alone
say "bench-loader, the default path (device augmentation, auto workers)"
"$PY" -m kitstrain bench-loader "$WORK/s.h5" --seconds 8 --workers "$WORKERS"
say "bench-loader, augmentation in the workers"
"$PY" -m kitstrain bench-loader "$WORK/s.h5" --seconds 8 --workers "$WORKERS" \
    --augment-on workers

# ---- 4. fit, both sides, GPU busy sampled by nvidia-smi
report() {
    "$PY" - "$1" "$2" <<'PY'
import json, sys
from pathlib import Path
run, util = Path(sys.argv[1]), Path(sys.argv[2])
cfg = json.loads((run / "config.json").read_text())
recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
train = [r for r in recs if r["kind"] == "train"]
steady = [r for r in train if r["step"] > 2 * cfg["train"]["log_every"]] or train[1:] or train
end = [r for r in recs if r["kind"] == "end"][-1]
wall = sum(r["wall_s"] for r in steady) or 1.0
sps = sum(r["samples_per_s"] * r["wall_s"] for r in steady) / wall
stall = sum(r["data_wait_s"] for r in steady) / wall
samples = [float(x) for x in util.read_text().split() if x.strip().replace(".", "").isdigit()]
busy = samples[len(samples) // 4:] or samples  # after start-up (store, search, workers)
b = cfg["batch"]
print(f"augmentation: {cfg.get('augment_side')}, workers {cfg.get('workers')} "
      f"({cfg.get('workers_reason')}), {cfg.get('precision_reason')}")
print(f"batch chosen: {cfg['batch_size']} of {cfg['patch_size']}x{cfg['patch_size']} "
      f"({b.get('mode')}): {b.get('reason', 'fixed')}; tried {b.get('tried')}")
print(f"samples/s after start-up: {sps:.0f}; loader stall {100 * stall:.1f}% (goal < 5%); "
      f"steps {end['step']}, stop {end['reason']}")
print(f"GPU busy: {sum(busy) / max(1, len(busy)):.0f}% (nvidia-smi, {len(busy)} samples); "
      f"peak memory {end.get('peak_memory_mb') or 0:.0f} MiB")
(run / "sps.txt").write_text(f"{sps:.1f}")
PY
}

for SIDE in device workers; do
    say "fit, --augment-on $SIDE, --batch-size $BATCH, bf16, --time-limit $TIME"
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 500 \
        > "$WORK/util-$SIDE.txt" 2>/dev/null &
    SMI=$!
    "$PY" -m kitstrain fit "$WORK/s.h5" --out "$WORK/run-$SIDE" --batch-size "$BATCH" \
        --precision bf16 --time-limit "$TIME" --workers "$WORKERS" --augment-on "$SIDE" \
        --device cuda 2>&1 | grep -v "^step " || true
    kill "$SMI" 2>/dev/null || true
    [ -f "$WORK/run-$SIDE/metrics.jsonl" ] || fail "fit --augment-on $SIDE wrote no metrics"
    say "summary, augmentation on the $SIDE side"
    report "$WORK/run-$SIDE" "$WORK/util-$SIDE.txt"
done

# ---- 5. the ceiling: the same step, its batch already on the GPU
say "ceiling (the device-side run's step on a batch already on the GPU)"
"$PY" benchmarks/gpu_ceiling.py "$WORK/run-device" --seconds 15 | tee "$WORK/ceiling.txt"
"$PY" - "$WORK" <<'PY'
import re, sys
from pathlib import Path
w = Path(sys.argv[1])
ceiling = float(re.search(r"ceiling: (\d+)", (w / "ceiling.txt").read_text()).group(1))
for side in ("device", "workers"):
    sps = float((w / f"run-{side}" / "sps.txt").read_text())
    print(f"fit with augmentation on the {side} side: {sps:.0f} samples/s = "
          f"{sps / ceiling:.2f} x the ceiling {ceiling:.0f} (goal >= 0.95)")
PY
say "done"
