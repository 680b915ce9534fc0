"""Mixed precision: the names `--precision` takes and the autocast dtype each means on a
device. Training, validation and inference agree because they all ask here."""

from __future__ import annotations

import torch

from kitsprep.errors import KitsError

__all__ = ["PRECISIONS", "Amp", "amp_dtype"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# Mixed precision on CUDA: True (float16 autocast), False, or the autocast dtype itself
# (e.g. torch.bfloat16, to validate in the precision training uses). Ignored on CPU.
Amp = bool | torch.dtype


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
    raise KitsError(f"--precision must be one of {', '.join(PRECISIONS)}, found {precision!r}")
