"""Building blocks any network of `kitstrain.model.networks` may share: the normalisations
by name (`NORMS`, what `--norm` chooses) and the tensor-core input padding
(`PaddedConv2d`, `pad_input_channels`).

They live apart from the U-Net so that a second network (a residual encoder, a 3D net)
uses the same `--norm` names and the same padding without importing another network.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NORMS", "PaddedConv2d", "pad_input_channels"]

# Groups for GroupNorm: at most 8, as asked, but always a divisor of the channel count so
# that widths that are not powers of two (e.g. 12, 24) still build.
_MAX_GROUPS = 8


def _group_count(channels: int) -> int:
    return max(g for g in range(1, min(_MAX_GROUPS, channels) + 1) if channels % g == 0)


# the normalisation after each convolution, by the name `--norm` and UNetConfig.norm use
NORMS: dict[str, Callable[[int], nn.Module]] = {
    "none": lambda channels: nn.Identity(),
    "batch": nn.BatchNorm2d,
    # affine so that instance norm can learn the same per-channel scale as the others
    "instance": lambda channels: nn.InstanceNorm2d(channels, affine=True),
    "group": lambda channels: nn.GroupNorm(_group_count(channels), channels),
}


class PaddedConv2d(nn.Conv2d):
    """A Conv2d that zero-pads its input channels, and its weight's, to a multiple of
    `multiple`: the same result, but cuDNN's tensor-core NHWC kernels want channel counts
    that are multiples of 8, and a 2.5D input has 1 + 2K (5). The stored weight keeps its
    real shape, so checkpoints load anywhere."""

    multiple = 8

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        pad = -input.shape[1] % self.multiple
        if pad:
            input = F.pad(input, (0, 0, 0, 0, 0, pad))
            weight = F.pad(weight, (0, 0, 0, 0, 0, pad))
        return super()._conv_forward(input, weight, bias)


def pad_input_channels(model: nn.Module) -> None:
    """Make the model's first convolution a PaddedConv2d (for CUDA; same parameters). A
    network without a 2D convolution (a 3D one) is left as it is."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and first.in_channels % PaddedConv2d.multiple:
        first.__class__ = PaddedConv2d
