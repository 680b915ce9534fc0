"""`kitstrain fit`'s set-up, in named steps: the options (a resumed run keeps its
record's), the split, the store check, the batch and lr, the plan, the record, the loader,
and the start-up line. `fit.py` calls them top to bottom."""

from __future__ import annotations

import math
import platform
import random
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kitsprep.errors import KitsError
from kitsprep.store import CRC_ON_READ, StoreInfo
from kitstrain import __version__
from kitstrain.core import rundir
from kitstrain.core.config import RESUMABLE, TrainConfig
from kitstrain.core.record import FoldRecord, RunRecord, StoreAttrs, write_record
from kitstrain.data.loaders import batches_per_epoch
from kitstrain.data.splits import Split, check_split, make_split
from kitstrain.model.layers import NORMS
from kitstrain.model.losses import LOSSES
from kitstrain.model.networks import NETWORKS
from kitstrain.model.unet import count_parameters
from kitstrain.train import distributed
from kitstrain.train.budget import VALIDATIONS_PLANNED, ValidationPlan, plan_validation
from kitstrain.train.config import (
    FitConfig,
    FitResult,
    Plan,
    State,
    step_limit,
)
from kitstrain.train.distributed import Dist
from kitstrain.train.evaluate import seconds_per_slice
from kitstrain.train.folds import resolve_fold_split
from kitstrain.train.memory import choose_batch_size, effective_lr
from kitstrain.train.optim import OPTIMIZERS, SCHEDULES


def resolve_train_config(cfg: FitConfig, run_dir: Path, recorded: RunRecord | None) -> TrainConfig:
    """A resumed run (`recorded`: its config.json) keeps its recorded options; only limits
    and loader knobs may change."""
    if recorded is None:
        return cfg.train
    saved = recorded.train
    changed = {k for k in cfg.explicit - RESUMABLE if getattr(cfg.train, k) != getattr(saved, k)}
    if changed:
        raise KitsError(
            f"--resume keeps the run's recorded options, but "
            f"{', '.join(sorted(changed))} differ from {run_dir}/config.json; drop "
            "those flags, or start a new run"
        )
    return replace(saved, **{k: getattr(cfg.train, k) for k in cfg.explicit & RESUMABLE})


def check_names(tc: TrainConfig) -> None:
    """Options that name a registry entry (loss, norm, optimizer, schedule) name one: the
    CLI's choices say so already, a Python caller's config or an edited record is checked
    here, beside the registries."""
    for option, value, registry in (
        ("optimizer", tc.optimizer, OPTIMIZERS),
        ("schedule", tc.schedule, SCHEDULES),
        ("loss", tc.loss, LOSSES),
        ("norm", tc.norm, NORMS),
        ("network", tc.network, NETWORKS),
    ):
        if value not in registry:
            raise KitsError(
                f"--{option} {value!r} unknown; expected one of {', '.join(sorted(registry))}"
            )


def resolve_split(
    cfg: FitConfig,
    info: StoreInfo,
    tc: TrainConfig,
    run_dir: Path,
    recorded: RunRecord | None,
    main: bool,
    echo: Callable[[str], None],
) -> tuple[Split, FoldRecord | None]:
    """The recorded split (and fold) on --resume, checked as a new one is (sides disjoint,
    non-empty, in the store, labelled); else fold `--fold` of the folds (`train.folds`), or
    a new (seeded) split. Only the main rank writes a new splits.json."""
    if cfg.fold is not None and (cfg.train_cases is not None or cfg.val_cases is not None):
        raise KitsError(
            "--fold takes its cases from the folds; --train-cases/--val-cases choose them "
            "by hand: give one or the other"
        )
    if cfg.fold is None and (cfg.folds is not None or cfg.splits is not None):
        raise KitsError("--folds/--splits choose the folds of --fold; add --fold K (0-based)")
    if cfg.resume:
        kept = recorded.fold if recorded is not None else None
        if cfg.fold is not None and (kept is None or kept.fold != cfg.fold):
            was = "no fold" if kept is None else f"fold {kept.fold}"
            raise KitsError(
                f"--resume keeps the run's split, but --fold {cfg.fold} differs from "
                f"{run_dir}/config.json ({was}); drop --fold, or start a new run"
            )
        split = rundir.from_record(
            run_dir, rundir.SPLIT, Split.from_json, rundir.read_split(run_dir)
        )
        try:
            check_split(split, info)
        except KitsError as exc:
            raise KitsError(
                f"{run_dir / rundir.SPLIT}: {exc}; restore the file `kitstrain fit` wrote, "
                "or start a new run"
            ) from None
        return split, kept
    if cfg.fold is not None:
        split, fold = resolve_fold_split(
            info,
            cfg.fold,
            cfg.folds,
            cfg.splits,
            run_dir,
            tc.seed,
            write=main,
            echo=echo if main else lambda s: None,
        )
        check_split(split, info)
        return split, fold
    return make_split(info, cfg.train_cases, cfg.val_cases, seed=tc.seed), None


def check_store(cfg: FitConfig, info: StoreInfo, run_dir: Path, config: RunRecord | None) -> None:
    """A --resume (`config`: the run's config.json) must train on the store the run trained
    on: same labels, same data."""
    if config is None:
        return
    # before the fingerprint: a store rebuilt under another --edition has the same sources
    trained = config.store_attrs.labels if config.store_attrs is not None else None
    if trained is None:
        raise KitsError(
            f"{run_dir}/config.json records no label set (store_attrs.labels), so --resume "
            "cannot check the store; restore the file `kitstrain fit` wrote, or start a new run"
        )
    if trained != info.labels:
        raise KitsError(
            f"--resume: {run_dir} trained on {trained.edition} labels, but "
            f"{cfg.store} holds {info.labels.edition} labels; resume with a "
            f"{trained.edition} store (the run's own), or start a new run without "
            "--resume on this one"
        )
    recorded = config.store_fingerprint
    if recorded != info.fingerprint:
        raise KitsError(
            f"{cfg.store} is not the store {run_dir} trained on (fingerprint "
            f"{info.fingerprint}, recorded {recorded}); resume with that store"
        )


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global streams (each rank its own seed)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def samples_per_epoch(train_slices: int, size: int, patch: int) -> int:
    """An epoch sees as many pixels as the training slices hold: one sample per slice for
    whole slices, (size/patch)**2 per slice for patches. So `epochs` means the same with
    or without patches, and per-epoch validation stays a small share of the time (a pass
    of half-side patches costs ~0.2 of a whole-slice pass; validating after each would
    take ~25 % of the run)."""
    return max(1, math.ceil(train_slices * (size / patch) ** 2))


def restore_or_restart(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
    d: Dist,
    fresh: State,
    echo: Callable[[str], None],
) -> State:
    """The state of last.pt; a run killed before its first checkpoint starts again from
    step 0, with the config and split it recorded. The metrics log is cut back to that
    step (the steps redone are logged once), and a best export that is not best.pt's is
    written again from it."""
    if rundir.checkpoint_path(run_dir, "last").is_file():
        state = rundir.restore_training(run_dir, model, optimizer, scaler, d.rank, device)
        if d.main:
            rundir.cut_metrics(run_dir, state.step)
            rundir.repair_export(run_dir)
        return state
    if d.main:
        rundir.cut_metrics(run_dir, 0)
        echo(
            f"{run_dir} has no checkpoint yet (stopped before its first one): starting it again "
            "from step 0 with its recorded options and split"
        )
    return fresh


def batch_and_lr(
    cfg: FitConfig,
    run_dir: Path,
    recorded: RunRecord | None,
    tc: TrainConfig,
    model: torch.nn.Module,
    loss_fn: Callable,
    patch: int,
    info: StoreInfo,
    device: torch.device,
    dtype: torch.dtype | None,
    d: Dist,
) -> tuple[int, dict, dict]:
    """The batch size, how it was chosen, and the learning rate for it. A resumed run
    (`recorded`: its config.json) keeps its recorded ones (the steps must not change); a
    new one searches (`auto` on CUDA, the same batch on every rank) and scales the lr to
    the batch."""
    if recorded is not None:
        if recorded.batch_size is None:
            raise KitsError(
                f"{run_dir}/config.json records no batch_size, so --resume cannot keep the "
                "run's steps; restore the file `kitstrain fit` wrote, or start a new run"
            )
        return recorded.batch_size, recorded.batch, recorded.lr_scaling
    batch_size, batch_info = choose_batch_size(
        tc,
        model,
        loss_fn,
        patch,
        info.num_classes,
        device,
        dtype,
        smallest=lambda n: distributed.smallest(d, device, n),
    )
    return batch_size, batch_info, effective_lr(tc, batch_size, d.world, cfg.explicit)


def make_plan(
    run_dir: Path,
    info: StoreInfo,
    split: Split,
    tc: TrainConfig,
    lr_info: dict,
    d: Dist,
    device: torch.device,
    dtype: torch.dtype | None,
    patch: int,
    batch_size: int,
) -> Plan:
    """The run's fixed numbers: steps per epoch and in all, the validation batch."""
    train_slices = int(sum(info.cases[c].slices for c in split.train))
    samples = tc.samples_per_epoch or samples_per_epoch(train_slices, info.size, patch)
    steps_per_epoch = batches_per_epoch(samples, batch_size, d.world)
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    return Plan(
        run_dir=run_dir,
        info=info,
        split=split,
        tc=tc,
        run_tc=replace(tc, lr=lr_info["lr"]),  # what the optimizer and schedule use
        d=d,
        device=device,
        dtype=dtype,
        patch=patch,
        batch_size=batch_size,
        # whole slices hold (size/patch)**2 times a patch's pixels: validate with as many
        # pixels per batch as a training batch, so validation fits wherever training does
        val_batch=max(1, batch_size * patch * patch // (info.size * info.size)),
        samples_per_epoch=samples,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
    )


def plan_budget(plan: Plan, model: torch.nn.Module, recorded: RunRecord | None) -> Plan:
    """Under --time-limit, the cases in-training validation covers (`budget.plan_validation`,
    priced by timing validation slices on this run's model and device); a resumed run keeps
    the cases its record names, so its curves compare. Without a limit, the plan as it is."""
    tc, info = plan.tc, plan.info
    if not tc.time_limit:
        return plan
    sps = distributed.from_main(plan.d, lambda: seconds_per_slice(model, plan))
    slices = {c: info.cases[c].slices for c in plan.split.val}
    kept = recorded.validation if recorded is not None else {}
    cases = [c for c in kept.get("cases", []) if c in slices]
    if cases:
        validation = ValidationPlan(
            tuple(cases),
            len(slices),
            sum(slices[c] for c in cases),
            sps,
            tc.val_budget * tc.time_limit,
            int(kept.get("planned", 1)),
            str(kept.get("note", "")),
        )
        return replace(plan, validation=validation)
    periodic = tc.epochs - 1 + (plan.total_steps // tc.val_every if tc.val_every else 0)
    validation = plan_validation(
        slices,
        tumour_voxels(info, plan.split.val),
        sps,
        tc.time_limit,
        tc.val_budget,
        min(VALIDATIONS_PLANNED, 1 + periodic),
        tc.seed,
        plan.d.world,
    )
    return replace(plan, validation=validation)


def tumour_voxels(info: StoreInfo, cases: list[str]) -> dict[str, int]:
    """Voxels of each case's most specific region (the last written back: the tumour of
    every KiTS edition), from the index alone."""
    labels = list(info.labels.regions[-1].labels)
    return {c: int(info.rows(c)["counts"][:, labels].sum()) for c in cases}


def record_run(
    plan: Plan,
    cfg: FitConfig,
    mcfg: Any,  # the network's config dataclass
    label_weights: dict[int, float],
    batch_info: dict,
    lr_info: dict,
    fold: FoldRecord | None,
) -> None:
    """split.json, then config.json (every resolved option, the store, the environment,
    the cross-validation fold)."""
    info, tc = plan.info, plan.tc
    record = RunRecord(
        store=str(Path(cfg.store).resolve()),
        store_fingerprint=info.fingerprint,
        store_attrs=StoreAttrs(
            info.window, info.size, info.num_classes, info.labels, info.spacing.mm
        ),
        label_weights_applied={
            n: label_weights[v] for n, v in info.labels.labels if v in label_weights
        },
        train=tc,
        model=asdict(mcfg),
        context=tc.context,
        batch=batch_info,
        batch_size=plan.batch_size,
        patch_size=plan.patch,
        lr_scaling=lr_info,
        val_batch_size=plan.val_batch,
        steps_per_epoch=plan.steps_per_epoch,
        total_steps=plan.total_steps,
        device=str(plan.device),
        workers=plan.workers,
        workers_reason=plan.workers_reason,
        augment_side=plan.augment_side,
        precision_reason=plan.precision_reason,
        env=environment(plan.device, plan.d),
        fold=fold,
        validation=plan.validation.to_json() if plan.validation else {},
    )
    # split.json first: config.json marks the run as started (a kill between the two
    # leaves a folder that a new run, or --resume, starts afresh: `rundir.unstarted`)
    rundir.write_json(plan.run_dir / rundir.SPLIT, plan.split.to_json())
    write_record(plan.run_dir, record)


def finished(
    plan: Plan, cfg: FitConfig, state: State, echo: Callable[[str], None]
) -> FitResult | None:
    """Resuming a run that already reached its limit trains no step: it says so. The state
    comes from the same checkpoint on every rank, so they all agree without a collective."""
    tc = plan.tc
    reason = cfg.resume and (
        step_limit(state, tc, plan.total_steps)
        or ("time_limit" if tc.time_limit and state.elapsed >= tc.time_limit else "")
    )
    if not reason:
        return None
    if plan.d.main:
        echo(
            f"{plan.run_dir} is finished ({reason} reached at step {state.step}); nothing to "
            "do. Raise --max-steps, --epochs or --time-limit to train it further"
        )
    last = rundir.last_validation(plan.run_dir)
    return FitResult(plan.run_dir, state.step, state.epoch, state.best, last, 0.0, "finished")


def environment(device: torch.device, d: Dist) -> dict:
    """Versions, platform and command line, for config.json: what reproduces the run."""
    import h5py
    import numba

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "numba": numba.__version__,
        "kits": __version__,
        "platform": platform.platform(),
        "device": str(device),
        "world_size": d.world,
        "argv": sys.argv,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def announce(
    plan: Plan,
    cfg: FitConfig,
    model: torch.nn.Module,
    batch_info: dict,
    lr_info: dict,
    state: State,
    echo: Callable[[str], None],
) -> None:
    """The start-up line: what will train, on what, how."""
    tc, d, p = plan.tc, plan.d, plan.patch
    train_slices = int(sum(plan.info.cases[c].slices for c in plan.split.train))
    scaled = lr_info["rule"] in ("sqrt", "linear")
    echo(
        f"run {plan.run_dir}: {len(plan.split.train)} train / {len(plan.split.val)} val "
        f"cases, {train_slices} train slices, batch {plan.batch_size} x {d.world} rank(s) "
        f"of {p}x{p} {plan.unit}, {plan.steps_per_epoch} steps/epoch, lr {plan.run_tc.lr:.3g}"
        + (
            f" ({lr_info['rule']} scaling from {tc.lr:.3g} at batch "
            f"{lr_info.get('reference_batch')})"
            if scaled
            else ""
        )
        + f", {count_parameters(model):,} parameters, device {plan.device}"
        + (f", {plan.dtype}".replace("torch.", "") if plan.dtype else ", fp32")
        + (f", resuming at step {state.step}" if cfg.resume else "")
    )
    echo(
        f"loader: {plan.workers} worker(s) per rank ({plan.workers_reason}); augmentation "
        + {"device": "on the device, after the copy", "workers": "in the workers"}.get(
            plan.augment_side or "", "off"
        )
        + f"; precision {plan.precision_reason}"
    )
    if plan.validation is not None and plan.validation.note:
        echo(plan.validation.note)
    if batch_info.get("reason") and batch_info.get("mode") == "auto":
        echo(f"batch {plan.batch_size} (auto): {batch_info['reason']}")
    if not CRC_ON_READ:
        echo(
            "note: without ISA-L the loader does not check each slice's CRC-32; "
            f"`kitsprep verify {cfg.store}` is the check"
        )
