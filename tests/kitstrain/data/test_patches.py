"""Training patches: their size, where they are cut, and what the loader hands out."""

from __future__ import annotations

import numpy as np
import pytest

from kitsprep.errors import KitsError
from kitsprep.store import open_store
from kitstrain.data.augment import AugmentConfig, augment_slice
from kitstrain.data.dataset import SliceDataset
from kitstrain.data.patches import patch_origin, resolve_patch, uniform_origin
from kitstrain.data.samplers import Drawn


def test_resolve_patch_sizes() -> None:
    assert resolve_patch("auto", 128, 16) == 64
    assert resolve_patch("auto", 512, 16) == 256
    assert resolve_patch("auto", 96, 16) == 48 - 48 % 16 == 48
    assert resolve_patch("auto", 32, 16) == 32  # never under 2x the divisor
    assert resolve_patch("auto", 16, 16) == 16  # nor over the slice
    assert resolve_patch("full", 128, 16) == 128
    assert resolve_patch(None, 128, 16) == 128
    assert resolve_patch(96, 128, 16) == 96


@pytest.mark.parametrize(
    "patch, message",
    [
        (200, "larger than"),
        (40, "multiple of 16"),
        (0, "--patch"),
        ("half", "--patch"),
        (True, "--patch"),
    ],
)
def test_resolve_patch_refuses_what_cannot_work(patch, message: str) -> None:
    with pytest.raises(KitsError, match=message):
        resolve_patch(patch, 128, 16)


def _origin(label: np.ndarray, patch: int, rng: np.random.Generator) -> tuple[int, int]:
    """`patch_origin` with the labels present found from the label, as the index counts them."""
    return patch_origin(label, patch, rng, np.flatnonzero(np.bincount(label.ravel())[1:]) + 1)


def _label(h: int = 64, w: int = 48) -> np.ndarray:
    lab = np.zeros((h, w), np.uint8)
    lab[30:50, 5:25] = 1  # a large kidney
    lab[40, 10] = 2  # a one-pixel tumour inside it
    return lab


def test_background_slices_get_uniform_windows_inside_the_slice() -> None:
    rng = np.random.default_rng(0)
    lab = np.zeros((64, 48), np.uint8)
    origins = np.array([_origin(lab, 16, rng) for _ in range(4000)])
    assert origins.min(axis=0).tolist() == [0, 0]
    assert origins.max(axis=0).tolist() == [64 - 16, 48 - 16]
    # uniform: every start row is about equally likely
    counts = np.bincount(origins[:, 0], minlength=49)
    assert counts.min() > 0.5 * counts.mean()


def test_uniform_origin_is_patch_origin_for_an_empty_label() -> None:
    # the dataset skips the label scan for slices its index marks empty: same windows
    empty = np.zeros((64, 48), np.uint8)
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert [_origin(empty, 16, a) for _ in range(50)] == [
        uniform_origin(empty.shape, 16, b) for _ in range(50)
    ]


def test_foreground_windows_hold_foreground_and_each_class_about_half_the_time() -> None:
    rng = np.random.default_rng(1)
    lab = _label()
    tumour = 0
    starts = set()
    for _ in range(2000):
        y, x = _origin(lab, 16, rng)
        window = lab[y : y + 16, x : x + 16]
        assert window.shape == (16, 16) and (window > 0).any()
        tumour += bool((window == 2).any())
        starts.add((y, x))
    # the tumour is 1 of 400 foreground pixels, yet drawn as a class half of the time
    assert 0.40 < tumour / 2000 < 0.75
    # the target is placed anywhere in the window, not always at its centre
    assert len(starts) > 100


def test_patch_origin_is_repeatable_and_checks_the_size() -> None:
    lab = _label()
    a = [_origin(lab, 32, np.random.default_rng(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    with pytest.raises(ValueError, match="does not fit"):
        _origin(lab, 64, np.random.default_rng(0))  # wider than the 48 columns


def test_a_label_value_said_present_but_absent_is_refused() -> None:
    with pytest.raises(ValueError, match="label value 3 is said to be present"):
        patch_origin(_label(), 16, np.random.default_rng(0), np.array([3]))


def test_a_label_that_disagrees_with_the_index_is_a_damaged_store(loader_store) -> None:
    info = open_store(loader_store)
    ds = SliceDataset(loader_store, info, info.labelled_cases, context=1, seed=5, patch=16)
    counts = ds.rows["counts"]
    i = int(np.flatnonzero(~ds._background & (counts[:, -1] == 0))[0])
    counts[i, 1:] = 0
    counts[i, -1] = 7  # the index says: only a label value that the slice does not hold
    case = info.case_ids[ds.rows["case"][i]]
    with pytest.raises(KitsError, match=rf"{case} slice .*disagrees with the index.*verify"):
        ds.__getitems__([Drawn(i, 0, 0)])


@pytest.mark.parametrize("augment", [False, True])
def test_dataset_cuts_patches_from_the_slices_it_would_read(loader_store, augment) -> None:
    info = open_store(loader_store)
    cases = list(info.case_ids[:3])
    aug = AugmentConfig() if augment else None
    whole = SliceDataset(loader_store, info, cases, context=1, seed=5)
    patched = SliceDataset(loader_store, info, cases, context=1, seed=5, patch=16, augment=aug)
    draws = [Drawn(i, 2, 10 + i) for i in range(len(whole))]
    got = patched.__getitems__(draws)
    assert got[0][0].shape == (3, 16, 16) and got[0][1].shape == (16, 16)
    for d, (img, lab) in zip(draws, got, strict=True):
        full_img, full_lab = whole[d.index]
        rng = np.random.default_rng([5, d.epoch, d.draw])
        y, x = _origin(full_lab.numpy(), 16, rng)
        if not augment:
            np.testing.assert_array_equal(img.numpy(), full_img[:, y : y + 16, x : x + 16].numpy())
            np.testing.assert_array_equal(lab.numpy(), full_lab[y : y + 16, x : x + 16].numpy())
        else:  # augmented about the window's centre, sampled from the whole slice
            want_img, want_lab = augment_slice(
                full_img.numpy(), full_lab.numpy(), rng, aug, window=(y, x, 16, 16)
            )
            np.testing.assert_array_equal(img.numpy(), want_img)
            np.testing.assert_array_equal(lab.numpy(), want_lab)
    if not augment:  # a slice with foreground always yields a patch holding some
        fg = [i for i in range(len(whole)) if (whole[i][1] > 0).any()]
        assert fg and all((patched.__getitems__([Drawn(i, 0, i)])[0][1] > 0).any() for i in fg)


def test_dataset_refuses_a_patch_larger_than_the_slices(loader_store) -> None:
    info = open_store(loader_store)
    with pytest.raises(KitsError, match="does not fit"):
        SliceDataset(loader_store, info, list(info.case_ids[:1]), patch=info.size + 16)
