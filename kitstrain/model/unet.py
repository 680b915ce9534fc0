"""The 2D U-Net of Ronneberger et al. (2015), with padded convolutions: the network
``"unet"`` of `kitstrain.model.networks`.

Padding every 3x3 convolution keeps encoder and decoder feature maps the same size, so
skip connections concatenate without cropping and the output has the input's size. The
only constraint this leaves is that H and W divide by 2**depth, which ``forward`` checks
with a message that says how to fix it, and which its contract (`UNetConfig.contract`)
tells training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kitstrain.model.contract import NetworkContract

# NORMS and the input padding are shared by every network (`layers`); imported here too,
# where `--norm` (the CLI reads unet.NORMS), fit and older callers look for them
from kitstrain.model.layers import NORMS, PaddedConv2d, pad_input_channels

__all__ = [
    "NORMS",
    "PaddedConv2d",
    "UNet",
    "UNetConfig",
    "build_model",
    "count_parameters",
    "pad_input_channels",
]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a :class:`UNet`; frozen so it can be saved with a run and compared."""

    in_channels: int = 1  # 1 + 2K for 2.5D context K
    num_classes: int = 3  # background plus the labels: the store's LabelSet.num_classes
    width: int = 32  # features of the first level; doubles per level down
    depth: int = 4  # number of down-sampling steps
    norm: str = "batch"  # a name in NORMS
    # extra 1x1 heads on the decoder's next N coarser levels (1/2, 1/4, ...), used in
    # training only; see losses.deep_supervision_weights
    deep_supervision: int = 0
    # one sigmoid logit per scored region of the label set instead of one softmax logit per
    # class (see losses.region_targets); region_writes is the label set's write_order (the
    # label each region writes back, in order), so a run decodes without its store
    regions: bool = False
    region_writes: tuple[int, ...] = ()
    # the registry entry that builds it (networks.NETWORKS): recorded in config.json's
    # model section so that a run is rebuilt by the network that trained it
    network: str = "unet"

    def __post_init__(self) -> None:
        # config.json gives lists back
        object.__setattr__(self, "region_writes", tuple(self.region_writes))
        if self.network != "unet":
            raise ValueError(
                f"UNetConfig.network: expected 'unet'; found {self.network!r}. Fix: build "
                f"another network with kitstrain.model.networks.build_network and its config."
            )
        _check_int("in_channels", self.in_channels, 1, "1 + 2K for 2.5D context K, e.g. 1 or 5")
        _check_int(
            "num_classes",
            self.num_classes,
            2,
            "background plus the store's labels (StoreInfo.num_classes)",
        )
        if self.regions and not (
            self.region_writes
            and all(isinstance(v, int) and 0 < v < self.num_classes for v in self.region_writes)
        ):
            raise ValueError(
                f"UNetConfig.region_writes: expected the label each region writes back, each "
                f"within 1..{self.num_classes - 1}, with regions=True; found "
                f"{self.region_writes!r}. Fix: pass the label set's write_order."
            )
        _check_int("width", self.width, 1, "a positive feature count such as 32")
        _check_int("depth", self.depth, 1, "a number of down-sampling steps such as 4")
        if self.norm not in NORMS:
            raise ValueError(
                f"UNetConfig.norm: expected one of {', '.join(NORMS)}; found {self.norm!r}. "
                f"Fix: pass norm='batch' (the default) or another of those names."
            )
        _check_int(
            "deep_supervision",
            self.deep_supervision,
            0,
            f"0 (off) up to depth - 1 = {self.depth - 1} coarser heads",
        )
        if self.deep_supervision >= self.depth:
            raise ValueError(
                f"UNetConfig.deep_supervision: expected at most depth - 1 = {self.depth - 1} "
                f"coarser heads; found {self.deep_supervision}. Fix: lower it or deepen the net."
            )

    @property
    def out_channels(self) -> int:
        """Logits per pixel: one per class, or one per region."""
        return len(self.region_writes) if self.regions else self.num_classes

    @property
    def divisor(self) -> int:
        """H and W must be multiples of this for the pooling and up-sampling to line up."""
        return 2**self.depth

    @property
    def contract(self) -> NetworkContract:
        """What the U-Net takes and gives, for training, loading and inference."""
        return NetworkContract(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            divisor=self.divisor,
            deep_supervision=self.deep_supervision,
            spatial_dims=2,
        )


def _check_int(name: str, value: object, minimum: int, hint: str) -> None:
    # bool is an int subclass; True as a width is always a mistake.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(
            f"UNetConfig.{name}: expected an integer >= {minimum}; found {value!r}. "
            f"Fix: use {hint}."
        )


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by the normalisation and a ReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        layers: list[nn.Module] = []
        for c_in in (in_channels, out_channels):
            # A bias right before a normalisation is cancelled by its mean subtraction.
            layers.append(nn.Conv2d(c_in, out_channels, 3, padding=1, bias=norm == "none"))
            layers.append(NORMS[norm](out_channels))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class UNet(nn.Module):
    """U-Net mapping ``(N, in_channels, H, W)`` images to ``(N, out_channels, H, W)`` logits
    (``out_channels`` is ``num_classes``, or one per region with ``regions``).

    With ``deep_supervision = D`` a model in training mode returns a list instead: the
    full-resolution logits, then logits at 1/2 .. 1/2**D of the size from the decoder's
    coarser levels (nnU-Net's deep supervision). In eval mode it always returns the tensor.
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        if not isinstance(cfg, UNetConfig):
            raise TypeError(f"UNet expects a UNetConfig; found {type(cfg).__name__}")
        self.cfg = cfg
        widths = [cfg.width * 2**level for level in range(cfg.depth + 1)]

        self.encoders = nn.ModuleList()
        c_in = cfg.in_channels
        for w in widths[:-1]:
            self.encoders.append(ConvBlock(c_in, w, cfg.norm))
            c_in = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = ConvBlock(widths[-2], widths[-1], cfg.norm)

        # Decoder from the deepest level up: halve the features, concatenate the skip
        # (same width), then a block brings 2w back to w.
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.ups.append(nn.ConvTranspose2d(2 * w, w, kernel_size=2, stride=2))
            self.decoders.append(ConvBlock(2 * w, w, cfg.norm))
        self.head = nn.Conv2d(widths[0], cfg.out_channels, kernel_size=1)
        # aux[i] reads the decoder output at 1/2**(i+1) of the input size
        self.aux_heads = nn.ModuleList(
            nn.Conv2d(widths[i + 1], cfg.out_channels, kernel_size=1)
            for i in range(cfg.deep_supervision)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # He et al. initialisation suits the ReLU after every convolution.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm)):
                if m.weight is not None:
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def check_input(self, x: Tensor) -> None:
        """Raise a ValueError that names the fix if ``x`` cannot go through this network."""
        cfg = self.cfg
        if x.dim() != 4:
            raise ValueError(
                f"UNet input: expected a 4-D tensor (N, C, H, W); found shape {tuple(x.shape)}. "
                f"Fix: add the batch dimension, e.g. x.unsqueeze(0)."
            )
        if x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"UNet input: expected {cfg.in_channels} channel(s); found {x.shape[1]}. "
                f"Fix: build the model with in_channels={x.shape[1]} or feed 1 + 2K "
                f"context slices to match the model."
            )
        d = cfg.divisor
        for name, size in (("H", x.shape[2]), ("W", x.shape[3])):
            if size % d:
                lower, upper = (size // d) * d, (size // d + 1) * d
                options = f"pad to {upper}" + (f" or crop/resize to {lower}" if lower else "")
                raise ValueError(
                    f"UNet input: expected {name} divisible by 2**depth = {d} (depth "
                    f"{cfg.depth}); found {name} = {size}. Fix: {options} (nearest valid "
                    f"sizes), or use a smaller depth."
                )

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        self.check_input(x)
        skips: list[Tensor] = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        supervise = self.training and len(self.aux_heads) > 0
        coarse: list[Tensor] = []
        for level, (up, dec, skip) in enumerate(
            zip(self.ups, self.decoders, reversed(skips), strict=True)
        ):
            x = dec(torch.cat([up(x), skip], dim=1))
            scale = self.cfg.depth - 1 - level  # this output is 1/2**scale of the input
            if supervise and 1 <= scale <= len(self.aux_heads):
                coarse.append(self.aux_heads[scale - 1](x))
        if supervise:
            return [self.head(x), *reversed(coarse)]
        return self.head(x)


def build_model(cfg: UNetConfig) -> UNet:
    """Build a freshly initialised U-Net for ``cfg``."""
    return UNet(cfg)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters, for logs and run summaries."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
