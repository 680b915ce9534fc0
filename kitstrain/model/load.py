"""A trained network back from its run directory: the architecture its config.json records,
the weights of one of its checkpoints. score, predict, the API and tests load through here."""

from __future__ import annotations

from pathlib import Path

import torch

from kitsprep.errors import KitsError
from kitstrain.core import rundir as runlib
from kitstrain.core.record import read_record
from kitstrain.model.unet import UNet, UNetConfig, build_model

__all__ = ["load_model", "model_config"]


def model_config(run_dir: Path) -> UNetConfig:
    """The run's U-Net architecture, as recorded."""
    record = read_record(run_dir)
    return runlib.from_record(run_dir, runlib.CONFIG, lambda m: UNetConfig(**m), record.model)


def load_model(
    run_dir: Path, which: str = "best", device: str | torch.device = "cpu"
) -> tuple[UNet, dict]:
    """The run's model with weights from `which` ('best', falling back to 'last')."""
    run_dir = Path(run_dir)
    path = runlib.resolve_checkpoint(run_dir, which)
    ckpt = runlib.load_checkpoint(path, map_location=device)
    model = build_model(model_config(run_dir))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:  # another architecture's weights
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:2])[:120]
        raise KitsError(
            f"checkpoint {path} does not fit the model in {run_dir}/{runlib.CONFIG} "
            f"({detail or 'other layers'}); it is from another run or model, put "
            "back this run's checkpoint"
        ) from None
    model.to(device).to(memory_format=torch.channels_last).eval()  # as trained: NHWC
    return model, ckpt
