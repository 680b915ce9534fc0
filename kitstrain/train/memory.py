"""GPU memory, explicitly: precision choice, batch-size search, out-of-memory detection."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kitsprep.errors import KitsError


def amp_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for `precision`; None means plain fp32.

    "auto" is bf16 on GPUs that support it (no loss scaling needed), fp16 with a gradient
    scaler on older GPUs, and fp32 on CPU. "bf16" on CPU is opt-in: on CPUs with AMX or
    AVX512-BF16 a training step is 1.65-2.44x faster (benchmarks/precision.py), elsewhere
    it is emulated and slower than fp32."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16":
        if device.type != "cuda":
            raise KitsError(
                "--precision fp16 needs a CUDA device (CPU autocast is bf16 only), "
                f"found device {device}; use --precision bf16 or fp32 on CPU"
            )
        return torch.float16
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise KitsError(
                f"--precision bf16: this GPU ({torch.cuda.get_device_name(device)}) "
                "has no bfloat16 support; use --precision fp16 or auto"
            )
        return torch.bfloat16
    raise KitsError(f"precision must be auto, fp32, bf16 or fp16, found {precision!r}")


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_memory_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


# Tensors of 2**31 elements or more break kernels without 64-bit indexing (with errors
# that are not OOMs): the search never tries a batch whose largest activation gets there.
ELEMENT_LIMIT = 2**31
# The largest per-GPU batch `--batch-size auto` tries: 8x the default preset's 16. Past
# that the recipe (lr, warm-up, steps per epoch) is far from where it was tuned, and the
# loader's shared-memory batches reach hundreds of MB.
AUTO_BATCH_CAP = 128
# A doubling must buy at least this much throughput per sample to be taken.
MIN_GAIN = 1.10


def find_batch_size(
    run_step: Callable[[int], tuple[float, int | None]],
    *,
    start: int = 2,
    cap: int = AUTO_BATCH_CAP,
    elements_per_sample: int = 0,
    total_bytes: int | None = None,
    margin: float = 0.85,
    min_gain: float = MIN_GAIN,
) -> dict:
    """The per-GPU batch with the fastest per-sample step, not the largest that fits.

    `run_step(n)` runs (and times) real training steps of `n` samples and returns
    (samples/s, peak bytes or None). Batches double from `start` while a doubling gains at
    least `min_gain` in samples/s, stays under `cap`, keeps the largest tensor
    (n * elements_per_sample) under 2**31 elements and its peak under `margin` of
    `total_bytes`; an OOM ends the search like a full card. Throughput flattens long
    before memory runs out on a large GPU (the kernels are already saturated), and every
    doubling past that point only costs optimisation steps per epoch."""
    best: int | None = None
    best_sps = 0.0
    tried: list[dict] = []
    reason = f"reached the cap of {cap}"
    n = max(1, start)
    while n <= cap:
        if elements_per_sample and n * elements_per_sample >= ELEMENT_LIMIT:
            reason = f"batch {n} would hold a tensor of >= 2**31 elements"
            break
        try:
            sps, peak = run_step(n)
        except Exception as exc:  # noqa: BLE001 - only OOM is expected; others re-raise
            if not is_oom(exc):
                raise
            tried.append({"batch": n, "result": "oom"})
            reason = f"batch {n} ran out of memory"
            break
        rec = {"batch": n, "samples_per_s": round(sps, 1)}
        if peak is not None:
            rec["peak_mb"] = round(peak / 2**20, 1)
        tried.append(rec)
        if peak is not None and total_bytes and peak > margin * total_bytes:
            reason = f"batch {n} peaked above {margin:.0%} of the device's memory"
            break
        if best is not None and sps < best_sps * min_gain:
            reason = (
                f"throughput flattened: batch {n} gave {sps:.0f} samples/s, "
                f"{sps / best_sps - 1:+.0%} over batch {best}"
            )
            break
        best, best_sps = n, sps
        n *= 2
    return {
        "batch_size": best or 1,
        "reason": reason,
        "tried": tried,
        "cap": cap,
        "margin": margin,
        "min_gain": min_gain,
        "total_mb": None if total_bytes is None else round(total_bytes / 2**20, 1),
    }


def scale_lr(lr: float, batch: int, reference: int, optimizer: str) -> tuple[float, str]:
    """The learning rate for an effective batch other than the one `lr` was tuned for:
    square-root scaling for Adam/AdamW (the rule that keeps the optimiser's SDE the same
    for adaptive methods, Malladi et al. 2022), linear for SGD (Goyal et al. 2017)."""
    if batch == reference:
        return lr, "none"
    if optimizer == "sgd":
        return lr * batch / reference, "linear"
    return lr * math.sqrt(batch / reference), "sqrt"
