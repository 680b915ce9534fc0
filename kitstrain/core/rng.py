"""A process's random streams (torch, CUDA, NumPy, Python) as checkpoint-ready tensors and
JSON strings, and back: what makes a resumed run draw what the uninterrupted one drew."""

from __future__ import annotations

import json
import random

import numpy as np
import torch

__all__ = ["rng_state", "set_rng_state"]


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
    """Restore this rank's streams from a checkpoint's per-rank list (`rng_state` of each
    rank). A rank the saved run did not have keeps its freshly seeded streams."""
    states = saved["ranks"]
    if rank >= len(states):
        return
    s = states[rank]
    torch.set_rng_state(s["torch"].cpu())
    if device.type == "cuda" and s["cuda"].numel():
        torch.cuda.set_rng_state(s["cuda"].cpu(), device)
    np.random.set_state(
        ("MT19937", np.array(json.loads(s["numpy"]), np.uint32), s["numpy_pos"], 0, 0.0)
    )
    py = json.loads(s["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
