"""Batches onto the device off the compute stream.

On CUDA the host runs ahead of the GPU (the step has no host sync, see
`kitstrain.train.trainer`): when the loop asks for batch n+1, step n's kernels are still
queued or running. `DeviceBatches` then enqueues batch n+1's host-to-device copy (from
pinned memory) and, with device augmentation, its warp on a side stream, so the copy runs
while step n computes; the compute stream waits for it with an event, on the GPU, not the
host, and `record_stream` keeps the caching allocator from handing the side stream's
tensors out again before the step that reads them is done. Off CUDA the same code runs
on the current stream (the copy is a no-op on CPU), which is what the CPU tests exercise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext

import numpy as np
import torch

__all__ = ["DeviceBatches"]


class DeviceBatches:
    """Wraps a loader iterator of (image, label[, params]) batches: yields (image, label)
    on `device`, `transform(image, label, params)` applied after the copy when a batch
    carries params (device augmentation)."""

    def __init__(
        self,
        batches: Iterator,
        device: torch.device,
        transform: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self.batches = batches
        self.device = device
        self.transform = transform
        self.side = (
            torch.cuda.Stream(device) if device.type == "cuda" else None
        )  # the copy's stream

    def __iter__(self) -> DeviceBatches:
        return self

    def _on_side(self):
        return torch.cuda.stream(self.side) if self.side is not None else nullcontext()

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(self.batches)
        with self._on_side():
            moved = [
                t.to(self.device, non_blocking=True) if isinstance(t, torch.Tensor) else t
                for t in batch
            ]
            if len(moved) > 2 and isinstance(moved[2], np.ndarray):
                if self.transform is None:
                    raise ValueError("a batch with augmentation params needs a transform")
                moved = list(self.transform(*moved[:3]))
            images, labels = moved[0], moved[1]
        if self.side is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.side)  # on the GPU: the host does not wait
            images.record_stream(compute)
            labels.record_stream(compute)
        return images, labels
