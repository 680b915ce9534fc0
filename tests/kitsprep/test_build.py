"""`build_store`: what lands in the store, that bad input never leaves a file at --out, and
that an interrupted build resumes to exactly the contents of an uninterrupted one."""

from __future__ import annotations

import io
import json
import multiprocessing
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import kitsprep.build.finish as finish_mod
import kitsprep.build.workers as workers_mod
from kitsprep.build import BuildConfig, partial_dir
from kitsprep.errors import KitsError
from kitsprep.geometry import fit_in_plane
from kitsprep.labels import ANY_EDITION, EDITIONS, any_edition_labels
from kitsprep.progress import Progress
from kitsprep.store import FORMAT, FORMAT_VERSION, SliceReader, open_store
from kitsprep.verify import verify_store
from kitsprep.window import WINDOW_PRESETS
from tests.kitsprep.conftest import (
    BAD_KINDS,
    assert_same_store,
    build,
    expected_case,
    kits_affine,
    random_case,
    read_store,
    truncate,
    write_bad_source,
    write_case,
    write_cohort,
    write_good,
)

REPO = Path(__file__).resolve().parents[2]


def assert_store_matches_source(out: Path, src: Path, size: int, window) -> None:
    """Every slice equals the kernels applied to the source; index and attributes agree;
    the memory map reads what h5py reads."""
    info = open_store(out)
    assert info.size == size and info.window == window
    smap = SliceReader(out, size)
    try:
        with h5py.File(out, "r") as f:
            row = 0
            for pos, cid in enumerate(info.case_ids):
                folder = src / cid
                seg_path = folder / "segmentation.nii.gz"
                img, lab, counts, plane, axes = expected_case(
                    folder / "imaging.nii.gz", seg_path if seg_path.exists() else None, size, window
                )
                g = f["cases"][cid]
                meta = info.cases[cid]
                rows = info.rows(cid)
                assert meta.row_start == row and meta.slices == img.shape[0] == len(rows)
                row += meta.slices
                np.testing.assert_array_equal(g["image"][...].view(np.uint16), img.view(np.uint16))
                assert (rows["case"] == pos).all()
                np.testing.assert_array_equal(rows["slice"], np.arange(meta.slices))
                assert meta.in_plane == plane and meta.axes == axes
                np.testing.assert_array_equal(
                    rows["image_offset"],
                    [g["image"].id.get_chunk_info(i).byte_offset for i in range(meta.slices)],
                )
                for i, r in enumerate(rows):
                    np.testing.assert_array_equal(
                        smap.image(r).view(np.uint16), img[i].view(np.uint16)
                    )
                if lab is None:
                    assert not meta.labelled and not g.attrs["labelled"]
                    assert "label" not in g
                    assert (rows["label_offset"] == -1).all()
                    assert (rows["label_nbytes"] == 0).all()
                    assert (rows["counts"] == 0).all()
                    continue
                assert meta.labelled
                stored = g["label"][...]
                np.testing.assert_array_equal(stored, lab)
                for v in range(info.num_classes):
                    np.testing.assert_array_equal(rows["counts"][:, v], (stored == v).sum((1, 2)))
                np.testing.assert_array_equal(
                    rows["counts"][:, 1:], counts[:, : info.num_classes - 1]
                )
                assert (rows["label_offset"] > 0).all() and (rows["label_nbytes"] > 0).all()
                for i, r in enumerate(rows):
                    np.testing.assert_array_equal(smap.label(r), stored[i])
            assert row == len(info.index)
    finally:
        smap.close()


# --------------------------------------------------------------------------- contents


def test_build_contents_and_attributes(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(7)
    write_cohort(src, n=3, unlabelled=(2,))  # float32/uint8, int16+scale/uint16 qform, none
    img, seg = random_case(rng, 3, 20, 28)  # non-square: padded top and bottom
    write_case(src, 3, img, seg, kits_affine(4.0, 0.9))
    report = build(src, tmp_path / "out.h5", size=32)
    assert (report.cases, report.slices) == (4, 4 + 5 + 6 + 3)
    out = tmp_path / "out.h5"
    window = WINDOW_PRESETS["mlperf"]
    assert_store_matches_source(out, src, 32, window)

    info = open_store(out)
    assert info.case_ids == ["case_00000", "case_00001", "case_00002", "case_00003"]
    assert info.labelled_cases == ["case_00000", "case_00001", "case_00003"]
    assert info.num_classes == 3 and info.bad_cases == {}
    assert info.format_version == FORMAT_VERSION
    m = info.cases["case_00001"]
    assert m.source_shape == (5, 24, 24) and m.axcodes == "IPL" and m.axes == (0, 1, 2)
    np.testing.assert_allclose(m.affine, kits_affine(2.0, 0.75), atol=1e-6)
    np.testing.assert_allclose(m.spacing, (2.0, 0.75, 0.75), rtol=1e-6)
    assert m.fingerprint["imaging_dtype"] == "int16"
    assert (m.fingerprint["slope"], m.fingerprint["inter"]) == (2.0, -1024.0)
    assert m.fingerprint["segmentation_dtype"] == "uint16"
    m3 = info.cases["case_00003"]
    assert m3.in_plane == fit_in_plane(20, 28, 32)
    assert (m3.in_plane.new_h, m3.in_plane.pad_top) == (23, 4)
    with h5py.File(out, "r") as f:
        a = f.attrs
        assert a["format"] == FORMAT and a["format_version"] == FORMAT_VERSION
        assert bool(a["complete"]) and a["image_dtype"] == "float16" and a["size"] == 32
        assert json.loads(a["window"]) == json.loads(window.to_json())
        assert json.loads(a["build"])["size"] == 32
        g = f["cases/case_00003"]
        assert json.loads(g.attrs["in_plane"])["pad_top"] == 4
        assert g.attrs["axcodes"] == "IPL"
        np.testing.assert_array_equal(g.attrs["source_shape"], [3, 20, 28])
        assert g["image"].chunks == (1, 32, 32) and g["image"].compression is None
        assert g["label"].chunks == (1, 32, 32) and g["label"].dtype == np.uint8
    assert verify_store(out, src).ok


def test_a_cyst_label_makes_a_kits23_store_under_auto(tmp_path):
    src = tmp_path / "src"
    seg = np.zeros((2, 16, 16), np.uint8)
    seg[1, :4, :5] = 3
    seg[1, 8:, 8:] = 1
    write_case(src, 0, np.zeros((2, 16, 16), np.float32), seg)
    report = build(src, tmp_path / "o.h5", size=16)
    assert report.edition == "kits23" and "case_00000" in report.edition_reason
    info = open_store(tmp_path / "o.h5")
    assert info.num_classes == 4 and info.labels == EDITIONS["kits23"]
    assert info.label_pixels("cyst").tolist() == [0, 20]
    assert info.label_pixels("kidney").tolist() == [0, 64]
    assert info.index["counts"][:, 0].tolist() == [256, 256 - 84]


def test_kidney_and_tumour_only_is_kits19_under_auto(tmp_path):
    src = tmp_path / "src"
    seg = np.zeros((2, 16, 16), np.uint8)
    seg[1, 8:, 8:] = 1
    seg[1, 9:11, 9:11] = 2
    write_case(src, 0, np.zeros((2, 16, 16), np.float32), seg)
    report = build(src, tmp_path / "o.h5", size=16)
    info = open_store(tmp_path / "o.h5")
    assert report.edition == "kits19" and info.labels == EDITIONS["kits19"]
    assert info.index["counts"].shape == (2, 3) and info.label_pixels("tumour").tolist() == [0, 4]


def test_a_kits21_layout_builds_with_labels(tmp_path):
    """aggregated_MAJ_seg.nii.gz is the mask; a case without any mask stays unlabelled and
    the store says why; the layout alone makes the store kits21, with no cyst in sight."""
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    image, seg = random_case(rng, 3, 16, 16)
    seg[2, :3, :3] = 3
    write_case(src, 0, image, seg)
    (src / "case_00000" / "segmentation.nii.gz").rename(
        src / "case_00000" / "aggregated_MAJ_seg.nii.gz"
    )
    write_case(src, 1, image, (seg == 1).astype(np.uint8))
    (src / "case_00001" / "segmentation.nii.gz").rename(
        src / "case_00001" / "aggregated_MAJ_seg.nii.gz"
    )
    write_case(src, 2, image)
    report = build(src, tmp_path / "o.h5", size=16)
    assert report.edition == "kits21" and "aggregated_MAJ_seg" in report.edition_reason
    info = open_store(tmp_path / "o.h5")
    assert info.labels == EDITIONS["kits21"] and info.edition_reason == report.edition_reason
    assert info.labelled_cases == ["case_00000", "case_00001"]
    assert info.label_pixels("cyst", info.rows("case_00000")).tolist() == [0, 0, 9]
    np.testing.assert_array_equal(
        info.label_pixels("tumour", info.rows("case_00000")), (seg == 2).sum((1, 2))
    )
    assert info.cases["case_00002"].unlabelled_reason == (
        "no segmentation.nii.gz or aggregated_MAJ_seg.nii.gz"
    )
    assert info.cases["case_00000"].unlabelled_reason == ""
    assert verify_store(tmp_path / "o.h5", src).ok
    seg[2, 0, 0] = 2  # a cyst voxel of the source turns tumour after the build
    write_case(src, 0, image, seg)
    (src / "case_00000" / "segmentation.nii.gz").replace(
        src / "case_00000" / "aggregated_MAJ_seg.nii.gz"
    )
    problems = verify_store(tmp_path / "o.h5", src).problems
    assert any(
        "label 3 (cyst) differ from the source mask (9 vs 8 pixels)" in p for p in problems
    ), problems


def test_kits23_json_makes_a_kits23_store_without_a_cyst(tmp_path):
    src = write_cohort(tmp_path / "src", n=2)
    (src / "kits23.json").write_text("[]")
    report = build(src, tmp_path / "o.h5", size=16)
    assert report.edition == "kits23" and "kits23.json" in report.edition_reason
    assert open_store(tmp_path / "o.h5").labels == EDITIONS["kits23"]
    forced = build(src, tmp_path / "f.h5", size=16, edition="kits19")
    assert forced.edition == "kits19" and forced.edition_reason == "--edition"


@pytest.mark.parametrize(("edition", "value"), [("kits19", 3), ("kits23", 5), ("auto", 5)])
def test_a_label_outside_the_edition_is_refused_naming_the_case(tmp_path, edition, value):
    src = tmp_path / "src"
    seg = np.zeros((2, 16, 16), np.uint8)
    seg[1, :2, :2] = value
    seg[0, 8:, 8:] = 1
    write_case(src, 0, np.zeros((2, 16, 16), np.float32), seg)
    write_case(src, 1, np.zeros((2, 16, 16), np.float32), (seg == 1).astype(np.uint8))
    named = ANY_EDITION if edition == "auto" else edition
    refused = (
        rf"case_00000: segmentation holds label value\(s\) {value}, outside the labels of {named}"
    )
    with pytest.raises(KitsError, match=refused):
        build(src, tmp_path / "o.h5", size=16, edition=edition)
    report = build(src, tmp_path / "o.h5", size=16, edition=edition, skip_bad=True, overwrite=True)
    assert list(report.bad_cases) == ["case_00000"] and report.cases == 1


def test_ras_stored_volume_is_sliced_along_its_axial_axis(tmp_path):
    """A volume stored (rows, cols, slices) with a RAS affine: slices come from axis 2."""
    src = tmp_path / "src"
    rng = np.random.default_rng(3)
    image = rng.uniform(-500, 500, (16, 20, 5)).astype(np.float32)
    seg = (rng.uniform(size=(16, 20, 5)) > 0.7).astype(np.uint8)
    write_case(src, 0, image, seg, np.diag([0.8, 0.8, 2.5, 1.0]))
    build(src, tmp_path / "o.h5", size=16)
    info = open_store(tmp_path / "o.h5")
    m = info.cases["case_00000"]
    assert m.slices == 5 and m.axes == (2, 0, 1) and m.source_shape == (16, 20, 5)
    assert m.axcodes == "RAS" and m.spacing == pytest.approx((2.5, 0.8, 0.8))
    assert_store_matches_source(tmp_path / "o.h5", src, 16, WINDOW_PRESETS["mlperf"])
    with h5py.File(tmp_path / "o.h5", "r") as f:
        # nearest-neighbour down from 20 cols to 16: every stored label is a source label
        assert set(np.unique(f["cases/case_00000/label"][...])) <= {0, 1}


@pytest.mark.parametrize("dtype,slope,inter", [(np.float32, None, None), (np.int16, 0.5, -1024.0)])
def test_big_endian_imaging_builds_like_little_endian(tmp_path, dtype, slope, inter):
    """Big-endian NIfTI is valid NIfTI. The numba kernels read memory as native-endian, so
    unconverted big-endian int16 would be silently wrong HU, and float32 garbage/NaN."""
    rng = np.random.default_rng(4)
    image, seg = random_case(rng, 3, 16, 16)
    if dtype == np.int16:
        image = np.round((image + 1024) * 2).astype(np.int16)
    for endian, name in (("<", "le"), (">", "be")):
        write_case(
            tmp_path / name, 0, image, seg, img_dtype=dtype, slope=slope, inter=inter, endian=endian
        )
        build(tmp_path / name, tmp_path / f"{name}.h5", size=16)
    a, b = read_store(tmp_path / "le.h5"), read_store(tmp_path / "be.h5")
    for k in a:
        if "@" not in k:
            np.testing.assert_array_equal(
                np.asarray(a[k]).view(np.uint8), np.asarray(b[k]).view(np.uint8), err_msg=k
            )


def test_workers_1_and_2_give_identical_stores(tmp_path):
    src = write_cohort(tmp_path / "src", n=3, unlabelled=(1,))
    build(src, tmp_path / "w1.h5", workers=1)
    build(src, tmp_path / "w2.h5", workers=2)
    assert_same_store(read_store(tmp_path / "w1.h5"), read_store(tmp_path / "w2.h5"))


def test_cases_spec_selects(tmp_path):
    src = write_cohort(tmp_path / "src", n=3)
    build(src, tmp_path / "o.h5", cases="0,2")
    assert open_store(tmp_path / "o.h5").case_ids == ["case_00000", "case_00002"]
    with pytest.raises(KitsError, match="case_00007"):
        build(src, tmp_path / "p.h5", cases="7")
    assert not (tmp_path / "p.h5").exists()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_input_is_a_named_error_and_leaves_no_output(tmp_path, kind):
    src = tmp_path / "src"
    needle = write_bad_source(kind, src)
    out = tmp_path / "out.h5"
    with pytest.raises(KitsError) as exc:
        build(src, out, size=16)
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)
    assert not out.exists()


def test_missing_src_dir(tmp_path):
    with pytest.raises(KitsError, match="does not exist"):
        build(tmp_path / "nowhere", tmp_path / "o.h5")
    assert not (tmp_path / "o.h5").exists()


def test_existing_out_is_refused_and_kept(tmp_path):
    src = tmp_path / "src"
    write_good(src)
    out = tmp_path / "out.h5"
    out.write_bytes(b"precious")
    with pytest.raises(KitsError, match="already exists.*--overwrite"):
        build(src, out, size=16)
    assert out.read_bytes() == b"precious"
    build(src, out, size=16, overwrite=True)
    assert open_store(out).size == 16


def test_out_is_a_folder(tmp_path):
    src = tmp_path / "src"
    write_good(src)
    (tmp_path / "out.h5").mkdir()
    with pytest.raises(KitsError, match="folder"):
        build(src, tmp_path / "out.h5", overwrite=True)


def test_failure_in_worker_pool_leaves_no_output(tmp_path):
    src = tmp_path / "src"
    for c in range(3):
        write_good(src, c)
    rng = np.random.default_rng(9)
    image, seg = random_case(rng, 3, 16, 16)
    image[1, 1, 1] = np.nan
    write_case(src, 3, image, seg)
    with pytest.raises(KitsError, match="case_00003.*NaN"):
        build(src, tmp_path / "o.h5", workers=2)
    assert not (tmp_path / "o.h5").exists()


def test_skip_bad_records_bad_cases_and_goes_on(tmp_path):
    src = tmp_path / "src"
    write_good(src, 0)
    write_good(src, 3)
    image = np.zeros((4, 16, 16), np.float32)
    truncate(write_case(src, 1, image, np.zeros((4, 16, 16), np.uint8)) / "imaging.nii.gz")
    write_case(src, 2, image, np.zeros((4, 16, 15), np.uint8))  # found at planning
    image[0, 0, 0] = np.nan
    write_case(src, 4, image, np.zeros((4, 16, 16), np.uint8))  # found in the worker
    out = tmp_path / "o.h5"
    report = build(src, out, size=16, skip_bad=True)
    assert sorted(report.bad_cases) == ["case_00001", "case_00002", "case_00004"]
    info = open_store(out)
    assert info.case_ids == ["case_00000", "case_00003"]
    assert sorted(info.bad_cases) == ["case_00001", "case_00002", "case_00004"]
    assert "truncated" in info.bad_cases["case_00001"]
    assert "shape" in info.bad_cases["case_00002"]
    assert "NaN" in info.bad_cases["case_00004"]
    with h5py.File(out, "r") as f:
        assert sorted(json.loads(f.attrs["bad_cases"])) == sorted(info.bad_cases)
        assert sorted(f["cases"]) == ["case_00000", "case_00003"]
    assert_store_matches_source(out, src, 16, WINDOW_PRESETS["mlperf"])
    assert verify_store(out, src).ok


def test_skip_bad_with_every_case_bad(tmp_path):
    src = tmp_path / "src"
    truncate(write_case(src, 0, np.zeros((2, 8, 8), np.float32)) / "imaging.nii.gz")
    with pytest.raises(KitsError, match="case_00000"):
        build(src, tmp_path / "o.h5", skip_bad=True)
    assert not (tmp_path / "o.h5").exists()


# --------------------------------------------------------------------------- resume


def _interrupt_after(monkeypatch, n: int) -> None:
    """Ctrl-C in the middle of the build: after `n` cases have committed."""
    real = workers_mod.process_case
    done = []

    def flaky(job):
        if len(done) == n:
            raise KeyboardInterrupt
        done.append(job)
        return real(job)

    monkeypatch.setattr(workers_mod, "process_case", flaky)


def _records(out: Path) -> list[Path]:
    # Commit records only: a record being written has a hidden temporary name.
    return list((partial_dir(out) / "cases").glob("case_*.npz"))


@pytest.fixture
def resume_src(tmp_path):
    src = write_cohort(tmp_path / "src", n=4, unlabelled=(3,))
    build(src, tmp_path / "ref.h5")
    return src, read_store(tmp_path / "ref.h5")


def test_resume_after_interrupt_equals_uninterrupted(tmp_path, monkeypatch, resume_src):
    src, ref = resume_src
    out = tmp_path / "out.h5"
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        build(src, out)
    monkeypatch.undo()
    assert not out.exists() and len(_records(out)) == 2
    report = build(src, out, resume=True)
    assert report.resumed_cases == 2
    assert not partial_dir(out).exists()
    assert_same_store(ref, read_store(out))


def test_resume_with_other_size_or_cases_is_refused(tmp_path, monkeypatch, resume_src):
    src, _ = resume_src
    out = tmp_path / "out.h5"
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        build(src, out)
    monkeypatch.undo()
    with pytest.raises(KitsError, match="other options or cases.*--overwrite"):
        build(src, out, size=48, resume=True)
    with pytest.raises(KitsError, match="other options or cases"):
        build(src, out, resume=True, window="abdomen")
    with pytest.raises(KitsError, match="other options or cases"):
        build(src, out, resume=True, cases="0-2")
    assert not out.exists() and partial_dir(out).exists()


def test_leftover_partial_needs_resume_or_overwrite(tmp_path, monkeypatch, resume_src):
    src, ref = resume_src
    out = tmp_path / "out.h5"
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        build(src, out)
    monkeypatch.undo()
    with pytest.raises(KitsError, match="interrupted build.*--resume.*--overwrite"):
        build(src, out)
    assert not out.exists()
    report = build(src, out, overwrite=True)
    assert report.resumed_cases == 0 and not partial_dir(out).exists()
    assert_same_store(ref, read_store(out))


def test_resume_of_a_damaged_partial_is_a_clear_error(tmp_path, monkeypatch, resume_src):
    """kill -9 can tear HDF5 metadata; --resume must say so, and --overwrite start over."""
    src, ref = resume_src
    out = tmp_path / "out.h5"
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        build(src, out)
    monkeypatch.undo()
    partial = partial_dir(out) / "store.h5"
    partial.write_bytes(partial.read_bytes()[:3000])
    with pytest.raises(KitsError, match="damaged.*--overwrite"):
        build(src, out, resume=True)
    assert not out.exists()
    build(src, out, overwrite=True)
    assert_same_store(ref, read_store(out))


def test_resume_after_interrupt_between_finalize_and_rename(tmp_path, monkeypatch, resume_src):
    """Killed after the index was written but before the rename onto --out (the finalize of
    a 45k-slice build takes a while): --resume must still finish the same store."""
    src, ref = resume_src
    out = tmp_path / "out.h5"

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(finish_mod, "fsync_path", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(src, out)
    monkeypatch.undo()
    assert not out.exists()
    build(src, out, resume=True)
    assert_same_store(ref, read_store(out))


def test_resume_without_partial_is_a_fresh_build(tmp_path, resume_src):
    src, ref = resume_src
    out = tmp_path / "out.h5"
    build(src, out, resume=True)
    assert_same_store(ref, read_store(out))


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    """kill -9 of a real `kitsprep build` process once a case has committed; --resume then
    gives a store equal, dataset by dataset and attribute by attribute, to a clean build."""
    src = tmp_path / "src"
    rng = np.random.default_rng(11)
    for c in range(24):
        image, seg = random_case(rng, 24, 64, 64, labelled=c != 5)
        write_case(src, c, image, seg, kits_affine(1.0 + c % 3, 0.8))
    out = tmp_path / "out.h5"
    cmd = [
        sys.executable,
        "-m",
        "kitsprep.cli",
        "build",
        "--src",
        str(src),
        "--out",
        str(out),
        "--workers",
        "1",
        "--size",
        "64",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if partial_dir(out).is_dir() and _records(out):
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, stderr
    assert not out.exists(), "the build finished before it could be killed"
    done = len(_records(out))
    assert 1 <= done < 24
    report = build(src, out, size=64, resume=True, fsync=True)
    assert report.resumed_cases >= done and report.cases == 24
    build(src, tmp_path / "ref.h5", size=64)
    assert_same_store(read_store(tmp_path / "ref.h5"), read_store(out))
    info = open_store(out)
    smap = SliceReader(out, 64)
    try:
        with h5py.File(out, "r") as f:
            for r in info.index:
                cid = info.case_ids[r["case"]]
                np.testing.assert_array_equal(
                    smap.image(r).view(np.uint16),
                    f["cases"][cid]["image"][r["slice"]].view(np.uint16),
                )
    finally:
        smap.close()
    assert verify_store(out, src).ok


def test_auto_allows_every_label_some_edition_has():
    """Under --edition auto the edition is decided after the cases are read: until then a
    mask may hold any edition's labels, and only a value no edition has is refused."""
    cfg = BuildConfig(Path("s"), Path("o.h5"), WINDOW_PRESETS["mlperf"])
    allowed = cfg.allowed_labels
    assert allowed.name == ANY_EDITION
    assert allowed.labels == any_edition_labels() == EDITIONS["kits23"].labels
    assert allowed.unknown_values([0, 1, 2, 3, 4, 7]) == [4, 7]
    kits19 = BuildConfig(Path("s"), Path("o.h5"), cfg.window, edition="kits19")
    assert kits19.allowed_labels.unknown_values([0, 1, 2, 3]) == [3]


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="no fork on this platform"
)
def test_a_progress_bar_does_not_rule_out_forked_workers(monkeypatch):
    """tqdm's bar would start a monitor thread, which makes forking unsafe; the progress
    helper starts none, so the build's workers still start by fork."""
    import tqdm

    if threading.active_count() != 1:
        pytest.skip("another thread runs in this test process")
    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 10)  # tqdm's default
    progress = Progress(io.StringIO(), bar=True).start(10, "build")
    try:
        assert threading.active_count() == 1  # no monitor thread
        assert workers_mod._pool_context().get_start_method() == "fork"
    finally:
        progress.close()
