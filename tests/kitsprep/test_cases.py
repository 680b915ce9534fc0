"""Case discovery, case specs and NIfTI reading: the input side, where user mistakes and
KiTS19's header quirks arrive."""

from __future__ import annotations

import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest

from kitsprep.cases import (
    case_number,
    check_pair,
    find_cases,
    folder_edition,
    parse_case_spec,
    read_header,
    read_volume,
    select_cases,
)
from kitsprep.errors import KitsError
from kitsprep.geometry import axcodes, axial_axes, fit_in_plane, voxel_spacing
from tests.kitsprep.conftest import kits_affine, write_case, write_nifti

# --------------------------------------------------------------------------- case specs


@pytest.mark.parametrize(
    "spec,want",
    [
        ("0-19,50-54", [*range(20), *range(50, 55)]),
        ("case_00003", [3]),
        ("3", [3]),
        (" 5 , 2-3 ,2 ", [2, 3, 5]),
        ("case_00001-case_00002", [1, 2]),
        ("7-7", [7]),
    ],
)
def test_parse_case_spec(spec, want):
    assert parse_case_spec(spec) == [f"case_{n:05d}" for n in want]


def test_parse_case_spec_from_file(tmp_path):
    f = tmp_path / "ids.txt"
    f.write_text("# validation\ncase_00050\n\n51\n52-53\n")
    assert parse_case_spec(f"@{f}") == [f"case_{n:05d}" for n in (50, 51, 52, 53)]


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("abc", "abc"),
        ("1,x2", "x2"),
        ("case_3a", "case_3a"),
        ("-3", "-3"),
        ("5-2", "backwards"),
        ("", "empty"),
        (" , ", "empty"),
    ],
)
def test_parse_case_spec_rejects(spec, needle):
    with pytest.raises(KitsError) as exc:
        parse_case_spec(spec)
    assert needle in str(exc.value)


def test_parse_case_spec_missing_file(tmp_path):
    with pytest.raises(KitsError, match="nope.txt"):
        parse_case_spec(f"@{tmp_path / 'nope.txt'}")


def test_parse_case_spec_names_absent_ids():
    have = [f"case_{n:05d}" for n in range(5)]
    with pytest.raises(KitsError) as exc:
        parse_case_spec("3-6,9", have)
    msg = str(exc.value)
    assert "case_00005" in msg and "case_00006" in msg and "case_00009" in msg
    assert "case_00003" not in msg.split("there:")[1].split(";")[0]


def test_case_number():
    assert case_number("case_00042") == 42
    with pytest.raises(KitsError, match="case_42"):
        case_number("case_42")


# --------------------------------------------------------------------------- find_cases


def _tiny(root, case, labelled=True):
    img = np.zeros((2, 4, 4), np.float32)
    return write_case(root, case, img, np.zeros((2, 4, 4), np.uint8) if labelled else None)


def test_find_cases_sorted_with_labels(tmp_path):
    for c in (10, 2, 7):
        _tiny(tmp_path, c, labelled=c != 7)
    (tmp_path / "README.txt").write_text("not a case")
    (tmp_path / "case_1").mkdir()  # not a KiTS name: ignored
    refs = find_cases(tmp_path)
    assert [r.case_id for r in refs] == ["case_00002", "case_00007", "case_00010"]
    assert [r.labelled for r in refs] == [True, False, True]
    assert refs[0].imaging.name == "imaging.nii.gz"
    assert [r.case_id for r in select_cases(refs, "7,10")] == ["case_00007", "case_00010"]
    assert select_cases(refs, None) == refs
    with pytest.raises(KitsError, match="case_00003"):
        select_cases(refs, "3")


def test_kits21_masks_are_read_and_a_case_without_a_mask_says_why(tmp_path):
    both = _tiny(tmp_path, 0)  # both names: segmentation.nii.gz wins
    shutil.copy(both / "segmentation.nii.gz", both / "aggregated_MAJ_seg.nii.gz")
    _tiny(tmp_path, 1)
    (tmp_path / "case_00001" / "segmentation.nii.gz").rename(
        tmp_path / "case_00001" / "aggregated_MAJ_seg.nii.gz"
    )
    _tiny(tmp_path, 2, labelled=False)
    refs = find_cases(tmp_path)
    assert [r.segmentation.name if r.segmentation else None for r in refs] == [
        "segmentation.nii.gz",
        "aggregated_MAJ_seg.nii.gz",
        None,
    ]
    assert [r.unlabelled_reason for r in refs] == [
        "",
        "",
        "no segmentation.nii.gz or aggregated_MAJ_seg.nii.gz",
    ]
    edition, why = folder_edition(tmp_path, refs)
    assert edition == "kits21" and "case_00001" in why and "aggregated_MAJ_seg" in why
    assert folder_edition(tmp_path, [refs[0], refs[2]]) is None  # KiTS19 layout: no word
    (tmp_path / "kits23.json").write_text("[]")  # the release's metadata file goes first
    assert folder_edition(tmp_path, refs) == ("kits23", f"kits23.json in {tmp_path}")
    (tmp_path / "kits23.json").unlink()
    (tmp_path / "kits21.json").write_text("[]")
    assert folder_edition(tmp_path, refs[:1])[0] == "kits21"


def test_find_cases_missing_dir(tmp_path):
    with pytest.raises(KitsError, match="does not exist"):
        find_cases(tmp_path / "nowhere")


def test_find_cases_file_not_dir(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(KitsError, match="found a file"):
        find_cases(tmp_path / "f")


def test_find_cases_empty_dir(tmp_path):
    with pytest.raises(KitsError, match="empty"):
        find_cases(tmp_path)


def test_find_cases_not_kits(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(KitsError, match="not a KiTS19 data folder"):
        find_cases(tmp_path)


def test_find_cases_case_without_imaging(tmp_path):
    _tiny(tmp_path, 0)
    (tmp_path / "case_00001").mkdir()
    (tmp_path / "case_00001" / "segmentation.nii.gz").write_bytes(b"")
    with pytest.raises(KitsError, match="case_00001.*imaging"):
        find_cases(tmp_path)


# --------------------------------------------------------------------------- reading


def test_read_volume_int16_scaled_matches_nibabel(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(-1500, 3000, (4, 6, 5)).astype(np.int16)
    folder = write_case(tmp_path, 3, raw, img_dtype=np.int16, slope=0.5, inter=-1024.0)
    vol = read_volume(folder / "imaging.nii.gz", "case_00003")
    assert vol.data.dtype == np.int16 and vol.data.shape == (4, 6, 5)
    assert (vol.header.slope, vol.header.inter) == (0.5, -1024.0)
    np.testing.assert_array_equal(vol.data, raw)
    scaled = vol.data.astype(np.float64) * vol.header.slope + vol.header.inter
    np.testing.assert_array_equal(scaled, nib.load(folder / "imaging.nii.gz").get_fdata())
    # viewed in place: Fortran order (slice axis contiguous), no private copy
    assert vol.data.flags.f_contiguous and not vol.data.flags.owndata
    assert vol.fingerprint.startswith("gz:")


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint16])
def test_read_volume_big_endian_gives_native_values(tmp_path, dtype):
    """The kernels read memory as native-endian: a big-endian file must come out swapped
    to native order with the same values nibabel reads."""
    raw = np.random.default_rng(5).integers(0, 3000, (3, 4, 5)).astype(dtype)
    path = write_nifti(tmp_path / "case_00000" / "imaging.nii.gz", raw, kits_affine(), endian=">")
    assert nib.load(path).header.endianness == ">"
    vol = read_volume(path)
    assert vol.data.dtype.isnative and vol.data.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(vol.data, raw)


def test_read_volume_uncompressed_and_float(tmp_path):
    data = np.random.default_rng(1).normal(size=(3, 4, 5)).astype(np.float32)
    path = write_nifti(tmp_path / "case_00000" / "imaging.nii", data, kits_affine())
    vol = read_volume(path)
    np.testing.assert_array_equal(vol.data, data)
    assert (vol.header.slope, vol.header.inter) == (1.0, 0.0)
    assert vol.fingerprint.startswith("raw:")


def test_qform_only_uint16_mask_pairs_with_sform_imaging(tmp_path):
    """KiTS19 cases 15/23/37/39: a uint16 mask with only a qform must line up with its sform
    imaging, or every one of those cases is refused."""
    aff = kits_affine(thickness=3.0, pixel=0.705)
    seg = np.zeros((3, 8, 8), np.uint16)
    seg[1, 2:4, 2:5] = 2
    folder = write_case(
        tmp_path,
        15,
        np.zeros((3, 8, 8), np.float32),
        seg,
        aff,
        mask_dtype=np.uint16,
        qform_only=True,
    )
    img_h = read_header(folder / "imaging.nii.gz", "case_00015")
    seg_h = read_header(folder / "segmentation.nii.gz", "case_00015")
    assert (seg_h.qform_code, seg_h.sform_code) == (1, 0)
    assert (img_h.qform_code, img_h.sform_code) == (0, 2)
    assert seg_h.dtype == np.uint16
    np.testing.assert_allclose(seg_h.affine, img_h.affine, atol=1e-5)
    np.testing.assert_allclose(img_h.affine, aff, atol=1e-6)
    check_pair("case_00015", img_h, seg_h)
    vol = read_volume(folder / "segmentation.nii.gz", "case_00015")
    np.testing.assert_array_equal(vol.data, seg)
    check_pair("case_00015", read_volume(folder / "imaging.nii.gz").header, vol.header)


def test_truncated_gzip_names_the_case(tmp_path):
    rng = np.random.default_rng(2)
    folder = write_case(tmp_path, 4, rng.normal(size=(4, 16, 16)).astype(np.float32))
    path = folder / "imaging.nii.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(KitsError, match="case_00004.*truncated or corrupt"):
        read_volume(path, "case_00004")


def corrupt_deflate(path) -> None:
    """Make the first deflate block header invalid (BTYPE=11): corrupt, not truncated."""
    blob = bytearray(path.read_bytes())
    blob[10] = 0xFF  # first byte after the 10-byte gzip header (no FNAME: mtime=0, bytes)
    path.write_bytes(bytes(blob))


def test_corrupt_gzip_names_the_case(tmp_path):
    """A damaged deflate stream: ISA-L raises its own error type (not zlib.error, not
    OSError), which must still come out as a KitsError naming the case."""
    folder = write_case(tmp_path, 5, np.zeros((4, 32, 32), np.float32))
    path = folder / "imaging.nii.gz"
    corrupt_deflate(path)
    with pytest.raises(KitsError, match="case_00005"):
        read_volume(path, "case_00005")


def test_crc_mismatch_names_the_case(tmp_path):
    folder = write_case(tmp_path, 6, np.zeros((2, 4, 4), np.float32))
    path = folder / "imaging.nii.gz"
    blob = bytearray(path.read_bytes())
    blob[-6] ^= 0x01  # the CRC32 in the gzip trailer
    path.write_bytes(bytes(blob))
    with pytest.raises(KitsError, match="case_00006"):
        read_volume(path, "case_00006")


def test_gzip_of_short_nifti_payload(tmp_path):
    """Valid gzip, valid header, but fewer voxels than the header claims."""
    raw = write_nifti(
        tmp_path / "x.nii", np.zeros((4, 8, 8), np.float32), kits_affine()
    ).read_bytes()
    path = tmp_path / "case_00007" / "imaging.nii.gz"
    path.parent.mkdir()
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(KitsError, match="case_00007.*fewer voxels"):
        read_volume(path, "case_00007")


def test_not_nifti_names_the_file(tmp_path):
    path = tmp_path / "case_00008" / "imaging.nii.gz"
    path.parent.mkdir()
    path.write_bytes(gzip.compress(b"this is not a nifti file" * 40))
    with pytest.raises(KitsError, match="case_00008"):
        read_volume(path, "case_00008")
    with pytest.raises(KitsError, match="case_00008"):
        read_header(path, "case_00008")


def test_read_header_rejects_4d(tmp_path):
    path = write_nifti(
        tmp_path / "case_00009" / "imaging.nii.gz",
        np.zeros((2, 3, 4, 2), np.float32),
        kits_affine(),
    )
    with pytest.raises(KitsError, match="3D"):
        read_header(path, "case_00009")


def test_check_pair_refuses_mismatches(tmp_path):
    img = np.zeros((3, 8, 8), np.float32)
    a = write_case(tmp_path, 0, img, np.zeros((3, 8, 9), np.uint8))
    b = write_case(
        tmp_path, 1, img, np.zeros((3, 8, 8), np.uint8), seg_affine=kits_affine(pixel=0.9)
    )
    c = write_case(tmp_path, 2, img, np.zeros((3, 8, 8), np.float32), mask_dtype=np.float32)
    for folder, needle in [(a, "shape"), (b, "affines differ"), (c, "dtype")]:
        cid = folder.name
        with pytest.raises(KitsError, match=f"{cid}.*{needle}"):
            check_pair(
                cid,
                read_header(folder / "imaging.nii.gz"),
                read_header(folder / "segmentation.nii.gz"),
            )


# --------------------------------------------------------------------------- geometry


def test_axial_axes_kits_and_ras():
    assert axial_axes(kits_affine()) == (0, 1, 2)
    assert axcodes(kits_affine()) == "IPL"
    ras = np.diag([0.8, 0.8, 2.5, 1.0])  # stored (rows, cols, slices)
    assert axial_axes(ras) == (2, 0, 1)
    assert voxel_spacing(ras) == (0.8, 0.8, 2.5)
    assert voxel_spacing(kits_affine(2.5, 0.8)) == (2.5, 0.8, 0.8)


def test_fit_in_plane():
    assert fit_in_plane(512, 512, 512).is_identity
    p = fit_in_plane(512, 796, 512)
    assert (p.new_h, p.new_w, p.pad_top, p.pad_left) == (329, 512, 91, 0)
    p = fit_in_plane(16, 16, 64)
    assert (p.new_h, p.new_w, p.pad_top, p.pad_left, p.is_identity) == (64, 64, 0, 0, False)
    p = fit_in_plane(1, 200, 16)
    assert (p.new_h, p.new_w) == (1, 16)
