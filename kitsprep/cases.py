"""Find KiTS cases (KiTS19/23 and KiTS21 layouts, and through `kitsprep.layouts` an nnU-Net
raw dataset or a MONAI datalist), parse case specs, read NIfTI volumes fast.

Decompression is the floor of a build's cost, so `.nii.gz` files are inflated in one call
with ISA-L (`isal.igzip`, ~3x zlib; measured in benchmarks/prep.py) and the voxels are
viewed in place from the inflated bytes, with no copy and no float64 conversion.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from kitsprep.caseref import CASE_RE, CaseRef, case_name
from kitsprep.errors import KitsError
from kitsprep.geometry import check_header_spacing
from kitsprep.gzipped import (  # source_fingerprint: named here too, for `build.plan`
    HEADER_BYTES,
    gzip_fingerprint,
    inflate_bounded,
    source_fingerprint,  # noqa: F401
)
from kitsprep.layouts.datalist import datalist_cases, datalist_splits, is_datalist
from kitsprep.layouts.nnunet import dataset_edition, is_nnunet_dataset, nnunet_cases

NEAR_CASE_RE = re.compile(r"^case", re.IGNORECASE)  # meant as a case, but not case_XXXXX
IMAGING_NAMES = ("imaging.nii.gz", "imaging.nii")
SEGMENTATION_NAMES = ("segmentation.nii.gz", "segmentation.nii")
# KiTS21's mask: the majority vote of three annotations, read where no segmentation is there.
KITS21_SEGMENTATION = "aggregated_MAJ_seg.nii.gz"
NO_MASK_REASON = f"no {SEGMENTATION_NAMES[0]} or {KITS21_SEGMENTATION}"
# Metadata files the official releases put beside the case folders, by edition. KiTS19 and
# KiTS21 both call theirs kits.json, which therefore says nothing.
EDITION_FILES = {"kits23.json": "kits23", "kits21.json": "kits21"}
MAX_RANGE = 100_000  # case ids have five digits


@dataclass(frozen=True)
class NiftiHeader:
    shape: tuple[int, ...]
    affine: np.ndarray
    dtype: np.dtype
    slope: float
    inter: float
    qform_code: int
    sform_code: int


@dataclass(frozen=True)
class Volume:
    """Raw stored voxels (not yet scaled) plus what is needed to interpret them."""

    data: np.ndarray
    header: NiftiHeader
    fingerprint: str


def case_number(case_id: str) -> int:
    """42 for ``case_00042``; a one-line error for anything else."""
    m = CASE_RE.match(case_id)
    if not m:
        raise KitsError(f"expected a case id like case_00042, found {case_id!r}")
    return int(m.group(1))


def _first_existing(folder: Path, names: Iterable[str]) -> Path | None:
    """The first of `names` in `folder`; one that is there but is no regular file (a
    FIFO, a folder, a broken link) is an error naming it, never silently skipped."""
    for name in names:
        path = folder / name
        if path.is_file():
            return path
        if path.is_symlink() or path.exists():
            raise KitsError(
                f"{folder.name}: {path} is {_kind(path)}, not a regular file; put the "
                f"NIfTI file there, or remove it"
            )
    return None


def _kind(path: Path) -> str:
    """What a path that is no regular file is, in words."""
    try:
        st = path.stat()
    except OSError as exc:
        if path.is_symlink():
            return "a symlink loop" if exc.errno == errno.ELOOP else "a broken symlink"
        return f"unreadable ({exc.strerror})"
    if stat.S_ISDIR(st.st_mode):
        return "a folder"
    if stat.S_ISFIFO(st.st_mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(st.st_mode):
        return "a socket"
    return "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a file"


def unusable_case_entries(src: Path) -> list[str]:
    """Entries of `src` named case_XXXXX that are not folders one can open (a broken or
    looping symlink, a file, an unreadable folder): `find_cases` leaves them out, and the
    CLIs say so once, with why."""
    src = Path(src)
    if not src.is_dir():
        return []
    out = []
    for p in sorted(src.iterdir()):
        if not CASE_RE.match(p.name):
            continue
        if not p.is_dir():
            out.append(f"{p.name} ({_kind(p) if p.is_symlink() or not p.exists() else 'a file'})")
        elif not os.access(p, os.R_OK | os.X_OK):
            out.append(f"{p.name} (a folder this user cannot read)")
    return out


def find_cases(src: Path) -> list[CaseRef]:
    """The cases of a source, sorted by id: every `case_XXXXX/` under a KiTS data folder
    (KiTS19 `data/`, KiTS21/23 `dataset/`), the images of an nnU-Net raw dataset folder
    (`dataset.json`), or the entries of a MONAI datalist JSON file."""
    src = Path(src)
    if is_datalist(src):
        return datalist_cases(src)
    if not src.exists():
        raise KitsError(
            f"source folder {src} does not exist; pass the KiTS19 data/ folder "
            "(with case_00000/ ...) or make one with `kitsprep synth --out DIR`"
        )
    if not src.is_dir():
        raise KitsError(
            "--src must be a folder of case_XXXXX/ folders, an nnU-Net dataset folder or a "
            f"MONAI datalist .json, found a file: {src}"
        )
    if is_nnunet_dataset(src):
        return nnunet_cases(src)
    entries = sorted(
        p
        for p in src.iterdir()
        if p.is_dir() and CASE_RE.match(p.name) and os.access(p, os.R_OK | os.X_OK)
    )
    if not entries:
        if not any(src.iterdir()):
            raise KitsError(
                f"{src} is empty; expected KiTS19 case folders (case_00000/ ...). "
                "Get the data with the KiTS19 starter code, or run `kitsprep synth`"
            )
        raise KitsError(
            f"{src} holds no case_XXXXX/ folders, so it is not a KiTS19 data folder; "
            "point --src at kits19/data"
        )
    cases = []
    for folder in entries:
        imaging = _first_existing(folder, IMAGING_NAMES)
        seg = _first_existing(folder, (*SEGMENTATION_NAMES, KITS21_SEGMENTATION))
        if imaging is None:
            raise KitsError(
                f"{folder.name}: imaging.nii.gz is missing from {folder}; "
                "re-download the case, or leave it out with --cases"
            )
        cases.append(CaseRef(folder.name, imaging, seg, "" if seg else NO_MASK_REASON))
    return cases


def folder_edition(src: Path, cases: Iterable[CaseRef]) -> tuple[str, str] | None:
    """The KiTS edition a source declares, and why: an nnU-Net dataset's labels, the
    release's metadata file (``kits23.json``, ``kits21.json``) or KiTS21's mask name; None
    when it says nothing."""
    if is_nnunet_dataset(src):
        return dataset_edition(Path(src))
    for name, edition in EDITION_FILES.items():
        if (Path(src) / name).is_file():
            return edition, f"{name} in {src}"
    for ref in cases:
        if ref.segmentation is not None and ref.segmentation.name == KITS21_SEGMENTATION:
            return "kits21", f"{ref.case_id} has KiTS21's {KITS21_SEGMENTATION}"
    return None


def check_edition(src: Path, requested: str) -> None:
    """An ``--edition`` the source's declared labels disagree with (an nnU-Net dataset's) is
    one line, before any case is read."""
    if requested != "auto" and is_nnunet_dataset(src):
        dataset_edition(Path(src), requested)


def recorded_splits(src: Path, case_ids: Iterable[str]) -> list[dict] | None:
    """The folds a source records (a MONAI datalist's), in nnU-Net's ``splits_final.json``
    form, over ``case_ids`` only (the cases the store holds); None when it records none."""
    if not is_datalist(src):
        return None
    keep = set(case_ids)
    splits = datalist_splits(Path(src))
    if splits is None:
        return None
    return [{k: [c for c in fold[k] if c in keep] for k in ("train", "val")} for fold in splits]


def misnamed_case_folders(src: Path) -> list[str]:
    """Folders under `src` that look like cases but are not named case_XXXXX (`case_0001`,
    `case_00001_copy`): `find_cases` skips them, and the CLIs say so once."""
    src = Path(src)
    if not src.is_dir():
        return []
    return sorted(
        p.name
        for p in src.iterdir()
        if p.is_dir() and NEAR_CASE_RE.match(p.name) and not CASE_RE.match(p.name)
    )


def parse_case_spec(spec: str, available: Iterable[str] | None = None) -> list[str]:
    """`0-19,50-54`, `case_00003`, `3`, or `@file` (one id a line) -> sorted case ids.
    With `available`, every id must be one of them, and any of them may be named as it is
    (numbers and ranges reach only the ids called case_XXXXX)."""
    spec = spec.strip()
    if spec.startswith("@"):
        path = Path(spec[1:])
        if not path.is_file():
            raise KitsError(f"case list file {path} does not exist; expected one case id a line")
        tokens = [t.strip() for t in path.read_text().splitlines()]
        tokens = [t for t in tokens if t and not t.startswith("#")]
    else:
        tokens = [t.strip() for t in spec.split(",") if t.strip()]
    if not tokens:
        raise KitsError(f"empty case spec {spec!r}; expected e.g. 0-19,50-54 or case_00003")
    have_numbers, have = None, set()
    if available is not None:
        have = set(available)
        have_numbers = sorted(int(m.group(1)) for m in map(CASE_RE.match, have) if m)
    numbers: set[int] = set()
    names: set[str] = set()  # ids as given: the only way to name a case not called case_XXXXX
    n_missing, first_missing = 0, []
    for tok in tokens:
        if tok in have:
            names.add(tok)
            continue
        m = re.fullmatch(r"(?:case_)?(\d+)\s*-\s*(?:case_)?(\d+)", tok)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise KitsError(f"case range {tok!r} runs backwards; write {hi}-{lo}")
            if have_numbers is None:
                if hi - lo >= MAX_RANGE:
                    raise KitsError(
                        f"case range {tok!r} spans {hi - lo + 1} cases; KiTS ids "
                        f"have 5 digits, so write a range within 0-{MAX_RANGE - 1}"
                    )
                numbers.update(range(lo, hi + 1))
                continue
            # checked against the cases there, never expanded beyond them: a range like
            # 0-999999999999 costs what the folder holds
            inside = [n for n in have_numbers if lo <= n <= hi]
            numbers.update(inside)
            n_missing += (hi - lo + 1) - len(inside)
            got = set(inside)
            n = lo
            while len(first_missing) < 5 and n <= hi:
                if n not in got:
                    first_missing.append(case_name(n))
                n += 1
            continue
        m = re.fullmatch(r"(?:case_)?(\d+)", tok)
        if m:
            numbers.add(int(m.group(1)))
        elif available is not None:  # a name, but none of the cases there
            n_missing += 1
            first_missing.append(tok)
        else:
            raise KitsError(
                f"cannot read case {tok!r} in spec {spec!r}; "
                "expected e.g. 0-19,50-54, case_00003, a case id, or @file"
            )
    ids = sorted({case_name(n) for n in numbers} | names)
    if available is not None:
        missing = [c for c in ids if c not in have]
        n_missing += len(missing)
        first_missing = sorted(set(first_missing + missing[:5]))[:5]
        if n_missing:
            shown = ", ".join(first_missing) + (" ..." if n_missing > 5 else "")
            raise KitsError(
                f"case spec {spec!r} names {n_missing} case(s) that are not "
                f"there: {shown}; available: {_summarise(sorted(have))}"
            )
    return ids


def _summarise(ids: list[str]) -> str:
    if not ids:
        return "none"
    return f"{ids[0]} .. {ids[-1]} ({len(ids)} cases)" if len(ids) > 3 else ", ".join(ids)


def select_cases(cases: list[CaseRef], spec: str | None) -> list[CaseRef]:
    """The cases a ``--cases`` spec names (all without one), in folder order."""
    if spec is None:
        return cases
    wanted = set(parse_case_spec(spec, [c.case_id for c in cases]))
    return [c for c in cases if c.case_id in wanted]


def _header_of(hdr: nib.Nifti1Header) -> NiftiHeader:
    """The header's facts; the affine is nibabel's best (sform, else qform), which is
    what makes the uint16 qform-only KiTS19 masks line up with their sform imaging."""
    slope, inter = hdr.get_slope_inter()
    return NiftiHeader(
        shape=tuple(int(v) for v in hdr.get_data_shape()),
        affine=np.asarray(hdr.get_best_affine(), dtype=np.float64),
        dtype=np.dtype(hdr.get_data_dtype()),
        slope=1.0 if slope is None else float(slope),
        inter=0.0 if inter is None else float(inter),
        qform_code=int(hdr["qform_code"]),
        sform_code=int(hdr["sform_code"]),
    )


def _check_raw_header(path: Path, name: str) -> None:
    """The header's spacing as written (`check_header_spacing`), before nibabel's own check
    fixes it. A file too damaged to parse is left to the caller's reader to report."""
    try:
        with nib.openers.ImageOpener(str(path)) as f:
            head = f.read(nib.Nifti2Header.sizeof_hdr)
    except Exception:
        return
    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        try:
            hdr = klass.from_fileobj(io.BytesIO(head), check=False)
        except Exception:
            continue
        if int(hdr["sizeof_hdr"]) == klass.sizeof_hdr:
            check_header_spacing(hdr, name, path.name)
            return


def read_header(path: Path, case_id: str = "") -> NiftiHeader:
    """Header only (a few KB of the gzip stream): shape and geometry before any decoding."""
    if not os.access(path, os.R_OK) and Path(path).exists():
        raise KitsError(
            f"{case_id or path.parent.name}: cannot read {path}: permission denied; give "
            "this user read access (chmod a+r), or leave the case out with --cases"
        )
    _check_raw_header(path, case_id or path.parent.name)
    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise KitsError(
            f"{case_id or path.parent.name}: cannot read {path.name} ({exc}); "
            "the file is truncated, corrupt or not NIfTI; re-download it, or skip "
            "it with --skip-bad"
        ) from None
    header = _header_of(img.header)
    if len(header.shape) != 3:
        raise KitsError(f"{case_id}: {path.name} has shape {header.shape}; expected a 3D volume")
    if 0 in header.shape:
        raise KitsError(
            f"{case_id or path.parent.name}: {path.name} has shape {header.shape}, "
            "an empty volume with no voxels; re-export the scan, or leave the case "
            "out with --cases"
        )
    return header


def read_volume(path: Path, case_id: str = "") -> Volume:
    """Inflate (never past the size its header gives) and view the voxels in place
    (Fortran order, as stored)."""
    name = case_id or path.parent.name
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise KitsError(f"{name}: cannot read {path} ({exc.strerror}); check permissions") from None
    if path.name.endswith(".gz"):
        data = inflate_bounded(blob, name, path)
        fingerprint = gzip_fingerprint(blob)
    else:
        data = blob
        fingerprint = f"raw:{len(blob)}:{zlib.crc32(blob):08x}"
    try:
        raw = nib.Nifti1Header.from_fileobj(io.BytesIO(data[:HEADER_BYTES]), check=False)
    except Exception:
        raw = None  # reported just below, by the checked read
    if raw is not None:
        check_header_spacing(raw, name, path.name)
    try:
        hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(data[:HEADER_BYTES]))
    except Exception as exc:
        raise KitsError(
            f"{name}: {path.name} has no valid NIfTI header ({exc}); re-download the case"
        ) from None
    header = _header_of(hdr)
    offset = int(hdr.get_data_offset())
    count = int(np.prod(header.shape))
    if offset + count * header.dtype.itemsize > len(data):
        raise KitsError(
            f"{name}: {path.name} holds fewer voxels than its header's shape "
            f"{header.shape} says; the file is truncated, re-download it"
        )
    arr = np.frombuffer(data, dtype=header.dtype, count=count, offset=offset)
    if not arr.dtype.isnative:  # big-endian file: the numba kernels read native order only
        arr = arr.byteswap().view(arr.dtype.newbyteorder("="))
    return Volume(arr.reshape(header.shape, order="F"), header, fingerprint)


def check_pair(case_id: str, img: NiftiHeader, seg: NiftiHeader) -> None:
    """Imaging and segmentation must describe the same voxels."""
    for what, h in (("imaging", img), ("segmentation", seg)):
        if not np.isfinite(h.affine).all():
            raise KitsError(
                f"{case_id}: the {what}'s header holds a non-finite (NaN/Inf) affine "
                "(voxel spacing or orientation); fix the header's pixdim/sform, or "
                "re-download the case"
            )
    if img.shape != seg.shape:
        raise KitsError(
            f"{case_id}: imaging shape {img.shape} differs from segmentation shape "
            f"{seg.shape}; the pair does not belong together, re-download the case"
        )
    if not np.allclose(img.affine, seg.affine, atol=1e-3, rtol=1e-4):
        raise KitsError(
            f"{case_id}: imaging and segmentation affines differ "
            f"({np.round(img.affine, 3).tolist()} vs "
            f"{np.round(seg.affine, 3).tolist()}); the mask is not in the "
            "imaging's geometry, resample it or re-download the case"
        )
    if seg.dtype.kind not in "iu":
        raise KitsError(
            f"{case_id}: segmentation has dtype {seg.dtype}; expected integer labels (uint8/uint16)"
        )
