"""Tiny hand-written KiTS19-layout cases, so every test controls the exact voxels it checks."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from kitsprep.window import WINDOW_PRESETS
from tests.conftest import build  # noqa: F401  (the kitsprep tests import it from here)


def kits_affine(thickness: float = 2.5, pixel: float = 0.8) -> np.ndarray:
    """The KiTS19 anti-diagonal affine: (slices, rows, cols) -> I, P, L."""
    return np.array(
        [
            [0.0, 0.0, -pixel, 0.0],
            [0.0, -pixel, 0.0, 0.0],
            [-thickness, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


def case_id(case: int | str) -> str:
    return case if isinstance(case, str) else f"case_{case:05d}"


def nifti_bytes(
    data: np.ndarray,
    affine: np.ndarray,
    dtype=None,
    slope: float | None = None,
    inter: float | None = None,
    qform_only: bool = False,
    endian: str = "<",
) -> bytes:
    """Uncompressed NIfTI-1 bytes of `data` stored as `dtype`, with the raw scale/intercept
    patched into the header: nibabel would otherwise rescale on save, and the point of the
    int16 fixtures is to control the stored integers and the scaling exactly. `endian=">"`
    writes a (valid, rarer) big-endian file."""
    dtype = np.dtype(dtype or data.dtype)
    hdr = nib.Nifti1Header(endianness=endian)
    hdr.set_data_dtype(dtype)
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine, header=hdr)
    img.set_data_dtype(dtype)
    if qform_only:  # the KiTS19 quirk of cases 15/23/37/39: qform_code 1, sform_code 0
        img.set_qform(affine, code=1)
        img.set_sform(None, code=0)
    else:
        img.set_sform(affine, code=2)
        img.set_qform(None, code=0)
    raw = bytearray(img.to_bytes())
    if slope is not None or inter is not None:
        struct.pack_into(
            f"{endian}ff",
            raw,
            112,
            1.0 if slope is None else slope,
            0.0 if inter is None else inter,
        )
    return bytes(raw)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = nifti_bytes(data, affine, **kw)
    path.write_bytes(
        gzip.compress(raw, compresslevel=1, mtime=0) if path.name.endswith(".gz") else raw
    )
    return path


def write_case(
    root: Path,
    case: int | str,
    image: np.ndarray,
    seg: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    img_dtype=np.float32,
    slope: float | None = None,
    inter: float | None = None,
    mask_dtype=np.uint8,
    qform_only: bool = False,
    seg_affine: np.ndarray | None = None,
    endian: str = "<",
) -> Path:
    """`root/case_XXXXX/imaging.nii.gz` (+ `segmentation.nii.gz` when `seg` is given).
    `image` is the stored (raw) array; with `slope`/`inter` the HU are raw*slope+inter.
    `qform_only` writes the mask the way KiTS19's uint16 masks are written."""
    affine = kits_affine() if affine is None else affine
    folder = Path(root) / case_id(case)
    write_nifti(
        folder / "imaging.nii.gz",
        image,
        affine,
        dtype=img_dtype,
        slope=slope,
        inter=inter,
        endian=endian,
    )
    if seg is not None:
        write_nifti(
            folder / "segmentation.nii.gz",
            seg,
            affine if seg_affine is None else seg_affine,
            dtype=mask_dtype,
            qform_only=qform_only,
        )
    return folder


def random_case(
    rng: np.random.Generator, slices: int = 5, rows: int = 24, cols: int = 24, labelled: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """HU spread across and beyond the mlperf window, and labels 0..2 in blobs."""
    image = rng.uniform(-1100, 1200, (slices, rows, cols)).astype(np.float32)
    if not labelled:
        return image, None
    seg = np.zeros((slices, rows, cols), np.uint8)
    seg[:, rows // 4 : rows // 2, cols // 4 : cols // 2] = 1
    seg[:, rows // 3 : rows // 2, cols // 3 : cols // 2] = 2
    seg[0] = 0  # one slice without foreground
    seg &= rng.integers(0, 2, seg.shape, dtype=np.uint8) * 3  # ragged edges, still 0..2
    return image, seg


def write_cohort(
    root: Path,
    n: int = 3,
    seed: int = 0,
    unlabelled: tuple[int, ...] = (),
    shapes: dict[int, tuple[int, int, int]] | None = None,
) -> Path:
    """A few small labelled cases with varied dtypes and slice thickness."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = (shapes or {}).get(i, (4 + i, 24, 24))
        image, seg = random_case(rng, *shape, labelled=i not in unlabelled)
        aff = kits_affine(thickness=1.0 + i, pixel=0.7 + 0.05 * i)
        if i % 2 == 1:  # int16 with a scale/intercept, like part of KiTS19
            write_case(
                root,
                i,
                np.round((image + 1024) / 2).astype(np.int16),
                seg,
                aff,
                img_dtype=np.int16,
                slope=2.0,
                inter=-1024.0,
                mask_dtype=np.uint16,
                qform_only=True,
            )
        else:
            write_case(root, i, image, seg, aff)
    return root


def read_store(path: Path, volatile: tuple[str, ...] = ()) -> dict:
    """Every dataset (as bytes-exact arrays) and attribute of an HDF5 file, flattened by
    name, for whole-store comparisons."""
    out: dict = {}
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            for k, v in obj.attrs.items():
                if k not in volatile:
                    out[f"{name}@{k}"] = v
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[...]

        for k, v in f.attrs.items():
            if k not in volatile:
                out[f"/@{k}"] = v
        f.visititems(visit)
    return out


def assert_same_store(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        if x.dtype == np.float16:
            x, y = x.view(np.uint16), y.view(np.uint16)
        assert x.dtype == y.dtype and np.array_equal(x, y), k


@pytest.fixture
def mlperf():
    return WINDOW_PRESETS["mlperf"]


def expected_case(ref_imaging: Path, ref_seg: Path | None, size: int, window):
    """What the store should hold for one case, computed from the source with the kernels
    (themselves checked against numpy in test_kernels): image float16, labels, counts."""
    from kitsprep.cases import read_volume
    from kitsprep.geometry import axial_axes, fit_in_plane
    from kitsprep.kernels import labels_resample, window_resample

    vol = read_volume(ref_imaging)
    axes = axial_axes(vol.header.affine)
    image = vol.data.transpose(axes)
    plane = fit_in_plane(image.shape[1], image.shape[2], size)
    img = window_resample(image, vol.header.slope, vol.header.inter, window, plane)
    lab = counts = None
    if ref_seg is not None:
        seg = read_volume(ref_seg).data.transpose(axes)
        counts = np.zeros((seg.shape[0], 3), np.int64)
        lab, _ = labels_resample(seg, plane, counts)
    return img, lab, counts, plane, axes


# --------------------------------------------------------------------------- bad input


def write_good(src: Path, case: int = 0) -> None:
    img, seg = random_case(np.random.default_rng(case), 3, 16, 16)
    write_case(src, case, img, seg)


def truncate(path: Path) -> None:
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) * 2 // 3])


def corrupt_late(path: Path) -> None:
    """Damage the deflate stream after the NIfTI header. Which stage notices depends on how
    far ahead the header read inflates (nibabel reads megabytes); either must name the case."""
    blob = bytearray(path.read_bytes())
    for i in range(len(blob) * 2 // 3, len(blob) * 2 // 3 + 16):
        blob[i] ^= 0xA5
    path.write_bytes(bytes(blob))


def write_bad_source(kind: str, src: Path) -> str:
    """Write a source folder with one kind of bad input; return what the error must name."""
    src.mkdir(parents=True)
    if kind == "empty":
        return "empty"
    if kind == "not_kits":
        (src / "scans").mkdir()
        (src / "a.txt").write_text("x")
        return "not a KiTS19"
    write_good(src, 0)
    rng = np.random.default_rng(1)
    image = rng.uniform(-500, 500, (4, 16, 16)).astype(np.float32)
    seg = np.zeros((4, 16, 16), np.uint8)
    if kind == "missing_imaging":
        (src / "case_00001").mkdir()
        (src / "case_00001" / "segmentation.nii.gz").write_bytes(
            gzip.compress(nifti_bytes(seg, kits_affine()))
        )
    elif kind == "truncated":
        truncate(write_case(src, 1, image, seg) / "imaging.nii.gz")
    elif kind == "corrupt":
        ramp = np.tile(np.arange(16, dtype=np.int16), (40, 16, 1)) * 10
        corrupt_late(write_case(src, 1, ramp, None, img_dtype=np.int16) / "imaging.nii.gz")
    elif kind == "truncated_mask":
        truncate(write_case(src, 1, image, seg) / "segmentation.nii.gz")
    elif kind == "shape":
        write_case(src, 1, image, seg[:, :, :15])
    elif kind == "affine":
        write_case(src, 1, image, seg, seg_affine=kits_affine(thickness=5.0))
    elif kind == "nan":
        image[2, 3, 4] = np.nan
        image[0, 0, 0] = np.inf
        write_case(src, 1, image, seg)
    elif kind == "float_mask":
        write_case(src, 1, image, seg.astype(np.float32), mask_dtype=np.float32)
    elif kind == "label_300":
        seg = seg.astype(np.uint16)
        seg[1, 1, 1] = 300
        write_case(src, 1, image, seg, mask_dtype=np.uint16)
    elif kind == "not_nifti":
        (src / "case_00001").mkdir()
        (src / "case_00001" / "imaging.nii.gz").write_bytes(b"<html>404</html>")
    return "case_00001"


BAD_KINDS = [
    "empty",
    "not_kits",
    "missing_imaging",
    "truncated",
    "corrupt",
    "truncated_mask",
    "shape",
    "affine",
    "nan",
    "float_mask",
    "label_300",
    "not_nifti",
]
