"""A header's voxel spacing that is zero, negative, NaN or Inf: `build` stops on one line
naming the case, the file and the value, or records the case as bad with --skip-bad; nibabel
would otherwise set a zero spacing to 1 (a negative one to its absolute value) and go on."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kitsprep.cli import main
from kitsprep.store import open_store
from tests.kitsprep.conftest import write_case, write_good

PIXDIM_1 = 80  # byte offset of pixdim[1] (the slice axis' spacing) in a NIfTI-1 header
SROW_Z0 = 312  # srow_z[0]: the slice axis' column of the KiTS19 anti-diagonal sform

BAD_VALUES = {"zero": (0.0, "(0, "), "negative": (-2.5, "(-2.5, "), "nan": (np.nan, "(nan, ")}
BAD_VALUES["inf"] = (np.inf, "(inf, ")


def patch_header(path: Path, offset: int, value: float) -> None:
    """Write one float32 into the header of a .nii.gz, as a damaged export would."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    struct.pack_into("<f", raw, offset, value)
    path.write_bytes(gzip.compress(bytes(raw), compresslevel=1, mtime=0))


def bad_spacing_case(src: Path, case: int, offset: int, value: float, mask: bool = False) -> Path:
    """A labelled case whose imaging (or mask) header holds `value` at `offset`."""
    image = np.zeros((4, 16, 16), np.float32)
    folder = write_case(src, case, image, np.zeros((4, 16, 16), np.uint8))
    patch_header(folder / ("segmentation.nii.gz" if mask else "imaging.nii.gz"), offset, value)
    return folder


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.mark.parametrize("kind", sorted(BAD_VALUES))
def test_build_refuses_a_bad_pixdim_naming_case_file_and_value(tmp_path: Path, kind: str) -> None:
    value, shown = BAD_VALUES[kind]
    src = tmp_path / "src"
    write_good(src, 0)
    bad_spacing_case(src, 1, PIXDIM_1, value)
    out = tmp_path / "o.h5"
    result = CliRunner().invoke(main, ["build", "--src", str(src), "--out", str(out)])
    line = one_error_line(result)
    assert "case_00001: imaging.nii.gz gives voxel spacing " + shown in line
    assert "pixdim" in line and "leave the case out" in line
    assert "setting" not in result.output  # nibabel's own fix-up line never shows
    assert not out.exists()


def test_build_refuses_a_zero_spacing_in_the_mask_or_the_affine(tmp_path: Path) -> None:
    src = tmp_path / "src"
    bad_spacing_case(src, 0, PIXDIM_1, 0.0, mask=True)
    line = one_error_line(
        CliRunner().invoke(main, ["build", "--src", str(src), "--out", str(tmp_path / "a.h5")])
    )
    assert "case_00000: segmentation.nii.gz gives voxel spacing (0, " in line
    src2 = tmp_path / "src2"
    bad_spacing_case(src2, 0, SROW_Z0, 0.0)  # pixdim fine, the sform's column zero
    line = one_error_line(
        CliRunner().invoke(main, ["build", "--src", str(src2), "--out", str(tmp_path / "b.h5")])
    )
    assert "case_00000: imaging.nii.gz gives voxel spacing (0, 0.8, 0.8)" in line
    assert "affine" in line


def test_skip_bad_records_a_bad_spacing_and_goes_on(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_good(src, 0)
    bad_spacing_case(src, 1, PIXDIM_1, np.nan)
    write_good(src, 2)
    out = tmp_path / "o.h5"
    result = CliRunner().invoke(
        main, ["build", "--src", str(src), "--out", str(out), "--size", "16", "--skip-bad"]
    )
    assert result.exit_code == 0, result.output
    info = open_store(out)
    assert info.case_ids == ["case_00000", "case_00002"]
    assert "imaging.nii.gz gives voxel spacing (nan, " in info.bad_cases["case_00001"]
