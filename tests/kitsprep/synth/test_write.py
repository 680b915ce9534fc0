"""Writing a synthetic cohort: the KiTS19 layout on disk, storage variants, byte identity,
atomic writes and kits23.json."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from kitsprep.synth import SynthConfig, make_case, write_cohort
from tests.kitsprep.conftest import build

CFG = SynthConfig(cases=10, size=64, seed=7)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[str]]:
    """One cohort on disk for the whole module (writing it takes a fraction of a second)."""
    out = tmp_path_factory.mktemp("synth")
    seen: list[str] = []
    ids = write_cohort(CFG, out, on_case=seen.append)
    return out, ids, seen


def raw_header(path: Path) -> nib.Nifti1Header:
    """The header exactly as stored (nibabel's loaded header moves the scaling elsewhere)."""
    with gzip.open(path, "rb") as f:
        return nib.Nifti1Header.from_fileobj(io.BytesIO(f.read(352)))


def test_layout_and_progress(cohort: tuple[Path, list[str], list[str]]) -> None:
    out, ids, seen = cohort
    assert ids == [f"case_{i:05d}" for i in range(CFG.cases)]
    assert seen == ids  # on_case once per case, in order
    assert sorted(p.name for p in out.iterdir()) == ids
    for cid in ids[:-1]:
        assert sorted(p.name for p in (out / cid).iterdir()) == [
            "imaging.nii.gz",
            "segmentation.nii.gz",
        ]
    # The last case is unlabelled, like the KiTS19 test cases.
    assert [p.name for p in (out / ids[-1]).iterdir()] == ["imaging.nii.gz"]
    # Written to temporary names and renamed: none is left behind.
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def test_files_are_byte_identical_across_runs(
    cohort: tuple[Path, list[str], list[str]], tmp_path: Path
) -> None:
    out, ids, _ = cohort
    write_cohort(CFG, tmp_path)
    for cid in ids:
        for f in sorted((out / cid).iterdir()):
            assert (tmp_path / cid / f.name).read_bytes() == f.read_bytes(), f"{cid}/{f.name}"


def test_geometry_and_storage_variants(cohort: tuple[Path, list[str], list[str]]) -> None:
    out, ids, _ = cohort
    for index, cid in enumerate(ids):
        case = make_case(index, CFG)
        img = nib.load(out / cid / "imaging.nii.gz")
        assert nib.aff2axcodes(img.affine) == ("I", "P", "L")
        lin = img.affine[:3, :3]
        # KiTS19 anti-diagonal: only (0,2), (1,1), (2,0) set, all negative.
        assert np.count_nonzero(lin) == 3
        px, thick = -lin[0, 2], -lin[2, 0]
        assert lin[1, 1] == lin[0, 2] and 0.6 <= px <= 1.0 and 0.5 <= thick <= 5.0
        assert np.array_equal(img.affine, case.affine)
        assert case.spacing == (thick, px, px)

        qform = index % 5 == 4
        hdr = raw_header(out / cid / "imaging.nii.gz")
        assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == ((0, 1) if qform else (2, 0))
        if index % 2:  # int16 with intercept: a reader that ignores scl_inter is off by 1024
            assert hdr.get_data_dtype() == np.int16
            assert (float(hdr["scl_slope"]), float(hdr["scl_inter"])) == (1.0, -1024.0)
            raw = np.asarray(img.dataobj.get_unscaled())
            assert np.array_equal(raw.astype(np.float32) - 1024, case.imaging)
        else:
            assert hdr.get_data_dtype() == np.float32
        hu = img.get_fdata(dtype=np.float32)
        assert np.array_equal(hu, case.imaging)  # scale/intercept honoured -> exact HU

        if case.segmentation is None:
            continue
        seg_path = out / cid / "segmentation.nii.gz"
        shdr = raw_header(seg_path)
        assert shdr.get_data_dtype() == (np.uint16 if qform else np.uint8)
        assert (int(shdr["sform_code"]), int(shdr["qform_code"])) == ((0, 1) if qform else (2, 0))
        seg = nib.load(seg_path)
        assert np.array_equal(seg.affine, img.affine)
        assert np.array_equal(np.asarray(seg.dataobj), case.segmentation)


def test_write_cohort_removes_a_stale_mask(tmp_path: Path) -> None:
    write_cohort(SynthConfig(cases=5, size=16), tmp_path)
    write_cohort(SynthConfig(cases=3, size=16), tmp_path)
    assert not (tmp_path / "case_00002" / "segmentation.nii.gz").exists()


def test_write_cohort_kits23_writes_kits23_json_and_builds_as_kits23(tmp_path: Path) -> None:
    cfg = SynthConfig(cases=3, size=32, seed=1, edition="kits23")
    ids = write_cohort(cfg, tmp_path / "src")
    entries = json.loads((tmp_path / "src" / "kits23.json").read_text())
    assert [e["case_id"] for e in entries] == ids
    report = build(tmp_path / "src", tmp_path / "o.h5", size=32)
    assert report.edition == "kits23" and "kits23.json" in report.edition_reason
