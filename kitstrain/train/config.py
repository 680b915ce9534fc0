"""What a fit is asked to do (`FitConfig`), what it resolved to (`Plan`), where it is
(`State`, saved in checkpoints) and what it returns (`FitResult`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kitsprep.store import StoreInfo
from kitstrain.core.config import TrainConfig
from kitstrain.core.rundir import State
from kitstrain.data.splits import Split
from kitstrain.train.budget import ValidationPlan
from kitstrain.train.distributed import Dist


@dataclass(frozen=True)
class FitConfig:
    store: Path
    train: TrainConfig
    out: Path | None = None
    train_cases: str | None = None
    val_cases: str | None = None
    device: str = "auto"
    resume: bool = False
    explicit: frozenset[str] = frozenset()  # TrainConfig fields given on the command line
    fold: int | None = None  # a cross-validation fold (`train.folds`); None: a plain split
    folds: int | None = None  # None: the splits file's count, or 5 for new folds
    splits: Path | None = None  # None: splits.json in the run's parent folder


@dataclass(frozen=True)
class Plan:
    """The run as resolved at start-up: fixed from the first step to the last."""

    run_dir: Path
    info: StoreInfo
    split: Split
    tc: TrainConfig  # as recorded in config.json
    run_tc: TrainConfig  # what the optimizer and schedule use (the lr scaled to the batch)
    d: Dist
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None is fp32
    patch: int  # training patch side (the slice side for whole slices)
    batch_size: int  # per rank and step
    val_batch: int  # whole slices per validation batch
    samples_per_epoch: int  # over all ranks
    steps_per_epoch: int
    total_steps: int
    workers: int = 0  # loader workers per rank, resolved (`core.workers`)
    workers_reason: str = ""
    augment_side: str | None = None  # 'device' or 'workers'; None: no augmentation
    precision_reason: str = ""
    validation: ValidationPlan | None = None  # under --time-limit (`setup.plan_budget`)

    @property
    def unit(self) -> str:
        return "patches" if self.patch < self.info.size else "slices"

    @property
    def val_cases(self) -> list[str]:
        """The cases each in-training validation scores: the budget's subset, else all."""
        return list(self.validation.cases) if self.validation else list(self.split.val)


@dataclass
class FitResult:
    run_dir: Path
    steps: int
    epochs: int
    best_mean_dice: float
    last_val: dict | None
    stall: float
    stop_reason: str
    warning: str = ""  # why a time-limited run trained too little, and what to change


def step_limit(state: State, tc: TrainConfig, total_steps: int) -> str:
    """The step count ends the run at the same step on every rank: no communication."""
    if state.step >= total_steps:
        return "max_steps" if tc.max_steps and state.step >= tc.max_steps else "epochs"
    return ""
