"""Cascade regions: components with a margin in mm, merging, clipping at the edges, paste."""

from __future__ import annotations

import numpy as np
import pytest

from kitstrain.infer.regions import Box, find_regions, fit_box, merge_boxes, paste, voxel_share


def test_two_kidneys_two_regions_with_anisotropic_margin():
    mask = np.zeros((20, 64, 64), bool)
    mask[8:12, 20:30, 5:15] = True  # left kidney
    mask[8:12, 20:30, 45:55] = True  # right kidney
    # 2.5 mm slices, 1 mm pixels: a 5 mm margin is 2 slices but 5 pixels
    boxes = find_regions(mask, (2.5, 1.0, 1.0), 5.0)
    assert boxes == [Box(6, 14, 15, 35, 0, 20), Box(6, 14, 15, 35, 40, 60)]


def test_one_kidney_and_none():
    mask = np.zeros((10, 32, 32), bool)
    assert find_regions(mask, (1.0, 1.0, 1.0), 10.0) == []  # nothing: the caller falls back
    mask[4, 10, 10] = True
    assert find_regions(mask, (1.0, 1.0, 1.0), 0.0) == [Box(4, 5, 10, 11, 10, 11)]


def test_region_at_the_edge_is_clipped():
    mask = np.zeros((6, 32, 32), bool)
    mask[0:2, 0:3, 29:32] = True
    assert find_regions(mask, (1.0, 0.5, 0.5), 2.0) == [Box(0, 4, 0, 7, 25, 32)]


def test_margins_that_overlap_merge():
    mask = np.zeros((10, 32, 32), bool)
    mask[5, 5:8, 5:8] = True
    mask[5, 5:8, 12:15] = True  # 4 px apart: margins of 3 px overlap
    assert find_regions(mask, (1.0, 1.0, 1.0), 3.0) == [Box(2, 9, 2, 11, 2, 18)]
    assert merge_boxes([Box(0, 2, 0, 2, 0, 2), Box(5, 6, 5, 6, 5, 6)]) == [
        Box(0, 2, 0, 2, 0, 2),
        Box(5, 6, 5, 6, 5, 6),
    ]


def test_fit_box_grows_to_the_divisor_inside_the_volume():
    box = fit_box(Box(1, 3, 0, 5, 58, 64), 16, (4, 64, 64))
    assert box == Box(1, 3, 0, 16, 48, 64)
    assert fit_box(Box(0, 1, 3, 60, 0, 64), 16, (4, 64, 64)) == Box(0, 1, 0, 64, 0, 64)


def test_paste_never_leaks_outside_the_boxes():
    boxes = [Box(1, 3, 2, 6, 2, 6), Box(0, 1, 10, 12, 0, 4)]
    crops = [np.full((2, 4, 4), 2, np.uint8), np.ones((1, 2, 4), np.uint8)]
    out = paste((4, 16, 16), boxes, crops)
    inside = np.zeros(out.shape, bool)
    for b in boxes:
        inside[b.slices] = True
    assert not out[~inside].any()
    assert (out[1:3, 2:6, 2:6] == 2).all() and (out[0, 10:12, 0:4] == 1).all()
    assert voxel_share(boxes, out.shape) == pytest.approx((32 + 8) / (4 * 256))
    with pytest.raises(ValueError):
        paste((4, 16, 16), boxes[:1], [np.ones((1, 1, 1), np.uint8)])
