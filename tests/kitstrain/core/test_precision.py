"""Precision choice: which autocast dtype each --precision gives on each device."""

from __future__ import annotations

import pytest
import torch

from kitsprep.errors import KitsError
from kitstrain.core import precision
from kitstrain.core.precision import amp_dtype, cpu_bf16_flags, resolve_precision

CPU = torch.device("cpu")


def test_cpu_precisions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: [])
    assert amp_dtype(CPU, "auto") is None  # fp32 where bf16 would be emulated
    assert "no AMX" in resolve_precision(CPU, "auto")[1]
    assert amp_dtype(CPU, "fp32") is None
    assert amp_dtype(CPU, "bf16") is torch.bfloat16


def test_cpu_auto_is_bf16_where_the_cpu_has_it_natively(monkeypatch, tmp_path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    )
    assert cpu_bf16_flags(str(info)) == ["amx_bf16", "avx512_bf16"]
    info.write_text("flags\t\t: fpu sse2 avx2\n")
    assert cpu_bf16_flags(str(info)) == []
    assert cpu_bf16_flags(str(tmp_path / "missing")) == []
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ["amx_bf16"])
    dtype, why = resolve_precision(CPU, "auto")
    assert dtype is torch.bfloat16 and "amx_bf16" in why


def test_cuda_bf16_means_native_not_emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    """A V100 or T4: torch's plain check says bf16 (emulated); auto takes fp16 + scaler."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(precision, "cuda_bf16_native", lambda device=None: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    assert resolve_precision(cuda, "auto")[0] is torch.float16
    with pytest.raises(KitsError, match="no native bfloat16.*fp16 or auto"):
        resolve_precision(cuda, "bf16")
    monkeypatch.setattr(precision, "cuda_bf16_native", lambda device=None: True)
    assert resolve_precision(cuda, "auto")[0] is torch.bfloat16


def test_fp16_on_cpu_names_the_fix() -> None:
    with pytest.raises(KitsError, match="needs a CUDA device.*use --precision bf16 or fp32"):
        amp_dtype(CPU, "fp16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_auto_is_bf16_where_supported() -> None:
    dev = torch.device("cuda")
    expected = torch.bfloat16 if precision.cuda_bf16_native(dev) else torch.float16
    assert amp_dtype(dev, "auto") is expected
    assert amp_dtype(dev, "fp32") is None
    assert amp_dtype(dev, "fp16") is torch.float16
