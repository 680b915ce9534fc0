"""Real KiTS23 masks (../shared/kits23-masks, cases 0-49) through a whole build: the cyst label
of real data, auto-detected as KiTS23, counted per label exactly as in the source. The CT
cannot be shipped, so each mask is paired with constant imaging in its geometry (speed: the
painted imaging is what benchmarks/real_masks.sh trains on)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from kitsprep.cli import main
from kitsprep.labels import EDITIONS
from kitsprep.store import open_store
from tests.kitsprep.conftest import write_nifti

MASKS = Path(__file__).resolve().parents[2].parent / "shared" / "kits23-masks"

pytestmark = pytest.mark.skipif(not MASKS.is_dir(), reason=f"{MASKS} not present")

# The fewest slices: 21 and 30 (38 each, both with cysts), 38 (32, no cyst). 108 slices of
# 512 x 512 in all.
CASES = ("case_00021", "case_00030", "case_00038")


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Copies of the real masks beside constant imaging, and the store built from them."""
    root = tmp_path_factory.mktemp("real23")
    src = root / "src"
    masks = {}
    for cid in CASES:
        mask_path = MASKS / cid / "segmentation.nii.gz"
        if not mask_path.is_file():
            pytest.skip(f"{mask_path} missing")
        (src / cid).mkdir(parents=True)
        shutil.copy(mask_path, src / cid / "segmentation.nii.gz")
        img = nib.load(mask_path)
        masks[cid] = np.asarray(img.dataobj)
        write_nifti(
            src / cid / "imaging.nii.gz",
            np.full(img.shape, 40.0, np.float32),
            img.header.get_best_affine(),
        )
    out = root / "real23.h5"
    result = CliRunner().invoke(
        main,
        [
            "build",
            "--src",
            str(src),
            "--out",
            str(out),
            "--size",
            "512",
            "--workers",
            "1",
            "--no-fsync",
        ],
    )
    assert result.exit_code == 0, result.output
    return src, out, masks, result.output


def test_real_kits23_masks_are_detected_as_kits23(real):
    _, out, masks, output = real
    assert "edition kits23 (case_00021 holds a cyst label)" in output
    info = open_store(out)
    assert info.labels == EDITIONS["kits23"] and info.edition_reason.startswith("case_00021")
    assert (masks["case_00038"] == 3).sum() == 0 < (masks["case_00021"] == 3).sum()


def test_per_label_counts_equal_the_real_masks(real):
    _, out, masks, _ = real
    info = open_store(out)
    assert info.case_ids == list(CASES) and info.num_classes == 4
    for cid, seg in masks.items():
        rows = info.rows(cid)
        assert info.cases[cid].in_plane.is_identity and info.cases[cid].slices == seg.shape[0]
        for name, value in info.labels.labels:
            np.testing.assert_array_equal(
                info.label_pixels(name, rows), (seg == value).sum((1, 2)), err_msg=f"{cid} {name}"
            )
        np.testing.assert_array_equal(rows["counts"][:, 0], (seg == 0).sum((1, 2)))


def test_verify_src_passes_on_real_kits23_masks(real):
    src, out, _, _ = real
    result = CliRunner().invoke(main, ["verify", str(out), "--src", str(src)])
    assert result.exit_code == 0, result.output
    assert "labels equal the source masks" in result.output
