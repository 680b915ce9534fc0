"""The run directory: one place that knows its layout, so fit, score, predict and plot agree.

runs/<name>/config.json     every resolved option, store path and fingerprint, versions
            split.json      train/val case lists and how they were chosen
            metrics.jsonl   one JSON object per logged event (train window, validation)
            checkpoints/last.pt, best.pt   tensors and JSON strings only, so they
                                           load with torch.load(weights_only=True)
            checkpoints/model.safetensors  best.pt's weights alone, to share
            oom.json        a DDP rank's OOM: the micro-batch --resume continues with
            lock            pid of the process training in this directory

Every file is written atomically (`kitsprep.files`): a reader, or a kill, sees the old file
or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from kitsprep import locks
from kitsprep.errors import KitsError
from kitsprep.files import atomic_path, remove_stale_temps, write_atomic, write_errors
from kitstrain.core.metricslog import (  # noqa: F401 - the run directory's log, named here too
    METRICS,
    append_metrics,
    cut_metrics,
    last_finite_loss,
    last_validation,
    read_metrics,
)
from kitstrain.core.rng import rng_state, set_rng_state  # noqa: F401 - checkpoints hold them

RUNS_ROOT = Path("runs")
CONFIG = "config.json"
SPLIT = "split.json"
CHECKPOINTS = "checkpoints"
OOM_RECORD = "oom.json"
WEIGHTS_FILE = "model.safetensors"  # weights only, beside best.pt
LOCK = "lock"


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
    train_seconds: float = 0.0  # in training steps (loader waits included), over the run
    val_seconds: float = 0.0  # in validations, over the run


def checkpoint_path(run_dir: Path, which: str) -> Path:
    """checkpoints/<which>.pt: `which` is 'last' or 'best'."""
    return Path(run_dir) / CHECKPOINTS / f"{which}.pt"


def newest_run(root: Path = RUNS_ROOT) -> Path:
    """The most recently modified run under `root` that has a config."""
    root = Path(root)
    runs = [p for p in root.glob("*") if (p / CONFIG).is_file()] if root.is_dir() else []
    if not runs:
        raise KitsError(
            f"no training run under {root}/; train one with `kitstrain fit STORE`, "
            "or name the run directory"
        )
    return max(runs, key=lambda p: (p / CONFIG).stat().st_mtime)


def write_json(path: Path, obj: Any) -> None:
    """Atomic: a reader (or a crash) never sees half a file."""
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


# --------------------------------------------------------------------------- prepare, lock

_created_here: set[Path] = set()  # run directories this process made (see drop_unstarted)


def prepare(out: Path | None, resume: bool, main: bool) -> Path:
    """The run directory: `out`, a new runs/<timestamp>/, or (resume) the newest run. Rank
    0 creates and locks it, and removes the temporary files a killed run left; a new run
    refuses a directory that holds one. A --resume of a folder that a run was killed in
    before it wrote its record (config.json, written last) starts that run afresh
    (`unstarted`)."""
    if resume:
        run_dir = out or newest_run()
        if not (run_dir / CONFIG).is_file() and not unstarted(run_dir):
            raise KitsError(
                f"--resume: {run_dir} holds no run (config.json missing); start a "
                "new run without --resume"
            )
    else:
        run_dir = out or RUNS_ROOT / datetime.now().strftime("%Y%m%d-%H%M%S")
        if (run_dir / CONFIG).is_file():
            raise KitsError(
                f"{run_dir} already holds a run; continue it with --resume or choose another --out"
            )
    if main:
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
        for folder in (run_dir, run_dir / CHECKPOINTS):
            remove_stale_temps(folder)
    return run_dir


def unstarted(run_dir: Path) -> bool:
    """A folder a run was killed in before it wrote config.json (its record, written after
    split.json): no checkpoint either, so starting it afresh loses nothing."""
    return (
        run_dir.is_dir()
        and not (run_dir / CONFIG).is_file()
        and not any((run_dir / CHECKPOINTS).glob("*.pt"))
    )


def drop_unstarted(run_dir: Path) -> None:
    """A run refused before it wrote its config (a bad option, a failed start) leaves no
    empty runs/<name>/ behind, when this process made the folder."""
    if run_dir in _created_here and not (run_dir / CONFIG).is_file():
        shutil.rmtree(run_dir, ignore_errors=True)
    _created_here.discard(run_dir)


def acquire_lock(run_dir: Path) -> None:
    """One training process per run directory: a POSIX record lock on `lock` (holding the
    pid), taken atomically (`kitsprep.locks`); the kernel frees a killed run's lock, and the
    loader's workers do not inherit it."""
    try:
        locks.take(run_dir / LOCK)
    except locks.LockBusy as busy:
        raise KitsError(
            f"{run_dir} is in use by process {busy.pid}; wait for it, stop it, or "
            "choose another --out"
        ) from None


def release_lock(run_dir: Path) -> None:
    """Release (and remove) the lock if this process holds it."""
    locks.release(run_dir / LOCK)


# --------------------------------------------------------------------------- config, split


def read_json(run_dir: Path, name: str) -> dict:
    path = Path(run_dir) / name
    if not path.is_file():
        raise KitsError(
            f"{run_dir} is not a kitstrain run directory ({name} is missing); "
            "pass a folder written by `kitstrain fit`"
        )
    try:
        obj = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise KitsError(
            f"{path} is not valid JSON ({exc}); restore the file `kitstrain fit` "
            "wrote, or start a new run"
        ) from None
    if not isinstance(obj, dict):
        raise KitsError(
            f"{path} holds a JSON {type(obj).__name__}, not the object `kitstrain "
            "fit` writes; restore the file, or start a new run"
        )
    return obj


def from_record(run_dir: Path, name: str, build: Callable[[Any], Any], record: Any) -> Any:
    """`build(record)` (a dataclass from a recorded section): an unknown or missing field,
    from an edited file or another kits version, becomes one line naming the file."""
    try:
        return build(record)
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        raise KitsError(
            f"{Path(run_dir) / name} does not match this kits ({exc}); restore the "
            "file `kitstrain fit` wrote, or start a new run"
        ) from None


def read_split(run_dir: Path) -> dict:
    """split.json, checked to be a JSON object."""
    return read_json(run_dir, SPLIT)


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write to a temporary name, fsync, rename: a kill at any instant leaves the previous
    checkpoint intact. Payload holds tensors, numbers, strings, lists and dicts only. A full
    disk, a file-size limit or an I/O error is one line (`disk_error`); --resume goes on
    from the previous checkpoint once it is fixed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _disk_errors(path), atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)


def export_weights(path: Path, state_dict: dict, step: int | None = None) -> None:
    """Weights only, as safetensors (`model.safetensors` beside `best.pt`): what users share,
    loadable without torch.load. Written atomically and durably, as checkpoints are; its
    metadata names the step of the checkpoint it came from."""
    from safetensors.torch import save_file

    tensors = {
        k: v.detach().cpu().contiguous().clone()
        for k, v in state_dict.items()
        if isinstance(v, torch.Tensor)
    }
    meta = {"format": "pt", "producer": "kitstrain"}
    if step is not None:
        meta["step"] = str(step)
    with _disk_errors(path), atomic_path(path, fsync=True) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _disk_errors(path: Path) -> contextlib.AbstractContextManager:
    run_dir = path.parent.parent if path.parent.name == CHECKPOINTS else path.parent
    return write_errors(
        path,
        "the previous checkpoint is intact; free space (or fix the disk), then continue "
        f"with `kitstrain fit STORE --resume --out {run_dir}`",
    )


def nonfinite_weights(state_dict: dict) -> int:
    """How many floating-point values of a model's state are NaN or Inf."""
    return int(
        sum(
            (~torch.isfinite(v)).sum().item()
            for v in state_dict.values()
            if isinstance(v, torch.Tensor) and v.is_floating_point()
        )
    )


def refuse_nonfinite(run_dir: Path, weights: dict, step: int) -> None:
    """No NaN/Inf weight ever reaches a checkpoint: a diverged model stops the run, and the
    previous checkpoint stays as it was."""
    bad = nonfinite_weights(weights)
    if bad:
        raise KitsError(
            f"training diverged by step {step}: the model holds {bad} NaN/Inf "
            f"weights{last_finite_loss(run_dir)}, so no checkpoint was written; start a new "
            "run with a lower --lr"
        )


def save_training(run_dir: Path, which: list[str], payload: dict) -> None:
    """A training checkpoint (weights, optimizer, scaler, `State`, every rank's RNG
    streams) as each of `which`; 'best' also exports its weights as safetensors. In the
    order that keeps the set consistent at every instant: best.pt, then its export, then
    last.pt, which records that best (a kill before last.pt is written redoes the steps
    since the previous one, and writes the same best again)."""
    step = json.loads(payload["state"])["step"] if "state" in payload else None
    if "best" in which:
        save_checkpoint(checkpoint_path(run_dir, "best"), payload)
        export_weights(weights_path(run_dir), payload["model"], step)
    for w in which:
        if w != "best":
            save_checkpoint(checkpoint_path(run_dir, w), payload)


def weights_path(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS / WEIGHTS_FILE


def repair_export(run_dir: Path) -> bool:
    """`model.safetensors` from best.pt again where it is missing or from another step
    (a run killed between the two by an older kits). True if it was rewritten."""
    best = checkpoint_path(run_dir, "best")
    if not best.is_file():
        return False
    ckpt = load_checkpoint(best)
    step = json.loads(ckpt["state"])["step"] if "state" in ckpt else None
    path = weights_path(run_dir)
    if path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("step") == str(step):
                    return False
        except Exception:  # noqa: BLE001 - a torn export is rewritten
            pass
    export_weights(path, ckpt["model"], step)
    return True


def restore_training(
    run_dir: Path,
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    rank: int,
    device: torch.device,
) -> State:
    """Load last.pt into the model, optimizer, scaler and this rank's RNG streams; the
    micro-batch a DDP OOM recorded after it (`OOM_RECORD`) wins."""
    ckpt = load_checkpoint(checkpoint_path(run_dir, "last"), map_location="cpu")
    net.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"], rank, device)
    state = State(**json.loads(ckpt["state"]))
    oom = run_dir / OOM_RECORD
    if oom.is_file():  # a rank ran out of memory after that checkpoint: continue smaller
        state.micro_batch = min(state.micro_batch, int(json.loads(oom.read_text())["micro_batch"]))
    return state


def record_oom(run_dir: Path, step: int, rank: int, micro_batch: int) -> None:
    """What `--resume` continues with after a DDP rank ran out of memory."""
    write_json(run_dir / OOM_RECORD, {"step": step, "rank": rank, "micro_batch": micro_batch})


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint `kitstrain fit` wrote, checked: a truncated, empty or foreign file, or
    one with NaN/Inf weights (a diverged run), is refused in one line. fit's resume, score
    and predict all load through here."""
    if not path.is_file():
        raise KitsError(f"checkpoint {path} does not exist; the run has not saved one yet")
    if path.stat().st_size == 0:
        raise KitsError(
            f"checkpoint {path} is empty (0 bytes: the disk filled, or a copy was "
            "cut short); use --checkpoint last, or retrain"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        if "weights only load failed" in str(exc).lower():
            raise KitsError(
                f"checkpoint {path} holds pickled Python objects besides tensors, "
                "which kits never loads (it may run code); it was not written by "
                "`kitstrain fit`, use the run's own checkpoint or retrain"
            ) from None
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise KitsError(
            f"checkpoint {path} cannot be loaded ({reason}): it is truncated, "
            "damaged or not written by `kitstrain fit`; use --checkpoint last, "
            "or retrain"
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise KitsError(
            f"checkpoint {path} holds no model weights, so it was not written by "
            "`kitstrain fit`; pass a run directory that `kitstrain fit` wrote"
        )
    bad = nonfinite_weights(ckpt["model"])
    if bad:
        raise KitsError(
            f"checkpoint {path} holds {bad} NaN/Inf weights (the run diverged); "
            "retrain with a lower --lr"
        )
    return ckpt


def resolve_checkpoint(run_dir: Path, which: str) -> Path:
    """The checkpoint file `which` names: 'best', or 'last' while no validation has saved a
    best yet. One rule, so a report names the file `load_model` actually loaded."""
    path = checkpoint_path(run_dir, which)
    if not path.is_file() and which == "best":
        last = checkpoint_path(run_dir, "last")
        if last.is_file():
            return last
    return path
