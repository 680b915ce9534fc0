"""kitstrain: 2D U-Net training, scoring and prediction from a kitsprep slice store.

The Python API (README "Python API"): `Predictor` (a trained run as a function from CT to
labels), `open_store` and `SliceDataset` (the slice store in a loop of one's own). They are
imported on first use, so `import kitstrain` and `kitstrain --help` stay fast and load no
torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it
_API = {
    "Predictor": "kitstrain.api",
    "SliceDataset": "kitstrain.data.dataset",
    "open_store": "kitsprep.store",
}

__all__ = ["Predictor", "SliceDataset", "__version__", "open_store"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'kitstrain' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
