"""The run directory: one place that knows its layout, so fit, score, predict and plot agree.

    runs/<name>/config.json     every resolved option, store path and fingerprint, versions
                split.json      train/val case lists and how they were chosen
                metrics.jsonl   one JSON object per logged event (train window, validation)
                checkpoints/last.pt, best.pt   tensors and JSON strings only, so they
                                               load with torch.load(weights_only=True)
                lock            pid of the process training in this directory
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from kitsprep.errors import KitsError
from kitstrain.model import UNet, UNetConfig, build_model

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
        raise KitsError(f"no training run under {root}/; train one with `kitstrain fit STORE`, "
                        "or name the run directory")
    return max(runs, key=lambda p: (p / CONFIG).stat().st_mtime)


def write_json(path: Path, obj: Any) -> None:
    """Atomic: a reader (or a crash) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def read_json(run_dir: Path, name: str) -> dict:
    path = Path(run_dir) / name
    if not path.is_file():
        raise KitsError(f"{run_dir} is not a kitstrain run directory ({name} is missing); "
                        "pass a folder written by `kitstrain fit`")
    return json.loads(path.read_text())


def read_config(run_dir: Path) -> dict:
    return read_json(run_dir, CONFIG)


def read_split(run_dir: Path) -> dict:
    return read_json(run_dir, SPLIT)


def model_config(run_dir: Path) -> UNetConfig:
    try:
        return UNetConfig(**read_config(run_dir)["model"])
    except (TypeError, ValueError) as exc:  # a run recorded by another kitstrain version
        raise KitsError(f"{run_dir}/config.json records a model this kitstrain cannot build "
                        f"({str(exc).splitlines()[0]}); train the run again with this "
                        "version") from None


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
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    if not path.is_file():
        raise KitsError(f"checkpoint {path} does not exist; the run has not saved one yet")
    return torch.load(path, map_location=map_location, weights_only=True)


def load_model(run_dir: Path, which: str = "best", device: str | torch.device = "cpu"
               ) -> tuple[UNet, dict]:
    """The run's model with weights from `which` ('best', falling back to 'last')."""
    run_dir = Path(run_dir)
    path = checkpoint_path(run_dir, which)
    if not path.is_file() and which == "best":
        path = checkpoint_path(run_dir, "last")
    ckpt = load_checkpoint(path, map_location=device)
    model = build_model(model_config(run_dir))
    model.load_state_dict(ckpt["model"])
    model.to(device).to(memory_format=torch.channels_last).eval()  # as trained: NHWC
    return model, ckpt
