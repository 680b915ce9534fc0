"""Mixed precision: the names `--precision` takes and the autocast dtype each means on a
device. Training, validation and inference agree because they all ask here."""

from __future__ import annotations

import torch

from kitsprep.errors import KitsError

__all__ = [
    "PRECISIONS",
    "Amp",
    "amp_dtype",
    "cpu_bf16_flags",
    "cuda_bf16_native",
    "resolve_precision",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# Mixed precision on CUDA: True (float16 autocast), False, or the autocast dtype itself
# (e.g. torch.bfloat16, to validate in the precision training uses). Ignored on CPU.
Amp = bool | torch.dtype


def cuda_bf16_native(device: torch.device | None = None) -> bool:
    """bfloat16 in the GPU's hardware (Ampere and later), not emulated: torch's plain
    `is_bf16_supported()` also says yes for a V100 or T4, which run it slowly."""
    import inspect

    check = torch.cuda.is_bf16_supported
    if "including_emulation" in inspect.signature(check).parameters:
        return bool(check(including_emulation=False))
    return torch.cuda.get_device_capability(device)[0] >= 8  # older torch: Ampere and up


CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The CPU flags that run bfloat16 natively (AMX, AVX512-BF16); [] where none, or
    where /proc/cpuinfo is not there to say."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in CPU_BF16_FLAGS if flag in have]
    except OSError:
        pass
    return []


def amp_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for `precision`; None means plain fp32 (see `resolve_precision`)."""
    return resolve_precision(device, precision)[0]


def resolve_precision(device: torch.device, precision: str) -> tuple[torch.dtype | None, str]:
    """The autocast dtype for `precision` (None: plain fp32), and why, for the run log.

    "auto" is bf16 on GPUs that have it natively (no loss scaling needed), fp16 with a
    gradient scaler on older GPUs (bf16 emulated there is slow); on CPU, bf16 where the
    CPU has AMX or AVX512-BF16 (a training step 1.65-2.44x faster, benchmarks/precision.py)
    and fp32 elsewhere (emulated bf16 is slower than fp32)."""
    if precision == "fp32":
        return None, "fp32 (asked)"
    if precision == "auto":
        if device.type == "cuda":
            if cuda_bf16_native(device):
                return torch.bfloat16, "bf16 (auto: the GPU has native bfloat16)"
            return torch.float16, "fp16 + loss scaling (auto: the GPU has no native bfloat16)"
        flags = cpu_bf16_flags()
        if flags:
            return torch.bfloat16, f"bf16 (auto: the CPU has {', '.join(flags)})"
        return None, "fp32 (auto: the CPU has no AMX/AVX512-BF16; bf16 would be emulated)"
    if precision == "fp16":
        if device.type != "cuda":
            raise KitsError(
                "--precision fp16 needs a CUDA device (CPU autocast is bf16 only), "
                f"found device {device}; use --precision bf16 or fp32 on CPU"
            )
        return torch.float16, "fp16 + loss scaling (asked)"
    if precision == "bf16":
        if device.type == "cuda" and not cuda_bf16_native(device):
            raise KitsError(
                f"--precision bf16: this GPU ({torch.cuda.get_device_name(device)}) "
                "has no native bfloat16 (torch would emulate it, slowly); use --precision "
                "fp16 or auto"
            )
        return torch.bfloat16, "bf16 (asked)"
    raise KitsError(f"--precision must be one of {', '.join(PRECISIONS)}, found {precision!r}")
