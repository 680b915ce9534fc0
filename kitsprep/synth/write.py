"""A case on disk: gzipped NIfTI in the KiTS19 storage variants (float32 or int16 with an
intercept, uint8 masks with an sform, uint16 masks with only a qform), written atomically,
and for kits23 the release's ``kits23.json``."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kitsprep.files import write_atomic
from kitsprep.synth.case import SynthCase, SynthConfig, check_config, make_case

if TYPE_CHECKING:
    import nibabel as nib

try:  # isal is a project dependency and several times faster than zlib at the same ratio
    from isal import igzip as _gzip
except ImportError:  # pragma: no cover - fallback for a bare environment
    _gzip = gzip  # type: ignore[assignment]

# int16 imaging stores raw = HU + 1024 and declares scl_inter = -1024, as scanners do.
INT16_INTERCEPT = -1024.0
_GZIP_LEVEL = 2  # fast: a real-sized cohort must not be bottlenecked by compression


def encode_case(case: SynthCase) -> dict[str, bytes]:
    """The gzipped NIfTI files of a case, by file name (pure; byte-identical for equal cases)."""
    files = {"imaging.nii.gz": _gz(_imaging_image(case).to_bytes())}
    if case.segmentation is not None:
        files["segmentation.nii.gz"] = _gz(_mask_image(case).to_bytes())
    return files


def write_cohort(
    cfg: SynthConfig, out: Path, on_case: Callable[[str], None] | None = None
) -> list[str]:
    """Write ``out/case_XXXXX/imaging.nii.gz`` (+ ``segmentation.nii.gz`` when labelled),
    and for kits23 the release's ``out/kits23.json`` (one entry per case), which tells
    ``kitsprep build`` the edition.

    Each file is written to a temporary name and renamed, so an interrupted run never leaves a
    truncated NIfTI behind. ``on_case(case_id)`` is called after each case (progress bars).
    Returns the case ids written.
    """
    check_config(cfg)
    out = Path(out)
    ids: list[str] = []
    for index in range(cfg.cases):
        case = make_case(index, cfg)
        folder = out / case.case_id
        folder.mkdir(parents=True, exist_ok=True)
        files = encode_case(case)
        for name, data in files.items():
            write_atomic(folder / name, data)
        stale = folder / "segmentation.nii.gz"
        if "segmentation.nii.gz" not in files and stale.exists():
            stale.unlink()  # an unlabelled case must not keep a mask from an earlier cohort
        ids.append(case.case_id)
        if on_case is not None:
            on_case(case.case_id)
    if cfg.edition == "kits23":
        entries = [{"case_id": cid, "synthetic": True} for cid in ids]
        write_atomic(out / "kits23.json", json.dumps(entries, indent=1) + "\n")
    return ids


def _gz(data: bytes) -> bytes:
    # mtime=0: the gzip header would otherwise embed the time and break byte-identity.
    return _gzip.compress(data, compresslevel=_GZIP_LEVEL, mtime=0)


def _set_geometry(img: nib.Nifti1Image, affine: np.ndarray, style: str) -> None:
    """Header geometry as the two KiTS19 variants store it."""
    hdr = img.header
    if style == "qform":  # the uint16 masks: qform_code 1, sform_code 0, srows zero, mm units
        hdr.set_qform(affine, code=1)
        hdr.set_sform(None, code=0)
        for row in ("srow_x", "srow_y", "srow_z"):
            hdr[row] = 0
        hdr.set_xyzt_units("mm")
    else:  # the common case: sform_code 2 (aligned), qform_code 0
        hdr.set_sform(affine, code=2)
        hdr.set_qform(affine, code=0)


def _imaging_image(case: SynthCase) -> nib.Nifti1Image:
    import nibabel as nib  # here: `kitsprep --help` need not load it (the CLI reads this package)

    if case.imaging_dtype == "int16":
        raw = (case.imaging - INT16_INTERCEPT).astype(np.int16)  # HU is integer, no rounding
        img = nib.Nifti1Image(raw, None)
        img.header.set_data_dtype(np.int16)
        # Set after construction: nibabel resets the scaling of a header passed in.
        img.header.set_slope_inter(1.0, INT16_INTERCEPT)
    else:
        img = nib.Nifti1Image(np.asarray(case.imaging, dtype=np.float32), None)
        img.header.set_data_dtype(np.float32)
    _set_geometry(img, case.affine, case.header_style)
    return img


def _mask_image(case: SynthCase) -> nib.Nifti1Image:
    import nibabel as nib

    assert case.segmentation is not None  # encode_case writes a mask only for labelled cases
    img = nib.Nifti1Image(case.segmentation.astype(case.mask_dtype), None)
    img.header.set_data_dtype(case.mask_dtype)
    _set_geometry(img, case.affine, case.header_style)
    return img
