"""The run directory: one place that knows its layout, so fit, score, predict and plot agree.

runs/<name>/config.json     every resolved option, store path and fingerprint, versions
            split.json      train/val case lists and how they were chosen
            metrics.jsonl   one JSON object per logged event (train window, validation)
            checkpoints/last.pt, best.pt   tensors and JSON strings only, so they
                                           load with torch.load(weights_only=True)
            checkpoints/model.safetensors  best.pt's weights alone, to share
            lock            pid of the process training in this directory
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kitsprep.errors import KitsError
from kitstrain.model.unet import UNet, UNetConfig, build_model

RUNS_ROOT = Path("runs")
CONFIG = "config.json"
SPLIT = "split.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


def checkpoint_path(run_dir: Path, which: str) -> Path:
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


@contextlib.contextmanager
def _no_half_file(tmp: Path, path: Path) -> Iterator[None]:
    """A write that fails (a full disk) leaves no half-written temporary behind, and its
    error names the file."""
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise


def write_json(path: Path, obj: Any) -> None:
    """Atomic: a reader (or a crash) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with _no_half_file(tmp, path):
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
        os.replace(tmp, path)


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


def from_record(run_dir: Path, name: str, build, record):
    """`build(record)` (a dataclass from a recorded section): an unknown or missing field,
    from an edited file or another kits version, becomes one line naming the file."""
    try:
        return build(record)
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        raise KitsError(
            f"{Path(run_dir) / name} does not match this kits ({exc}); restore the "
            "file `kitstrain fit` wrote, or start a new run"
        ) from None


def read_config(run_dir: Path) -> dict:
    return read_json(run_dir, CONFIG)


def read_split(run_dir: Path) -> dict:
    return read_json(run_dir, SPLIT)


def model_config(run_dir: Path) -> UNetConfig:
    return from_record(run_dir, CONFIG, lambda c: UNetConfig(**c["model"]), read_config(run_dir))


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(json.dumps(record, default=float) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write to a temporary name, fsync, rename: a kill at any instant leaves the previous
    checkpoint intact. Payload holds tensors, numbers, strings, lists and dicts only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with _no_half_file(tmp, path):
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def export_weights(path: Path, state_dict: dict) -> None:
    """Weights only, as safetensors (`model.safetensors` beside `best.pt`): what users share,
    loadable without torch.load. Written atomically, as checkpoints are."""
    from safetensors.torch import save_file

    tensors = {
        k: v.detach().cpu().contiguous().clone()
        for k, v in state_dict.items()
        if isinstance(v, torch.Tensor)
    }
    tmp = path.with_name(path.name + ".tmp")
    with _no_half_file(tmp, path):
        save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "kitstrain"})
        os.replace(tmp, path)


def nonfinite_weights(state_dict: dict) -> int:
    """How many floating-point values of a model's state are NaN or Inf."""
    return int(
        sum(
            (~torch.isfinite(v)).sum().item()
            for v in state_dict.values()
            if isinstance(v, torch.Tensor) and v.is_floating_point()
        )
    )


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


def load_model(
    run_dir: Path, which: str = "best", device: str | torch.device = "cpu"
) -> tuple[UNet, dict]:
    """The run's model with weights from `which` ('best', falling back to 'last')."""
    run_dir = Path(run_dir)
    path = resolve_checkpoint(run_dir, which)
    ckpt = load_checkpoint(path, map_location=device)
    model = build_model(model_config(run_dir))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:  # another architecture's weights
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:2])[:120]
        raise KitsError(
            f"checkpoint {path} does not fit the model in {run_dir}/{CONFIG} "
            f"({detail or 'other layers'}); it is from another run or model, put "
            "back this run's checkpoint"
        ) from None
    model.to(device).to(memory_format=torch.channels_last).eval()  # as trained: NHWC
    return model, ckpt


def resolve_checkpoint(run_dir: Path, which: str) -> Path:
    """The checkpoint file `which` names: 'best', or 'last' while no validation has saved a
    best yet. One rule, so a report names the file `load_model` actually loaded."""
    path = checkpoint_path(run_dir, which)
    if not path.is_file() and which == "best":
        last = checkpoint_path(run_dir, "last")
        if last.is_file():
            return last
    return path
