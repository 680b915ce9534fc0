"""Cascade inference with stand-in models: regions from the coarse stage, the fine stage
only inside them, and the whole-slice fallback when the coarse stage finds no kidney."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kitsprep.cases import NiftiHeader, Volume
from kitsprep.window import WINDOW_PRESETS
from kitstrain.infer.cascade import CascadeInference
from kitstrain.infer.inference import Inference


class Square(nn.Module):
    """Class logits: `cls` inside rows and cols [lo, hi) x side, background elsewhere
    (the whole slice when `lo` is None)."""

    def __init__(self, cls: int, lo: float | None = None, hi: float | None = None) -> None:
        super().__init__()
        self.cls, self.lo, self.hi = cls, lo, hi
        self.anchor = nn.Parameter(torch.zeros(1))  # a parameter: the engine asks its device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        out = torch.zeros(n, 3, h, w)
        out[:, 0] = 1.0
        if self.lo is None:
            out[:, self.cls] = 2.0
        else:
            a, b = int(self.lo * h), int(self.hi * h)
            out[:, self.cls, a:b, a:b] = 2.0
        return out


class Bright(nn.Module):
    """Class `cls` where the centre channel is above 0.5, else background."""

    def __init__(self, cls: int = 2) -> None:
        super().__init__()
        self.cls = cls
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        out = torch.zeros(n, 3, h, w)
        out[:, 0] = 0.5
        out[:, self.cls] = x[:, c // 2]
        return out


def cascade(
    coarse: nn.Module, fine: nn.Module | None = None, fine_factor: int = 1
) -> CascadeInference:
    fine = fine or Square(2)  # labels tumour everywhere it runs
    cpu = torch.device("cpu")
    return CascadeInference(
        Inference([coarse], 0, cpu),
        Inference([fine], 1, cpu),
        factor=2,
        margin_mm=2.0,
        divisor=4,
        fine_factor=fine_factor,
    )


def test_a_shrunk_crop_comes_back_exactly_inside_its_box() -> None:
    c = cascade(Square(1, 0.25, 0.5), Bright(), fine_factor=2)
    images = np.zeros((10, 64, 64), np.float16)
    images[:, 16:32, 16:32] = 1.0  # the kidney the coarse model finds, bright
    images[:, 48:60, 48:60] = 1.0  # bright too, but outside every region
    out = c.labels(images, (1.0, 1.0, 1.0), "a")
    # 14..34 with the margin, fitted to 2 * 4 = 8: 12..36, 12x12 at the fine side
    assert c.notes["a"]["regions"] == [[0, 10, 12, 36, 12, 36]]
    assert out.shape == images.shape
    expected = np.zeros_like(out)
    expected[:, 16:32, 16:32] = 2  # shrunk, decided, resized back: the same pixels
    assert (out == expected).all()


def test_the_fallback_runs_the_fine_stage_at_its_factor() -> None:
    c = cascade(Square(0), Bright(), fine_factor=2)
    images = np.zeros((3, 32, 32), np.float16)
    images[:, 4:10, 6:20] = 1.0
    out = c.labels(images, (1.0, 1.0, 1.0), "b")
    assert c.notes["b"]["fallback"] and out.shape == images.shape
    assert (out[:, 4:10, 6:20] == 2).all() and (out == 2).sum() == 3 * 6 * 14


def test_fine_stage_runs_only_inside_the_coarse_regions() -> None:
    c = cascade(Square(1, 0.25, 0.5))  # a kidney at rows/cols 8..16 of 32 coarse pixels
    images = np.zeros((10, 64, 64), np.float16)
    out = c.labels(images, (1.0, 1.0, 1.0), "a")
    note = c.notes["a"]
    # 16..32 at full size, 2 px of margin: 14..34 (20 px, a multiple of 4)
    assert note["regions"] == [[0, 10, 14, 34, 14, 34]] and not note["fallback"]
    assert note["fine_voxel_share"] == pytest.approx(20 * 20 / 64**2, abs=1e-6)
    assert (out[:, 14:34, 14:34] == 2).all()
    out[:, 14:34, 14:34] = 0
    assert not out.any()  # nothing the fine stage predicted leaks outside its region


def test_no_kidney_falls_back_to_whole_slices_and_says_so() -> None:
    c = cascade(Square(0))
    out = c.labels(np.zeros((4, 32, 32), np.float16), (2.5, 0.8, 0.8), "b")
    assert c.notes["b"] == {"regions": [], "fine_voxel_share": 1.0, "fallback": True}
    assert (out == 2).all()


def test_a_resized_source_volume_comes_back_in_its_own_grid() -> None:
    # 32 rows x 16 cols are stored as 64x32 inside a 64x64 square (padded left and right)
    data = np.zeros((5, 32, 16), np.float32)
    affine = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])
    volume = Volume(data, NiftiHeader(data.shape, affine, data.dtype, 1.0, 0.0, 0, 0), "")
    c = cascade(Square(1, 0.25, 0.5))
    out = c.volume(volume, WINDOW_PRESETS["mlperf"], 64, "v")
    assert out.shape == data.shape and out.dtype == np.uint8
    # at the store's side a pixel is 0.5 mm: the 2 mm margin is 4 px, so the region is
    # rows and cols 12..36 (the image spans cols 16..48): source rows 6..18, cols 0..10
    assert c.notes["v"]["regions"] == [[0, 5, 12, 36, 12, 36]]
    assert (out[:, 6:18, 0:10] == 2).all()
    out[:, 6:18, 0:10] = 0
    assert not out.any()


def test_a_speck_of_the_coarse_stage_gets_no_fine_region() -> None:
    c = cascade(Bright(cls=1))
    images = np.zeros((10, 64, 64), np.float16)
    images[:, 8:24, 8:24] = 1.0  # a kidney
    images[:, 8:20, 40:52] = 1.0  # the other, smaller, kept (over a fifth of the first)
    images[4, 56:58, 56:58] = 1.0  # one coarse pixel on one slice: a speck
    c.labels(images, (1.0, 1.0, 1.0), "s")
    regions = c.notes["s"]["regions"]
    assert len(regions) == 2, regions
    assert not any(y0 <= 56 < y1 and x0 <= 56 < x1 for _, _, y0, y1, x0, x1 in regions)
