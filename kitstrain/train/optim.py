"""The optimizers and learning-rate schedules `--optimizer` and `--schedule` name: registries,
so the CLI's choices, the preset check and the code that builds them are one list."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kitstrain.core.config import TrainConfig
    from kitstrain.core.rundir import State

Params = Iterable[torch.nn.Parameter]


def _sgd(
    params: Params, lr: float, weight_decay: float, fused: bool | None = None
) -> torch.optim.Optimizer:
    # nnU-Net's SGD: Nesterov momentum 0.99 (its foreach step syncs no host either)
    return torch.optim.SGD(params, lr=lr, momentum=0.99, nesterov=True, weight_decay=weight_decay)


# fused=True (CUDA): one kernel per step, and with fp16's scaler no host sync for the
# inf check (the scaler hands found_inf to the kernel instead of reading it)
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": lambda params, lr, wd, fused=None: torch.optim.Adam(
        params, lr=lr, weight_decay=wd, fused=fused
    ),
    "adamw": lambda params, lr, wd, fused=None: torch.optim.AdamW(
        params, lr=lr, weight_decay=wd, fused=fused
    ),
    "sgd": _sgd,
}

# the learning rate after warm-up as a share of the peak, at progress q (0..1) of the rest
SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda q: 1.0,
    "cosine": lambda q: 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * q)),  # ends at 2 %
    "poly": lambda q: (1 - q) ** 0.9,  # nnU-Net's
}


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """`tc.optimizer` over the model's parameters at `tc.lr`; fused on CUDA."""
    params = list(model.parameters())
    cuda = bool(params) and all(p.device.type == "cuda" for p in params)
    return OPTIMIZERS[tc.optimizer](params, tc.lr, tc.weight_decay, fused=True if cuda else None)


def progress_of(state: State, total_steps: int, tc: TrainConfig, reserve_s: float = 0.0) -> float:
    """How far the run is, by whichever limit ends it first: steps or wall time. Training
    under a time limit stops `reserve_s` early for the final validation, so the schedule
    ends there, not at the limit (else the last stretch of annealing is never reached)."""
    p = state.step / max(1, total_steps)
    if tc.time_limit:
        p = max(p, state.elapsed / max(1e-6, tc.time_limit - reserve_s))
    return min(1.0, p)


def lr_at(p: float, tc: TrainConfig) -> float:
    """The learning rate at progress `p`: a linear warm-up over `tc.warmup` of the run,
    then `tc.schedule` over the rest."""
    if tc.warmup > 0 and p < tc.warmup:
        return tc.lr * max(p / tc.warmup, 0.01)
    q = (p - tc.warmup) / max(1e-8, 1 - tc.warmup)
    return tc.lr * SCHEDULES[tc.schedule](q)


def apply_gradients(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    grad_clip: float | None,
) -> None:
    """The end of a step, once its gradients are in: unscale (fp16), clip, step, zero.
    The trainer and the GPU ceiling benchmark step alike through here."""
    if scaler:
        scaler.unscale_(optimizer)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
