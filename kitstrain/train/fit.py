"""`kitstrain fit`: the training loop. Reads top to bottom: setup, train step, validation,
checkpoint. One process per GPU under torchrun (DDP); a plain process otherwise."""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from kitsprep.errors import KitsError
from kitsprep.labels import LabelSet
from kitsprep.store import CRC_ON_READ, StoreInfo, open_store
from kitstrain import __version__
from kitstrain.data.augment import AugmentConfig, compile_kernels
from kitstrain.data.loaders import (
    batches_per_epoch,
    close_loader,
    make_train_loader,
    next_batch,
    prefetch_for,
    shard_cases,
)
from kitstrain.data.patches import resolve_patch
from kitstrain.data.samplers import label_weights_by_value
from kitstrain.data.splits import Split, make_split
from kitstrain.infer.engine import resolve_device, score_store_cases
from kitstrain.metrics import mean_score
from kitstrain.model.losses import make_loss
from kitstrain.model.presets import PRESETS, TrainConfig
from kitstrain.model.unet import UNetConfig, build_model, pad_input_channels
from kitstrain.train import rundir as run
from kitstrain.train.memory import (
    AUTO_BATCH_CAP,
    amp_dtype,
    find_batch_size,
    free_memory,
    is_oom,
    peak_memory_mb,
    scale_lr,
)

STALL_WARN = 0.10  # loader stall share above which one warning names the fix
CHECKPOINT_EVERY_S = 120.0  # a `last` checkpoint at least this often, besides validations
VAL_SHARE = 0.10  # epoch-end validations skip while they would cost more than this
VAL_COST = 0.5  # a validated sample's cost in training samples (forward only,
# plus reading and counting on the host): estimates the final
# validation before any has run, so --time-limit holds
OOM_RECORD = "oom.json"  # a DDP rank's OOM: what --resume continues with
DIVERGED_STEPS = 20  # non-finite losses in a row that stop an fp16 (scaled) run
WEIGHTS_FILE = "model.safetensors"  # weights only, beside best.pt
RESUMABLE_OVERRIDES = {"max_steps", "time_limit", "epochs", "workers", "val_every", "log_every"}


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


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class State:
    """Everything a resumed run needs besides weights and optimizer: saved in checkpoints."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    elapsed: float = 0.0
    best: float = -1.0
    micro_batch: int = 0
    last_val_seconds: float = 0.0


@dataclass
class Window:
    """Running sums between two log lines: where the time went."""

    wait: float = 0.0
    slices: int = 0
    loss: torch.Tensor | float = 0.0  # summed on the device: no sync per step
    steps: int = 0
    t0: float = field(default_factory=time.perf_counter)


@dataclass
class FitResult:
    run_dir: Path
    steps: int
    epochs: int
    best_mean_dice: float
    last_val: dict | None
    stall: float
    stop_reason: str


# --------------------------------------------------------------------------- setup


def setup_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank if world > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return d, device


def prepare_run_dir(cfg: FitConfig, d: Dist) -> Path:
    if cfg.resume:
        run_dir = cfg.out or run.newest_run()
        if not (run_dir / run.CONFIG).is_file():
            raise KitsError(
                f"--resume: {run_dir} holds no run (config.json missing); start a "
                "new run without --resume"
            )
    else:
        run_dir = cfg.out or run.RUNS_ROOT / datetime.now().strftime("%Y%m%d-%H%M%S")
        if (run_dir / run.CONFIG).is_file():
            raise KitsError(
                f"{run_dir} already holds a run; continue it with --resume or choose another --out"
            )
    if d.main:
        if not run_dir.exists():
            _created_here.add(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KitsError(
                f"cannot create the run directory {run_dir} ({exc.strerror}); "
                "choose an --out in a writable folder"
            ) from None
        acquire_lock(run_dir)
    return run_dir


_created_here: set[Path] = set()  # run directories this process made (see drop_unstarted)


def drop_unstarted(run_dir: Path) -> None:
    """A run refused before it wrote its config (a bad option, a failed start) leaves no
    empty runs/<name>/ behind, when this process made the folder."""
    if run_dir in _created_here and not (run_dir / run.CONFIG).is_file():
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
    _created_here.discard(run_dir)


def acquire_lock(run_dir: Path) -> None:
    """One training process per run directory; a lock left by a killed run is taken over."""
    lock = run_dir / "lock"
    if lock.is_file():
        try:
            pid = int(lock.read_text().strip() or 0)
        except ValueError:
            pid = 0
        if pid and pid != os.getpid() and _alive(pid):
            raise KitsError(
                f"{run_dir} is in use by process {pid}; wait for it, stop it, or "
                "choose another --out"
            )
    lock.write_text(str(os.getpid()))


def release_lock(run_dir: Path) -> None:
    lock = run_dir / "lock"
    if lock.is_file() and lock.read_text().strip() == str(os.getpid()):
        lock.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split()[2] == "Z")


def resolve_train_config(cfg: FitConfig, run_dir: Path) -> TrainConfig:
    """A resumed run keeps its recorded options; only limits and loader knobs may change."""
    if not cfg.resume:
        return cfg.train
    recorded = run.read_config(run_dir)["train"]
    # runs recorded before patches existed trained on whole slices; before --precision,
    # a boolean `amp` meant autocast on CUDA only
    if "amp" in recorded:
        recorded["precision"] = "auto" if recorded.pop("amp") else "fp32"
    saved = run.from_record(
        run_dir, run.CONFIG, lambda r: TrainConfig(**{"patch": "full", **r}), recorded
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


def resolve_split(cfg: FitConfig, info: StoreInfo, tc: TrainConfig, run_dir: Path) -> Split:
    if cfg.resume:
        return run.from_record(run_dir, run.SPLIT, Split.from_json, run.read_split(run_dir))
    return make_split(info, cfg.train_cases, cfg.val_cases, seed=tc.seed)


def check_store(cfg: FitConfig, info: StoreInfo, run_dir: Path) -> None:
    if not cfg.resume:
        return
    config = run.read_config(run_dir)
    # before the fingerprint: a store rebuilt under another --edition has the same sources
    recorded_labels = config.get("store_attrs", {}).get("labels")
    if recorded_labels is None:
        raise KitsError(
            f"--resume: {run_dir} records no label set (an older kitstrain); start "
            "a new run without --resume"
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
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_training_model(info: StoreInfo, tc: TrainConfig, device: torch.device):
    writes = tuple(r.writes for r in info.labels.regions) if tc.regions else ()
    mcfg = UNetConfig(
        in_channels=1 + 2 * tc.context,
        num_classes=info.num_classes,
        width=tc.width,
        depth=tc.depth,
        norm=tc.norm,
        deep_supervision=tc.deep_supervision,
        regions=tc.regions,
        region_writes=writes,
    )
    if info.size % mcfg.divisor:
        raise KitsError(
            f"store slices are {info.size}x{info.size}, which a depth-{tc.depth} "
            f"U-Net cannot halve {tc.depth} times; rebuild with --size "
            f"{info.size // mcfg.divisor * mcfg.divisor or mcfg.divisor} or lower "
            "the depth"
        )
    # channels_last everywhere: cuDNN's fast NHWC kernels on GPUs, oneDNN's on CPUs
    # (measured on 2 cores at 64x64: batch-norm U-Net steps ~15 % faster, inference ~1.5x)
    model = build_model(mcfg).to(device).to(memory_format=torch.channels_last)
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


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    if tc.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=tc.lr, momentum=0.99, nesterov=True, weight_decay=tc.weight_decay
        )
    cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)


def reference_batch(tc: TrainConfig) -> int:
    """The per-step batch the preset's learning rate was tuned for."""
    ref = PRESETS.get(tc.preset, {}).get("batch_size", TrainConfig.batch_size)
    return int(ref) if isinstance(ref, int) else int(TrainConfig.batch_size)


def choose_batch_size(
    tc: TrainConfig,
    model,
    loss_fn,
    patch: int,
    info: StoreInfo,
    device: torch.device,
    dtype: torch.dtype | None,
    d: Dist,
) -> tuple[int, dict]:
    """`auto` on CUDA: the batch with the fastest per-sample step (`search_batch_size`),
    the same on every rank. On CPU memory is not the limit and throughput is flat: the
    preset's batch is kept."""
    if tc.batch_size != "auto":
        return int(tc.batch_size), {"mode": "fixed"}
    if device.type != "cuda":
        bs = reference_batch(tc)
        return bs, {"mode": "auto", "reason": f"CPU: kept the preset's batch of {bs}"}
    found = search_batch_size(model, loss_fn, tc, patch, info.num_classes, device, dtype)
    bs = found["batch_size"]
    if d.world > 1:  # every rank must agree on one batch size
        t = torch.tensor([bs], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        bs = int(t.item())
    return bs, {"mode": "auto", **found, "batch_size": bs}


def largest_activation(tc: TrainConfig, patch: int) -> int:
    """Elements per sample of the U-Net's largest tensor: the full-resolution decoder
    concatenation (2 x width channels), or the input when that is wider."""
    return max(2 * tc.width, 1 + 2 * tc.context) * patch * patch


def search_batch_size(
    model: torch.nn.Module,
    loss_fn,
    tc: TrainConfig,
    patch: int,
    num_classes: int,
    device: torch.device,
    dtype: torch.dtype | None,
    *,
    cap: int = AUTO_BATCH_CAP,
    steps: int = 3,
) -> dict:
    """Time real forward+backward steps at doubling batches (`memory.find_batch_size`),
    then put the model back exactly as it was: weights, batch-norm running statistics, no
    gradients. A try that fails mid-backward leaves partial gradients, and every try's
    forward moves the running statistics; neither may reach the first real step."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cuda = device.type == "cuda"
    channels = 1 + 2 * tc.context

    def run_step(n: int) -> tuple[float, int | None]:
        free_memory(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        x = torch.randn(n, channels, patch, patch, device=device).contiguous(
            memory_format=torch.channels_last
        )
        y = torch.randint(0, num_classes, (n, patch, patch), device=device)
        try:
            t0 = 0.0
            for i in range(steps + 1):  # the first is warm-up (kernel choice, allocator)
                if i == 1:
                    if cuda:
                        torch.cuda.synchronize(device)
                    t0 = time.perf_counter()
                with torch.autocast(
                    device.type, dtype=dtype or torch.float32, enabled=dtype is not None
                ):
                    loss = loss_fn(model(x), y)
                loss.backward()
                model.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)
            seconds = max(time.perf_counter() - t0, 1e-9)
        finally:
            model.zero_grad(set_to_none=True)
        return n * steps / seconds, torch.cuda.max_memory_allocated(device) if cuda else None

    total = torch.cuda.get_device_properties(device).total_memory if cuda else None
    try:
        return find_batch_size(
            run_step, cap=cap, total_bytes=total, elements_per_sample=largest_activation(tc, patch)
        )
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved)
        free_memory(device)


def effective_lr(tc: TrainConfig, batch_size: int, world: int, explicit: frozenset[str]) -> dict:
    """The learning rate for this run's effective batch (batch x ranks): the preset's lr
    is tuned for `reference_batch`; an --lr given on the command line is taken as is."""
    ref, eff = reference_batch(tc), batch_size * world
    if "lr" in explicit:
        lr, rule = tc.lr, "none (--lr given)"
    else:
        lr, rule = scale_lr(tc.lr, eff, ref, tc.optimizer)
    return {
        "lr": lr,
        "base_lr": tc.lr,
        "rule": rule,
        "reference_batch": ref,
        "effective_batch": eff,
    }


def environment(device: torch.device, d: Dist) -> dict:
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


# --------------------------------------------------------------------------- schedule


def progress_of(state: State, total_steps: int, tc: TrainConfig) -> float:
    """How far the run is, by whichever limit ends it first: steps or wall time."""
    p = state.step / max(1, total_steps)
    if tc.time_limit:
        p = max(p, state.elapsed / tc.time_limit)
    return min(1.0, p)


def lr_at(p: float, tc: TrainConfig) -> float:
    if tc.warmup > 0 and p < tc.warmup:
        return tc.lr * max(p / tc.warmup, 0.01)
    if tc.schedule == "constant":
        return tc.lr
    q = (p - tc.warmup) / max(1e-8, 1 - tc.warmup)
    if tc.schedule == "poly":
        return tc.lr * (1 - q) ** 0.9
    return tc.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * q)))


# --------------------------------------------------------------------------- step


def _inject_fault(step: int, rank: int) -> None:
    """Fault injection for tests: KITS_INJECT_OOM_AT_STEP=N raises one OOM at step N,
    KITS_INJECT_ERROR_AT_STEP=N one other error; KITS_INJECT_RANK=R limits either to rank R."""
    only = os.environ.get("KITS_INJECT_RANK")
    if only is not None and int(only) != rank:
        return
    for var, exc in (
        (
            "KITS_INJECT_OOM_AT_STEP",
            torch.cuda.OutOfMemoryError("CUDA out of memory (injected for a test)"),
        ),
        ("KITS_INJECT_ERROR_AT_STEP", RuntimeError("failure injected for a test")),
    ):
        at = os.environ.get(var)
        if at is not None and int(at) == step and not getattr(_inject_fault, var, False):
            setattr(_inject_fault, var, True)
            raise exc


def train_step(
    model,
    batch,
    loss_fn,
    optimizer,
    scaler,
    state: State,
    tc: TrainConfig,
    device: torch.device,
    dtype: torch.dtype | None,
    log: Callable[[dict], None],
    d: Dist,
    run_dir: Path,
) -> torch.Tensor:
    """One optimizer step over the batch, in micro-batches of `state.micro_batch` (gradient
    accumulation keeps the effective batch). On OOM in one process: halve the micro-batch,
    log, retry. Under DDP a retry cannot be agreed without a host sync every step, and one
    rank retrying alone hangs the others in the gradient all-reduce: every rank stops at
    once instead, and --resume continues with half the micro-batch (`OOM_RECORD`)."""
    images, labels = batch[0], batch[1]
    while True:
        try:
            return _accumulate(
                model, images, labels, loss_fn, optimizer, scaler, state, tc, device, dtype, d.rank
            )
        except Exception as exc:  # noqa: BLE001 - only OOM is handled; the rest re-raise
            if not is_oom(exc):
                raise
            optimizer.zero_grad(set_to_none=True)
            free_memory(device)
            if state.micro_batch <= 1:
                raise KitsError(
                    "out of GPU memory even with a micro-batch of 1 slice; use a "
                    "smaller --size store, a smaller model, or a larger GPU"
                ) from None
            half = state.micro_batch // 2
            if d.world > 1:
                run.write_json(
                    run_dir / OOM_RECORD, {"step": state.step, "rank": d.rank, "micro_batch": half}
                )
                raise KitsError(
                    f"rank {d.rank} ran out of GPU memory at step {state.step} with a "
                    f"micro-batch of {state.micro_batch}; every rank stops (one rank "
                    f"retrying alone would hang the others). Continue with micro-batch {half}: "
                    f"the same command with --resume --out {run_dir}"
                ) from None
            state.micro_batch = half
            log(
                {
                    "kind": "oom",
                    "step": state.step,
                    "micro_batch": state.micro_batch,
                    "accumulation": math.ceil(images.shape[0] / state.micro_batch),
                }
            )


def _accumulate(
    model, images, labels, loss_fn, optimizer, scaler, state, tc, device, dtype, rank: int = 0
):
    n = images.shape[0]
    chunks = list(range(0, n, state.micro_batch))
    total = torch.zeros((), device=device)
    for i, s in enumerate(chunks):
        _inject_fault(state.step, rank)
        x = images[s : s + state.micro_batch].to(device, non_blocking=True)
        y = labels[s : s + state.micro_batch].to(device, non_blocking=True).long()
        x = x.float().contiguous(memory_format=torch.channels_last)
        sync = i == len(chunks) - 1 or not hasattr(model, "no_sync")
        ctx = model.no_sync() if not sync else nullcontext()
        with ctx:
            with torch.autocast(
                device.type, dtype=dtype or torch.float32, enabled=dtype is not None
            ):
                loss = loss_fn(model(x), y) * (x.shape[0] / n)
            (scaler.scale(loss) if scaler else loss).backward()
        total += loss.detach()
    if scaler:
        scaler.unscale_(optimizer)
    if tc.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


# --------------------------------------------------------------------------- validation


def validate(
    model,
    info: StoreInfo,
    split: Split,
    tc: TrainConfig,
    device: torch.device,
    dtype,
    batch_size: int,
    d: Dist,
) -> dict:
    """Per-case 3D Dice of every region of the store's label set on the validation cases,
    whole cases sharded across ranks by slice count (`shard_cases`) and gathered, so every
    rank sees the same numbers. Rank 0's batch-norm statistics are broadcast first: DDP here
    does not broadcast buffers each forward, and every rank must score the same model. Keys:
    ``<region>_dice`` per region (KiTS19: kidney_dice, tumour_dice), ``mean_dice`` (their
    mean, what picks the best checkpoint), ``regions`` (the names, in order) and
    ``per_case`` (each case's region Dice, in that order)."""
    net = unwrap(model)
    if d.world > 1:
        for buf in net.buffers():
            dist.broadcast(buf, src=0)
    net.eval()
    mine = shard_cases(info, split.val, d.rank, d.world)
    with torch.no_grad():
        scores = (
            score_store_cases(
                net,
                info,
                mine,
                tc.context,
                device,
                amp=dtype or False,
                tta=False,
                batch_size=batch_size,
            )
            if mine
            else []
        )
    net.train()
    if d.world > 1:
        gathered: list = [None] * d.world
        dist.all_gather_object(gathered, [asdict(s) for s in scores])
        from kitstrain.metrics import CaseScore

        scores = [CaseScore(**s) for part in gathered for s in part]
    scores.sort(key=lambda s: s.case)
    m = mean_score(scores)
    return {
        **{f"{name}_dice": v for name, v in m.dice.items()},
        "mean_dice": m.mean_dice,
        "accuracy": m.accuracy,
        "background_accuracy": m.background_accuracy,
        "background_only": m.background_only,
        "over_predicts": m.over_predicts,
        "regions": list(m.dice),
        "per_case": {s.case: [round(v, 4) for v in s.dice.values()] for s in scores},
    }


def validation_due(trained_s: float, last_val_s: float, share: float = VAL_SHARE) -> bool:
    """Validate at an epoch's end only when the training since the last validation has
    been long enough for that validation's cost to stay within `share` of the time."""
    return last_val_s <= 0 or trained_s * share >= last_val_s * (1 - share)


def estimate_val_seconds(
    val_slices: int, size: int, patch: int, train_samples_per_s: float
) -> float:
    """A validation's duration before one has run, from the training throughput: whole
    slices hold (size/patch)**2 patches, each costing `VAL_COST` of a training sample."""
    if train_samples_per_s <= 0:
        return 0.0
    return val_slices * (size / patch) ** 2 * VAL_COST / train_samples_per_s


def unwrap(model):
    """The plain U-Net inside DDP and torch.compile wrappers, in either order."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


# --------------------------------------------------------------------------- checkpoint


def rng_state(device: torch.device) -> dict:
    """This process's RNG streams; on CUDA its own device's only."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": (
            torch.cuda.get_rng_state(device)
            if device.type == "cuda"
            else torch.zeros(0, dtype=torch.uint8)
        ),
        "numpy": json.dumps(np.random.get_state()[1].tolist()),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": json.dumps(random.getstate(), default=list),
    }


def set_rng_state(saved: dict, rank: int, device: torch.device) -> None:
    """Restore this rank's streams from a checkpoint's per-rank list. A rank the saved run
    did not have keeps its freshly seeded streams. Checkpoints from before per-rank
    states hold rank 0's host streams and every visible GPU's state: rank 0 takes its
    own device's, if the saving machine had that many."""
    states = saved.get("ranks") if "ranks" in saved else ([saved] if rank == 0 else [])
    if rank >= len(states):
        return
    s = states[rank]
    torch.set_rng_state(s["torch"].cpu())
    cuda = s.get("cuda")
    if device.type == "cuda" and cuda is not None:
        if isinstance(cuda, (list, tuple)):
            index = device.index or 0
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None and cuda.numel():
            torch.cuda.set_rng_state(cuda.cpu(), device)
    np.random.set_state(
        ("MT19937", np.array(json.loads(s["numpy"]), np.uint32), s["numpy_pos"], 0, 0.0)
    )
    py = json.loads(s["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))


def save(
    run_dir: Path,
    which: Sequence[str],
    model,
    optimizer,
    scaler,
    state: State,
    d: Dist,
    device: torch.device,
) -> None:
    """Every rank calls this at the same point: each one's RNG streams are gathered, rank 0
    writes the checkpoint(s). No NaN/Inf weight ever reaches a checkpoint: a diverged model
    stops the run here on every rank (DDP keeps their weights equal), and the previous
    checkpoint stays as it was."""
    weights = unwrap(model).state_dict()
    bad = run.nonfinite_weights(weights)
    if bad:
        logged = [
            r
            for r in run.read_metrics(run_dir)
            if r.get("kind") == "train"
            and isinstance(r.get("loss"), float)
            and math.isfinite(r["loss"])
        ]
        last = (
            f"; last logged loss {logged[-1]['loss']:.4g} at step {logged[-1]['step']}"
            if logged
            else ""
        )
        raise KitsError(
            f"training diverged by step {state.step}: the model holds {bad} NaN/Inf "
            f"weights{last}, so no checkpoint was written; start a new run with a "
            "lower --lr"
        )
    rngs = [rng_state(device)]
    if d.world > 1:
        rngs = [None] * d.world
        dist.all_gather_object(rngs, rng_state(device))
    if not d.main:
        return
    payload = {
        "model": weights,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler else {},
        "state": json.dumps(asdict(state)),
        "rng": {"ranks": rngs},
    }
    for w in which:
        run.save_checkpoint(run.checkpoint_path(run_dir, w), payload)
    if "best" in which:
        run.export_weights(run.checkpoint_path(run_dir, "best").with_name(WEIGHTS_FILE), weights)


def restore_or_restart(
    run_dir: Path,
    model,
    optimizer,
    scaler,
    device: torch.device,
    d: Dist,
    fresh: State,
    echo: Callable[[str], None],
) -> State:
    """A run killed before its first checkpoint starts again from step 0, with the config
    and split it recorded."""
    if run.checkpoint_path(run_dir, "last").is_file():
        return restore(run_dir, model, optimizer, scaler, device, d)
    if d.main:
        echo(
            f"{run_dir} has no checkpoint yet (stopped before its first one): starting it again "
            "from step 0 with its recorded options and split"
        )
    return fresh


def finished_run(
    cfg: FitConfig,
    state: State,
    tc: TrainConfig,
    total_steps: int,
    d: Dist,
    run_dir: Path,
    echo: Callable[[str], None],
) -> FitResult | None:
    """Resuming a run that already reached its limit trains no step: it says so. The state
    comes from the same checkpoint on every rank, so they all agree without a collective."""
    if not cfg.resume:
        return None
    reason = step_limit(state, tc, total_steps) or (
        "time_limit" if tc.time_limit and state.elapsed >= tc.time_limit else ""
    )
    if not reason:
        return None
    if d.main:
        echo(
            f"{run_dir} is finished ({reason} reached at step {state.step}); nothing to do. "
            "Raise --max-steps, --epochs or --time-limit to train it further"
        )
    vals = [r for r in run.read_metrics(run_dir) if r.get("kind") == "val"]
    return FitResult(
        run_dir, state.step, state.epoch, state.best, vals[-1] if vals else None, 0.0, "finished"
    )


class Divergence:
    """Non-finite losses, counted on the device (no host sync per step) and checked at each
    log line. Without a gradient scaler one NaN/Inf loss has already spoilt the weights, so
    it stops the run; with fp16's scaler, skipped steps are normal and only a persistent run
    of them (DIVERGED_STEPS in a row) stops it."""

    def __init__(self, device: torch.device, tolerate: bool):
        self.limit = DIVERGED_STEPS if tolerate else 1
        z = torch.zeros((), device=device)
        self.bad_run, self.worst = z.clone(), z.clone()  # non-finite losses in a row
        self.run_start, self.worst_start = z.clone(), z.clone()  # step each run began
        self.last_loss, self.last_step = z.clone(), z.clone()

    def update(self, loss: torch.Tensor, step: int) -> None:
        ok = torch.isfinite(loss.detach()).to(self.bad_run.dtype)
        at = torch.full_like(self.run_start, step)
        self.bad_run = (self.bad_run + 1) * (1 - ok)
        self.run_start = torch.where(self.bad_run == 1, at, self.run_start)
        self.worst_start = torch.where(self.bad_run > self.worst, self.run_start, self.worst_start)
        self.worst = torch.maximum(self.worst, self.bad_run)
        self.last_loss = torch.where(ok > 0, loss.detach().float(), self.last_loss)
        self.last_step = torch.where(ok > 0, at, self.last_step)

    def check(self, tc: TrainConfig) -> None:
        if float(self.worst) < self.limit:
            return
        start = int(self.worst_start)
        last = (
            f"last finite loss {float(self.last_loss):.4g} at step {int(self.last_step)}"
            if int(self.last_step) > 0
            else "no finite loss before it"
        )
        raise KitsError(
            f"training diverged: the loss is NaN/Inf from step {start} ({last}); "
            f"no checkpoint holds the diverged weights. Start a new run with a "
            f"lower --lr (this one: {tc.lr:g})"
        )


def restore(run_dir: Path, model, optimizer, scaler, device: torch.device, d: Dist) -> State:
    ckpt = run.load_checkpoint(run.checkpoint_path(run_dir, "last"), map_location="cpu")
    unwrap(model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"], d.rank, device)
    state = State(**json.loads(ckpt["state"]))
    oom = run_dir / OOM_RECORD
    if oom.is_file():  # a rank ran out of memory after that checkpoint: continue smaller
        state.micro_batch = min(state.micro_batch, int(json.loads(oom.read_text())["micro_batch"]))
    return state


def rank_peaks(device: torch.device, d: Dist) -> list[float] | None:
    """Every rank's peak GPU memory (MiB) since the last reset; None off CUDA."""
    if device.type != "cuda":
        return None
    t = torch.tensor([peak_memory_mb(device)], device=device)
    if d.world > 1:
        parts = [torch.zeros_like(t) for _ in range(d.world)]
        dist.all_gather(parts, t)
        t = torch.cat(parts)
    return [round(float(v), 1) for v in t.cpu()]


def agree(d: Dist, device: torch.device, value: int) -> int:
    """Rank 0's `value` on every rank: decisions from one clock, so ranks never diverge."""
    if d.world == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


# --------------------------------------------------------------------------- the run


def fit(
    cfg: FitConfig,
    show_progress: bool = True,
    echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> FitResult:
    # ---- setup
    d, device = setup_distributed(cfg.device)
    info = open_store(cfg.store)
    run_dir = prepare_run_dir(cfg, d)
    failed = True
    try:
        result = _fit(cfg, d, device, info, run_dir, show_progress, echo)
        failed = False
        return result
    except Exception as exc:
        if d.world > 1 and _peer_failure(exc):
            raise KitsError(
                f"rank {d.rank}: another rank stopped ({_first_line(exc)}); its "
                "own message says why"
            ) from None
        raise
    finally:
        if d.main:
            release_lock(run_dir)
            drop_unstarted(run_dir)
        if d.world > 1 and dist.is_initialized():
            if failed:
                # never a barrier here: the other ranks may be inside a broadcast or the
                # gradient all-reduce, which a barrier does not match (the whole job would
                # hang until the backend's timeout). Abort instead: peers fail at once, and
                # torchrun stops those that do not
                _abort_group()
            else:
                # every rank leaves together: tearing down gloo while a peer still holds its
                # connection aborts that peer (std::terminate at exit)
                with contextlib.suppress(Exception):
                    dist.barrier()
                dist.destroy_process_group()


def _peer_failure(exc: BaseException) -> bool:
    """An error that a collective raised because another rank went away."""
    if isinstance(exc, KitsError):
        return False
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        k in text
        for k in ("connection closed by peer", "connection reset", "gloo", "nccl", "broken pipe")
    )


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _abort_group() -> None:
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    with contextlib.suppress(Exception):
        abort() if abort is not None else dist.destroy_process_group()


def _fit(cfg, d, device, info, run_dir, show_progress, echo) -> FitResult:
    tc = resolve_train_config(cfg, run_dir)
    check_store(cfg, info, run_dir)
    label_weights = label_weights_by_value(
        info.labels, tc.label_weights, strict="label_weights" in cfg.explicit
    )
    split = resolve_split(cfg, info, tc, run_dir)
    seed_everything(tc.seed + d.rank)
    dtype = amp_dtype(device, tc.precision)
    model, mcfg = build_training_model(info, tc, device)
    patch = resolve_patch(tc.patch, info.size, mcfg.divisor)
    loss_fn = make_loss(tc.loss, info.labels, regions=tc.regions)
    recorded = run.read_config(run_dir) if cfg.resume else None
    if recorded is not None:  # the recorded batch, not a new search: the steps must not change
        batch_size, batch_info = int(recorded["batch_size"]), recorded["batch"]
        # runs recorded before lr scaling trained at their lr as given
        lr_info = recorded.get("lr_scaling") or {
            "lr": tc.lr,
            "base_lr": tc.lr,
            "rule": "none (recorded before scaling)",
        }
    else:
        batch_size, batch_info = choose_batch_size(
            tc, model, loss_fn, patch, info, device, dtype, d
        )
        lr_info = effective_lr(tc, batch_size, d.world, cfg.explicit)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # peaks from here: not the search's tries
        torch.backends.cudnn.benchmark = True  # shapes are fixed now: choose kernels once
    run_tc = replace(tc, lr=lr_info["lr"])  # what the optimizer and schedule use
    # whole slices hold (size/patch)**2 times a patch's pixels: validate with as many
    # pixels per batch as a training batch, so validation fits wherever training does
    val_batch = max(1, batch_size * patch * patch // (info.size * info.size))
    optimizer = make_optimizer(model, run_tc)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    state = State(micro_batch=batch_size)
    if cfg.resume:
        state = restore_or_restart(run_dir, model, optimizer, scaler, device, d, state, echo)
    if d.world > 1:
        # buffers (batch-norm statistics) are broadcast before each validation, not at each
        # forward: no collective inside a step but the gradient all-reduce
        ddp = torch.nn.parallel.DistributedDataParallel
        # (torch 2.13 renamed the option; both keep the one broadcast at construction)
        sync = (
            "forward_sync_buffers"
            if "forward_sync_buffers" in inspect.signature(ddp).parameters
            else "broadcast_buffers"
        )
        model = ddp(
            model, device_ids=[device.index] if device.type == "cuda" else None, **{sync: False}
        )
    if tc.compile:
        # after the DDP wrap: DDPOptimizer splits the graph at bucket boundaries, so the
        # gradient all-reduce overlaps the backward pass
        model = torch.compile(model)

    def log(record: dict) -> None:
        if d.main:
            run.append_metrics(run_dir, {"time": time.time(), **record})

    train_slices = int(sum(info.cases[c].slices for c in split.train))
    val_slices = int(sum(info.cases[c].slices for c in split.val))
    samples = tc.samples_per_epoch or samples_per_epoch(train_slices, info.size, patch)
    steps_per_epoch = batches_per_epoch(samples, batch_size, d.world)
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    unit = "patches" if patch < info.size else "slices"
    if d.main and not cfg.resume:
        run.write_json(
            run_dir / run.CONFIG,
            {
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
                "batch_size": batch_size,
                "patch_size": patch,
                "lr_scaling": lr_info,
                "val_batch_size": val_batch,
                "steps_per_epoch": steps_per_epoch,
                "total_steps": total_steps,
                "device": str(device),
                "env": environment(device, d),
            },
        )
        run.write_json(run_dir / run.SPLIT, split.to_json())
    if d.main:
        echo(
            f"run {run_dir}: {len(split.train)} train / {len(split.val)} val cases, "
            f"{train_slices} train slices, batch {batch_size} x {d.world} rank(s) of "
            f"{patch}x{patch} {unit}, {steps_per_epoch} steps/epoch, lr {run_tc.lr:.3g}"
            + (
                f" ({lr_info['rule']} scaling from {tc.lr:.3g} at batch "
                f"{lr_info.get('reference_batch')})"
                if lr_info["rule"] in ("sqrt", "linear")
                else ""
            )
            + f", device {device}"
            + (f", {dtype}".replace("torch.", "") if dtype else ", fp32")
            + (f", resuming at step {state.step}" if cfg.resume else "")
        )
        if batch_info.get("reason") and batch_info.get("mode") == "auto":
            echo(f"batch {batch_size} (auto): {batch_info['reason']}")
        if not CRC_ON_READ:
            echo(
                "note: without ISA-L the loader does not check each slice's CRC-32; "
                f"`kitsprep verify {cfg.store}` is the check"
            )
    done = finished_run(cfg, state, tc, total_steps, d, run_dir, echo)
    if done is not None:
        return done
    writer = tensorboard_writer(run_dir, echo) if d.main else None
    bar = progress_bar(total_steps, state.step) if d.main and show_progress else None

    # ---- one loader for the whole run: workers, their open store and their kernels
    # persist across epochs; each epoch is `sampler.set_epoch`, resumable mid-epoch
    if tc.augment and tc.workers > 0:
        compile_kernels()  # before the workers fork: they inherit it, none compiles
    batch_bytes = batch_size * patch * patch * (2 * (1 + 2 * tc.context) + 1)
    loader = make_train_loader(
        cfg.store,
        info,
        split.train,
        batch_size=batch_size,
        workers=tc.workers,
        context=tc.context,
        augment=AugmentConfig(enabled=tc.augment),
        fg_fraction=tc.fg_fraction,
        label_weights=label_weights,
        seed=tc.seed,
        rank=d.rank,
        world_size=d.world,
        samples_per_epoch=samples,
        pin_memory=device.type == "cuda",
        epoch=state.epoch,
        start_batch=state.step_in_epoch,
        patch=patch,
        prefetch_factor=prefetch_for(batch_bytes, tc.workers),
    )
    try:
        stop_reason, last_val, stall, peaks = _train(
            model,
            loader,
            loss_fn,
            optimizer,
            scaler,
            state,
            tc,
            run_tc,
            device,
            dtype,
            d,
            info,
            split,
            patch,
            val_batch,
            val_slices,
            steps_per_epoch,
            total_steps,
            run_dir,
            log,
            bar,
            writer,
            echo,
            unit,
        )
    finally:
        close_loader(loader)
    if bar is not None:
        bar.close()
    log(
        {
            "kind": "end",
            "step": state.step,
            "epoch": state.epoch,
            "reason": stop_reason,
            "stall": stall,
            "peak_memory_mb": max(peaks) if peaks else None,
            "peak_memory_mb_ranks": peaks,
            "elapsed": state.elapsed,
        }
    )
    if writer is not None:
        writer.close()
    return FitResult(run_dir, state.step, state.epoch, state.best, last_val, stall, stop_reason)


STOP_TIME, CHECKPOINT_DUE = 1, 2  # bits of the decision rank 0 broadcasts per log window


def _train(
    model,
    loader,
    loss_fn,
    optimizer,
    scaler,
    state: State,
    tc: TrainConfig,
    run_tc: TrainConfig,
    device,
    dtype,
    d: Dist,
    info: StoreInfo,
    split: Split,
    patch: int,
    val_batch: int,
    val_slices: int,
    steps_per_epoch: int,
    total_steps: int,
    run_dir: Path,
    log,
    bar,
    writer,
    echo,
    unit: str,
) -> tuple[str, dict | None, float, list[float] | None]:
    """The loop. No host sync per step: the step limit is the same count on every rank,
    and rank 0's clock (time limit, periodic checkpoint) is broadcast once per log window,
    where the logged loss syncs anyway."""
    stop_reason = ""
    last_val: dict | None = None
    warned_stall = False
    diverged = Divergence(device, tolerate=scaler is not None)
    win = Window()
    stall_sum = [0.0, 0.0]
    run_peaks: list[float] | None = None
    t_run = time.perf_counter() - state.elapsed
    last_ckpt = time.perf_counter()
    trained_since_val = 0.0
    step0 = state.step

    def validation(final: bool = False) -> dict:
        nonlocal last_ckpt, trained_since_val
        tv = time.perf_counter()
        val = run_validation(
            model,
            info,
            split,
            tc,
            device,
            dtype,
            val_batch,
            d,
            state,
            log,
            run_dir,
            optimizer,
            scaler,
            writer,
            t_run,
            final=final,
        )
        win.t0 += time.perf_counter() - tv  # training throughput excludes validation
        last_ckpt = time.perf_counter()
        trained_since_val = 0.0
        return val

    def val_estimate() -> float:
        if state.last_val_seconds:
            return state.last_val_seconds
        sps = (state.step - step0) * loader.batch_size * d.world / max(state.elapsed, 1e-9)
        return estimate_val_seconds(val_slices, info.size, patch, sps)

    model.train()
    while not stop_reason:
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            batch = next_batch(it)
            if batch is None:
                break
            t1 = time.perf_counter()
            for g in optimizer.param_groups:
                g["lr"] = lr_at(progress_of(state, total_steps, run_tc), run_tc)
            loss = train_step(
                model, batch, loss_fn, optimizer, scaler, state, tc, device, dtype, log, d, run_dir
            )
            diverged.update(loss, state.step + 1)
            state.step += 1
            state.step_in_epoch += 1
            win.wait += t1 - t0
            win.loss = win.loss + loss
            win.slices += batch[0].shape[0] * d.world
            win.steps += 1
            now = time.perf_counter()
            trained_since_val += now - t0
            state.elapsed = now - t_run
            logged = state.step % tc.log_every == 0 or state.step == 1
            if logged:
                win = flush_window(
                    win,
                    state,
                    optimizer,
                    log,
                    bar,
                    writer,
                    stall_sum,
                    echo if d.main else None,
                    unit=unit,
                )
                diverged.check(tc)
                if (
                    not warned_stall
                    and d.main
                    and state.step >= 5 * tc.log_every
                    and stall_sum[0] / max(stall_sum[1], 1e-9) > STALL_WARN
                ):
                    warned_stall = True
                    echo(
                        f"warning: the {'GPU' if device.type == 'cuda' else 'model'} waited "
                        f"on the loader "
                        f"{100 * stall_sum[0] / stall_sum[1]:.0f}% of the time; raise "
                        f"--workers (now {tc.workers}), or put the store on faster disk"
                    )
            elif bar is not None:
                bar.update(1)
            action = 0
            if logged or d.world == 1:
                local = 0
                if tc.time_limit and state.elapsed + val_estimate() >= tc.time_limit:
                    local |= STOP_TIME
                if time.perf_counter() - last_ckpt > CHECKPOINT_EVERY_S:
                    local |= CHECKPOINT_DUE
                action = agree(d, device, local)
            stop_reason = step_limit(state, tc, total_steps) or (
                "time_limit" if action & STOP_TIME else ""
            )
            if tc.val_every and state.step % tc.val_every == 0 and not stop_reason:
                last_val = validation()
            elif action & CHECKPOINT_DUE:
                save(run_dir, ["last"], model, optimizer, scaler, state, d, device)
                last_ckpt = time.perf_counter()
            if stop_reason:
                break
        if state.step_in_epoch >= steps_per_epoch or not stop_reason:
            # ---- end of epoch (also when its last step ended the run)
            state.epoch += 1
            state.step_in_epoch = 0
            loader.sampler.set_epoch(state.epoch)
            peaks = rank_peaks(device, d)
            if peaks is not None:
                run_peaks = [max(a, b) for a, b in zip(run_peaks or peaks, peaks, strict=True)]
                torch.cuda.reset_peak_memory_stats(device)  # the next record is that epoch's
            log(
                {
                    "kind": "epoch",
                    "epoch": state.epoch,
                    "step": state.step,
                    "peak_memory_mb": max(peaks) if peaks else None,
                    "peak_memory_mb_ranks": peaks,
                }
            )
        if stop_reason:
            break
        if state.epoch >= tc.epochs:
            stop_reason = "epochs"
            break
        # a bounded share of the run: rank 0 decides, every rank follows
        if agree(d, device, int(validation_due(trained_since_val, state.last_val_seconds))):
            last_val = validation()
    # ---- final validation and checkpoint
    if win.steps:
        flush_window(
            win, state, optimizer, log, bar, writer, stall_sum, echo if d.main else None, unit=unit
        )
    last_val = validation(final=True)
    peaks = rank_peaks(device, d)
    if peaks is not None:
        run_peaks = [max(a, b) for a, b in zip(run_peaks or peaks, peaks, strict=True)]
    return stop_reason, last_val, stall_sum[0] / max(stall_sum[1], 1e-9), run_peaks


def flush_window(
    win: Window,
    state: State,
    optimizer,
    log,
    bar,
    writer,
    stall_sum,
    echo: Callable[[str], None] | None,
    unit: str = "slices",
) -> Window:
    loss = float(win.loss) / max(1, win.steps)  # the one host sync per log window
    wall = time.perf_counter() - win.t0
    stall = win.wait / wall if wall > 0 else 0.0
    if state.step > 1:
        # the first step's window is start-up (worker processes, store maps, JIT-compiled
        # kernels loading), not steady-state stall: it would set off a false warning
        stall_sum[0] += win.wait
        stall_sum[1] += wall
    rec = {
        "kind": "train",
        "step": state.step,
        "epoch": state.epoch,
        "loss": loss,
        "lr": optimizer.param_groups[0]["lr"],
        "slices_per_s": win.slices / wall,
        "samples_per_s": win.slices / wall,
        "unit": unit,
        "stall": stall,
        "data_wait_s": win.wait,
        "wall_s": wall,
        "micro_batch": state.micro_batch,
    }
    log(rec)
    if bar is not None:
        bar.update(win.steps)
        bar.set_postfix(
            loss=f"{loss:.3f}", sps=f"{rec['slices_per_s']:.0f}", stall=f"{100 * stall:.0f}%"
        )
    elif echo is not None:
        echo(
            f"step {state.step} epoch {state.epoch} loss {loss:.4f} lr {rec['lr']:.2e} "
            f"{rec['samples_per_s']:.0f} {unit}/s loader stall {100 * stall:.0f}%"
        )
    if writer is not None:
        for k in ("loss", "lr", "slices_per_s", "stall"):
            writer.add_scalar(f"train/{k}", rec[k], state.step)
    return Window()


def step_limit(state: State, tc: TrainConfig, total_steps: int) -> str:
    """The step count ends the run at the same step on every rank: no communication."""
    if state.step >= total_steps:
        return "max_steps" if tc.max_steps and state.step >= tc.max_steps else "epochs"
    return ""


def run_validation(
    model,
    info,
    split,
    tc,
    device,
    dtype,
    batch_size,
    d,
    state,
    log,
    run_dir,
    optimizer,
    scaler,
    writer,
    t_run,
    final: bool = False,
) -> dict:
    t = time.perf_counter()
    val = validate(model, info, split, tc, device, dtype, batch_size, d)
    state.last_val_seconds = time.perf_counter() - t
    state.elapsed = time.perf_counter() - t_run
    improved = val["mean_dice"] > state.best
    if improved:
        state.best = val["mean_dice"]
    log(
        {
            "kind": "val",
            "step": state.step,
            "epoch": state.epoch,
            "final": final,
            "seconds": state.last_val_seconds,
            "peak_memory_mb": peak_memory_mb(device),
            **val,
        }
    )
    save(
        run_dir,
        ["last", "best"] if improved else ["last"],
        model,
        optimizer,
        scaler,
        state,
        d,
        device,
    )
    if d.main:
        if writer is not None:
            for k in [f"{r}_dice" for r in val["regions"]] + ["mean_dice"]:
                writer.add_scalar(f"val/{k}", val[k], state.step)
        try:
            from kitstrain.report.plots import plot_curves

            plot_curves(run_dir)
        except Exception:  # noqa: BLE001 - a picture must never stop training
            pass
    return val


def tensorboard_writer(run_dir: Path, echo: Callable[[str], None] | None = None):
    """TensorBoard event files when tensorboard is installed; otherwise one line says so
    (metrics.jsonl and `kitstrain plot` have the same numbers)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - optional dependency
        if echo is not None:
            echo(
                "note: tensorboard is not installed, so no TensorBoard logs (metrics are in "
                "metrics.jsonl; `kitstrain plot` draws them); `pip install tensorboard` "
                "to get them"
            )
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def progress_bar(total: int, initial: int):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, unit="step", desc="fit", file=sys.stderr, dynamic_ncols=True
    )
