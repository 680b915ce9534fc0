"""`kitstrain fit`: set a run up (store, options, split, model, batch, loader), then
`Trainer(...).run()`. One process per GPU under torchrun (DDP); a plain process otherwise.

The room: `config` (what is asked, resolved, returned), `rundir` (the run directory, its
lock and checkpoints), `distributed` (ranks and collectives), `memory` (precision, OOM,
batch search, lr scaling), `optim` (optimizer and schedule registries), `log` (metrics,
TensorBoard, progress) and `trainer` (the loop)."""

from __future__ import annotations

import json
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
from kitsprep.labels import LabelSet
from kitsprep.progress import Progress
from kitsprep.store import CRC_ON_READ, StoreInfo, open_store
from kitstrain import __version__
from kitstrain.core import rundir
from kitstrain.core.config import TrainConfig
from kitstrain.core.precision import amp_dtype
from kitstrain.data.augment import AugmentConfig, compile_kernels
from kitstrain.data.loaders import (
    batches_per_epoch,
    close_loader,
    make_train_loader,
)
from kitstrain.data.patches import resolve_patch
from kitstrain.data.samplers import label_weights_by_value
from kitstrain.data.splits import Split, make_split
from kitstrain.model.layers import pad_input_channels
from kitstrain.model.losses import LOSSES, make_loss
from kitstrain.model.networks import DEFAULT_NETWORK, build_network, network_config
from kitstrain.model.unet import NORMS, UNetConfig, count_parameters
from kitstrain.train import distributed
from kitstrain.train.config import (
    RESUMABLE_OVERRIDES,
    FitConfig,
    FitResult,
    Plan,
    State,
    step_limit,
)
from kitstrain.train.distributed import Dist, setup_distributed
from kitstrain.train.log import RunLog, tensorboard_writer
from kitstrain.train.memory import choose_batch_size, effective_lr
from kitstrain.train.optim import OPTIMIZERS, SCHEDULES, make_optimizer
from kitstrain.train.trainer import Trainer

__all__ = ["FitConfig", "FitResult", "fit"]


def fit(
    cfg: FitConfig,
    show_progress: bool = True,
    echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    on_validation: Callable[[Path], object] | None = None,
) -> FitResult:
    """Train (or --resume) a run; `on_validation(run_dir)` runs on rank 0 after each
    validation (the CLI draws the curves there). Under DDP a rank that fails takes the
    others down at once (`distributed.shutdown`), and a rank that failed only because a
    peer did says so in one line instead of a collective's traceback."""
    d, device = setup_distributed(cfg.device)
    info = open_store(cfg.store)
    run_dir = rundir.prepare(cfg.out, cfg.resume, d.main)
    failed = True
    try:
        result = _fit(cfg, d, device, info, run_dir, show_progress, echo, on_validation)
        failed = False
        return result
    except Exception as exc:
        peer = distributed.peer_failure_error(exc, d)
        if peer is not None:
            raise peer from None
        raise
    finally:
        if d.main:
            rundir.release_lock(run_dir)
            rundir.drop_unstarted(run_dir)
        distributed.shutdown(d, failed)


def _fit(
    cfg: FitConfig,
    d: Dist,
    device: torch.device,
    info: StoreInfo,
    run_dir: Path,
    show_progress: bool,
    echo: Callable[[str], None],
    on_validation: Callable[[Path], object] | None,
) -> FitResult:
    # ---- options, split, model: what the run is
    recorded = rundir.read_config(run_dir) if cfg.resume else None  # read once
    tc = resolve_train_config(cfg, run_dir, recorded)
    check_names(tc)
    check_store(cfg, info, run_dir, recorded)
    label_weights = label_weights_by_value(
        info.labels, tc.label_weights, strict="label_weights" in cfg.explicit
    )
    split = resolve_split(cfg, info, tc, run_dir)
    seed_everything(tc.seed + d.rank)
    dtype = amp_dtype(device, tc.precision)
    model, mcfg = build_training_model(info, tc, device)
    patch = resolve_patch(tc.patch, info.size, mcfg.contract.divisor)
    loss_fn = make_loss(tc.loss, info.labels, regions=tc.regions)
    batch_size, batch_info, lr_info = batch_and_lr(
        cfg, run_dir, recorded, tc, model, loss_fn, patch, info, device, dtype, d
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # peaks from here: not the search's tries
        torch.backends.cudnn.benchmark = True  # shapes are fixed now: choose kernels once
    plan = make_plan(run_dir, info, split, tc, lr_info, d, device, dtype, patch, batch_size)

    # ---- optimizer and state (restored on --resume), then the DDP and compile wrappers
    optimizer = make_optimizer(model, plan.run_tc)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    state = State(micro_batch=batch_size)
    if cfg.resume:
        state = restore_or_restart(run_dir, model, optimizer, scaler, device, d, state, echo)
    if d.world > 1:
        model = distributed.wrap_ddp(model, device)
    if tc.compile:
        # after the DDP wrap: DDPOptimizer splits the graph at bucket boundaries, so the
        # gradient all-reduce overlaps the backward pass
        model = torch.compile(model)

    if d.main and not cfg.resume:
        record_run(plan, cfg, mcfg, label_weights, batch_info, lr_info)
    if d.main:
        announce(plan, cfg, model, batch_info, lr_info, state, echo)
    done = finished(plan, cfg, state, echo)
    if done is not None:
        return done

    # ---- train
    loader = train_loader(cfg, plan, label_weights, state)
    try:
        with RunLog(
            run_dir,
            main=d.main,
            echo=echo,
            writer=tensorboard_writer(run_dir, echo) if d.main else None,
            progress=Progress(enabled=show_progress and d.main).start(
                plan.total_steps, "fit", unit="step", initial=state.step
            ),
            unit=plan.unit,
            on_validation=on_validation,
        ) as log:
            return Trainer(plan, model, optimizer, scaler, loss_fn, state, loader, log).run()
    finally:
        close_loader(loader)


# --------------------------------------------------------------------------- setup


def resolve_train_config(cfg: FitConfig, run_dir: Path, recorded: dict | None) -> TrainConfig:
    """A resumed run (`recorded`: its config.json) keeps its recorded options; only limits
    and loader knobs may change."""
    if recorded is None:
        return cfg.train
    saved = rundir.from_record(
        run_dir, rundir.CONFIG, lambda r: TrainConfig(**r["train"]), recorded
    )
    changed = {
        k for k in cfg.explicit - RESUMABLE_OVERRIDES if getattr(cfg.train, k) != getattr(saved, k)
    }
    if changed:
        raise KitsError(
            f"--resume keeps the run's recorded options, but "
            f"{', '.join(sorted(changed))} differ from {run_dir}/config.json; drop "
            "those flags, or start a new run"
        )
    return replace(saved, **{k: getattr(cfg.train, k) for k in cfg.explicit & RESUMABLE_OVERRIDES})


def check_names(tc: TrainConfig) -> None:
    """Options that name a registry entry (loss, norm, optimizer, schedule) name one: the
    CLI's choices say so already, a Python caller's config or an edited record is checked
    here, beside the registries."""
    for option, value, registry in (
        ("optimizer", tc.optimizer, OPTIMIZERS),
        ("schedule", tc.schedule, SCHEDULES),
        ("loss", tc.loss, LOSSES),
        ("norm", tc.norm, NORMS),
    ):
        if value not in registry:
            raise KitsError(
                f"--{option} {value!r} unknown; expected one of {', '.join(sorted(registry))}"
            )


def resolve_split(cfg: FitConfig, info: StoreInfo, tc: TrainConfig, run_dir: Path) -> Split:
    """The recorded split on --resume; a new (seeded) one otherwise."""
    if cfg.resume:
        return rundir.from_record(
            run_dir, rundir.SPLIT, Split.from_json, rundir.read_split(run_dir)
        )
    return make_split(info, cfg.train_cases, cfg.val_cases, seed=tc.seed)


def check_store(cfg: FitConfig, info: StoreInfo, run_dir: Path, config: dict | None) -> None:
    """A --resume (`config`: the run's config.json) must train on the store the run trained
    on: same labels, same data."""
    if config is None:
        return
    # before the fingerprint: a store rebuilt under another --edition has the same sources
    recorded_labels = rundir.from_record(
        run_dir, rundir.CONFIG, lambda c: c["store_attrs"]["labels"], config
    )
    trained = LabelSet.from_json(json.dumps(recorded_labels))
    if trained != info.labels:
        raise KitsError(
            f"--resume: {run_dir} trained on {trained.edition} labels, but "
            f"{cfg.store} holds {info.labels.edition} labels; resume with a "
            f"{trained.edition} store (the run's own), or start a new run without "
            "--resume on this one"
        )
    recorded = config["store_fingerprint"]
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


def build_training_model(
    info: StoreInfo, tc: TrainConfig, device: torch.device, network: str = DEFAULT_NETWORK
) -> tuple[torch.nn.Module, Any]:
    """The network called ``network`` (a name in `networks.NETWORKS`) for the store's
    labels, channels-last on `device`, with its config (the run records it). What the
    trainer feeds it is checked against the network's contract before anything runs."""
    mcfg = network_config(
        network,
        in_channels=1 + 2 * tc.context,
        num_classes=info.num_classes,
        width=tc.width,
        depth=tc.depth,
        norm=tc.norm,
        deep_supervision=tc.deep_supervision,
        regions=tc.regions,
        region_writes=info.labels.write_order if tc.regions else (),
    )
    contract = mcfg.contract
    if contract.spatial_dims != 2:
        raise KitsError(
            f"network {network!r} is {contract.spatial_dims}D, but `kitstrain fit` trains on "
            "2D slices of the store; choose a 2D network"
        )
    outputs = len(info.labels.regions) if tc.regions else info.num_classes
    if (contract.in_channels, contract.out_channels) != (1 + 2 * tc.context, outputs):
        raise ValueError(  # the network ignored the options: a bug in its config
            f"network {network!r} takes {contract.in_channels} channel(s) and gives "
            f"{contract.out_channels}; expected {1 + 2 * tc.context} and {outputs}"
        )
    d = contract.divisor
    if info.size % d:
        raise KitsError(
            f"store slices are {info.size}x{info.size}, which a depth-{tc.depth} "
            f"{network} (sides divisible by {d}) cannot take; rebuild with --size "
            f"{info.size // d * d or d} or lower the depth"
        )
    # channels_last everywhere: cuDNN's fast NHWC kernels on GPUs, oneDNN's on CPUs
    # (measured on 2 cores at 64x64: batch-norm U-Net steps ~15 % faster, inference ~1.5x)
    model = build_network(network, mcfg).to(device).to(memory_format=contract.memory_format)
    if device.type == "cuda":
        pad_input_channels(model)  # 5 context channels -> 8 for tensor-core kernels
    return model, mcfg


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
    step 0, with the config and split it recorded."""
    if rundir.checkpoint_path(run_dir, "last").is_file():
        return rundir.restore_training(run_dir, model, optimizer, scaler, d.rank, device)
    if d.main:
        echo(
            f"{run_dir} has no checkpoint yet (stopped before its first one): starting it again "
            "from step 0 with its recorded options and split"
        )
    return fresh


def batch_and_lr(
    cfg: FitConfig,
    run_dir: Path,
    recorded: dict | None,
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
        return rundir.from_record(
            run_dir,
            rundir.CONFIG,
            lambda r: (int(r["batch_size"]), r["batch"], r["lr_scaling"]),
            recorded,
        )
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


def record_run(
    plan: Plan,
    cfg: FitConfig,
    mcfg: UNetConfig,
    label_weights: dict[int, float],
    batch_info: dict,
    lr_info: dict,
) -> None:
    """config.json (every resolved option, the store, the environment) and split.json."""
    info, tc = plan.info, plan.tc
    record = {
        "store": str(Path(cfg.store).resolve()),
        "store_fingerprint": info.fingerprint,
        "store_attrs": {
            "window": json.loads(info.window.to_json()),
            "size": info.size,
            "num_classes": info.num_classes,
            "labels": json.loads(info.labels.to_json()),
        },
        "label_weights_applied": {
            n: label_weights[v] for n, v in info.labels.labels if v in label_weights
        },
        "train": asdict(tc),
        "model": asdict(mcfg),
        "context": tc.context,
        "batch": batch_info,
        "batch_size": plan.batch_size,
        "patch_size": plan.patch,
        "lr_scaling": lr_info,
        "val_batch_size": plan.val_batch,
        "steps_per_epoch": plan.steps_per_epoch,
        "total_steps": plan.total_steps,
        "device": str(plan.device),
        "env": environment(plan.device, plan.d),
    }
    rundir.write_json(plan.run_dir / rundir.CONFIG, record)
    rundir.write_json(plan.run_dir / rundir.SPLIT, plan.split.to_json())


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


def train_loader(
    cfg: FitConfig, plan: Plan, label_weights: dict[int, float], state: State
) -> torch.utils.data.DataLoader:
    """One loader for the whole run: workers, their open store and their kernels persist
    across epochs; each epoch is `sampler.set_epoch`, resumable mid-epoch."""
    tc, patch = plan.tc, plan.patch
    if tc.augment and tc.workers > 0:
        compile_kernels()  # before the workers fork: they inherit it, none compiles
    return make_train_loader(
        cfg.store,
        plan.info,
        plan.split.train,
        batch_size=plan.batch_size,
        workers=tc.workers,
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
    if batch_info.get("reason") and batch_info.get("mode") == "auto":
        echo(f"batch {plan.batch_size} (auto): {batch_info['reason']}")
    if not CRC_ON_READ:
        echo(
            "note: without ISA-L the loader does not check each slice's CRC-32; "
            f"`kitsprep verify {cfg.store}` is the check"
        )
