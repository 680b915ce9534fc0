"""What a network promises the rest of kitstrain: `NetworkContract`.

Training, loading and inference never look inside a network: they read its contract (how
many channels go in and come out, how many deep-supervision outputs it adds in training,
which input sides it can take, how many spatial dimensions) from its config's
``contract``. A module of its own, below every network and the registry, so that a network
file and `kitstrain.model.networks` both import it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["NetworkContract"]


@dataclass(frozen=True)
class NetworkContract:
    """A network's inputs and outputs.

    ``(N, in_channels, *spatial)`` goes in, ``(N, out_channels, *spatial)`` logits come out
    with the same spatial size; every spatial side must be a multiple of ``divisor``. In
    training mode a network with ``deep_supervision = D`` returns a list instead: the
    full-size logits, then D coarser ones (1/2 .. 1/2**D of the size)."""

    in_channels: int
    out_channels: int
    divisor: int
    deep_supervision: int = 0
    spatial_dims: int = 2

    @property
    def memory_format(self) -> torch.memory_format:
        """Channels-last in the network's own dimensions: what training and loading put its
        weights in (cuDNN's and oneDNN's fast kernels)."""
        return torch.channels_last if self.spatial_dims == 2 else torch.channels_last_3d
