"""Device augmentation against the workers' path: the same draws give the same patches
(up to float rounding), labels are moved never blended, the loader carries the draws, and
the copy-and-augment wrapper hands (image, label) on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kitsprep.store import SliceReader, open_store
from kitstrain.data.augment import AugmentConfig, augment_slice
from kitstrain.data.dataset import SliceDataset
from kitstrain.data.device_augment import (
    PARAMS,
    augment_batch,
    cut_origin,
    cut_side,
    draw_params,
    reach_rows,
)
from kitstrain.data.loaders import close_loader, train_loader_for
from kitstrain.data.patches import patch_origin
from kitstrain.data.prefetch import DeviceBatches
from kitstrain.data.samplers import Drawn

WARPS = AugmentConfig(p_rotate=1.0, p_scale=1.0, p_intensity=0.5, p_noise=0.5)
NO_WARP = AugmentConfig(p_rotate=0.0, p_scale=0.0, p_intensity=1.0, p_noise=0.0)


def slice_(c: int = 3, size: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((c, size, size)).astype(np.float16)
    lab = np.zeros((size, size), np.uint8)
    lab[10:40, 8:30] = 1
    lab[15:25, 12:20] = 2
    lab[45:55, 40:60] = 3
    return img, lab


def both_paths(img, lab, cfg, patch, seed, origin):
    """The workers' patch and the device's patch for one seed and patch origin."""
    size = lab.shape[0]
    y, x = origin
    cpu_img, cpu_lab = augment_slice(
        img, lab, np.random.default_rng(seed), cfg, window=(y, x, patch, patch)
    )
    side = cut_side(patch, size, cfg)
    p = draw_params(np.random.default_rng(seed), cfg, y, x, patch, side, size)
    ct, cl = int(p["cut_top"]), int(p["cut_left"])
    if side < size:  # as the dataset does: the slice's darkest value for beyond it
        p["fill"][: img.shape[0]] = img.astype(np.float32).min(axis=(1, 2))
    cut_img = torch.from_numpy(np.ascontiguousarray(img[:, ct : ct + side, cl : cl + side]))
    cut_lab = torch.from_numpy(np.ascontiguousarray(lab[ct : ct + side, cl : cl + side]))
    params = np.array([p], PARAMS)
    dev_img, dev_lab = augment_batch(cut_img[None], cut_lab[None], params, patch, size)
    return (cpu_img.astype(np.float32), cpu_lab), (dev_img[0].numpy(), dev_lab[0].numpy()), p


@pytest.mark.parametrize("patch", [32, 16, 64], ids=["half-whole-cut", "small-cut", "full"])
@pytest.mark.parametrize(
    "cfg", [WARPS, NO_WARP, AugmentConfig()], ids=["warps", "flips", "default"]
)
def test_the_same_draw_gives_the_same_patch_on_both_sides(cfg, patch):
    img, lab = slice_()
    size = lab.shape[0]
    mismatched = total = 0
    for seed in range(40):
        rng = np.random.default_rng(1000 + seed)
        origin = (int(rng.integers(0, size - patch + 1)), int(rng.integers(0, size - patch + 1)))
        (ci, cl), (di, dl), p = both_paths(img, lab, cfg, patch, seed, origin)
        assert di.shape == ci.shape and dl.shape == cl.shape and dl.dtype == np.uint8
        # float16 rounding of the workers' output; taps at exact halves may round apart
        close = np.isclose(di, ci, atol=2e-2, rtol=2e-3)
        assert close.mean() > 0.995, (seed, p, np.abs(di - ci).max())
        mismatched += int((dl != cl).sum())
        total += dl.size
        if not (p["angle"] or p["zoom"] != 1.0):  # flips alone: exact copies
            assert np.array_equal(dl, cl)
            assert np.allclose(di, ci, atol=1e-2, rtol=1e-3)
    assert mismatched / total < 1e-3


def test_the_cut_holds_every_tap_any_draw_can_reach():
    """The cut is the smallest window that serves every draw of the config: rotation by
    45 degrees at the smallest zoom reaches farthest."""
    cfg = AugmentConfig()
    assert cut_side(256, 512, cfg) == 512  # nnU-Net's ranges, half-side patch: whole slice
    side = cut_side(16, 64, cfg)
    assert side == math.ceil(15 * math.sqrt(2) / 0.7) + 4 < 64
    assert cut_side(16, 64, AugmentConfig(p_rotate=0.0, p_scale=0.0)) == 19
    for top in (0, 5, 24, 48):
        ct, cl = cut_origin(top, top, 16, side, 64)
        assert 0 <= ct <= 64 - side and ct <= top and top + 16 <= ct + side


@pytest.mark.parametrize("patch", [32, 16, 64], ids=["half-whole-cut", "small-cut", "full"])
@pytest.mark.parametrize(
    "cfg", [WARPS, NO_WARP, AugmentConfig()], ids=["warps", "flips", "default"]
)
def test_the_warp_reads_no_row_beyond_reach_rows(cfg, patch):
    """What a worker leaves unread (NaN here) changes nothing: every tap, the bilinear
    neighbour included, lies in the rows `reach_rows` names."""
    img, lab = slice_()
    size = lab.shape[0]
    side = cut_side(patch, size, cfg)
    rng = np.random.default_rng(9)
    params = np.zeros(40, PARAMS)
    cuts = np.empty((40, img.shape[0], side, side), np.float16)
    for j in range(40):
        y, x = (int(v) for v in rng.integers(0, size - patch + 1, 2))
        params[j] = draw_params(np.random.default_rng(j), cfg, y, x, patch, side, size)
        params["fill"][j, : img.shape[0]] = -9.0
        ct, cl = int(params["cut_top"][j]), int(params["cut_left"][j])
        cuts[j] = img[:, ct : ct + side, cl : cl + side]
    labs = np.stack([lab[:side, :side]] * 40)
    start, stop = reach_rows(params, patch, size, side)
    assert (start >= params["cut_top"]).all() and (stop <= params["cut_top"] + side).all()
    poisoned, poisoned_labs = cuts.copy(), labs.copy()
    for j in range(40):
        a, b = start[j] - params["cut_top"][j], stop[j] - params["cut_top"][j]
        poisoned[j, :, :a] = poisoned[j, :, b:] = np.nan
        poisoned_labs[j, :a] = poisoned_labs[j, b:] = 255
    want = augment_batch(torch.from_numpy(cuts), torch.from_numpy(labs), params, patch, size)
    got = augment_batch(
        torch.from_numpy(poisoned), torch.from_numpy(poisoned_labs), params, patch, size
    )
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    if cfg is NO_WARP:  # flips alone read the patch's rows and the next one, no more
        assert (stop - start <= patch + 3).all()


def test_labels_stay_in_the_editions_set_and_are_never_blended():
    img, lab = slice_()
    for seed in range(30):
        _, (di, dl), _ = both_paths(img, lab, WARPS, 32, seed, (16, 16))
        assert set(np.unique(dl).tolist()) <= {0, 1, 2, 3}


def test_same_seed_same_draws_and_the_noise_of_the_workers_path():
    img, lab = slice_()
    cfg = AugmentConfig(p_noise=1.0, p_rotate=0.0, p_scale=0.0)
    (ci, _), (di, _), p = both_paths(img, lab, cfg, 64, 3, (0, 0))
    assert p["noise"] > 0 and p["noise_seed"] != 0
    assert np.allclose(di, ci, atol=2e-2)  # the same generator: the same noise on CPU
    again = draw_params(np.random.default_rng(3), cfg, 0, 0, 64, 64, 64)
    assert np.array_equal(again["noise_seed"], p["noise_seed"]) and again["angle"] == p["angle"]


def dataset(store, augment_on, patch=16):
    info = open_store(store)
    return SliceDataset(
        store,
        info,
        info.labelled_cases,
        context=1,
        augment=AugmentConfig(),
        seed=5,
        patch=patch,
        augment_on=augment_on,
    )


def test_both_sides_of_the_loader_give_the_same_samples_and_parameter_rates(loader_store):
    """Items read by the dataset on either side: the same patches (the draws are the
    same, in the same order), and the device side's draws fire at the config's rates."""
    workers, device = dataset(loader_store, "workers"), dataset(loader_store, "device")
    assert device.side == cut_side(16, 32, AugmentConfig()) == 32 and workers.side == 16
    items = [Drawn(i % len(workers), 0, i) for i in range(400)]
    wi, wl = workers._batch_tensors(len(items), shared=False)
    assert workers._fill(items, wi, wl) is None
    ci, cl = device._batch_tensors(len(items), shared=False)
    params = device._fill(items, ci, cl)
    di, dl = augment_batch(ci, cl, params, 16, 32)
    close = np.isclose(di.numpy(), wi.float().numpy(), atol=2e-2, rtol=2e-3)
    assert close.mean() > 0.995
    assert (dl.numpy() != wl.numpy()).mean() < 1e-3
    # each item's patch lies where the workers' side put it
    reader = SliceReader(loader_store, 32, device.store_case_ids)
    for j in (0, 7, 99):
        i = items[j].index
        present = np.flatnonzero(device.rows["counts"][i][1:]) + 1
        y, x = patch_origin(
            reader.label(device.rows[i]),
            16,
            np.random.default_rng([device.seed, 0, items[j].draw]),
            present,
        )
        assert (params["top"][j], params["left"][j]) == (y, x)
    reader.close()
    n = len(params)
    rates = {
        "flip_h": params["flip_h"].mean(),
        "rotate": (params["angle"] != 0).mean(),
        "zoom": (params["zoom"] != 1).mean(),
        "intensity": (params["gain"] != 1).mean(),
        "noise": (params["noise"] > 0).mean(),
    }
    cfg = AugmentConfig()
    for name, p in (
        ("flip_h", cfg.p_flip),
        ("rotate", cfg.p_rotate),
        ("zoom", cfg.p_scale),
        ("intensity", cfg.p_intensity),
        ("noise", cfg.p_noise),
    ):
        assert abs(rates[name] - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9, (name, rates)
    angles = np.degrees(params["angle"][params["angle"] != 0])
    assert angles.min() > -180 and angles.max() < 180 and abs(np.median(angles)) < 45
    zooms = params["zoom"][params["zoom"] != 1]
    assert zooms.min() >= 0.7 and zooms.max() <= 1.4


@pytest.mark.parametrize("cfg", [AugmentConfig(), NO_WARP], ids=["whole-slice-cut", "smaller-cut"])
def test_the_device_side_reads_the_rows_the_warp_reads_and_the_slices_darkest(loader_store, cfg):
    """Every item twice in one batch: the first read of each chunk is whole, the later ones
    partial; the reach's rows are the stored ones either way, and the fill is the whole
    stack's darkest value as before (`amin` over each whole context slice)."""
    info = open_store(loader_store)
    ds = SliceDataset(
        loader_store,
        info,
        info.labelled_cases,
        context=1,
        augment=cfg,
        seed=5,
        patch=16,
        augment_on="device",
    )
    size, side = ds.size, ds.side
    items = [Drawn(i % len(ds), 0, i) for i in range(2 * len(ds))]
    images, labels = ds._batch_tensors(len(items), shared=False)
    images.fill_(float("nan"))
    labels.fill_(255)
    params = ds._fill(items, images, labels)
    assert torch.isnan(images).any()  # partial reads left the rest of the cut alone
    reader = SliceReader(loader_store, size, info.case_ids)
    start, stop = reach_rows(params, 16, size, side)
    cuts = np.empty((len(items), 3, side, side), np.float16)
    cut_labels = np.empty((len(items), side, side), np.uint8)
    for j, item in enumerate(items):
        stack = reader.images(
            ds.rows[ds._neighbours[item.index]], np.empty((3, size, size), np.float16)
        )
        darkest = torch.from_numpy(stack).amin(dim=(1, 2)).float().numpy()
        assert np.array_equal(params["fill"][j, :3], darkest)
        ct, cl = int(params["cut_top"][j]), int(params["cut_left"][j])
        cuts[j] = stack[:, ct : ct + side, cl : cl + side]
        cut_labels[j] = reader.label(ds.rows[item.index])[ct : ct + side, cl : cl + side]
        a, b = start[j] - ct, stop[j] - ct
        assert np.array_equal(labels[j, a:b].numpy(), cut_labels[j, a:b])
        assert np.array_equal(
            images[j, :, a:b].numpy().view(np.uint16), cuts[j, :, a:b].view(np.uint16)
        )
    reader.close()
    got, got_lab = augment_batch(images, labels, params, 16, size)
    want, want_lab = augment_batch(
        torch.from_numpy(cuts), torch.from_numpy(cut_labels), params, 16, size
    )
    assert torch.equal(got, want) and torch.equal(got_lab, want_lab)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_device_side_loader_carries_cuts_and_draws(loader_store, workers):
    ds = dataset(loader_store, "device", patch=16)
    loader = train_loader_for(
        ds,
        batch_size=4,
        workers=workers,
        fg_fraction=0.5,
        label_weights=None,
        seed=0,
        samples_per_epoch=12,
        pin_memory=False,
    )
    try:
        it = iter(loader)
        seen = []
        for _ in range(5):  # past the epoch's 3 batches: the stream runs on
            img, lab, params = next(it)
            assert img.shape == (4, 3, 32, 32) and lab.shape == (4, 32, 32)
            assert params.dtype == PARAMS and len(params) == 4
            seen.append(params.copy())
        out = list(DeviceBatches(iter([(img, lab, params)]), torch.device("cpu"), _augment))
        assert out[0][0].shape == (4, 3, 16, 16) and out[0][0].dtype == torch.float32
    finally:
        close_loader(loader)
    # a second loader with the same seed: the same draws
    again = train_loader_for(
        dataset(loader_store, "device", patch=16),
        batch_size=4,
        workers=0,
        fg_fraction=0.5,
        label_weights=None,
        seed=0,
        samples_per_epoch=12,
        pin_memory=False,
    )
    it = iter(again)
    for want in seen:
        assert next(it)[2].tobytes() == want.tobytes()


def _augment(images, labels, params):
    return augment_batch(images, labels, params, 16, 32)


def test_device_batches_pass_plain_batches_and_refuse_params_without_a_transform():
    img, lab = torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4, dtype=torch.uint8)
    out = list(DeviceBatches(iter([(img, lab)]), torch.device("cpu")))
    assert out[0][0] is img and out[0][1] is lab
    with pytest.raises(ValueError, match="needs a transform"):
        next(DeviceBatches(iter([(img, lab, np.zeros(2, PARAMS))]), torch.device("cpu")))
