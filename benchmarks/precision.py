"""Training-step throughput of each --precision on this machine, in one run: the U-Net's
real forward + loss + backward + AdamW step, interleaved so that a noisy machine moves
every precision alike.

    python benchmarks/precision.py [--device cpu] [--width 16 32] [--size 64 128]

On CPU, `--precision bf16` pays off where the cores have AMX or AVX512-BF16 (the flags
are printed); elsewhere bf16 is emulated and slower than fp32, which is why `auto` stays
fp32 on CPU. The ratio column is bf16 (or fp16) over fp32 from the same rounds.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from kitsprep.labels import EDITIONS
from kitstrain.core.precision import amp_dtype, cuda_bf16_native
from kitstrain.model.losses import make_loss
from kitstrain.model.unet import UNet, UNetConfig


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    wanted = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f") if f in flags]
    return " ".join(wanted) or "none of avx512f/avx512_bf16/amx"


def step_rate(
    device: torch.device,
    precision: str,
    width: int,
    size: int,
    batch: int,
    context: int,
    rounds: int,
    steps: int,
) -> list[float]:
    """Samples/s of `steps` training steps, once per round (the caller interleaves)."""
    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=1 + 2 * context, num_classes=3, width=width, depth=4)
    model = UNet(cfg).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = make_loss("ce+dice", EDITIONS["kits19"])
    dtype = amp_dtype(device, precision)
    x = torch.randn(batch, cfg.in_channels, size, size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.randint(0, 3, (batch, size, size), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):  # warm-up: oneDNN/cuDNN pick their kernels
        step()
    sync()
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        rates.append(batch * steps / (time.perf_counter() - t))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--size", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    device = torch.device(a.device)
    low = "bf16" if device.type == "cpu" or cuda_bf16_native(device) else "fp16"
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"CPU flags: {cpu_flags()}"
    )
    print(f"{'width':>5} {'size':>5} {'batch':>5}   fp32 samples/s   {low} samples/s   {low}/fp32")
    for width in a.width:
        for size in a.size:
            batch = max(1, a.batch * 64 * 64 // (size * size)) if size > 64 else a.batch
            fp32, half = [], []
            for _ in range(a.rounds):  # interleave the precisions round by round
                fp32 += step_rate(device, "fp32", width, size, batch, a.context, 1, a.steps)
                half += step_rate(device, low, width, size, batch, a.context, 1, a.steps)
            f, h = max(fp32), max(half)  # best round: the least disturbed
            print(f"{width:5d} {size:5d} {batch:5d}   {f:14.1f}   {h:14.1f}   {h / f:8.2f}x")


if __name__ == "__main__":
    main()
