"""GPU memory, explicitly: precision choice, batch-size search, out-of-memory detection."""

from __future__ import annotations

from collections.abc import Callable

import torch


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 where the GPU supports it (no loss scaling needed), else fp16; None = fp32."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


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
