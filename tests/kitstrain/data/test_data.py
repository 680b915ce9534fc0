"""The training data path: splits, the memory-mapped dataset, samplers and loaders."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kitsprep.errors import KitsError
from kitsprep.labels import EDITIONS
from kitsprep.store import SliceReader, index_dtype, open_store
from kitstrain.data.augment import AugmentConfig
from kitstrain.data.batch_pool import PooledBatch
from kitstrain.data.dataset import SliceDataset, collate_slices
from kitstrain.data.loaders import (
    POOL_SPARE_SLOTS,
    PREFETCH_BYTES,
    batches_per_epoch,
    make_train_loader,
    prefetch_for,
    shard_cases,
)
from kitstrain.data.samplers import ForegroundSampler, label_weights_by_value, slice_weights
from kitstrain.data.splits import Split, check_split, make_split
from tests.conftest import LOADER_CASES, blob_labels, build, write_kits_case

MASKS = Path(__file__).resolve().parents[4] / "shared" / "kits19-masks"


@pytest.fixture(scope="module")
def info(loader_store):
    return open_store(loader_store)


def h5_image(f: h5py.File, case_id: str, s: int) -> np.ndarray:
    return f["cases"][case_id]["image"][s]


# --------------------------------------------------------------------------- reading


def test_every_slice_reads_back_bit_exact_through_the_reader(loader_store, info):
    m = SliceReader(loader_store, info.size)
    with h5py.File(loader_store, "r") as f:
        for cid, meta in info.cases.items():
            images = f["cases"][cid]["image"][...]
            labels = f["cases"][cid]["label"][...] if meta.labelled else None
            for row in info.rows(cid):
                s = int(row["slice"])
                assert np.array_equal(m.image(row).view(np.uint16), images[s].view(np.uint16))
                if labels is not None:
                    assert np.array_equal(m.label(row), labels[s])
    m.close()


def test_dataset_items_equal_the_store(loader_store, info):
    ds = SliceDataset(loader_store, info, info.labelled_cases)
    assert len(ds) == sum(n for n, _, _ in LOADER_CASES)
    assert ds._reader is None  # nothing opened until a process reads
    with h5py.File(loader_store, "r") as f:
        for i in range(len(ds)):
            img, lab = ds[i]
            assert img.dtype == torch.float16 and img.shape == (1, info.size, info.size)
            assert lab.dtype == torch.uint8 and lab.shape == (info.size, info.size)
            cid = info.case_ids[int(ds.rows["case"][i])]
            s = int(ds.rows["slice"][i])
            assert np.array_equal(
                img[0].numpy().view(np.uint16), h5_image(f, cid, s).view(np.uint16)
            )
            assert np.array_equal(lab.numpy(), f["cases"][cid]["label"][s])


def test_batched_read_equals_single_reads_and_collates_without_copy(loader_store, info):
    ds = SliceDataset(loader_store, info, info.labelled_cases, context=1)
    idx = [5, 0, 17, 3]
    items = ds.__getitems__(idx)
    img, lab = collate_slices(items)
    assert img.shape == (4, 3, info.size, info.size) and lab.shape == (4, info.size, info.size)
    assert img.data_ptr() == items[0][0].data_ptr()  # the batch tensor itself, not a copy
    for j, i in enumerate(idx):
        one = ds[i]
        assert torch.equal(img[j], one[0]) and torch.equal(lab[j], one[1])
    # tensors that are not one batch's views are stacked as usual
    loose = [(torch.ones(2), torch.zeros(3)), (torch.ones(2), torch.zeros(3))]
    a, b = collate_slices(loose)
    assert a.shape == (2, 2) and b.shape == (2, 3)


def test_context_stacks_neighbours_clamped_at_the_ends(loader_store, info):
    cid = "case_00002"  # 5 slices
    ds = SliceDataset(loader_store, info, [cid], context=2)
    with h5py.File(loader_store, "r") as f:
        vol = f["cases"][cid]["image"][...]
    n = vol.shape[0]
    for i in range(n):
        img, _ = ds[i]
        assert img.shape[0] == 5
        for c, k in enumerate(range(-2, 3)):
            src = vol[min(max(i + k, 0), n - 1)]
            assert np.array_equal(img[c].numpy().view(np.uint16), src.view(np.uint16))
    # training and inference stack context in two places: they must agree exactly
    from kitstrain.infer.engine import stack_context

    stacked = stack_context(vol, 2)
    for i in range(n):
        assert np.array_equal(ds[i][0].numpy().view(np.uint16), stacked[i].view(np.uint16))


def test_unlabelled_and_unknown_cases_are_refused(loader_store, info):
    unlabelled = [c for c in info.case_ids if not info.cases[c].labelled]
    assert unlabelled
    with pytest.raises(KitsError, match="unlabelled"):
        SliceDataset(loader_store, info, unlabelled)
    with pytest.raises(KitsError, match="not in"):
        SliceDataset(loader_store, info, ["case_00099"])


def test_dataset_pickles_without_its_reader(loader_store, info):
    import pickle

    ds = SliceDataset(loader_store, info, info.labelled_cases[:1])
    ds[0]
    assert ds._reader is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._reader is None
    assert torch.equal(clone[1][0], ds[1][0])


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_resident_memory_stays_flat_while_reading(tmp_path):
    shape = (96, 256, 256)  # a 12.6 MB image array: bigger than any allowed growth
    hu = np.random.default_rng(1).uniform(-300, 500, shape).astype(np.float32)
    write_kits_case(tmp_path / "src", "case_00000", hu, blob_labels(shape, 1), gz=False)
    out = tmp_path / "big.h5"
    build(tmp_path / "src", out, size=256, workers=1)
    shutil.rmtree(tmp_path / "src")
    info = open_store(out)
    ds = SliceDataset(out, info, info.labelled_cases)
    ds.__getitems__(list(range(8)))  # map opened, buffers warm
    before = _rss_kb()
    for _ in range(2):
        for start in range(0, len(ds), 8):
            ds.__getitems__(list(range(start, min(start + 8, len(ds)))))
    grown_mb = (_rss_kb() - before) / 1024
    image_mb = shape[0] * 256 * 256 * 2 / 2**20
    assert grown_mb < image_mb / 4, f"RSS grew {grown_mb:.1f} MB reading {image_mb:.1f} MB"


# --------------------------------------------------------------------------- splits


def test_seeded_split_is_patient_level_and_repeatable(info):
    a = make_split(info, None, None, seed=3)
    b = make_split(info, None, None, seed=3)
    assert a == b and a.mode == "seeded" and a.seed == 3
    assert not set(a.train) & set(a.val)
    assert set(a.train) | set(a.val) == set(info.labelled_cases)  # unlabelled never enters
    assert len(a.val) == round(0.2 * len(info.labelled_cases))
    seen = {make_split(info, None, None, seed=s).val for s in range(6)}
    assert len(seen) > 1
    assert Split.from_json(a.to_json()) == a


def test_explicit_split_and_the_rest(info):
    s = make_split(info, "0-2", "3,case_00004")
    assert s.train == ("case_00000", "case_00001", "case_00002")
    assert s.val == ("case_00003", "case_00004") and s.mode == "explicit"
    only_train = make_split(info, "0-3", None)
    assert only_train.val == ("case_00004", "case_00005")  # the rest of the labelled cases
    only_val = make_split(info, None, "5")
    assert only_val.train == tuple(f"case_{i:05d}" for i in range(5))


@pytest.mark.parametrize(
    "train, val, message",
    [
        ("0-3", "3-4", "both"),
        ("0-2", "6", "no segmentation"),
        ("0-2", "42", "not there"),
        ("0-5", None, "validation split is empty"),
    ],
)
def test_bad_splits_fail_loudly(info, train, val, message):
    with pytest.raises(KitsError, match=message) as exc:
        make_split(info, train, val)
    assert "\n" not in str(exc.value)


def test_check_split_catches_a_saved_split_with_overlap(info):
    with pytest.raises(KitsError, match="both"):
        check_split(Split(("case_00000", "case_00001"), ("case_00001",), "explicit", 0), info)


# --------------------------------------------------------------------------- samplers


def idx(sampler) -> list[int]:
    """The dataset positions a sampler draws (it yields Drawn(index, epoch, draw))."""
    return [d.index for d in sampler]


def fake_rows(n: int = 1000, fg: float = 0.1, tumour: float = 0.03, seed: int = 0):
    rows = np.zeros(n, index_dtype(3))
    rng = np.random.default_rng(seed)
    pick = rng.permutation(n)
    n_fg, n_t = int(n * fg), int(n * tumour)
    rows["counts"][pick[:n_fg], 1] = 50
    rows["counts"][pick[:n_t], 2] = 10
    return rows


def test_uniform_sampler_is_an_epoch_permutation():
    rows = fake_rows(100)
    s = ForegroundSampler(rows, 100, fg_fraction=0.0, seed=1)
    first, second = idx(s), idx(s)  # iterating again moves to the next epoch
    assert sorted(first) == list(range(100)) and sorted(second) == list(range(100))
    assert first != second
    s.set_epoch(0)
    assert idx(s) == first


def test_foreground_share_holds_in_every_batch():
    rows = fake_rows(1000, fg=0.1, tumour=0.03)
    fg = rows["counts"][:, 1:].sum(1) > 0
    s = ForegroundSampler(rows, 3200, fg_fraction=0.33, label_weights={2: 3.0}, seed=2)
    draws = np.array(idx(s))
    per_batch = fg[draws].reshape(-1, 16).sum(axis=1)
    assert per_batch.min() >= 4  # round(0.33 * 16) = 5, minus the +-1 of an even spread
    expected = 0.33 + 0.67 * fg.mean()
    assert abs(fg[draws].mean() - expected) < 0.03
    # tumour slices drawn about their weight (3) times as often as kidney-only ones
    counts = np.bincount(draws, minlength=len(rows))
    tumour = rows["counts"][:, 2] > 0
    kidney_only = fg & ~tumour
    forced_t = counts[tumour].mean() - counts[~fg].mean()
    forced_k = counts[kidney_only].mean() - counts[~fg].mean()
    assert 2.4 < forced_t / forced_k < 3.6


def test_a_slice_weighs_the_most_of_the_labels_it_holds():
    # kidney, tumour, cyst, nothing, kidney+tumour+cyst, cyst only, kidney+cyst
    counts = np.zeros((7, 4), np.int32)
    for row, values in enumerate([(1,), (2,), (3,), (), (1, 2, 3), (3,), (1, 3)]):
        counts[row, list(values)] = 5
    w = slice_weights(counts, {2: 4.0, 3: 2.0})
    assert w.tolist() == [1.0, 4.0, 2.0, 0.0, 4.0, 2.0, 2.0]
    # a weight under 1 applies only where no heavier label is held
    assert slice_weights(counts, {1: 0.5}).tolist() == [0.5, 1, 1, 0, 1, 1, 1]
    rows = np.zeros(7, index_dtype(4))
    rows["counts"] = counts
    s = ForegroundSampler(rows, 700, fg_fraction=1.0, label_weights={2: 4.0, 3: 2.0}, seed=0)
    assert s.fg_positions.tolist() == [0, 1, 2, 4, 5, 6]  # the cyst-only slices count
    assert np.allclose(s.fg_p, np.array([1, 4, 2, 4, 2, 2]) / 15)
    drawn = np.bincount(idx(s), minlength=7)
    assert drawn[3] == 0 and drawn[5] > 1.3 * drawn[0] and drawn[1] > 2.5 * drawn[0]


def test_label_weights_by_name_against_the_edition():
    kits19, kits23 = EDITIONS["kits19"], EDITIONS["kits23"]
    preset = {"tumour": 4.0, "cyst": 2.0}
    assert label_weights_by_value(kits23, preset, strict=True) == {2: 4.0, 3: 2.0}
    assert label_weights_by_value(kits19, preset, strict=False) == {2: 4.0}  # from a preset
    with pytest.raises(KitsError, match=r"cyst.*kits19.*kidney, tumour$"):
        label_weights_by_value(kits19, preset, strict=True)  # given by the user


def test_rank_shards_are_disjoint_and_equal():
    rows = fake_rows(120)
    shards = [
        idx(ForegroundSampler(rows, 120, fg_fraction=0.0, seed=5, rank=r, world_size=3))
        for r in range(3)
    ]
    assert [len(x) for x in shards] == [40, 40, 40]
    assert sorted(sum(shards, [])) == list(range(120))  # each slice on exactly one rank
    rows = fake_rows(1000)
    fg = rows["counts"][:, 1:].sum(1) > 0
    samplers = [
        ForegroundSampler(rows, 999, fg_fraction=0.4, seed=5, rank=r, world_size=2)
        for r in range(2)
    ]
    stream = samplers[0].global_stream(0)
    for r, s in enumerate(samplers):
        got = np.array(idx(s))
        assert len(got) == 500 and np.array_equal(got, stream[:, r])
        assert fg[got].mean() >= 0.4


def test_sampler_without_foreground_falls_back_to_uniform():
    rows = fake_rows(50, fg=0.0, tumour=0.0)
    assert sorted(idx(ForegroundSampler(rows, 50, fg_fraction=0.5))) == list(range(50))


# --------------------------------------------------------------------------- loaders


def _train_loader(loader_store, info, **kw):
    settings = dict(
        batch_size=4,
        workers=2,
        context=1,
        augment=AugmentConfig(),
        fg_fraction=0.5,
        label_weights={2: 2.0},
        seed=0,
        samples_per_epoch=40,
        pin_memory=False,
        persistent_workers=False,
        multiprocessing_context="fork",
    )
    settings.update(kw)
    # one epoch, so that a test can run the loader dry (training's never ends)
    settings.setdefault("until_epoch", settings.get("epoch", 0) + 1)
    return make_train_loader(loader_store, info, info.labelled_cases, **settings)


@pytest.mark.parametrize("mp_context", ["fork", "spawn"])
def test_pooled_batches_equal_batches_read_in_the_main_process(loader_store, info, mp_context):
    """Workers write into reused pool slots (more batches than slots, so every slot is
    reused); each batch equals the one read without workers, and every slot comes back."""
    pooled = _train_loader(loader_store, info, multiprocessing_context=mp_context)
    assert pooled.pool is not None
    # prefetch chosen from the batch's bytes (small here: 4), the pool sized from it
    assert pooled.prefetch_factor == 4 and pooled.pool.slots_per_worker == 4 + POOL_SPARE_SLOTS
    slots = pooled.pool.images.shape[0]
    got = [(img.clone(), lab.clone()) for img, lab in pooled]
    want = list(_train_loader(loader_store, info, workers=0))
    assert len(got) == len(want) == 10 > slots // 2
    for (gi, gl), (wi, wl) in zip(got, want, strict=True):
        assert torch.equal(gi, wi) and torch.equal(gl, wl)
    free = sorted(
        s for q in pooled.pool.free for s in iter(lambda q=q: None if q.empty() else q.get(), None)
    )
    assert free == list(range(slots))


def test_workers_fill_pool_slots_and_fall_back_when_none_is_free(loader_store, info):
    """A consumer that never hands slots back (keeps every batch) still gets every batch
    right: once a worker's slots are all held it allocates fresh ones."""
    loader = _train_loader(loader_store, info, prefetch_factor=1)
    raw = list(DataLoader.__iter__(loader))  # no hand-back
    pooled = [b for b in raw if isinstance(b, PooledBatch)]
    assert len(pooled) == loader.pool.images.shape[0]  # each worker used all its slots
    assert len(raw) - len(pooled) == 10 - len(pooled)
    want = list(_train_loader(loader_store, info, workers=0))
    for b, (wi, wl) in zip(raw, want, strict=True):
        img, lab = b.tensors() if isinstance(b, PooledBatch) else b
        assert torch.equal(img, wi) and torch.equal(lab, wl)
    for b in pooled:
        b.release()
        b.release()  # idempotent: a slot is handed back once


def test_train_loader_is_repeatable_for_a_seed_with_workers(loader_store, info):
    def batches(seed: int, rank: int = 0, world: int = 1):
        loader = _train_loader(
            loader_store, info, seed=seed, rank=rank, world_size=world, samples_per_epoch=24
        )
        return [(img.clone(), lab.clone()) for img, lab in loader]

    a, b, other = batches(0), batches(0), batches(1)
    assert len(a) == 6
    for (ia, la), (ib, lb) in zip(a, b, strict=True):
        assert ia.shape == (4, 3, info.size, info.size) and ia.dtype == torch.float16
        assert torch.equal(ia, ib) and torch.equal(la, lb)
    assert any(not torch.equal(x[0], y[0]) for x, y in zip(a, other, strict=True))
    labels = torch.cat([lab for _, lab in a])
    assert set(labels.unique().tolist()) <= {0, 1, 2}
    fg_slices = sum(int((lab > 0).any()) for _, batch in a for lab in batch)
    assert fg_slices >= 12  # at least the forced half of 24 draws shows foreground


@pytest.mark.parametrize(
    "samples, batch, world", [(20, 4, 1), (22, 4, 1), (21, 4, 2), (3, 4, 1), (30, 8, 3)]
)
def test_steps_per_epoch_equal_the_batches_the_loader_yields(
    loader_store, info, samples, batch, world
):
    """The schedule counts batches_per_epoch; a loader that yields fewer (drop_last) would
    end every epoch before the schedule thinks it does."""
    for rank in range(world):
        loader = _train_loader(
            loader_store,
            info,
            batch_size=batch,
            workers=0,
            context=0,
            augment=None,
            fg_fraction=0.0,
            label_weights=None,
            rank=rank,
            world_size=world,
            samples_per_epoch=samples,
        )
        assert len(list(loader.sampler)) > 0
        assert sum(1 for _ in loader) == batches_per_epoch(samples, batch, world)


def test_one_loader_serves_a_resumed_epoch_and_the_next_ones(loader_store, info):
    """Built once for the run, resumed at the last batch of an epoch (2 draws left of 22,
    fewer than a batch): that epoch yields nothing more, and the stream runs on through
    the next epochs without ending, each one whole."""
    loader = _train_loader(
        loader_store,
        info,
        workers=0,
        context=0,
        augment=None,
        fg_fraction=0.0,
        label_weights=None,
        samples_per_epoch=22,
        epoch=3,
        start_batch=5,
        until_epoch=None,
    )
    batches = list(itertools.islice(iter(loader.stream), 12))
    epochs = [b[0].epoch for b in batches]
    assert epochs == [4] * 5 + [5] * 5 + [6] * 2
    assert [b[0].draw for b in batches[:6]] == [0, 4, 8, 12, 16, 0]
    assert loader.stream.batches_per_epoch == 5
    it = iter(loader)
    assert all(next(it)[0].shape == (4, 1, info.size, info.size) for _ in range(12))


def test_resume_mid_epoch_draws_the_rest_of_that_epoch(loader_store, info):
    def batches(epoch: int, start_batch: int = 0):
        loader = _train_loader(
            loader_store,
            info,
            workers=0,
            context=0,
            augment=None,
            fg_fraction=0.33,
            seed=3,
            samples_per_epoch=20,
            epoch=epoch,
            start_batch=start_batch,
        )
        return [img for img, _ in loader]

    full, resumed, next_epoch = batches(1), batches(1, start_batch=2), batches(2)
    assert len(full) == 5 and len(resumed) == 3
    assert all(torch.equal(a, b) for a, b in zip(full[2:], resumed, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(full, next_epoch, strict=True))
    s = ForegroundSampler(fake_rows(50), 50, seed=1)
    s.set_epoch(4)
    whole = list(s)
    s.set_epoch(4)
    s.skip_next(12)
    assert len(s) == 38 and list(s) == whole[12:] and len(s) == 50


def test_val_shards_whole_cases_across_ranks(info):
    cases = info.labelled_cases
    shards = [shard_cases(info, cases, r, 2) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(cases)
    assert not set(shards[0]) & set(shards[1])
    load = [sum(info.cases[c].slices for c in s) for s in shards]
    assert abs(load[0] - load[1]) <= max(info.cases[c].slices for c in cases)


# --------------------------------------------------------------------------- real masks


@pytest.mark.skipif(not MASKS.is_dir(), reason="../shared/kits19-masks is not present")
def test_real_mask_reads_back_equal_through_the_reader(tmp_path):
    paths = sorted(MASKS.glob("case_*/segmentation.nii.gz"))
    shortest = min(paths, key=lambda p: (nib.load(p).shape[0], p.name))
    case_id = shortest.parent.name
    seg = nib.load(shortest)
    mask = np.asarray(seg.dataobj)
    src = tmp_path / "src" / case_id
    src.mkdir(parents=True)
    shutil.copy(shortest, src / "segmentation.nii.gz")
    # imaging: a constant volume in the mask's exact geometry
    img = nib.Nifti1Image(np.full(mask.shape, 40.0, np.float32), seg.affine, seg.header)
    img.set_data_dtype(np.float32)
    nib.save(img, src / "imaging.nii")
    out = tmp_path / "real.h5"
    build(tmp_path / "src", out, size=512, workers=1)
    info = open_store(out)
    meta = info.cases[case_id]
    assert meta.in_plane.is_identity, "the shortest KiTS19 case is 512x512"
    expect = mask.transpose(meta.axes)
    ds = SliceDataset(out, info, [case_id])
    for i in range(len(ds)):
        _, lab = ds[i]
        assert np.array_equal(lab.numpy(), expect[i])
    assert int((expect == 2).sum()) == int(info.label_pixels("tumour", info.rows(case_id)).sum())


def test_prefetch_keeps_the_whole_pool_within_its_budget():
    mb = 2**20
    assert prefetch_for(12 * mb, workers=2) == 4  # 512x512 batch of 16: 4 ahead
    for batch_bytes, workers in [(92 * mb, 16), (40 * mb, 8), (300 * mb, 1)]:
        p = prefetch_for(batch_bytes, workers)
        assert 1 <= p <= 4
        pool = workers * (p + POOL_SPARE_SLOTS) * batch_bytes
        assert pool <= PREFETCH_BYTES or p == 1
    assert prefetch_for(700 * mb, workers=16) == 1  # never below one batch ahead
