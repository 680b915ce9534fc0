"""Networks by name: `NETWORKS` and `build_network`, the one seam between kitstrain and an
architecture.

Training builds its network here from a small config, and loading a run rebuilds it from
the config's record (the ``model`` section of config.json), so neither knows which
architecture it holds: they read its `NetworkContract` (channels in and out, deep
supervision, the input side divisor, spatial dimensions). A new network (a residual
encoder, a 3D net) is a new file plus an entry in `NETWORKS`; nothing else changes.

What an entry's config must be (`UNetConfig` is the model to follow):
- a frozen dataclass that takes the training options as keywords: ``in_channels``,
  ``num_classes``, ``width``, ``depth``, ``norm`` (a name in `layers.NORMS`),
  ``deep_supervision``, ``regions`` and ``region_writes`` (the label set's write order,
  which inference decodes region logits with), and rebuilds from ``asdict`` of itself
  after a trip through JSON (tuples come back as lists);
- with a field ``network`` that defaults to its registry name, so the record names it (a
  record without one is a U-Net's, from before there was a choice);
- with a ``contract`` property giving its `NetworkContract`.
The built module keeps its config as ``.cfg`` (inference reads the write order there).

Importing this module builds nothing: the entries name classes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from kitsprep.errors import KitsError
from kitstrain.model.contract import NetworkContract
from kitstrain.model.unet import UNet, UNetConfig

__all__ = [
    "DEFAULT_NETWORK",
    "NETWORKS",
    "Network",
    "NetworkContract",
    "build_network",
    "config_from_record",
    "network",
    "network_config",
]


@dataclass(frozen=True)
class Network:
    """A registry entry: the network's config class and the callable that builds a freshly
    initialised module from one such config."""

    config: type
    build: Callable[[Any], nn.Module]
    about: str = ""  # one line for help texts


# name -> entry; `--network` (when it exists) chooses among these names
NETWORKS: dict[str, Network] = {
    "unet": Network(UNetConfig, UNet, "2D U-Net (Ronneberger et al. 2015), padded convolutions"),
}

# what a run trained before networks had names was, and what `fit` builds unless told
DEFAULT_NETWORK = "unet"


def network(name: str) -> Network:
    """The entry called ``name``; an unknown name is one line listing the known ones."""
    try:
        return NETWORKS[name]
    except KeyError:
        raise KitsError(
            f"unknown network {name!r}; choose one of {', '.join(sorted(NETWORKS))}"
        ) from None


def network_config(name: str, **options: Any) -> Any:
    """The config of network ``name`` from the training options (module docstring)."""
    return network(name).config(**options)


def config_from_record(record: Mapping[str, Any]) -> Any:
    """The config a run recorded (config.json's ``model`` section); without a ``network``
    key it is a U-Net's. A bad record raises ValueError or TypeError, which the run
    loader turns into one line naming the file."""
    name = record.get("network", DEFAULT_NETWORK)
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; this kits has {', '.join(sorted(NETWORKS))}")
    return NETWORKS[name].config(**record)


def build_network(name: str, config: Any) -> nn.Module:
    """A freshly initialised network ``name`` for ``config`` (an instance of its entry's
    config class)."""
    entry = network(name)
    if not isinstance(config, entry.config):
        raise TypeError(
            f"network {name!r} is built from a {entry.config.__name__}; found "
            f"{type(config).__name__}"
        )
    return entry.build(config)
