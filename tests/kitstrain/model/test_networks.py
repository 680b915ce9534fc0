"""The network seam: networks built by name from a small config, their contracts read by
training and loading, a dummy network registered in a test built like the U-Net."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from kitsprep.errors import KitsError
from kitstrain.model import networks
from kitstrain.model.contract import NetworkContract
from kitstrain.model.networks import (
    DEFAULT_NETWORK,
    NETWORKS,
    Network,
    build_network,
    config_from_record,
    network_config,
)
from kitstrain.model.unet import UNet, UNetConfig


@dataclass(frozen=True)
class DummyConfig:
    """The smallest config the registry asks for (networks' module docstring)."""

    in_channels: int = 1
    num_classes: int = 3
    width: int = 4
    depth: int = 1
    norm: str = "none"
    deep_supervision: int = 0
    regions: bool = False
    region_writes: tuple[int, ...] = ()
    network: str = "dummy"

    def __post_init__(self) -> None:
        object.__setattr__(self, "region_writes", tuple(self.region_writes))  # JSON: a list

    @property
    def contract(self) -> NetworkContract:
        out = len(self.region_writes) if self.regions else self.num_classes
        return NetworkContract(self.in_channels, out, divisor=4, spatial_dims=2)


class Dummy(nn.Module):
    """A 1x1 convolution: logits of the input's size."""

    def __init__(self, cfg: DummyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.conv = nn.Conv2d(cfg.in_channels, cfg.contract.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.fixture
def dummy(monkeypatch: pytest.MonkeyPatch) -> Network:
    entry = Network(DummyConfig, Dummy, "a 1x1 convolution, for tests")
    monkeypatch.setitem(NETWORKS, "dummy", entry)
    return entry


def test_the_unet_is_the_first_and_default_network() -> None:
    assert list(NETWORKS)[0] == DEFAULT_NETWORK == "unet"
    cfg = network_config("unet", in_channels=5, num_classes=4, width=4, depth=3)
    assert isinstance(cfg, UNetConfig) and cfg.network == "unet"
    model = build_network("unet", cfg)
    assert isinstance(model, UNet) and model.cfg is cfg
    assert cfg.contract == NetworkContract(
        in_channels=5, out_channels=4, divisor=8, deep_supervision=0, spatial_dims=2
    )
    regions = UNetConfig(num_classes=4, regions=True, region_writes=(1, 3, 2), deep_supervision=2)
    assert regions.contract.out_channels == 3 and regions.contract.deep_supervision == 2
    assert regions.contract.memory_format == torch.channels_last


def test_a_registered_dummy_network_is_built_by_name_and_its_contract_read(
    dummy: Network,
) -> None:
    cfg = network_config("dummy", in_channels=3, num_classes=4)
    assert isinstance(cfg, DummyConfig)
    model = build_network("dummy", cfg)
    assert isinstance(model, Dummy)
    contract = cfg.contract
    assert (contract.in_channels, contract.out_channels, contract.divisor) == (3, 4, 4)
    x = torch.randn(2, contract.in_channels, 8, 8)
    assert model(x).shape == (2, contract.out_channels, 8, 8)
    # its record names it, and rebuilds the same config
    assert config_from_record(asdict(cfg)) == cfg


def test_unknown_network_names_list_the_known_ones(dummy: Network) -> None:
    with pytest.raises(KitsError) as err:
        build_network("vnet", UNetConfig())
    message = str(err.value)
    assert "'vnet'" in message and "dummy, unet" in message and "\n" not in message
    with pytest.raises(KitsError, match="dummy, unet"):
        network_config("vnet", in_channels=1)
    with pytest.raises(ValueError, match="unknown network 'vnet'.*dummy, unet"):
        config_from_record({"network": "vnet"})


def test_a_config_of_another_network_is_refused(dummy: Network) -> None:
    with pytest.raises(TypeError, match="'dummy' is built from a DummyConfig; found UNetConfig"):
        build_network("dummy", UNetConfig())
    with pytest.raises(ValueError, match="UNetConfig.network: expected 'unet'"):
        UNetConfig(network="dummy")


def test_records_without_a_network_name_are_unets() -> None:
    """config.json written before networks had names: its model section has no key."""
    cfg = UNetConfig(num_classes=4, width=4, depth=2, regions=True, region_writes=(1, 3, 2))
    record = asdict(cfg)
    assert record["network"] == "unet"
    del record["network"]
    assert config_from_record(record) == cfg
    # lists, as JSON gives them back
    assert config_from_record({**record, "region_writes": [1, 3, 2]}) == cfg


def test_training_builds_the_named_network_and_checks_its_contract(
    dummy: Network, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from kitsprep.labels import EDITIONS
    from kitstrain.core.config import TrainConfig
    from kitstrain.train.fit import build_training_model

    info = SimpleNamespace(num_classes=4, labels=EDITIONS["kits23"], size=32)
    tc = TrainConfig(context=1, regions=True)
    model, cfg = build_training_model(info, tc, torch.device("cpu"), network="dummy")
    assert isinstance(model, Dummy) and cfg.region_writes == (1, 3, 2)
    assert cfg.contract.in_channels == 3 and cfg.contract.out_channels == 3
    # a side the network cannot take, one line with the fix
    with pytest.raises(KitsError, match="30x30.*divisible by 4.*--size 28"):
        build_training_model(
            SimpleNamespace(num_classes=4, labels=EDITIONS["kits23"], size=30),
            tc,
            torch.device("cpu"),
            network="dummy",
        )
    # a 3D network cannot train on slices
    monkeypatch.setattr(
        DummyConfig,
        "contract",
        property(lambda c: NetworkContract(c.in_channels, 3, divisor=4, spatial_dims=3)),
    )
    with pytest.raises(KitsError, match="'dummy' is 3D"):
        build_training_model(info, tc, torch.device("cpu"), network="dummy")


def _run_with(run_dir: Path, model: nn.Module, record: dict) -> Path:
    from kitstrain.core import rundir as runlib

    run_dir.mkdir()
    runlib.write_json(run_dir / runlib.CONFIG, {"model": record, "train": {}})
    runlib.save_checkpoint(runlib.checkpoint_path(run_dir, "best"), {"model": model.state_dict()})
    return run_dir


def test_a_run_is_loaded_by_the_network_its_record_names(dummy: Network, tmp_path: Path) -> None:
    from kitstrain.model.load import load_model

    trained = Dummy(DummyConfig(in_channels=3))
    run = _run_with(tmp_path / "dummy", trained, asdict(trained.cfg))
    model, _ = load_model(run)
    assert isinstance(model, Dummy) and model.cfg == trained.cfg and not model.training
    assert torch.equal(model.conv.weight, trained.conv.weight)
    # a record from before networks had names is a U-Net
    unet = UNet(UNetConfig(width=4, depth=2))
    legacy = {k: v for k, v in asdict(unet.cfg).items() if k != "network"}
    model, _ = load_model(_run_with(tmp_path / "legacy", unet, legacy))
    assert isinstance(model, UNet) and model.cfg == unet.cfg
    # a name this kits does not have: one line naming the file and the known networks
    with pytest.raises(KitsError) as err:
        load_model(_run_with(tmp_path / "other", unet, {**legacy, "network": "vnet"}))
    assert "config.json" in str(err.value) and "'vnet'" in str(err.value)
    assert "dummy, unet" in str(err.value) and "\n" not in str(err.value)


def test_the_registry_is_plain_data() -> None:
    """Importing it builds nothing: entries name a config class and a builder, and the
    module holds no network instance."""
    for name, entry in NETWORKS.items():
        assert isinstance(entry, Network) and isinstance(entry.config, type), name
        assert callable(entry.build) and entry.about, name
        assert entry.config().network == name  # the record names the entry that builds it
    assert not [v for v in vars(networks).values() if isinstance(v, nn.Module)]
