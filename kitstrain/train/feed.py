"""`kitstrain fit`'s loader, resolved on this machine: how many workers (`--workers auto`),
which side augments (`--augment-on`), and the one DataLoader for the whole run."""

from __future__ import annotations

from dataclasses import replace

import torch

from kitsprep.errors import KitsError
from kitstrain.core.config import TrainConfig
from kitstrain.core.workers import resolve_workers
from kitstrain.data.augment import AugmentConfig, compile_kernels
from kitstrain.data.loaders import make_train_loader
from kitstrain.train.config import FitConfig, Plan, State


def augment_side(tc: TrainConfig, device: torch.device) -> str | None:
    """Where augmentation runs: `--augment-on device` needs CUDA; `auto` is the device
    on CUDA (the CPU cannot feed a GPU with augmented samples), the workers elsewhere."""
    if not tc.augment:
        return None
    if tc.augment_on == "device" and device.type != "cuda":
        raise KitsError(
            f"--augment-on device needs a CUDA device, found device {device}; use "
            "--augment-on workers (or auto, which picks workers off CUDA)"
        )
    if tc.augment_on == "auto":
        return "device" if device.type == "cuda" else "workers"
    return tc.augment_on


def loader_plan(plan: Plan, precision_reason: str) -> Plan:
    """The plan with the loader resolved on this machine: workers (`--workers auto`: this
    rank's cores minus one), the side augmentation runs on, and why precision is what it
    is."""
    workers, why = resolve_workers(plan.tc.workers)
    return replace(
        plan,
        workers=workers,
        workers_reason=why,
        augment_side=augment_side(plan.tc, plan.device),
        precision_reason=precision_reason,
    )


def train_loader(
    cfg: FitConfig, plan: Plan, label_weights: dict[int, float], state: State
) -> torch.utils.data.DataLoader:
    """One loader for the whole run: workers, their open store and their kernels persist
    across epochs; each epoch is `sampler.set_epoch`, resumable mid-epoch."""
    tc, patch = plan.tc, plan.patch
    if plan.augment_side == "workers" and plan.workers > 0:
        compile_kernels()  # before the workers fork: they inherit it, none compiles
    return make_train_loader(
        cfg.store,
        plan.info,
        plan.split.train,
        batch_size=plan.batch_size,
        workers=plan.workers,
        augment_on=plan.augment_side or "workers",
        context=tc.context,
        augment=AugmentConfig(enabled=tc.augment),
        fg_fraction=tc.fg_fraction,
        label_weights=label_weights,
        seed=tc.seed,
        rank=plan.d.rank,
        world_size=plan.d.world,
        samples_per_epoch=plan.samples_per_epoch,
        pin_memory=plan.device.type == "cuda",
        epoch=state.epoch,
        start_batch=state.step_in_epoch,
        patch=patch,
    )
