"""Device choice: auto takes a GPU where there is one; an explicit one that is missing, or
an unknown name, is one line."""

from __future__ import annotations

import pytest
import torch

from kitsprep.errors import KitsError
from kitstrain.core.device import resolve_device

CPU = torch.device("cpu")


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(KitsError, match="expected auto, cpu or cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(KitsError, match="--device cpu"):
            resolve_device("cuda")
