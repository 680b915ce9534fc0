"""Precision choice: which autocast dtype each --precision gives on each device."""

from __future__ import annotations

import pytest
import torch

from kitsprep.errors import KitsError
from kitstrain.core.precision import amp_dtype

CPU = torch.device("cpu")


def test_cpu_precisions() -> None:
    assert amp_dtype(CPU, "auto") is None  # fp32 unless asked
    assert amp_dtype(CPU, "fp32") is None
    assert amp_dtype(CPU, "bf16") is torch.bfloat16


def test_fp16_on_cpu_names_the_fix() -> None:
    with pytest.raises(KitsError, match="needs a CUDA device.*use --precision bf16 or fp32"):
        amp_dtype(CPU, "fp16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_auto_is_bf16_where_supported() -> None:
    dev = torch.device("cuda")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert amp_dtype(dev, "auto") is expected
    assert amp_dtype(dev, "fp32") is None
    assert amp_dtype(dev, "fp16") is torch.float16
