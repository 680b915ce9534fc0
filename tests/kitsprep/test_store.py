"""The store format's reader: what it refuses (so later stages never train on a half-built or
foreign file) and what `summarise` reports."""

from __future__ import annotations

import os
import pickle
import shutil

import h5py
import numpy as np
import pytest

from kitsprep.errors import KitsError
from kitsprep.store import (
    FORMAT_VERSION,
    SliceReader,
    file_size,
    index_dtype,
    open_store,
    summarise,
)
from kitsprep.window import WINDOW_PRESETS
from tests.kitsprep.conftest import build, write_case, write_cohort


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Three labelled cases and one unlabelled, size 32."""
    root = tmp_path_factory.mktemp("store")
    src = write_cohort(root / "src", n=4, unlabelled=(2,))
    build(src, root / "s.h5", size=32)
    return root / "s.h5"


def _copy(store, tmp_path, **attrs):
    path = tmp_path / "copy.h5"
    shutil.copy(store, path)
    with h5py.File(path, "r+") as f:
        for k, v in attrs.items():
            if v is None:
                del f.attrs[k]
            else:
                f.attrs[k] = v
    return path


def test_open_store_reads_back(store):
    info = open_store(store)
    assert info.case_ids == [f"case_{i:05d}" for i in range(4)]
    assert info.index.dtype == index_dtype(3) and len(info.index) == 4 + 5 + 6 + 7
    assert info.window == WINDOW_PRESETS["mlperf"] and info.size == 32
    assert info.build["size"] == 32 and info.kitsprep_version
    np.testing.assert_array_equal(info.rows("case_00001")["slice"], np.arange(5))
    assert (info.rows("case_00001")["case"] == 1).all()


def test_open_store_missing(tmp_path):
    with pytest.raises(KitsError, match="does not exist.*kitsprep build"):
        open_store(tmp_path / "nope.h5")


def test_open_store_folder(tmp_path):
    with pytest.raises(KitsError, match=str(tmp_path)):
        open_store(tmp_path)


def test_open_store_not_hdf5(tmp_path):
    path = tmp_path / "x.h5"
    path.write_text("hello, not HDF5\n" * 100)
    with pytest.raises(KitsError, match="not an HDF5 file"):
        open_store(path)


def test_open_store_hdf5_without_format(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(KitsError, match="not a kits slice store"):
        open_store(path)


def test_open_store_foreign_format(store, tmp_path):
    with pytest.raises(KitsError, match="not a kits slice store.*'nnunet'"):
        open_store(_copy(store, tmp_path, format="nnunet"))


def test_open_store_wrong_version(store, tmp_path):
    newer = FORMAT_VERSION + 1
    match = f"format version {newer}.*reads versions 2 to {FORMAT_VERSION}"
    with pytest.raises(KitsError, match=match):
        open_store(_copy(store, tmp_path, format_version=newer))


def test_open_store_incomplete(store, tmp_path):
    with pytest.raises(KitsError, match="unfinished build.*--resume"):
        open_store(_copy(store, tmp_path, complete=False))


def test_summarise(store):
    info = open_store(store)
    s = summarise(info)
    idx = info.index
    lab_rows = np.isin(idx["case"], [0, 1, 3])
    n_lab = int(lab_rows.sum())
    fg = (idx["counts"][:, 1:].sum(1) > 0)[lab_rows]
    assert s["cases"] == 4 and s["labelled_cases"] == 3 and s["unlabelled_cases"] == 1
    assert s["slices"] == 22 and s["size"] == 32 and s["num_classes"] == 3
    assert s["bytes"] == file_size(store) == store.stat().st_size
    assert s["window"]["name"] == "mlperf" and s["window"]["lo"] == -79.0
    assert s["fg_slice_share"] == pytest.approx(fg.mean())
    assert 0 < s["fg_slice_share"] < 1  # fixtures have an empty first slice per case
    for name, v in (("kidney", 1), ("tumour", 2)):
        share = idx["counts"][:, v].sum() / (n_lab * 32 * 32)
        assert s["pixel_share"][name] == pytest.approx(share)
    assert s["edition"] == "kits19" and s["labels"] == {"kidney": 1, "tumour": 2}
    assert s["bad_cases"] == {} and s["format_version"] == FORMAT_VERSION
    no_mask = "no segmentation.nii.gz or aggregated_MAJ_seg.nii.gz"
    assert s["per_case"]["case_00002"] == {
        "slices": 6,
        "labelled": False,
        "unlabelled_reason": no_mask,
        "source_shape": [6, 24, 24],
        "spacing": pytest.approx([3.0, 0.8, 0.8]),
        "in_plane": {
            **{"src_h": 24, "src_w": 24, "new_h": 32, "new_w": 32, "size": 32},
            **{"pad_top": 0, "pad_left": 0, "crop_top": 0, "crop_left": 0},
            **{"crop_h": 24, "crop_w": 24, "shrink": 1.0},
        },
    }
    assert s["spacing"] == "none" and s["target_spacing"] is None and s["shrunk"] == {}
    assert s["unlabelled_reasons"] == {no_mask: 1}
    assert s["edition_reason"] == "no mask holds a label beyond kidney and tumour"
    assert s["per_case"]["case_00001"]["labelled"] is True


def test_summarise_unlabelled_only(tmp_path):
    write_case(tmp_path / "src", 0, np.zeros((2, 16, 16), np.float32))
    build(tmp_path / "src", tmp_path / "u.h5", size=16)
    s = summarise(open_store(tmp_path / "u.h5"))
    assert s["labelled_cases"] == 0 and s["fg_slice_share"] == 0.0
    assert s["pixel_share"]["kidney"] == 0.0


def test_slicemap_reads_equal_h5py_and_pickle_by_path(store):
    info = open_store(store)
    smap = SliceReader(store, info.size)
    clone = pickle.loads(pickle.dumps(smap))  # what a DataLoader worker receives
    out = np.empty((32, 32), np.float16)
    try:
        with h5py.File(store, "r") as f:
            for r in info.index:
                cid = info.case_ids[r["case"]]
                want = f["cases"][cid]["image"][r["slice"]]
                for m in (smap, clone):
                    np.testing.assert_array_equal(m.image(r).view(np.uint16), want.view(np.uint16))
                assert smap.image(r, out=out) is out
                if info.cases[cid].labelled:
                    np.testing.assert_array_equal(
                        clone.label(r), f["cases"][cid]["label"][r["slice"]]
                    )
                else:
                    with pytest.raises(KitsError, match="unlabelled"):
                        smap.label(r)
    finally:
        smap.close()
        clone.close()


def test_fingerprint_tracks_content(store, tmp_path):
    src = store.parent / "src"
    build(src, tmp_path / "same.h5", size=32)
    build(src, tmp_path / "other.h5", size=16)
    fp = open_store(store).fingerprint
    assert open_store(tmp_path / "same.h5").fingerprint == fp
    assert open_store(tmp_path / "other.h5").fingerprint != fp


def _flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ 0xFF]))


def test_a_damaged_chunk_is_one_line_naming_store_case_slice_and_the_fix(store, tmp_path):
    path = tmp_path / "damaged.h5"
    shutil.copy(store, path)
    info = open_store(path)
    img_row = info.index[3]
    lab_row = next(r for r in info.index if r["label_nbytes"] > 0 and r["slice"] > 0)
    _flip_byte(path, int(img_row["image_offset"]) + 100)
    _flip_byte(path, int(lab_row["label_offset"]) + int(lab_row["label_nbytes"]) // 2)
    m = SliceReader(path, info.size, info.case_ids)
    for read, row, what in ((m.image, img_row, "CRC-32"), (m.label, lab_row, "label chunk")):
        case = info.case_ids[row["case"]]
        with pytest.raises(
            KitsError,
            match=rf"{path}: {case} slice {row['slice']}: .*{what}"
            rf".*kitsprep verify {path}.*rebuild",
        ) as e:
            read(row)
        assert "\n" not in str(e.value)
    # verify reads without the check, to report every problem itself
    unchecked = SliceReader(path, info.size, info.case_ids, check_crc=False)
    assert unchecked.image(img_row).shape == (info.size, info.size)
    # a truncated file is named as such
    with open(path, "r+b") as f:
        f.truncate(int(info.index["image_offset"].max()) + 10)
    with pytest.raises(KitsError, match="truncated"):
        m.image(info.index[int(np.argmax(info.index["image_offset"]))])
    m.close()
    unchecked.close()


def test_adjacent_chunks_read_in_one_call_equal_single_reads(store, monkeypatch):
    info = open_store(store)
    rows = info.rows(info.case_ids[0])
    stack = rows[[0, 0, 0, 1, 2]]  # a 2.5D stack clamped at the case's first slice
    m = SliceReader(store, info.size, info.case_ids)
    want = np.stack([m.image(r) for r in stack])
    calls = []
    real = os.preadv
    monkeypatch.setattr(
        os, "preadv", lambda fd, bufs, off: calls.append(len(bufs)) or real(fd, bufs, off)
    )
    got = m.images(stack, np.empty((5, info.size, info.size), np.float16))
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    assert calls == [1, 1, 3]  # slice 0 three times, then slices 0-2 back to back
    # never more buffers per call than the kernel takes (IOV_MAX; a case can be longer)
    import kitsprep.store.reader as reader_mod

    monkeypatch.setattr(reader_mod, "_IOV_MAX", 2)
    calls.clear()
    got = m.images(stack, np.empty((5, info.size, info.size), np.float16))
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16)) and calls == [1, 1, 2, 1]
    m.close()


def test_row_ranges_are_the_rows_of_whole_reads_and_each_chunk_is_checked_first(store, monkeypatch):
    info = open_store(store)
    stack = info.rows(info.case_ids[0])[[0, 0, 1, 2]]
    m = SliceReader(store, info.size, info.case_ids)
    want = m.images(stack, np.empty((4, info.size, info.size), np.float16))
    sizes = []
    real = os.preadv
    monkeypatch.setattr(
        os,
        "preadv",
        lambda fd, bufs, off: sizes.append(sum(len(b) for b in bufs)) or real(fd, bufs, off),
    )
    none = np.zeros(4, bool)
    for start, stop in ((5, 20), (0, info.size), (31, 32), (0, 1)):
        out = np.full((4, info.size, info.size), np.nan, np.float16)
        sizes.clear()
        fresh = m.image_rows(stack, out, start, stop, none)
        assert np.array_equal(
            out[:, start:stop].view(np.uint16), want[:, start:stop].view(np.uint16)
        )
        if start == 5:  # the reader's first touch of each chunk: whole (and checked)
            assert fresh.all() and sizes == [info.size**2 * 2] * 4
            assert np.array_equal(out.view(np.uint16), want.view(np.uint16))
        else:  # checked before: only the rows asked for, one read per chunk
            assert not fresh.any() and sizes == [(stop - start) * info.size * 2] * 4
            assert np.isnan(out[:, :start]).all() and np.isnan(out[:, stop:]).all()
    # `whole` asks for a whole read of a chunk already checked
    fresh = m.image_rows(stack, out, 5, 6, np.array([False, False, True, False]))
    assert fresh.tolist() == [False, False, True, False]
    assert np.array_equal(out[2].view(np.uint16), want[2].view(np.uint16))
    m.close()


def test_a_partial_read_checks_the_whole_chunk_on_first_touch(store, tmp_path):
    """A damaged byte outside the rows asked for is still reported on the first read."""
    path = tmp_path / "damaged.h5"
    shutil.copy(store, path)
    info = open_store(path)
    row = info.index[3]
    _flip_byte(path, int(row["image_offset"]) + 2 * info.size * 30)  # row 30
    m = SliceReader(path, info.size, info.case_ids)
    out = np.empty((1, info.size, info.size), np.float16)
    case = info.case_ids[row["case"]]
    with pytest.raises(
        KitsError, match=rf"{path}: {case} slice {row['slice']}: .*CRC-32.*kitsprep verify"
    ) as e:
        m.image_rows(info.index[3:4], out, 0, 4, np.zeros(1, bool))
    assert "\n" not in str(e.value)
    # a truncated file is named as such on a partial read too
    ok = info.index[4:5]
    m.image_rows(ok, out, 0, 4, np.zeros(1, bool))  # first touch: whole, checked
    with open(path, "r+b") as f:
        f.truncate(int(ok["image_offset"][0]) + 10)
    with pytest.raises(KitsError, match="truncated"):
        m.image_rows(ok, out, 0, 4, np.zeros(1, bool))
    m.close()
