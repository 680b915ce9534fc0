"""The coarse stage's resolution: area-averaged images, max-pooled labels."""

from __future__ import annotations

import numpy as np
import pytest

from kitsprep.errors import KitsError
from kitstrain.data.downsample import (
    coarse_factor,
    downsample_images,
    downsample_labels,
    fine_factor,
    upsample_labels,
)


def test_one_pixel_tumour_survives_downsampling():
    lab = np.zeros((1, 16, 16), np.uint8)
    lab[0, 4:12, 4:12] = 1
    lab[0, 9, 6] = 2  # a one-pixel tumour inside the kidney
    small = downsample_labels(lab, 4)
    assert small.shape == (1, 4, 4)
    assert (small == 2).sum() == 1 and small[0, 2, 1] == 2
    assert upsample_labels(small, 4).shape == lab.shape
    assert (upsample_labels(small, 4)[0, 8:12, 4:8] == 2).all()


def test_images_are_area_averaged():
    img = np.arange(16, dtype=np.float16).reshape(1, 4, 4)
    assert downsample_images(img, 2)[0].tolist() == [[2.5, 4.5], [10.5, 12.5]]
    assert downsample_images(img, 2).dtype == np.float16


def test_coarse_factor():
    assert coarse_factor(512, None) == 4 and coarse_factor(64, None) == 1
    assert coarse_factor(64, 32) == 2
    for bad in (48, 128):
        with pytest.raises(KitsError, match="--coarse-size"):
            coarse_factor(64, bad)


def test_fine_factor():
    assert fine_factor(512, None) == 2 and fine_factor(256, None) == 1
    assert fine_factor(64, 2) == 2 and fine_factor(64, 1) == 1
    for bad in (3, 128):
        with pytest.raises(KitsError, match=f"--fine-factor {bad} must divide"):
            fine_factor(64, bad)
