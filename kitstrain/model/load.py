"""A trained network back from its run directory: the architecture its config.json records,
the weights of one of its checkpoints. score, predict, the API and tests load through here.

The record names its network (`kitstrain.model.networks`; a record without a name is a
U-Net's), so loading works for any registered architecture."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kitsprep.errors import KitsError
from kitstrain.core import rundir as runlib
from kitstrain.core.record import RunRecord, read_record
from kitstrain.model.networks import build_network, config_from_record

__all__ = ["load_model"]


def load_model(
    run_dir: Path,
    which: str = "best",
    device: str | torch.device = "cpu",
    record: RunRecord | None = None,
) -> tuple[nn.Module, dict]:
    """The run's model with weights from `which` ('best', falling back to 'last'), built as
    its record (`record`, or read from config.json) describes."""
    run_dir = Path(run_dir)
    path = runlib.resolve_checkpoint(run_dir, which)
    ckpt = runlib.load_checkpoint(path, map_location=device)
    record = record if record is not None else read_record(run_dir)
    cfg = runlib.from_record(run_dir, runlib.CONFIG, config_from_record, record.model)
    model = build_network(cfg.network, cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:  # another architecture's weights
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:2])[:120]
        raise KitsError(
            f"checkpoint {path} does not fit the model in {run_dir}/{runlib.CONFIG} "
            f"({detail or 'other layers'}); it is from another run or model, put "
            "back this run's checkpoint"
        ) from None
    # as trained: channels-last (NHWC for a 2D network)
    model.to(device).to(memory_format=cfg.contract.memory_format).eval()
    return model, ckpt
