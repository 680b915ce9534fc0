"""Which device a command runs on: one rule for fit, score, predict and the API."""

from __future__ import annotations

import torch

from kitsprep.errors import KitsError

__all__ = ["resolve_device"]


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when there is a GPU; an explicit `cuda` without one is a user error
    (silently falling back to CPU would turn minutes into hours)."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise KitsError(
                f"--device {name} asked for a GPU, but torch sees none (torch "
                f"{torch.__version__}); use --device cpu, or install a CUDA build "
                "of torch"
            )
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise KitsError(
                f"--device {name}: there are only {torch.cuda.device_count()} "
                "GPU(s); use --device cuda or a lower index"
            )
        return dev
    raise KitsError(f"unknown --device {name!r}; expected auto, cpu or cuda")
