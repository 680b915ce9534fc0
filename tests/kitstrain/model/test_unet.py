"""U-Net: shapes, input validation, memory format, training signal."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from torch import nn

from kitstrain.model.unet import NORMS, UNet, UNetConfig, build_model, count_parameters


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("in_channels,depth", [(1, 2), (5, 3), (1, 4)])
def test_output_shape(norm: str, in_channels: int, depth: int) -> None:
    cfg = UNetConfig(in_channels=in_channels, num_classes=3, width=4, depth=depth, norm=norm)
    model = build_model(cfg).eval()
    x = torch.randn(2, in_channels, 32, 48)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 3, 32, 48)
    assert torch.isfinite(y).all()


def test_group_norm_with_width_not_divisible_by_eight() -> None:
    model = build_model(UNetConfig(width=12, depth=2, norm="group"))
    groups = {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}
    assert groups <= {6, 8}
    assert model(torch.randn(1, 1, 16, 16)).shape == (1, 3, 16, 16)


def test_bad_size_names_dimension_and_fix() -> None:
    model = build_model(UNetConfig(width=4, depth=3))
    with pytest.raises(ValueError, match=r"W divisible by 2\*\*depth = 8.*found W = 30.*pad to 32"):
        model(torch.randn(1, 1, 32, 30))
    with pytest.raises(ValueError, match=r"found H = 20.*pad to 24 or crop/resize to 16"):
        model(torch.randn(1, 1, 20, 32))


def test_wrong_channel_count_and_rank() -> None:
    model = build_model(UNetConfig(in_channels=5, width=4, depth=2))
    with pytest.raises(ValueError, match="expected 5 channel"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(5, 16, 16))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"norm": "layer"}, r"expected one of none, batch, instance, group; found 'layer'.*Fix"),
        ({"width": 0}, r"width: expected an integer >= 1; found 0.*Fix"),
        ({"depth": 0}, r"depth: expected an integer >= 1"),
        ({"in_channels": 0}, r"in_channels"),
        ({"num_classes": 1}, r"num_classes: expected an integer >= 2"),
        ({"width": 8.0}, r"width"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UNetConfig(**kwargs)


def test_channels_last_matches_contiguous() -> None:
    torch.manual_seed(0)
    model = build_model(UNetConfig(in_channels=3, width=4, depth=2)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_backward_reaches_every_parameter() -> None:
    model = build_model(UNetConfig(width=4, depth=2, norm="group"))
    model(torch.randn(2, 1, 16, 16)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_autocast_bfloat16_runs() -> None:
    model = build_model(UNetConfig(width=4, depth=2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randn(2, 1, 16, 16))
    assert y.shape == (2, 3, 16, 16)
    y.float().sum().backward()


def test_parameter_count_grows_with_width() -> None:
    counts = [count_parameters(build_model(UNetConfig(width=w, depth=3))) for w in (4, 8, 16)]
    assert counts[0] < counts[1] < counts[2]
    # Convolutions dominate, so doubling the width roughly quadruples the count.
    assert 3.5 < counts[2] / counts[1] < 4.5


def test_overfits_a_tiny_batch() -> None:
    torch.manual_seed(0)
    n, size = 2, 32
    target = torch.zeros(n, size, size, dtype=torch.int64)
    target[:, 8:20, 6:18] = 1  # "kidney"
    target[:, 11:16, 9:14] = 2  # "tumour" inside it
    image = 0.2 * torch.randn(n, 1, size, size) + (target > 0).float().unsqueeze(1)
    image += (target == 2).float().unsqueeze(1)

    model: UNet = build_model(UNetConfig(width=8, depth=2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(image), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    model.eval()
    with torch.no_grad():
        acc = (model(image).argmax(1) == target).float().mean().item()
    assert acc > 0.95


def test_deep_supervision_heads_in_training_only() -> None:
    model = build_model(UNetConfig(in_channels=5, width=4, depth=3, deep_supervision=2))
    x = torch.randn(2, 5, 32, 32)
    outs = model(x)
    assert [tuple(o.shape) for o in outs] == [(2, 3, 32, 32), (2, 3, 16, 16), (2, 3, 8, 8)]
    sum(o.sum() for o in outs).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    model.eval()
    with torch.no_grad():
        y = model(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3, 32, 32)


def test_deep_supervision_needs_coarser_levels() -> None:
    with pytest.raises(ValueError, match=r"at most depth - 1 = 1 coarser heads; found 2"):
        UNetConfig(depth=2, deep_supervision=2)
    with pytest.raises(ValueError, match=r"deep_supervision: expected an integer >= 0"):
        UNetConfig(deep_supervision=-1)


def test_regions_give_one_logit_per_region() -> None:
    cfg = UNetConfig(num_classes=3, width=4, depth=2, regions=True, region_writes=(1, 2))
    assert cfg.out_channels == 2 and UNetConfig(num_classes=3).out_channels == 3
    assert build_model(cfg)(torch.randn(1, 1, 16, 16)).shape == (1, 2, 16, 16)
    # KiTS21/23: three regions over four classes; a config read back from JSON is equal
    cfg = UNetConfig(num_classes=4, width=4, depth=2, regions=True, region_writes=[1, 3, 2])
    assert cfg.out_channels == 3 and cfg.region_writes == (1, 3, 2)
    assert UNetConfig(**asdict(cfg)) == cfg
    for bad in ((), (1, 4)):
        with pytest.raises(ValueError, match="region_writes"):
            UNetConfig(num_classes=4, regions=True, region_writes=bad)


def test_input_channels_padded_to_8_give_the_same_output_and_state_dict() -> None:
    from kitstrain.model.unet import PaddedConv2d, pad_input_channels

    torch.manual_seed(0)
    model = build_model(UNetConfig(in_channels=5, width=4, depth=2)).eval()
    x = torch.randn(2, 5, 16, 16)
    with torch.no_grad():
        ref = model(x)
        keys = {k: v.shape for k, v in model.state_dict().items()}
        pad_input_channels(model)
        assert sum(isinstance(m, PaddedConv2d) for m in model.modules()) == 1
        torch.testing.assert_close(model(x), ref)
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
