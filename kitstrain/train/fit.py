"""`kitstrain fit`: set a run up (store, options, split, model, batch, loader), then
`Trainer(...).run()`. One process per GPU under torchrun (DDP); a plain process otherwise.

The room: `config` (what is asked, resolved, returned), `setup` (the steps below, by
name), `distributed` (ranks and collectives), `memory` (OOM, batch search, lr scaling),
`optim` (optimizer and schedule registries), `log` (metrics, TensorBoard, progress),
`trainer` (the loop), `evaluate` (validation and when it is due) and `faults` (test-only
fault injection, outside the step). The run directory and its record are `kitstrain.core`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from kitsprep.errors import KitsError
from kitsprep.progress import Progress
from kitsprep.store import StoreInfo, open_store
from kitstrain.core import rundir
from kitstrain.core.config import TrainConfig
from kitstrain.core.precision import resolve_precision
from kitstrain.core.record import read_record
from kitstrain.data.loaders import (
    close_loader,
)
from kitstrain.data.patches import resolve_patch
from kitstrain.data.samplers import label_weights_by_value
from kitstrain.model.layers import pad_input_channels
from kitstrain.model.losses import make_loss
from kitstrain.model.networks import DEFAULT_NETWORK, build_network, network_config
from kitstrain.train import distributed
from kitstrain.train.config import (
    FitConfig,
    FitResult,
    State,
)
from kitstrain.train.distributed import Dist, setup_distributed
from kitstrain.train.feed import loader_plan, train_loader
from kitstrain.train.log import RunLog, tensorboard_writer
from kitstrain.train.optim import make_optimizer
from kitstrain.train.setup import (
    announce,
    batch_and_lr,
    check_names,
    check_store,
    finished,
    make_plan,
    plan_budget,
    record_run,
    resolve_split,
    resolve_train_config,
    restore_or_restart,
    seed_everything,
)
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
    d, device = setup_distributed(cfg.device, cfg.train.dist_timeout)
    distributed.watch(d, echo=lambda line: print(f"Error: {line}", file=sys.stderr))
    run_dir: Path | None = None
    failed = True
    try:
        info = open_store(cfg.store)
        # rank 0 chooses (and locks) the run directory; the others take its choice
        run_dir = distributed.from_main(d, lambda: rundir.prepare(cfg.out, cfg.resume, True))
        if cfg.resume and rundir.unstarted(run_dir):
            if d.main:
                echo(
                    f"{run_dir} holds no run record yet (stopped before it wrote config.json): "
                    "starting it afresh with the options given"
                )
            cfg = replace(cfg, resume=False)
        result = _fit(cfg, d, device, info, run_dir, show_progress, echo, on_validation)
        failed = False
        distributed.finished(d)
        return result
    except BaseException as exc:
        distributed.report_failure(d, exc)  # every other rank stops within a second
        peer = distributed.peer_failure_error(exc, d)
        if peer is not None:
            raise peer from None
        raise
    finally:
        if d.main and run_dir is not None:
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
    recorded = read_record(run_dir) if cfg.resume else None  # read once
    tc = resolve_train_config(cfg, run_dir, recorded)
    check_names(tc)
    check_store(cfg, info, run_dir, recorded)
    label_weights = label_weights_by_value(
        info.labels, tc.label_weights, strict="label_weights" in cfg.explicit
    )
    split, fold = resolve_split(cfg, info, tc, run_dir, recorded, d.main, echo)
    seed_everything(tc.seed + d.rank)
    dtype, precision_reason = resolve_precision(device, tc.precision)
    model, mcfg = build_training_model(info, tc, device, tc.network)
    patch = resolve_patch(tc.patch, info.size, mcfg.contract.divisor)
    loss_fn = make_loss(tc.loss, info.labels, regions=tc.regions)
    batch_size, batch_info, lr_info = batch_and_lr(
        cfg, run_dir, recorded, tc, model, loss_fn, patch, info, device, dtype, d
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # peaks from here: not the search's tries
        torch.backends.cudnn.benchmark = True  # shapes are fixed now: choose kernels once
    plan = make_plan(run_dir, info, split, tc, lr_info, d, device, dtype, patch, batch_size)
    plan = loader_plan(plan, precision_reason)
    plan = plan_budget(plan, model, recorded)

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
        record_run(plan, cfg, mcfg, label_weights, batch_info, lr_info, fold)
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


# --------------------------------------------------------------------------- model
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
