"""Real KiTS19 masks (../shared/kits19-masks, cases 0-49) through a whole build: real shapes,
real headers (including a uint16 qform-only mask) and real label statistics. The CT cannot be
shipped, so each mask is paired with a constant synthetic imaging volume in its geometry."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from kitsprep.cli import main
from kitsprep.store import open_store
from kitsprep.window import WINDOW_PRESETS
from tests.kitsprep.conftest import build, write_nifti

MASKS = Path(__file__).resolve().parents[2].parent / "shared" / "kits19-masks"

pytestmark = pytest.mark.skipif(not MASKS.is_dir(), reason=f"{MASKS} not present")

# The fewest slices (38: 32, 21: 38), and the smallest of the uint16 qform-only masks
# (15: 75 slices). 145 slices of 512 x 512 in all.
CASES = ("case_00015", "case_00021", "case_00038")
HU = 40.0


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Copies of the real masks beside constant imaging, and the store built from them."""
    root = tmp_path_factory.mktemp("real")
    src = root / "src"
    masks = {}
    for cid in CASES:
        mask_path = MASKS / cid / "segmentation.nii.gz"
        if not mask_path.is_file():
            pytest.skip(f"{mask_path} missing")
        (src / cid).mkdir(parents=True)
        shutil.copy(mask_path, src / cid / "segmentation.nii.gz")
        img = nib.load(mask_path)
        masks[cid] = (np.asarray(img.dataobj), img.header)
        write_nifti(
            src / cid / "imaging.nii.gz",
            np.full(img.shape, HU, np.float32),
            img.header.get_best_affine(),
        )
    out = root / "real.h5"
    build(src, out, size=512)
    return src, out, masks


def test_real_mask_headers_are_what_the_readme_says(real):
    _, _, masks = real
    seg, hdr = masks["case_00015"]
    assert seg.dtype == np.uint16
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (1, 0)
    seg, hdr = masks["case_00038"]
    assert seg.dtype == np.uint8
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (0, 2)


def test_index_counts_equal_the_real_masks(real):
    _, out, masks = real
    info = open_store(out)
    assert info.case_ids == list(CASES) and info.num_classes == 3
    for cid, (seg, hdr) in masks.items():
        meta = info.cases[cid]
        rows = info.rows(cid)
        assert meta.labelled and meta.source_shape == seg.shape
        assert meta.slices == seg.shape[0] and meta.axcodes == "IPL" and meta.axes == (0, 1, 2)
        assert meta.in_plane.is_identity
        assert meta.spacing == pytest.approx(tuple(float(z) for z in hdr.get_zooms()), rel=1e-5)
        np.testing.assert_array_equal(info.label_pixels("kidney", rows), (seg == 1).sum((1, 2)))
        np.testing.assert_array_equal(info.label_pixels("tumour", rows), (seg == 2).sum((1, 2)))
        assert info.labels.edition == "kits19"
        assert info.label_pixels("tumour", rows).sum() > 0  # every KiTS19 case has tumour
    with h5py.File(out, "r") as f:
        for cid, (seg, _) in masks.items():
            k = seg.shape[0] // 2
            np.testing.assert_array_equal(f["cases"][cid]["label"][k], seg[k])
            assert (
                f["cases"][cid]["image"][k] == np.float16(WINDOW_PRESETS["mlperf"].normalise(HU))
            ).all()
    fp = info.cases["case_00015"].fingerprint
    assert fp["segmentation_dtype"] == "uint16"


def test_verify_src_passes_on_real_masks(real):
    src, out, _ = real
    result = CliRunner().invoke(main, ["verify", str(out), "--src", str(src)])
    assert result.exit_code == 0, result.output
    assert "labels equal the source masks" in result.output
