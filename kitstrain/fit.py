"""`kitstrain fit`: the training loop. Reads top to bottom: setup, train step, validation,
checkpoint. One process per GPU under torchrun (DDP); a plain process otherwise."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from kitsprep.errors import KitsError
from kitsprep.store import StoreInfo, open_store
from kitstrain import __version__, run
from kitstrain.augment import AugmentConfig
from kitstrain.data import Split, make_split, make_train_loader
from kitstrain.infer import resolve_device, score_store_cases
from kitstrain.losses import make_loss
from kitstrain.memory import amp_dtype, find_batch_size, free_memory, is_oom, peak_memory_mb
from kitstrain.metrics import mean_score
from kitstrain.model import UNetConfig, build_model
from kitstrain.patches import resolve_patch
from kitstrain.presets import TrainConfig

STALL_WARN = 0.10             # loader stall share above which one warning names the fix
CHECKPOINT_EVERY_S = 120.0    # a `last` checkpoint at least this often, besides validations
DIVERGED_STEPS = 20           # non-finite losses in a row that stop an fp16 (scaled) run
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
    explicit: frozenset[str] = frozenset()   # TrainConfig fields given on the command line


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
            raise KitsError(f"--resume: {run_dir} holds no run (config.json missing); start a "
                            "new run without --resume")
    else:
        run_dir = cfg.out or run.RUNS_ROOT / datetime.now().strftime("%Y%m%d-%H%M%S")
        if (run_dir / run.CONFIG).is_file():
            raise KitsError(f"{run_dir} already holds a run; continue it with --resume or "
                            "choose another --out")
    if d.main:
        if not run_dir.exists():
            _created_here.add(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KitsError(f"cannot create the run directory {run_dir} ({exc.strerror}); "
                            "choose an --out in a writable folder") from None
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
            raise KitsError(f"{run_dir} is in use by process {pid}; wait for it, stop it, or "
                            "choose another --out")
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
    saved = run.from_record(run_dir, run.CONFIG,
                            lambda r: TrainConfig(**{"patch": "full", **r}), recorded)
    changed = {k for k in cfg.explicit - RESUMABLE_OVERRIDES
               if getattr(cfg.train, k) != getattr(saved, k)}
    if changed:
        raise KitsError(f"--resume keeps the run's recorded options, but "
                        f"{', '.join(sorted(changed))} differ from {run_dir}/config.json; drop "
                        "those flags, or start a new run")
    return replace(saved, **{k: getattr(cfg.train, k) for k in cfg.explicit & RESUMABLE_OVERRIDES})


def resolve_split(cfg: FitConfig, info: StoreInfo, tc: TrainConfig, run_dir: Path) -> Split:
    if cfg.resume:
        return run.from_record(run_dir, run.SPLIT, Split.from_json, run.read_split(run_dir))
    return make_split(info, cfg.train_cases, cfg.val_cases, seed=tc.seed)


def check_store(cfg: FitConfig, info: StoreInfo, run_dir: Path) -> None:
    if not cfg.resume:
        return
    recorded = run.read_config(run_dir)["store_fingerprint"]
    if recorded != info.fingerprint:
        raise KitsError(f"{cfg.store} is not the store {run_dir} trained on (fingerprint "
                        f"{info.fingerprint}, recorded {recorded}); resume with that store")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_training_model(info: StoreInfo, tc: TrainConfig, device: torch.device):
    mcfg = UNetConfig(in_channels=1 + 2 * tc.context, num_classes=info.num_classes,
                      width=tc.width, depth=tc.depth, norm=tc.norm,
                      deep_supervision=tc.deep_supervision, regions=tc.regions)
    if info.size % mcfg.divisor:
        raise KitsError(f"store slices are {info.size}x{info.size}, which a depth-{tc.depth} "
                        f"U-Net cannot halve {tc.depth} times; rebuild with --size "
                        f"{info.size // mcfg.divisor * mcfg.divisor or mcfg.divisor} or lower "
                        "the depth")
    # channels_last everywhere: cuDNN's fast NHWC kernels on GPUs, oneDNN's on CPUs
    # (measured on 2 cores at 64x64: batch-norm U-Net steps ~15 % faster, inference ~1.5x)
    model = build_model(mcfg).to(device).to(memory_format=torch.channels_last)
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
        return torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=0.99, nesterov=True,
                               weight_decay=tc.weight_decay)
    cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)


def choose_batch_size(tc: TrainConfig, model, loss_fn, patch: int, info: StoreInfo,
                      device: torch.device, dtype: torch.dtype | None, d: Dist
                      ) -> tuple[int, dict]:
    """`auto` on CUDA: a real forward+backward at the training patch size, doubled until
    the card is nearly full. On CPU memory is not the limit: the preset's default is kept."""
    if tc.batch_size != "auto":
        return int(tc.batch_size), {"mode": "fixed"}
    if device.type != "cuda":
        bs = 16
        return bs, {"mode": "auto", "note": f"CPU: memory is not the limit, using {bs}"}
    c = 1 + 2 * tc.context

    def try_batch(n: int) -> None:
        x = torch.randn(n, c, patch, patch, device=device).to(
            memory_format=torch.channels_last)
        y = torch.randint(0, info.num_classes, (n, patch, patch), device=device)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    found = find_batch_size(try_batch, device)
    bs = found["batch_size"]
    if d.world > 1:  # every rank must agree on one batch size
        t = torch.tensor([bs], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        bs = int(t.item())
    return bs, {"mode": "auto", **found, "batch_size": bs}


def environment(device: torch.device, d: Dist) -> dict:
    import h5py
    import numba

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__, "h5py": h5py.__version__, "numba": numba.__version__,
           "kits": __version__, "platform": platform.platform(), "device": str(device),
           "world_size": d.world, "argv": sys.argv}
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


def _inject_oom(step: int) -> None:
    """Fault injection for tests: KITS_INJECT_OOM_AT_STEP=N raises one OOM at step N."""
    at = os.environ.get("KITS_INJECT_OOM_AT_STEP")
    if at is not None and int(at) == step and not getattr(_inject_oom, "done", False):
        _inject_oom.done = True
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected for a test)")


def train_step(model, batch, loss_fn, optimizer, scaler, state: State, tc: TrainConfig,
               device: torch.device, dtype: torch.dtype | None, log: Callable[[dict], None]
               ) -> torch.Tensor:
    """One optimizer step over the batch, in micro-batches of `state.micro_batch` (gradient
    accumulation keeps the effective batch). On OOM: halve the micro-batch, log, retry."""
    images, labels = batch[0], batch[1]
    while True:
        try:
            return _accumulate(model, images, labels, loss_fn, optimizer, scaler, state, tc,
                               device, dtype)
        except Exception as exc:  # noqa: BLE001 - only OOM is handled; the rest re-raise
            if not is_oom(exc):
                raise
            optimizer.zero_grad(set_to_none=True)
            free_memory(device)
            if state.micro_batch <= 1:
                raise KitsError("out of GPU memory even with a micro-batch of 1 slice; use a "
                                "smaller --size store, a smaller model, or a larger GPU") from None
            state.micro_batch //= 2
            log({"kind": "oom", "step": state.step, "micro_batch": state.micro_batch,
                 "accumulation": math.ceil(images.shape[0] / state.micro_batch)})


def _accumulate(model, images, labels, loss_fn, optimizer, scaler, state, tc, device, dtype):
    n = images.shape[0]
    chunks = list(range(0, n, state.micro_batch))
    total = torch.zeros((), device=device)
    for i, s in enumerate(chunks):
        _inject_oom(state.step)
        x = images[s:s + state.micro_batch].to(device, non_blocking=True)
        y = labels[s:s + state.micro_batch].to(device, non_blocking=True).long()
        x = x.float().contiguous(memory_format=torch.channels_last)
        sync = i == len(chunks) - 1 or not hasattr(model, "no_sync")
        ctx = model.no_sync() if not sync else nullcontext()
        with ctx:
            with torch.autocast(device.type, dtype=dtype or torch.float32,
                                enabled=dtype is not None):
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


def validate(model, info: StoreInfo, split: Split, tc: TrainConfig, device: torch.device,
             dtype, batch_size: int, d: Dist) -> dict:
    """Per-case 3D Dice on the validation cases (KiTS19 definitions), cases sharded across
    ranks and gathered, so every rank sees the same numbers."""
    net = unwrap(model)
    net.eval()
    mine = list(split.val)[d.rank::d.world]
    with torch.no_grad():
        scores = score_store_cases(net, info, mine, tc.context, device, amp=dtype or False,
                                   tta=False, batch_size=batch_size) if mine else []
    net.train()
    if d.world > 1:
        gathered: list = [None] * d.world
        dist.all_gather_object(gathered, [asdict(s) for s in scores])
        from kitstrain.metrics import CaseScore

        scores = [CaseScore(**s) for part in gathered for s in part]
    scores.sort(key=lambda s: s.case)
    m = mean_score(scores)
    return {"kidney_dice": m.kidney_dice, "tumour_dice": m.tumour_dice,
            "mean_dice": m.mean_dice, "accuracy": m.accuracy,
            "background_accuracy": m.background_accuracy, "background_only": m.background_only,
            "per_case": {s.case: [round(s.kidney_dice, 4), round(s.tumour_dice, 4)]
                         for s in scores}}


def unwrap(model):
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# --------------------------------------------------------------------------- checkpoint


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": json.dumps(np.random.get_state()[1].tolist()),
            "numpy_pos": int(np.random.get_state()[2]),
            "python": json.dumps(random.getstate(), default=list)}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"].cpu())
    if torch.cuda.is_available() and len(s["cuda"]):
        torch.cuda.set_rng_state_all([t.cpu() for t in s["cuda"]])
    np.random.set_state(("MT19937", np.array(json.loads(s["numpy"]), np.uint32),
                         s["numpy_pos"], 0, 0.0))
    py = json.loads(s["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))


def save(run_dir: Path, which: str, model, optimizer, scaler, state: State) -> None:
    """No NaN/Inf weight ever reaches a checkpoint: a diverged model stops the run here,
    and the previous checkpoint stays as it was."""
    weights = unwrap(model).state_dict()
    bad = run.nonfinite_weights(weights)
    if bad:
        logged = [r for r in run.read_metrics(run_dir) if r.get("kind") == "train"
                  and isinstance(r.get("loss"), float) and math.isfinite(r["loss"])]
        last = (f"; last logged loss {logged[-1]['loss']:.4g} at step {logged[-1]['step']}"
                if logged else "")
        raise KitsError(f"training diverged by step {state.step}: the model holds {bad} NaN/Inf "
                        f"weights{last}, so no checkpoint was written; start a new run with a "
                        "lower --lr")
    if which == "best":
        run.export_weights(run.checkpoint_path(run_dir, "best").with_name(WEIGHTS_FILE), weights)
    run.save_checkpoint(run.checkpoint_path(run_dir, which), {
        "model": weights,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler else {},
        "state": json.dumps(asdict(state)),
        "rng": rng_state(),
    })


def restore_or_restart(run_dir: Path, model, optimizer, scaler, device, fresh: State,
                       echo: Callable[[str], None]) -> State:
    """A run killed before its first checkpoint starts again from step 0, with the config
    and split it recorded."""
    if run.checkpoint_path(run_dir, "last").is_file():
        return restore(run_dir, model, optimizer, scaler, device)
    echo(f"{run_dir} has no checkpoint yet (stopped before its first one): starting it again "
         "from step 0 with its recorded options and split")
    return fresh


def finished_run(cfg: FitConfig, state: State, tc: TrainConfig, total_steps: int, d: Dist,
                 device: torch.device, run_dir: Path, echo: Callable[[str], None]
                 ) -> FitResult | None:
    """Resuming a run that already reached its limit trains no step: it says so."""
    if not cfg.resume:
        return None
    reason = should_stop(state, tc, total_steps, d, device)
    if not reason:
        return None
    if d.main:
        echo(f"{run_dir} is finished ({reason} reached at step {state.step}); nothing to do. "
             "Raise --max-steps, --epochs or --time-limit to train it further")
    vals = [r for r in run.read_metrics(run_dir) if r.get("kind") == "val"]
    return FitResult(run_dir, state.step, state.epoch, state.best, vals[-1] if vals else None,
                     0.0, "finished")


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
        self.worst_start = torch.where(self.bad_run > self.worst, self.run_start,
                                       self.worst_start)
        self.worst = torch.maximum(self.worst, self.bad_run)
        self.last_loss = torch.where(ok > 0, loss.detach().float(), self.last_loss)
        self.last_step = torch.where(ok > 0, at, self.last_step)

    def check(self, tc: TrainConfig) -> None:
        if float(self.worst) < self.limit:
            return
        start = int(self.worst_start)
        last = (f"last finite loss {float(self.last_loss):.4g} at step {int(self.last_step)}"
                if int(self.last_step) > 0 else "no finite loss before it")
        raise KitsError(f"training diverged: the loss is NaN/Inf from step {start} ({last}); "
                        f"no checkpoint holds the diverged weights. Start a new run with a "
                        f"lower --lr (this one: {tc.lr:g})")


def restore(run_dir: Path, model, optimizer, scaler, device) -> State:
    ckpt = run.load_checkpoint(run.checkpoint_path(run_dir, "last"), map_location=device)
    unwrap(model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return State(**json.loads(ckpt["state"]))


# --------------------------------------------------------------------------- the run


def fit(cfg: FitConfig, show_progress: bool = True,
        echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> FitResult:
    # ---- setup
    d, device = setup_distributed(cfg.device)
    info = open_store(cfg.store)
    run_dir = prepare_run_dir(cfg, d)
    try:
        return _fit(cfg, d, device, info, run_dir, show_progress, echo)
    finally:
        if d.main:
            release_lock(run_dir)
            drop_unstarted(run_dir)
        if d.world > 1 and dist.is_initialized():
            # every rank leaves together: tearing down gloo while a peer still holds its
            # connection aborts that peer (std::terminate at exit)
            with contextlib.suppress(Exception):
                dist.barrier()
            dist.destroy_process_group()


def _fit(cfg, d, device, info, run_dir, show_progress, echo) -> FitResult:
    tc = resolve_train_config(cfg, run_dir)
    check_store(cfg, info, run_dir)
    split = resolve_split(cfg, info, tc, run_dir)
    seed_everything(tc.seed + d.rank)
    dtype = amp_dtype(device, tc.precision)
    model, mcfg = build_training_model(info, tc, device)
    patch = resolve_patch(tc.patch, info.size, mcfg.divisor)
    loss_fn = make_loss(tc.loss, info.num_classes, regions=tc.regions)
    if cfg.resume:  # the recorded batch, not a new search: the run's steps must not change
        recorded = run.read_config(run_dir)
        batch_size, batch_info = int(recorded["batch_size"]), recorded["batch"]
    else:
        batch_size, batch_info = choose_batch_size(tc, model, loss_fn, patch, info, device,
                                                   dtype, d)
    # whole slices hold (size/patch)**2 times a patch's pixels: validate with as many
    # pixels per batch as a training batch, so validation fits wherever training does
    val_batch = max(1, batch_size * patch * patch // (info.size * info.size))
    optimizer = make_optimizer(model, tc)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    state = State(micro_batch=batch_size)
    if cfg.resume:
        state = restore_or_restart(run_dir, model, optimizer, scaler, device, state, echo)
    if tc.compile:
        model = torch.compile(model)
    if d.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def log(record: dict) -> None:
        if d.main:
            run.append_metrics(run_dir, {"time": time.time(), **record})

    train_slices = int(sum(info.cases[c].slices for c in split.train))
    samples = tc.samples_per_epoch or samples_per_epoch(train_slices, info.size, patch)
    steps_per_epoch = max(1, math.ceil(samples / (batch_size * d.world)))
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    if d.main and not cfg.resume:
        run.write_json(run_dir / run.CONFIG, {
            "store": str(Path(cfg.store).resolve()), "store_fingerprint": info.fingerprint,
            "store_attrs": {"window": json.loads(info.window.to_json()), "size": info.size,
                            "num_classes": info.num_classes},
            "train": asdict(tc), "model": asdict(mcfg), "context": tc.context,
            "batch": batch_info, "batch_size": batch_size, "patch_size": patch,
            "val_batch_size": val_batch,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps, "device": str(device), "env": environment(device, d)})
        run.write_json(run_dir / run.SPLIT, split.to_json())
    if d.main:
        echo(f"run {run_dir}: {len(split.train)} train / {len(split.val)} val cases, "
             f"{train_slices} train slices, batch {batch_size} x {d.world} rank(s) of "
             f"{patch}x{patch}" + (" patches" if patch < info.size else " slices") + ", "
             f"{steps_per_epoch} steps/epoch, device {device}"
             + (f", {dtype}".replace("torch.", "") if dtype else ", fp32")
             + (f", resuming at step {state.step}" if cfg.resume else ""))
    done = finished_run(cfg, state, tc, total_steps, d, device, run_dir, echo)
    if done is not None:
        return done
    writer = tensorboard_writer(run_dir, echo) if d.main else None
    bar = progress_bar(total_steps, state.step) if d.main and show_progress else None

    stop_reason = ""
    last_val: dict | None = None
    warned_stall = False
    diverged = Divergence(device, tolerate=scaler is not None)
    win = Window()
    stall_sum = [0.0, 0.0]
    t_run = time.perf_counter() - state.elapsed
    last_ckpt = time.perf_counter()
    model.train()
    while not stop_reason:
        # ---- one epoch of batches (resumes mid-epoch at state.step_in_epoch)
        loader = make_train_loader(
            cfg.store, info, split.train, batch_size=batch_size, workers=tc.workers,
            context=tc.context, augment=AugmentConfig(enabled=tc.augment),
            fg_fraction=tc.fg_fraction, tumour_weight=tc.tumour_weight, seed=tc.seed,
            rank=d.rank, world_size=d.world, samples_per_epoch=samples,
            pin_memory=device.type == "cuda", epoch=state.epoch,
            start_batch=state.step_in_epoch, patch=patch)
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            for g in optimizer.param_groups:
                g["lr"] = lr_at(progress_of(state, total_steps, tc), tc)
            loss = train_step(model, batch, loss_fn, optimizer, scaler, state, tc, device,
                              dtype, log)
            diverged.update(loss, state.step + 1)
            state.step += 1
            state.step_in_epoch += 1
            win.wait += t1 - t0
            win.loss = win.loss + loss
            win.slices += batch[0].shape[0] * d.world
            win.steps += 1
            state.elapsed = time.perf_counter() - t_run
            if state.step % tc.log_every == 0 or state.step == 1:
                win = flush_window(win, state, optimizer, log, bar, writer, stall_sum,
                                   echo if d.main else None)
                diverged.check(tc)
                if (not warned_stall and d.main and state.step >= 5 * tc.log_every
                        and stall_sum[0] / max(stall_sum[1], 1e-9) > STALL_WARN):
                    warned_stall = True
                    echo(f"warning: the {'GPU' if device.type == 'cuda' else 'model'} waited "
                         f"on the loader "
                         f"{100 * stall_sum[0] / stall_sum[1]:.0f}% of the time; raise "
                         f"--workers (now {tc.workers}), or put the store on faster disk")
            elif bar is not None:
                bar.update(1)
            stop_reason = should_stop(state, tc, total_steps, d, device)
            if tc.val_every and state.step % tc.val_every == 0 and not stop_reason:
                tv = time.perf_counter()
                last_val = run_validation(model, info, split, tc, device, dtype, val_batch, d,
                                          state, log, run_dir, optimizer, scaler, writer, t_run)
                win.t0 += time.perf_counter() - tv  # training throughput excludes validation
                last_ckpt = time.perf_counter()
            elif d.main and time.perf_counter() - last_ckpt > CHECKPOINT_EVERY_S:
                save(run_dir, "last", model, optimizer, scaler, state)
                last_ckpt = time.perf_counter()
            if stop_reason:
                break
        if stop_reason:
            break
        # ---- end of epoch: validate, checkpoint
        state.epoch += 1
        state.step_in_epoch = 0
        log({"kind": "epoch", "epoch": state.epoch, "step": state.step,
             "peak_memory_mb": peak_memory_mb(device)})
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the next record is that epoch's
        if state.epoch >= tc.epochs:
            stop_reason = "epochs"
            break
        tv = time.perf_counter()
        last_val = run_validation(model, info, split, tc, device, dtype, val_batch, d, state,
                                  log, run_dir, optimizer, scaler, writer, t_run)
        win.t0 += time.perf_counter() - tv
        last_ckpt = time.perf_counter()
    # ---- final validation and checkpoint
    if win.steps:
        flush_window(win, state, optimizer, log, bar, writer, stall_sum, echo if d.main else None)
    last_val = run_validation(model, info, split, tc, device, dtype, val_batch, d, state, log,
                              run_dir, optimizer, scaler, writer, t_run, final=True)
    if bar is not None:
        bar.close()
    stall = stall_sum[0] / max(stall_sum[1], 1e-9)
    log({"kind": "end", "step": state.step, "epoch": state.epoch, "reason": stop_reason,
         "stall": stall, "peak_memory_mb": peak_memory_mb(device),
         "elapsed": state.elapsed})
    if writer is not None:
        writer.close()
    return FitResult(run_dir, state.step, state.epoch, state.best, last_val, stall, stop_reason)


def flush_window(win: Window, state: State, optimizer, log, bar, writer, stall_sum,
                 echo: Callable[[str], None] | None) -> Window:
    loss = float(win.loss) / max(1, win.steps)  # the one host sync per log window
    wall = time.perf_counter() - win.t0
    stall = win.wait / wall if wall > 0 else 0.0
    if state.step > 1:
        # the first step's window is start-up (worker processes, store maps, JIT-compiled
        # kernels loading), not steady-state stall: it would set off a false warning
        stall_sum[0] += win.wait
        stall_sum[1] += wall
    rec = {"kind": "train", "step": state.step, "epoch": state.epoch, "loss": loss,
           "lr": optimizer.param_groups[0]["lr"], "slices_per_s": win.slices / wall,
           "stall": stall, "data_wait_s": win.wait, "wall_s": wall,
           "micro_batch": state.micro_batch}
    log(rec)
    if bar is not None:
        bar.update(win.steps)
        bar.set_postfix(loss=f"{loss:.3f}", sps=f"{rec['slices_per_s']:.0f}",
                        stall=f"{100 * stall:.0f}%")
    elif echo is not None:
        echo(f"step {state.step} epoch {state.epoch} loss {loss:.4f} lr {rec['lr']:.2e} "
             f"{rec['slices_per_s']:.0f} slices/s loader stall {100 * stall:.0f}%")
    if writer is not None:
        for k in ("loss", "lr", "slices_per_s", "stall"):
            writer.add_scalar(f"train/{k}", rec[k], state.step)
    return Window()


def should_stop(state: State, tc: TrainConfig, total_steps: int, d: Dist,
                device: torch.device) -> str:
    """Steps or wall time, whichever first; the time check leaves room for the final
    validation. Rank 0 decides for everyone, so ranks never disagree."""
    reason = ""
    if state.step >= total_steps:
        reason = "max_steps" if tc.max_steps and state.step >= tc.max_steps else "epochs"
    elif tc.time_limit and state.elapsed + state.last_val_seconds >= tc.time_limit:
        reason = "time_limit"
    if d.world > 1:
        codes = ["", "max_steps", "epochs", "time_limit"]
        t = torch.tensor([codes.index(reason)], device=device)
        dist.broadcast(t, src=0)
        reason = codes[int(t.item())]
    return reason


def run_validation(model, info, split, tc, device, dtype, batch_size, d, state, log, run_dir,
                   optimizer, scaler, writer, t_run, final: bool = False) -> dict:
    t = time.perf_counter()
    val = validate(model, info, split, tc, device, dtype, batch_size, d)
    state.last_val_seconds = time.perf_counter() - t
    state.elapsed = time.perf_counter() - t_run
    improved = val["mean_dice"] > state.best
    if improved:
        state.best = val["mean_dice"]
    log({"kind": "val", "step": state.step, "epoch": state.epoch, "final": final,
         "seconds": state.last_val_seconds, "peak_memory_mb": peak_memory_mb(device), **val})
    if d.main:
        save(run_dir, "last", model, optimizer, scaler, state)
        if improved:
            save(run_dir, "best", model, optimizer, scaler, state)
        if writer is not None:
            for k in ("kidney_dice", "tumour_dice", "mean_dice"):
                writer.add_scalar(f"val/{k}", val[k], state.step)
        try:
            from kitstrain.plots import plot_curves

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
            echo("note: tensorboard is not installed, so no TensorBoard logs (metrics are in "
                 "metrics.jsonl; `kitstrain plot` draws them); `pip install tensorboard` "
                 "to get them")
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def progress_bar(total: int, initial: int):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", desc="fit", file=sys.stderr,
                dynamic_ncols=True)
