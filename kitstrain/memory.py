"""GPU memory, explicitly: precision choice, batch-size search, out-of-memory detection."""

from __future__ import annotations

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
            raise KitsError("--precision fp16 needs a CUDA device (CPU autocast is bf16 only), "
                            f"found device {device}; use --precision bf16 or fp32 on CPU")
        return torch.float16
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise KitsError(f"--precision bf16: this GPU ({torch.cuda.get_device_name(device)}) "
                            "has no bfloat16 support; use --precision fp16 or auto")
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


def find_batch_size(try_batch: Callable[[int], None], device: torch.device, *,
                    start: int = 2, limit: int = 1024, margin: float = 0.85) -> dict:
    """Double the batch until a real forward+backward (`try_batch(n)`) runs out of memory or
    its peak passes `margin` of the card; keep the last one under both. The margin leaves
    room for fragmentation, the optimizer's first step and the loader's pinned buffers."""
    total = torch.cuda.get_device_properties(device).total_memory
    best, tried, n = None, [], start
    while n <= limit:
        free_memory(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            try_batch(n)
            torch.cuda.synchronize(device)
        except Exception as exc:  # noqa: BLE001 - only OOM is expected; others re-raise
            if not is_oom(exc):
                raise
            tried.append({"batch": n, "result": "oom"})
            break
        peak = torch.cuda.max_memory_allocated(device)
        tried.append({"batch": n, "peak_mb": round(peak / 2**20, 1)})
        if peak > margin * total:
            break
        best = n
        n *= 2
    free_memory(device)
    if best is None:
        best = 1
    return {"batch_size": best, "tried": tried, "total_mb": round(total / 2**20, 1),
            "margin": margin}
