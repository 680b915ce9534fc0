"""The training step's ceiling on a GPU: a run's very step (its network, loss, optimizer,
precision, batch and patch, from config.json) on one batch that is already on the GPU, so
no loader and no copy can hold it back. `benchmarks/gpu.sh` divides fit's samples/s by
this (goal: >= 0.95).

    python benchmarks/gpu_ceiling.py RUN_DIR [--seconds 20]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from kitsprep.store import open_store
from kitstrain.core.precision import resolve_precision
from kitstrain.core.record import read_record
from kitstrain.model.losses import make_loss
from kitstrain.train.fit import build_training_model
from kitstrain.train.optim import apply_gradients, make_optimizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--seconds", type=float, default=20.0)
    a = ap.parse_args()
    record = read_record(a.run)
    tc, batch, patch = record.train, record.batch_size, record.patch_size
    info = open_store(record.store)
    cuda = torch.cuda.is_available()  # CPU only to try the script out
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = True
    dtype, why = resolve_precision(device, tc.precision)
    model, _ = build_training_model(info, tc, device, tc.network)
    model.train()
    optimizer = make_optimizer(model, tc)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    loss_fn = make_loss(tc.loss, info.labels, regions=tc.regions)
    channels = 1 + 2 * tc.context
    x = torch.randn(batch, channels, patch, patch, device=device).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.randint(0, info.num_classes, (batch, patch, patch), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(model(x), y)
        (scaler.scale(loss) if scaler else loss).backward()
        apply_gradients(model, optimizer, scaler, tc.grad_clip)

    for _ in range(10):  # warm-up: cuDNN's choice, the allocator
        step()
    sync()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < a.seconds:
        for _ in range(10):
            step()
        steps += 10
        sync()
    sps = steps * batch / (time.perf_counter() - t0)
    print(
        f"ceiling: {sps:.0f} samples/s ({batch} x {patch}x{patch}, {channels} channels, "
        f"{why}; the batch already on the GPU)"
    )


if __name__ == "__main__":
    main()
