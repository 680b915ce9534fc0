"""Augmentation: deterministic for a seed, labels moved but never blended, geometry right."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kitsprep.errors import KitsError
from kitstrain.data.augment import (
    AugmentConfig,
    AugmentDraw,
    _cast,
    augment_slice,
    draw,
    warp,
    warp_matrix,
)

ALL_ON = AugmentConfig(p_flip=0.5, p_rotate=1.0, p_scale=1.0, p_intensity=1.0, p_noise=1.0)
NONE = AugmentConfig(p_flip=0.0, p_rotate=0.0, p_scale=0.0, p_intensity=0.0, p_noise=0.0)


def sample(c: int = 1, h: int = 48, w: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((c, h, w)).astype(np.float16)
    lab = np.zeros((h, w), np.uint8)
    lab[10:30, 8:25] = 1
    lab[15:20, 12:16] = 2
    lab[35:40, 30:36] = 3
    return img, lab


@pytest.mark.parametrize("cfg", [AugmentConfig(), ALL_ON], ids=["default", "all-on"])
def test_same_seed_same_result_other_seed_differs(cfg):
    img, lab = sample()
    runs = []
    for seed in (7, 7, 8):
        rng = np.random.default_rng(seed)
        runs.append([augment_slice(img, lab, rng, cfg) for _ in range(12)])
    for (a_img, a_lab), (b_img, b_lab) in zip(runs[0], runs[1], strict=True):
        assert np.array_equal(a_img.view(np.uint16), b_img.view(np.uint16))
        assert np.array_equal(a_lab, b_lab)
    assert any(not np.array_equal(a[0], c[0]) for a, c in zip(runs[0], runs[2], strict=True))


def test_inputs_untouched_and_types_kept():
    img, lab = sample(c=3)
    img0, lab0 = img.copy(), lab.copy()
    rng = np.random.default_rng(0)
    for _ in range(20):
        out, out_lab = augment_slice(img, lab, rng, ALL_ON)
        assert out.dtype == np.float16 and out.shape == img.shape
        assert out_lab.dtype == np.uint8 and out_lab.shape == lab.shape
        assert not np.shares_memory(out, img) and not np.shares_memory(out_lab, lab)
    assert np.array_equal(img, img0) and np.array_equal(lab, lab0)


def test_labels_are_moved_never_interpolated():
    img, lab = sample()
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(30):
        _, out_lab = augment_slice(img, lab, rng, ALL_ON)
        seen |= set(np.unique(out_lab).tolist())
    assert seen <= {0, 1, 2, 3}
    assert {1, 2, 3} <= seen


def test_disabled_is_identity():
    img, lab = sample()
    out, out_lab = augment_slice(img, lab, np.random.default_rng(0), AugmentConfig.off())
    assert out is img and out_lab is lab
    out, out_lab = augment_slice(img, lab, np.random.default_rng(0), NONE)
    assert np.array_equal(out, img) and np.array_equal(out_lab, lab)


def test_flips_are_exact():
    img, lab = sample(c=2)
    cfg = AugmentConfig(p_flip=1.0, p_rotate=0.0, p_scale=0.0, p_intensity=0.0, p_noise=0.0)
    out, out_lab = augment_slice(img, lab, np.random.default_rng(0), cfg)
    assert np.array_equal(out, img[:, ::-1, ::-1])
    assert np.array_equal(out_lab, lab[::-1, ::-1])


def test_warp_identity_and_quarter_turn():
    img, lab = sample(c=2, h=33, w=33)
    f32 = img.astype(np.float32)
    same, same_lab = warp(
        f32, lab, warp_matrix(lab.shape, AugmentDraw(False, False, 0.0, 1.0, 1.0, 0.0, 0.0))
    )
    assert np.array_equal(same, f32) and np.array_equal(same_lab, lab)
    # +90 degrees turns the slice counter-clockwise as displayed, like np.rot90
    turned, turned_lab = warp(
        f32, lab, warp_matrix(lab.shape, AugmentDraw(False, False, math.pi / 2, 1.0, 1.0, 0.0, 0.0))
    )
    assert np.allclose(turned, np.rot90(f32, 1, axes=(1, 2)), atol=1e-5)
    assert np.array_equal(turned_lab, np.rot90(lab, 1))
    # flips folded into the warp match the strided flips
    flipped, flipped_lab = warp(
        f32, lab, warp_matrix(lab.shape, AugmentDraw(True, True, 0.0, 1.0, 1.0, 0.0, 0.0))
    )
    assert np.array_equal(flipped, f32[:, ::-1, ::-1])
    assert np.array_equal(flipped_lab, lab[::-1, ::-1])


def test_zoom_out_fills_with_minimum_and_background():
    img, lab = sample(c=2)
    lab[:] = 1
    f32 = img.astype(np.float32)
    out, out_lab = warp(
        f32, lab, warp_matrix(lab.shape, AugmentDraw(False, False, 0.3, 0.5, 1.0, 0.0, 0.0))
    )
    for c in range(2):
        assert out[c, 0, 0] == f32[c].min() and out[c, -1, -1] == f32[c].min()
    assert out_lab[0, 0] == 0 and out_lab[lab.shape[0] // 2, lab.shape[1] // 2] == 1
    assert out.min() >= f32.min() - 1e-6 and out.max() <= f32.max() + 1e-6


def test_intensity_is_gain_and_offset():
    img, lab = sample()
    cfg = AugmentConfig(p_flip=0.0, p_rotate=0.0, p_scale=0.0, p_intensity=1.0, p_noise=0.0)
    d = draw(np.random.default_rng(11), cfg)
    assert d.gain != 1.0 and d.offset != 0.0
    out, out_lab = augment_slice(img, lab, np.random.default_rng(11), cfg)
    expect = img.astype(np.float32) * np.float32(d.gain) + np.float32(d.offset)
    assert np.allclose(out.astype(np.float32), expect, atol=2e-3, rtol=2e-3)
    assert np.array_equal(out_lab, lab)


def test_noise_has_the_drawn_sigma():
    img = np.zeros((1, 256, 256), np.float16)
    lab = np.zeros((256, 256), np.uint8)
    cfg = AugmentConfig(
        p_flip=0.0, p_rotate=0.0, p_scale=0.0, p_intensity=0.0, p_noise=1.0, noise_std=0.5
    )
    d = draw(np.random.default_rng(4), cfg)
    out, _ = augment_slice(img, lab, np.random.default_rng(4), cfg)
    assert abs(float(out.astype(np.float32).std()) - d.noise) < 0.05 * d.noise + 1e-3


def test_context_channels_share_one_transform():
    img, lab = sample(c=1)
    stack = np.repeat(img, 3, axis=0)
    rng = np.random.default_rng(5)
    cfg = AugmentConfig(p_flip=0.5, p_rotate=1.0, p_scale=1.0, p_intensity=1.0, p_noise=0.0)
    for _ in range(10):
        out, _ = augment_slice(stack, lab, rng, cfg)
        assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])


def test_float16_casts_match_numpy_bit_for_bit():
    bits = np.arange(2**16, dtype=np.uint16).view(np.float16)
    bits = bits[~np.isnan(bits)]
    assert np.array_equal(_cast(bits, np.float32), bits.astype(np.float32))
    rng = np.random.default_rng(0)
    f = np.concatenate(
        [
            rng.standard_normal(10000).astype(np.float32) * 10,
            np.array([65504, 65520, 1e6, -1e6, 6e-8, 3e-8, 1e-5, 0.0, -0.0], np.float32),
        ]
    )
    with np.errstate(over="ignore"):  # 1e6 -> inf is the point of the case
        expect = f.astype(np.float16)
    assert np.array_equal(_cast(f, np.float16).view(np.uint16), expect.view(np.uint16))


def test_config_is_checked():
    with pytest.raises(KitsError, match="p_flip"):
        AugmentConfig(p_flip=1.5)
    with pytest.raises(KitsError, match="scale_range"):
        AugmentConfig(scale_range=(1.2, 0.8))


def test_window_is_warped_about_its_centre_from_the_whole_slice():
    img, lab = sample(c=2, h=48, w=40)
    f32 = img.astype(np.float32)
    top, left, n = 9, 7, 17
    crop, crop_lab = f32[:, top : top + n, left : left + n], lab[top : top + n, left : left + n]
    turn = AugmentDraw(False, False, math.pi / 2, 1.0, 1.0, 0.0, 0.0)
    m = warp_matrix((n, n), turn)
    m[:, 2] += (top, left)
    out, out_lab = warp(f32, lab, m, out_shape=(n, n))
    # a quarter turn of a square window about its centre stays inside it: rot90 of the crop
    assert out.shape == (2, n, n) and out_lab.shape == (n, n)
    assert np.allclose(out, np.rot90(crop, 1, axes=(1, 2)), atol=1e-5)
    assert np.array_equal(out_lab, np.rot90(crop_lab, 1))


def test_rotated_window_shows_the_slice_around_it_not_fill():
    img = np.zeros((1, 64, 64), np.float16)
    img[0, 8:56, 8:56] = 1.0  # tissue well beyond the window's rotated corners
    lab = np.zeros((64, 64), np.uint8)
    lab[8:56, 8:56] = 1
    cfg = AugmentConfig(
        p_flip=0.0, p_rotate=1.0, max_rotate_deg=45.0, p_scale=0.0, p_intensity=0.0, p_noise=0.0
    )
    for seed in range(5):
        out, out_lab = augment_slice(
            img, lab, np.random.default_rng(seed), cfg, window=(16, 16, 32, 32)
        )
        assert out.shape == (1, 32, 32) and out.dtype == np.float16
        assert (out == 1.0).all() and (out_lab == 1).all()  # no blank corners
    # the same rotation of the cut-out window alone has to fill its corners
    alone, alone_lab = augment_slice(
        img[:, 16:48, 16:48], lab[16:48, 16:48], np.random.default_rng(0), cfg
    )
    if draw(np.random.default_rng(0), cfg).angle != 0.0:
        assert (alone_lab == 0).any()


def test_window_without_a_warp_is_the_crop_flipped():
    img, lab = sample(c=2, h=40, w=40)
    flips = AugmentConfig(p_flip=1.0, p_rotate=0.0, p_scale=0.0, p_intensity=0.0, p_noise=0.0)
    out, out_lab = augment_slice(img, lab, np.random.default_rng(0), flips, window=(3, 5, 16, 16))
    assert np.array_equal(out, img[:, 3:19, 5:21][:, ::-1, ::-1])
    assert np.array_equal(out_lab, lab[3:19, 5:21][::-1, ::-1])
    off, off_lab = augment_slice(
        img, lab, np.random.default_rng(0), AugmentConfig.off(), window=(3, 5, 16, 16)
    )
    assert np.array_equal(off, img[:, 3:19, 5:21]) and np.array_equal(off_lab, lab[3:19, 5:21])
    with pytest.raises(ValueError, match="does not fit"):
        augment_slice(img, lab, np.random.default_rng(0), flips, window=(30, 30, 16, 16))
