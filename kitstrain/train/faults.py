"""Fault injection for tests, kept out of the training step: when a `KITS_INJECT_*`
variable is set, a forward pre-hook on the model raises the asked-for error once, at the
asked-for step; otherwise nothing is installed and the step runs no check at all.

KITS_INJECT_OOM_AT_STEP=N raises one CUDA out-of-memory error in step N's forward pass,
KITS_INJECT_ERROR_AT_STEP=N one other error; KITS_INJECT_RANK=R limits either to rank R.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["install_faults"]

_VARS = ("KITS_INJECT_OOM_AT_STEP", "KITS_INJECT_ERROR_AT_STEP")


@dataclass
class _Faults:
    at: dict[str, int]  # variable -> the step it fires at
    fired: set[str] = field(default_factory=set)

    def fire(self, step: int) -> None:
        for var, at in self.at.items():
            if at == step and var not in self.fired:
                self.fired.add(var)  # once: the retried step must go through
                if var == "KITS_INJECT_OOM_AT_STEP":
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected for a test)")
                raise RuntimeError("failure injected for a test")


def install_faults(model: torch.nn.Module, step: Callable[[], int], rank: int) -> bool:
    """Hook the faults the environment asks for onto `model` (the unwrapped network);
    False, and nothing installed, when it asks for none or for another rank."""
    at = {v: int(os.environ[v]) for v in _VARS if os.environ.get(v) is not None}
    only = os.environ.get("KITS_INJECT_RANK")
    if not at or (only is not None and int(only) != rank):
        return False
    faults = _Faults(at)
    model.register_forward_pre_hook(lambda _module, _args: faults.fire(step()))
    return True
