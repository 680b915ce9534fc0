"""Fault injection for tests, kept out of the training step: when a `KITS_INJECT_*`
variable is set, a hook on the model fires the asked-for fault once, at the asked-for
step; otherwise nothing is installed and the step runs no check at all.

KITS_INJECT_OOM_AT_STEP=N raises one CUDA out-of-memory error in step N's forward pass,
KITS_INJECT_ERROR_AT_STEP=N one other error, KITS_INJECT_NAN_AT_STEP=N makes step N's
output (so its loss) NaN, KITS_INJECT_SLEEP_AT_STEP=N sleeps KITS_INJECT_SLEEP_S seconds
(default 600: past any collective's timeout) before step N's forward pass;
KITS_INJECT_RANK=R limits them to rank R. KITS_INJECT_CLOCK_SKEW_S=S starts the run's
clock S seconds early on that rank (`clock_skew`): it reaches a time limit first.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["clock_skew", "install_faults"]

_VARS = (
    "KITS_INJECT_OOM_AT_STEP",
    "KITS_INJECT_ERROR_AT_STEP",
    "KITS_INJECT_NAN_AT_STEP",
    "KITS_INJECT_SLEEP_AT_STEP",
)


def _mine(rank: int) -> bool:
    only = os.environ.get("KITS_INJECT_RANK")
    return only is None or int(only) == rank


@dataclass
class _Faults:
    at: dict[str, int]  # variable -> the step it fires at
    fired: set[str] = field(default_factory=set)

    def due(self, var: str, step: int) -> bool:
        if self.at.get(var) == step and var not in self.fired:
            self.fired.add(var)  # once: a retried step must go through
            return True
        return False

    def before(self, step: int) -> None:
        if self.due("KITS_INJECT_SLEEP_AT_STEP", step):
            time.sleep(float(os.environ.get("KITS_INJECT_SLEEP_S", "600")))
        if self.due("KITS_INJECT_OOM_AT_STEP", step):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected for a test)")
        if self.due("KITS_INJECT_ERROR_AT_STEP", step):
            raise RuntimeError("failure injected for a test")

    def after(self, step: int, output: object) -> object:
        if not self.due("KITS_INJECT_NAN_AT_STEP", step):
            return None  # the output as it is
        if isinstance(output, (list, tuple)):
            return type(output)(o * float("nan") for o in output)
        return output * float("nan")


def install_faults(model: torch.nn.Module, step: Callable[[], int], rank: int) -> bool:
    """Hook the faults the environment asks for onto `model` (the unwrapped network);
    False, and nothing installed, when it asks for none or for another rank. `step()` is
    the count of finished steps, as the fault's step number is counted."""
    at = {v: int(os.environ[v]) for v in _VARS if os.environ.get(v) is not None}
    if not at or not _mine(rank):
        return False
    faults = _Faults(at)
    model.register_forward_pre_hook(lambda _module, _args: faults.before(step()))
    if "KITS_INJECT_NAN_AT_STEP" in at:
        model.register_forward_hook(lambda _m, _a, out: faults.after(step(), out))
    return True


def clock_skew(rank: int) -> float:
    """Seconds this rank's run clock starts early (KITS_INJECT_CLOCK_SKEW_S); 0 normally."""
    value = os.environ.get("KITS_INJECT_CLOCK_SKEW_S")
    return float(value) if value is not None and _mine(rank) else 0.0
