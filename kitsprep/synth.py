"""The synthetic KiTS19 cohort: the project's embedded default data set.

Real KiTS19 CT cannot be downloaded here, so this module writes a cohort in the exact KiTS19
layout and geometry conventions (``case_XXXXX/imaging.nii.gz`` + ``segmentation.nii.gz``,
arrays ``(slices, rows, cols)``, orientation ``I P L`` with the anti-diagonal affine) and with
the storage variety that breaks naive readers: float32 and int16-with-intercept imaging,
uint8 masks with an sform and uint16 masks with only a qform, one non-square case and one
unlabelled case.

The anatomy is built so that a model has to learn shape and context rather than a threshold:
liver, spleen, bowel wall, vessels and bone all share the kidney's intensity range, kidneys
have an enhanced cortex around a darker medulla, and tumours of varying size and contrast
grow out of a kidney's surface. Everything is drawn from ``np.random.default_rng([seed,
index])``, so a configuration always gives identical arrays and byte-identical files.

``edition="kits23"`` adds KiTS21/23's renal cysts (label 3: round, homogeneous, near-water
density, on or in a kidney), drawn from a stream of their own (``[seed, index, 3]``) so the
anatomy around them is the KiTS19 cohort's, and writes the release's ``kits23.json``.

Conventions used throughout: axis 0 runs superior -> inferior, axis 1 anterior -> posterior,
axis 2 patient right -> left. So the liver (patient right) sits at low column indices, the
spine at high row indices. Pure functions (``make_case``, ``paint_imaging``,
``encode_case``) are kept apart from the one function that touches the disk
(``write_cohort``).
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np

try:  # isal is a project dependency and several times faster than zlib at the same ratio
    from isal import igzip as _gzip
except ImportError:  # pragma: no cover - fallback for a bare environment
    _gzip = gzip  # type: ignore[assignment]

__all__ = [
    "SynthCase",
    "SynthConfig",
    "encode_case",
    "kits_affine",
    "make_case",
    "paint_imaging",
    "write_cohort",
]

# Slice thicknesses that occur in KiTS19 (mm).
_THICKNESSES = (0.5, 1.0, 1.25, 2.0, 2.5, 3.0, 3.75, 4.0, 5.0)
# Real 512x796 case: one non-square case keeps code honest about rows != cols.
_WIDE_RATIO = 796 / 512
# int16 imaging stores raw = HU + 1024 and declares scl_inter = -1024, as scanners do.
_INT16_INTERCEPT = -1024.0
_HU_MIN, _HU_MAX = -1024.0, 3071.0
_GZIP_LEVEL = 2  # fast: a real-sized cohort must not be bottlenecked by compression
_RENDER_CHUNK = 4  # slices rendered at a time: small enough to stay in cache

# Tissue classes of the painted volume; each gets a per-case mean HU and texture amplitude.
AIR, FAT, MUSCLE, CAVITY, LIVER, SPLEEN, WALL, FLUID, GAS = range(9)
ARTERY, VEIN, BONE, CORTICAL, DISC, CSF = range(9, 15)
CORTEX, MEDULLA, PELVIS, TUMOUR, NECROSIS = range(15, 20)
CYST = 20  # a renal cyst (KiTS21/23 label 3): water density, homogeneous
_N_CLASSES = 21
SYNTH_EDITIONS = ("kits19", "kits23")
# What the labelled cases of a kits23 cohort hold, by case index: variety in any small cohort.
_CYST_KINDS = ("cysts", "cyst_beside_tumour", "cysts_only", "no_cyst")


@dataclass(frozen=True)
class SynthConfig:
    """What to generate: number of cases, in-plane size, the seed and the KiTS edition."""

    cases: int = 10
    size: int = 128  # in-plane size of a square case (rows = cols = size)
    seed: int = 0
    edition: str = "kits19"  # one of SYNTH_EDITIONS; kits23 adds cysts (label 3)


@dataclass(frozen=True, eq=False)
class SynthCase:
    """One generated case plus how it will be stored (so readers meet every KiTS19 variant).

    ``imaging`` is always HU as float32 (integer-valued, like real CT) whatever the storage
    dtype; the arrays are read-only.
    """

    case_id: str
    imaging: np.ndarray  # HU, float32, (slices, rows, cols)
    segmentation: np.ndarray | None  # uint8 labels 0/1/2 (3: kits23 cyst), None: unlabelled
    affine: np.ndarray  # 4x4 float64, KiTS19 anti-diagonal
    imaging_dtype: str  # 'float32' | 'int16' (int16 with scl_slope 1, scl_inter -1024)
    mask_dtype: str  # 'uint8' | 'uint16'
    header_style: str  # 'sform' (sform_code 2, qform_code 0) | 'qform' (qform 1, sform 0)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (slices, rows, cols)."""
        return (float(-self.affine[2, 0]), float(-self.affine[1, 1]), float(-self.affine[0, 2]))

    @property
    def labelled(self) -> bool:
        return self.segmentation is not None


@dataclass(frozen=True)
class _Layout:
    """Where the body, spine and kidneys are, in voxel units of one volume.

    ``ez``/``pe`` are the millimetres per slice / pixel the anatomy is drawn at. For a real mask
    they are its spacing; for a synthetic case they are chosen so that a fixed-size body fills
    the same share of the field of view at every ``size`` and a kidney spans about a third of
    the slices, independently of the slice thickness written into the header.
    """

    shape: tuple[int, int, int]
    ez: float
    pe: float
    cy: float  # body ellipse centre and half-axes (px)
    cx: float
    a: float  # lateral half-width
    b: float  # anterior-posterior half-depth
    fat: float  # subcutaneous fat thickness (px)
    wall: float  # muscle wall thickness (px)
    spine_y: float  # vertebral body centre and radius (px)
    spine_x: float
    rv: float
    kz_lo: float = 0.0  # slice range holding kidney
    kz_hi: float = 0.0
    kidneys: tuple[tuple[float, float, float, int], ...] = ()  # (z, y, x, side); side -1 = right


# --------------------------------------------------------------------------- public API


def make_case(index: int, cfg: SynthConfig) -> SynthCase:
    """Generate case ``index`` of the cohort ``cfg`` in memory (pure, deterministic)."""
    _check_config(cfg)
    if not 0 <= index < cfg.cases:
        raise ValueError(f"case index {index} outside 0..{cfg.cases - 1}")
    # SeedSequence wants non-negative words; a negative seed (the CLI allows any int) wraps.
    seed = cfg.seed % 2**64 if cfg.seed < 0 else cfg.seed
    rng = np.random.default_rng([seed, index])
    special = cfg.cases >= 3  # the odd cases only make sense in a cohort with room for them
    rows = cfg.size
    cols = round(cfg.size * _WIDE_RATIO) if special and index == 1 else cfg.size
    lo = max(8, cfg.size // 4)
    slices = int(rng.integers(lo, max(lo, cfg.size // 2) + 1))
    thick = float(rng.choice(_THICKNESSES))
    # Multiples of 1/1024 mm are exact in float32, so the affine reads back bit-identical.
    px = round(float(rng.uniform(0.6, 1.0)) * 1024) / 1024
    shape = (slices, rows, cols)

    # The anatomy is drawn on a nominal 512-pixel grid scale and a 300-420 mm coverage.
    layout = _draw_body(shape, ez=rng.uniform(300, 420) / slices, pe=px * 512 / rows, rng=rng)
    cysts = _CYST_KINDS[index % len(_CYST_KINDS)] if cfg.edition == "kits23" else "no_cyst"
    seg, pelvis, layout = _draw_kidneys(layout, rng, tumours=cysts != "cysts_only")
    if cysts != "no_cyst":
        _grow_cysts(
            seg,
            layout,
            np.random.default_rng([seed, index, 3]),
            beside_tumour=cysts == "cyst_beside_tumour",
        )
    hu = _paint(seg, layout, rng, pelvis)

    labelled = not (special and index == cfg.cases - 1)
    affine = kits_affine(thick, px)
    hu.flags.writeable = False
    seg.flags.writeable = False
    return SynthCase(
        case_id=f"case_{index:05d}",
        imaging=hu,
        segmentation=seg if labelled else None,
        affine=affine,
        imaging_dtype="int16" if index % 2 == 1 else "float32",
        mask_dtype="uint16" if index % 5 == 4 else "uint8",
        header_style="qform" if index % 5 == 4 else "sform",
    )


def paint_imaging(
    segmentation: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """Synthetic CT (HU, float32, same shape) painted around a given, possibly real, mask.

    Lets tests run the whole pipeline on real KiTS19 masks whose CT cannot be shipped: body,
    fat, organs, vessels and bone are placed around the mask's kidneys, and the mask's kidney
    (label 1) and tumour (label 2) voxels get kidney and tumour intensities; label 3 (a
    KiTS21/23 cyst) is painted as a cyst: 0-20 HU, homogeneous. ``spacing`` is (slice, row,
    col) in mm.
    """
    seg = np.asarray(segmentation)
    if seg.ndim != 3 or min(seg.shape) < 1:
        raise ValueError(f"segmentation must be a non-empty 3D array, got shape {seg.shape}")
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive numbers, got {spacing!r}")
    layout = _layout_from_mask(seg, spacing, rng)
    return _paint(seg, layout, rng, ())


def kits_affine(thickness: float, pixel: float) -> np.ndarray:
    """The KiTS19 anti-diagonal affine: axes (slices, rows, cols) -> I, P, L."""
    return np.array(
        [
            [0.0, 0.0, -pixel, 0.0],
            [0.0, -pixel, 0.0, 0.0],
            [-thickness, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


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
    _check_config(cfg)
    out = Path(out)
    ids: list[str] = []
    for index in range(cfg.cases):
        case = make_case(index, cfg)
        folder = out / case.case_id
        folder.mkdir(parents=True, exist_ok=True)
        files = encode_case(case)
        for name, data in files.items():
            _atomic_write(folder / name, data)
        stale = folder / "segmentation.nii.gz"
        if "segmentation.nii.gz" not in files and stale.exists():
            stale.unlink()  # an unlabelled case must not keep a mask from an earlier cohort
        ids.append(case.case_id)
        if on_case is not None:
            on_case(case.case_id)
    if cfg.edition == "kits23":
        entries = [{"case_id": cid, "synthetic": True} for cid in ids]
        _atomic_write(out / "kits23.json", (json.dumps(entries, indent=1) + "\n").encode())
    return ids


# --------------------------------------------------------------------------- storage


def _check_config(cfg: SynthConfig) -> None:
    if cfg.cases < 1:
        raise ValueError(f"cases must be at least 1, got {cfg.cases}")
    if cfg.size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {cfg.size}")
    if cfg.edition not in SYNTH_EDITIONS:
        raise ValueError(f"edition must be one of {', '.join(SYNTH_EDITIONS)}, got {cfg.edition!r}")


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
    if case.imaging_dtype == "int16":
        raw = (case.imaging - _INT16_INTERCEPT).astype(np.int16)  # HU is integer, no rounding
        img = nib.Nifti1Image(raw, None)
        img.header.set_data_dtype(np.int16)
        # Set after construction: nibabel resets the scaling of a header passed in.
        img.header.set_slope_inter(1.0, _INT16_INTERCEPT)
    else:
        img = nib.Nifti1Image(np.asarray(case.imaging, dtype=np.float32), None)
        img.header.set_data_dtype(np.float32)
    _set_geometry(img, case.affine, case.header_style)
    return img


def _mask_image(case: SynthCase) -> nib.Nifti1Image:
    assert case.segmentation is not None
    img = nib.Nifti1Image(case.segmentation.astype(case.mask_dtype), None)
    img.header.set_data_dtype(case.mask_dtype)
    _set_geometry(img, case.affine, case.header_style)
    return img


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- geometry helpers


def _frame(
    shape: tuple[int, int, int], z0: int, cy: np.ndarray, cx: np.ndarray, reach: float
) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray] | None:
    """Bounding box of a stack of shapes centred at (cy[k], cx[k]) on slices z0.., and the
    offsets (dy, dx) of its voxels from those centres, shaped to broadcast (nz, h, w)."""
    _, rows, cols = shape
    if len(cy) == 0:
        return None
    y0 = max(0, math.floor(float(cy.min()) - reach))
    y1 = min(rows, math.ceil(float(cy.max()) + reach) + 1)
    x0 = max(0, math.floor(float(cx.min()) - reach))
    x1 = min(cols, math.ceil(float(cx.max()) + reach) + 1)
    if y1 <= y0 or x1 <= x0:
        return None
    dy = np.arange(y0, y1, dtype=np.float32)[None, :, None] - cy[:, None, None].astype(np.float32)
    dx = np.arange(x0, x1, dtype=np.float32)[None, None, :] - cx[:, None, None].astype(np.float32)
    return (slice(z0, z0 + len(cy)), slice(y0, y1), slice(x0, x1)), dy, dx


@dataclass(frozen=True)
class _Blob:
    """A voxelised ellipsoid: bounding box, mask, and normalised coordinates inside it.

    (t, u, v) are the ellipsoid's own axes scaled to [-1, 1]: t along the slices, u along the
    rotated in-plane 'x' axis, v along the rotated 'y' axis.
    """

    box: tuple[slice, slice, slice]
    mask: np.ndarray
    t: np.ndarray
    u: np.ndarray
    v: np.ndarray


def _ellipsoid(
    shape: tuple[int, int, int],
    centre: tuple[float, float, float],
    radii: tuple[float, float, float],
    theta: float = 0.0,
    drift: tuple[float, float] = (0.0, 0.0),
) -> _Blob | None:
    """Ellipsoid with in-plane rotation ``theta`` whose in-plane centre moves linearly by
    ``drift`` (dy, dx px) from its centre to its inferior pole, to tilt organs like kidneys."""
    zc, yc, xc = centre
    rz, ry, rx = max(radii[0], 0.5), max(radii[1], 0.5), max(radii[2], 0.5)
    z0 = max(0, math.ceil(zc - rz))
    z1 = min(shape[0], math.floor(zc + rz) + 1)
    if z1 <= z0:
        return None
    t = (np.arange(z0, z1) - zc) / rz
    frame = _frame(shape, z0, yc + drift[0] * t, xc + drift[1] * t, max(ry, rx))
    if frame is None:
        return None
    box, dy, dx = frame
    c, s = math.cos(theta), math.sin(theta)
    u = (dx * c + dy * s) / rx
    v = (dy * c - dx * s) / ry
    tt = t.astype(np.float32)[:, None, None]
    mask = u * u + v * v + tt * tt <= 1.0
    return _Blob(box, mask, tt, u, v)


def _fill(
    cls: np.ndarray,
    box: tuple[slice, slice, slice],
    mask: np.ndarray,
    value: int,
    allowed: Sequence[int] | None = None,
) -> None:
    """Set ``cls[box][mask] = value``, only over voxels whose class is in ``allowed``."""
    sub = cls[box]
    m = np.broadcast_to(mask, sub.shape)
    if allowed is not None:
        m = m & np.isin(sub, allowed)
    sub[m] = value


def _erode2d(mask: np.ndarray, n: int) -> np.ndarray:
    """In-plane binary erosion, ``n`` steps alternating 4- and 8-neighbourhoods (roughly
    round), in-plane only because slice thickness varies 10-fold between cases."""
    m = mask.copy()
    for step in range(n):
        if not m.any():
            break
        e = m.copy()
        e[:, 1:, :] &= m[:, :-1, :]
        e[:, :-1, :] &= m[:, 1:, :]
        e[:, :, 1:] &= m[:, :, :-1]
        e[:, :, :-1] &= m[:, :, 1:]
        if step % 2:
            e[:, 1:, 1:] &= m[:, :-1, :-1]
            e[:, :-1, :-1] &= m[:, 1:, 1:]
            e[:, 1:, :-1] &= m[:, :-1, 1:]
            e[:, :-1, 1:] &= m[:, 1:, :-1]
        m = e
    return m


def _body_rho(layout: _Layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised body coordinates (X, Y) of every in-plane pixel, and the body 'radius'.

    The posterior half is a flatter superellipse: a patient lies on the table.
    """
    _, rows, cols = layout.shape
    y = (np.arange(rows, dtype=np.float32)[:, None] - layout.cy) / layout.b
    x = (np.arange(cols, dtype=np.float32)[None, :] - layout.cx) / layout.a
    p = np.where(y > 0, np.float32(2.8), np.float32(2.0))
    rho = (np.abs(x) ** p + np.abs(y) ** p) ** (1.0 / p)
    return np.broadcast_to(x, rho.shape), np.broadcast_to(y, rho.shape), rho


# --------------------------------------------------------------------------- layouts


def _draw_body(
    shape: tuple[int, int, int], ez: float, pe: float, rng: np.random.Generator
) -> _Layout:
    """Random body outline and spine for a synthetic case."""
    _, rows, cols = shape
    a = min(rng.uniform(150, 185) / pe, 0.47 * cols)
    b = min(a * rng.uniform(0.66, 0.8), 0.45 * rows)
    cy = rows / 2 + rng.uniform(-0.01, 0.04) * rows
    cx = cols / 2 + rng.uniform(-0.02, 0.02) * cols
    fat = rng.uniform(8, 35) / pe
    wall = rng.uniform(6, 14) / pe
    rv = min(rng.uniform(15, 20) / pe, 0.15 * b)
    # Vertebral body centre ~65-85 mm in front of the skin of the back.
    spine_y = max(cy + b - rng.uniform(65, 85) / pe, cy + 0.2 * b)
    return _Layout(
        shape=shape, ez=float(ez), pe=float(pe), cy=cy, cx=cx, a=a, b=b, fat=fat, wall=wall,
        spine_y=spine_y, spine_x=cx, rv=rv,
    )  # fmt: skip


def _draw_kidneys(
    layout: _Layout, rng: np.random.Generator, tumours: bool = True
) -> tuple[np.ndarray, list[tuple[tuple[slice, slice, slice], np.ndarray]], _Layout]:
    """Two bean-shaped kidneys beside the spine and one or two tumours growing from them
    (none without ``tumours``: a kits23 case with cysts only).

    Returns the label volume, the renal-pelvis regions (for painting) and the layout
    completed with the kidneys' slice range and centres.
    """
    shape, ez, pe = layout.shape, layout.ez, layout.pe
    slices = shape[0]
    seg = np.zeros(shape, np.uint8)
    pelvis: list[tuple[tuple[slice, slice, slice], np.ndarray]] = []
    kidneys = []
    z_left = slices * rng.uniform(0.42, 0.54)
    z_right = z_left + slices * rng.uniform(0.0, 0.06)  # the liver pushes the right one down
    for side, zc in ((-1, z_right), (1, z_left)):
        rz = rng.uniform(48, 62) / ez
        ry = rng.uniform(17, 24) / pe
        rx = rng.uniform(24, 32) / pe
        yc = layout.spine_y + layout.rv * rng.uniform(-0.6, 0.2)
        xc = layout.spine_x + side * (layout.rv + rx + rng.uniform(8, 22) / pe)
        # Hilum faces antero-medially: rotate so the medial pole points forward.
        theta = side * math.radians(rng.uniform(15, 35))
        drift = (-rng.uniform(3, 10) / pe, side * rng.uniform(3, 10) / pe)
        # At tiny sizes a kidney must still be a few voxels, not vanish between samples.
        rz, ry, rx = max(rz, 1.0), max(ry, 1.5), max(rx, 1.5)
        blob = _ellipsoid(shape, (zc, yc, xc), (rz, ry, rx), theta, drift)
        if blob is None:
            continue
        medial = -side * blob.u  # +1 at the medial pole
        # Bean shape: a rounded notch (renal sinus, left as fat) cut into the medial side,
        # with the renal pelvis (urine, labelled kidney) filling its inner part.
        hilum = ((medial - 1.0) / 0.5) ** 2 + (blob.v / 0.45) ** 2 + (blob.t / 0.55) ** 2 <= 1
        basin = ((medial - 0.5) / 0.4) ** 2 + (blob.v / 0.25) ** 2 + (blob.t / 0.35) ** 2 <= 1
        kid = blob.mask & (~hilum | basin)
        _fill(seg, blob.box, kid, 1)
        pelvis.append((blob.box, blob.mask & basin))
        kidneys.append((side, (zc, yc, xc), (rz, ry, rx), theta, drift))

    inside = _inner_body(layout)
    n_tumours = 1 + int(rng.random() < 0.25) if tumours else 0
    for _ in range(n_tumours):
        side, centre, radii, theta, drift = kidneys[int(rng.integers(len(kidneys)))]
        _grow_tumour(seg, layout, inside, side, centre, radii, theta, drift, rng)

    if not (seg == 1).any():  # a tumour swallowed the only kidney voxels (tiny sizes)
        z, y, x = (min(max(round(c), 0), n - 1) for c, n in zip(kidneys[0][1], shape, strict=True))
        seg[z, y, x] = 1
    spots = tuple((k[1][0], k[1][1], k[1][2], k[0]) for k in kidneys)
    z_lo = max(0.0, min(k[1][0] - k[2][0] for k in kidneys))
    z_hi = min(float(slices), max(k[1][0] + k[2][0] for k in kidneys))
    return seg, pelvis, replace(layout, kz_lo=z_lo, kz_hi=z_hi, kidneys=spots)


def _inner_body(layout: _Layout) -> np.ndarray:
    """In-plane pixels where a tumour may grow: inside the muscle wall, not in the spine."""
    _, _, rho = _body_rho(layout)
    inner = rho < 1.0 - (layout.fat + layout.wall) / max(layout.a, layout.b)
    _, rows, cols = layout.shape
    yy = np.arange(rows)[:, None] - layout.spine_y
    xx = np.arange(cols)[None, :] - layout.spine_x
    return inner & (yy * yy + xx * xx > (1.1 * layout.rv) ** 2)


def _grow_tumour(
    seg: np.ndarray,
    layout: _Layout,
    inside: np.ndarray,
    side: int,
    centre: tuple[float, float, float],
    radii: tuple[float, float, float],
    theta: float,
    drift: tuple[float, float],
    rng: np.random.Generator,
) -> None:
    """Label 2: a lumpy ball centred near a random point of the kidney surface (not the
    hilum), partly inside the kidney and partly bulging out, from 7 to ~45 mm radius."""
    ez, pe = layout.ez, layout.pe
    for _ in range(100):  # a direction away from the hilum; bounded, deterministic
        d = rng.standard_normal(3)
        d /= np.linalg.norm(d) + 1e-12
        if -side * d[1] < 0.3:
            break
    t, u, v = d
    c, s = math.cos(theta), math.sin(theta)
    dz = t * radii[0]
    dx = u * radii[2] * c - v * radii[1] * s + drift[1] * t
    dy = u * radii[2] * s + v * radii[1] * c + drift[0] * t
    surface = np.array([centre[0] + dz, centre[1] + dy, centre[2] + dx])
    # Unit outward direction in mm, to push the tumour centre in or out of the kidney.
    out_mm = np.array([dz * ez, dy * pe, dx * pe])
    out_mm /= np.linalg.norm(out_mm) + 1e-12
    r_mm = float(np.exp(rng.uniform(math.log(7), math.log(45))))
    shift = r_mm * rng.uniform(-0.4, 0.6)
    main = surface + shift * out_mm / np.array([ez, pe, pe])
    main[0] = np.clip(main[0], 0, seg.shape[0] - 1)
    balls = [(main, r_mm)]
    for _ in range(int(rng.integers(0, 3))):  # lobulated outline
        off = rng.standard_normal(3)
        off *= 0.5 * r_mm / (np.linalg.norm(off) + 1e-12)
        balls.append((main + off / np.array([ez, pe, pe]), r_mm * rng.uniform(0.4, 0.7)))
    painted = False
    for pos, r in balls:
        blob = _ellipsoid(
            seg.shape, tuple(pos), (max(r / ez, 1.0), max(r / pe, 1.5), max(r / pe, 1.5))
        )
        if blob is None:
            continue
        m = blob.mask & inside[blob.box[1:]]
        _fill(seg, blob.box, m, 2)
        painted = painted or bool(m.any())
    if not painted:  # tiny tumour clipped away: keep the promise that every case has one
        z, y, x = np.clip(np.round(surface).astype(int), 0, np.array(seg.shape) - 1)
        seg[z, y, x] = 2


def _grow_cysts(
    seg: np.ndarray, layout: _Layout, rng: np.random.Generator, beside_tumour: bool
) -> None:
    """Label 3: one to three round cysts of 5-25 mm radius centred on a kidney voxel (on its
    surface, bulging out, or inside it); with ``beside_tumour`` the first sits on the
    tumour's surface. Cysts never overwrite tumour, as KiTS writes tumour over cyst."""
    ez, pe = layout.ez, layout.pe
    inside = _inner_body(layout)
    kidney = seg == 1
    tumour = seg == 2
    painted = False
    for k in range(int(rng.integers(1, 4))):
        if k == 0 and beside_tumour and tumour.any():
            where = tumour & ~_erode2d(tumour, 1)
        elif rng.random() < 0.6:
            where = kidney & ~_erode2d(kidney, 1)  # on the surface: an exophytic cyst
        else:
            where = kidney
        spots = np.argwhere(where)
        if len(spots) == 0:
            continue
        centre = tuple(float(v) for v in spots[int(rng.integers(len(spots)))])
        r_mm = float(np.exp(rng.uniform(math.log(5), math.log(25))))
        blob = _ellipsoid(
            seg.shape, centre, (max(r_mm / ez, 0.5), max(r_mm / pe, 1.0), max(r_mm / pe, 1.0))
        )
        if blob is None:
            continue
        m = blob.mask & inside[blob.box[1:]] & ~tumour[blob.box]
        _fill(seg, blob.box, m, 3)
        painted = painted or bool(m.any())
    spots = np.argwhere(seg == 1)
    if not painted and len(spots):  # clipped away at tiny sizes: a cyst case keeps a cyst
        seg[tuple(spots[len(spots) // 2])] = 3


def _layout_from_mask(
    seg: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator
) -> _Layout:
    """Place body and spine around the kidneys of a given mask (real or hand-made)."""
    shape = tuple(int(n) for n in seg.shape)
    slices, rows, cols = shape
    ez, pe = float(spacing[0]), float(spacing[1])
    fg = seg > 0
    zs = np.flatnonzero(fg.any(axis=(1, 2)))
    if zs.size == 0:  # nothing to place around: kidney level in the middle third
        body = _draw_body(shape, ez, pe, rng)
        return replace(body, kz_lo=slices / 3, kz_hi=2 * slices / 3)
    z, y, x = np.nonzero(fg[zs[0] : zs[-1] + 1])
    z = z + zs[0]
    right = x < cols / 2
    groups = [g for g in (right, ~right) if g.any()]
    spots = tuple(
        (float(z[g].mean()), float(y[g].mean()), float(x[g].mean()), -1 if g is right else 1)
        for g in groups
    )
    spine_x = float(np.mean([s[2] for s in spots])) if len(spots) == 2 else cols / 2
    reach_x = float(np.abs(x - spine_x).max())
    a = max(rng.uniform(150, 185) / pe, reach_x * 1.25)
    a = min(a, 0.99 * min(spine_x, cols - spine_x))
    b = a * rng.uniform(0.66, 0.8)
    rv = min(rng.uniform(15, 20) / pe, 0.15 * b)
    spine_y = float(y.mean()) + 0.4 * rv
    # The back's skin ~65-85 mm behind the vertebral body, as in the synthetic cases, but
    # kept inside the field of view and behind the kidneys even for odd hand-made masks.
    back = min(spine_y + rng.uniform(65, 85) / pe, 0.99 * rows)
    back = min(max(back, spine_y + 2.6 * rv, float(y.max()) + 3), rows - 1.0)
    b = float(max(min(b, (back - 0.01 * rows) / 2), 1.0))
    cy = back - b
    thin = min(a, b)
    fat = min(rng.uniform(8, 35) / pe, 0.12 * thin)
    wall = min(rng.uniform(6, 14) / pe, 0.06 * thin)
    return _Layout(
        shape=shape, ez=ez, pe=pe, cy=cy, cx=spine_x, a=a, b=b, fat=fat, wall=wall,
        spine_y=spine_y, spine_x=spine_x, rv=rv,
        kz_lo=float(zs[0]), kz_hi=float(zs[-1] + 1), kidneys=spots,
    )  # fmt: skip


# --------------------------------------------------------------------------- painting


def _paint(
    seg: np.ndarray,
    layout: _Layout,
    rng: np.random.Generator,
    pelvis: Sequence[tuple[tuple[slice, slice, slice], np.ndarray]],
) -> np.ndarray:
    """Tissue classes around the mask, then HU with texture, correlated noise and blur."""
    cls, mode = _tissue_classes(seg, layout, rng, pelvis)
    return _render(cls, mode, layout, rng)


def _stack(
    shape: tuple[int, int, int],
    z0: int,
    cy: np.ndarray,
    cx: np.ndarray,
    ry: np.ndarray,
    rx: np.ndarray,
    theta: float = 0.0,
) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """A stack of ellipses on slices z0.. with per-slice centres and radii: tubes that bend,
    grow or split (vessels, psoas, colon)."""
    ry = np.asarray(ry, np.float32)
    rx = np.asarray(rx, np.float32)
    if len(ry) == 0:
        return None
    frame = _frame(shape, z0, np.asarray(cy), np.asarray(cx), float(max(ry.max(), rx.max())))
    if frame is None:
        return None
    box, dy, dx = frame
    c, s = math.cos(theta), math.sin(theta)
    ry3 = np.maximum(ry, 1e-3)[:, None, None]
    rx3 = np.maximum(rx, 1e-3)[:, None, None]
    u = (dx * c + dy * s) / rx3
    v = (dy * c - dx * s) / ry3
    return box, (u * u + v * v <= 1.0) & (np.minimum(ry3, rx3) > 0.3)


def _hollow(cls: np.ndarray, blob: _Blob | None, inner: float, content: int) -> None:
    """A gut segment: enhancing wall around gas or fluid, only into free abdominal fat.

    ``inner`` is the lumen's share of the radius (1 - wall / radius).
    """
    if blob is None:
        return
    _fill(cls, blob.box, blob.mask, WALL, (CAVITY,))
    if content == WALL or inner <= 0:
        return  # collapsed loop: solid wall tissue throughout
    lumen = blob.u * blob.u + blob.v * blob.v + blob.t * blob.t <= inner * inner
    _fill(cls, blob.box, blob.mask & lumen, content, (WALL,))


def _tissue_classes(
    seg: np.ndarray,
    layout: _Layout,
    rng: np.random.Generator,
    pelvis: Sequence[tuple[tuple[slice, slice, slice], np.ndarray]],
) -> tuple[np.ndarray, str]:
    """Class volume (uint8, one of the tissue constants per voxel) and the tumour's look."""
    shape = layout.shape
    slices = shape[0]
    ez, pe, a, b = layout.ez, layout.pe, layout.a, layout.b
    cy, cx, sy, sx, rv = layout.cy, layout.cx, layout.spine_y, layout.spine_x, layout.rv
    kz_lo, kz_hi = layout.kz_lo, layout.kz_hi
    lk = max(kz_hi - kz_lo, 1.0)
    u = rng.uniform
    z = np.arange(slices, dtype=np.float32)

    # Body layers: air | subcutaneous fat | muscle wall | abdominal cavity (visceral fat).
    # The outline breathes a little along z so that slices differ.
    _, _, rho = _body_rho(layout)
    scale = 1.0 + 0.03 * np.sin(2 * np.pi * z * ez / u(150, 300) + u(0, 2 * np.pi))
    mean_r = (a + b) / 2
    fat_r, wall_r = layout.fat / mean_r, layout.wall / mean_r
    lut = np.array([CAVITY, MUSCLE, FAT, AIR], np.uint8)
    cls = np.empty(shape, np.uint8)
    for k, sc in enumerate(scale.astype(np.float32)):  # per slice: stays in cache, 4x faster
        layer = (rho > sc - fat_r - wall_r).view(np.uint8)
        layer += rho > sc - fat_r
        layer += rho > sc
        cls[k] = lut[layer]

    def ell(
        zc: float,
        yc: float,
        xc: float,
        rz: float,
        ry: float,
        rx: float,
        theta: float = 0.0,
        drift: tuple[float, float] = (0.0, 0.0),
    ) -> _Blob | None:
        return _ellipsoid(shape, (zc, yc, xc), (rz, ry, rx), theta, drift)

    def along(z0: float, z1: float) -> np.ndarray:
        """Slice numbers in [z0, z1) inside the volume."""
        return np.arange(max(0, math.ceil(z0)), min(slices, math.ceil(z1)), dtype=np.float32)

    def tube(zs: np.ndarray, yc: object, xc: object, ry: object, rx: object) -> tuple | None:
        """Ellipses on slices ``zs``; each parameter a number or one value per slice."""
        if zs.size == 0:
            return None
        per = [np.broadcast_to(np.asarray(v, np.float32), zs.shape) for v in (yc, xc, ry, rx)]
        return _stack(shape, int(zs[0]), *per)

    soft = (CAVITY, WALL, FLUID, GAS, LIVER, SPLEEN)

    # Paraspinal muscles behind the spine, psoas beside it growing towards the pelvis.
    for side in (-1, 1):
        st = tube(
            along(0, slices),
            sy + 2.0 * rv,
            sx + side * 1.5 * rv,
            rv * u(0.9, 1.2),
            rv * u(1.0, 1.4),
        )
        if st:
            _fill(cls, *st, MUSCLE, (CAVITY, MUSCLE, FAT))
    z_ps = kz_lo + u(-0.1, 0.3) * lk
    zs = along(z_ps, slices)
    if zs.size:
        grow = np.clip((zs - z_ps) / max(slices - 1.0 - z_ps, 1.0), 0, 1)
        r_ps = u(18, 28) / pe * (0.25 + 0.75 * grow)
        for side in (-1, 1):
            st = tube(zs, sy - 0.1 * rv, sx + side * (rv + 0.8 * r_ps), r_ps * 0.85, r_ps)
            if st:
                _fill(cls, *st, MUSCLE, soft)

    # Liver on the patient's right (low columns), down to the right kidney's upper half.
    rz = u(0.9, 1.3) * lk
    zc = kz_lo + u(0.25, 0.6) * lk - rz
    liver = (zc, cy + u(-0.2, 0.0) * b, cx - u(0.3, 0.42) * a)
    blob = ell(*liver, rz, u(0.55, 0.7) * b, u(0.45, 0.6) * a, u(-0.3, 0.3), (-0.15 * b, -0.1 * a))
    if blob:
        _fill(cls, blob.box, blob.mask, LIVER, (CAVITY,))
        for _ in range(int(rng.integers(0, 3))):  # cysts: hypodense round lesions, not kidney
            r = u(4, 14)
            cyst = ell(
                liver[0] + u(0, 0.6) * rz,
                liver[1] + u(-0.3, 0.3) * b,
                liver[2] + u(-0.3, 0.2) * a,
                r / ez,
                r / pe,
                r / pe,
            )
            if cyst:
                _fill(cls, cyst.box, cyst.mask, FLUID, (LIVER,))

    # Spleen postero-laterally on the left, upper abdomen.
    rz = u(0.35, 0.5) * lk
    blob = ell(
        kz_lo + u(0.0, 0.4) * lk - rz,
        cy + u(0.1, 0.3) * b,
        cx + u(0.45, 0.6) * a,
        rz,
        u(0.25, 0.35) * b,
        u(0.14, 0.2) * a,
        u(0.3, 0.7),
    )
    if blob:
        _fill(cls, blob.box, blob.mask, SPLEEN, (CAVITY,))

    wall = u(2.5, 4.0) / pe
    # Stomach: left anterior upper abdomen.
    rz = u(0.3, 0.5) * lk
    ry, rx = u(0.2, 0.3) * b, u(0.2, 0.3) * a
    _hollow(
        cls,
        ell(kz_lo - u(0.1, 0.4) * lk, cy - u(0.2, 0.4) * b, cx + u(0.1, 0.35) * a, rz, ry, rx),
        1 - wall / min(ry, rx),
        GAS if rng.random() < 0.5 else FLUID,
    )
    # Colon: ascending (right) and descending (left) flanks, transverse across the front.
    for side in (-1, 1):
        zs = along(kz_lo + u(0.0, 0.3) * lk, slices)
        r = u(13, 22) / pe
        yc = cy + u(-0.1, 0.2) * b
        xc = cx + side * u(0.5, 0.62) * a
        st = tube(zs, yc, xc, r, r * u(0.8, 1.2))
        content = GAS if rng.random() < 0.6 else FLUID
        if st:
            _fill(cls, *st, WALL, (CAVITY,))
            lumen = tube(zs, yc, xc, r - wall, r - wall)
            if lumen:
                _fill(cls, *lumen, content, (WALL,))
    ry = u(14, 20) / pe
    _hollow(
        cls,
        ell(
            kz_lo + u(0.2, 0.8) * lk,
            cy - u(0.4, 0.55) * b,
            cx + u(-0.1, 0.1) * a,
            u(15, 25) / ez,
            ry,
            u(0.45, 0.6) * a,
        ),
        1 - wall / ry,
        GAS if rng.random() < 0.6 else FLUID,
    )
    # Small bowel loops in the lower anterior abdomen: gas, fluid or collapsed (solid wall,
    # which sits right in the kidney's intensity range).
    for _ in range(int(rng.integers(6, 14))):
        r = u(10, 25) / pe
        content = int(rng.choice([GAS, FLUID, WALL], p=[0.3, 0.35, 0.35]))
        ry, rx = r * u(0.7, 1.3), r * u(0.7, 1.3)
        _hollow(
            cls,
            ell(
                u(kz_lo + 0.2 * lk, slices),
                cy + u(-0.75, 0.15) * b,
                cx + u(-0.55, 0.55) * a,
                u(15, 40) / ez,
                ry,
                rx,
                u(0, np.pi),
            ),
            1 - wall / min(ry, rx),
            content,
        )

    # Aorta (left-anterior of the spine) splitting into the iliacs below the kidneys; IVC on
    # the right. Vessels run through everything soft, the intrahepatic IVC included.
    vessel_ok = tuple(k for k in range(_N_CLASSES) if k not in (AIR, FAT, BONE, CORTICAL))
    r_ao = u(9, 13) / pe
    r_iv = u(9, 13) / pe
    ya, xa = sy - rv - 1.15 * r_ao, sx + 0.35 * rv
    yv, xv = sy - rv - 0.7 * r_iv, sx - 1.4 * rv - 0.3 * r_iv
    z_bif = min(float(slices), kz_hi + u(0.1, 0.5) * lk)
    spread = u(0.25, 0.4) / pe * ez  # px of lateral drift per slice after the bifurcation
    zs = along(0, z_bif)
    for yc, xc, r, kind in ((ya, xa, r_ao, ARTERY), (yv, xv, r_iv, VEIN)):
        st = tube(zs, yc, xc, r * 0.9, r * 1.1)
        if st:
            _fill(cls, *st, kind, vessel_ok)
    zs = along(z_bif, slices)
    if zs.size:
        d = (zs - z_bif) * spread
        for side in (-1, 1):
            for yc, xc, r, kind in ((ya, xa, r_ao, ARTERY), (yv + r_iv, (xa + xv) / 2, r_iv, VEIN)):
                gap = side * (d + (r_iv if kind == VEIN else 0.3 * r_ao))
                st = tube(zs, yc + 0.1 * d, xc + gap, 0.65 * r, 0.65 * r)
                if st:
                    _fill(cls, *st, kind, vessel_ok)
    # Renal veins from each kidney's hilum region to the IVC.
    r_rv = max(u(3.5, 6) / pe, 0.8)
    for kz, ky, kx, _side in layout.kidneys:
        half = max(0, round(u(3, 6) / ez))
        z0, z1 = max(0, round(kz) - half), min(slices, round(kz) + half + 1)
        if z1 <= z0:
            continue
        y0 = max(0, math.floor(min(ky, yv) - r_rv))
        y1 = min(shape[1], math.ceil(max(ky, yv) + r_rv) + 1)
        x0 = max(0, math.floor(min(kx, xv) - r_rv))
        x1 = min(shape[2], math.ceil(max(kx, xv) + r_rv) + 1)
        if y1 <= y0 or x1 <= x0:
            continue
        py = np.arange(y0, y1, dtype=np.float32)[:, None] - ky
        px_ = np.arange(x0, x1, dtype=np.float32)[None, :] - kx
        vy, vx = yv - ky, xv - kx
        t = np.clip((py * vy + px_ * vx) / max(vy * vy + vx * vx, 1e-6), 0, 1)
        near = (py - t * vy) ** 2 + (px_ - t * vx) ** 2 <= r_rv * r_rv
        _fill(
            cls, (slice(z0, z1), slice(y0, y1), slice(x0, x1)), near[None], VEIN, soft + (MUSCLE,)
        )

    _paint_spine(cls, layout, rng)
    _paint_ribs(cls, layout, rng, rho, fat_r, wall_r)
    mode = _paint_kidneys(cls, seg, layout, rng, pelvis)
    return cls, mode


def _paint_spine(cls: np.ndarray, layout: _Layout, rng: np.random.Generator) -> None:
    """Vertebrae (cancellous body, cortical rim, arch, processes) alternating with discs."""
    slices, rows, cols = layout.shape
    sy, sx, rv, pe = layout.spine_y, layout.spine_x, layout.rv, layout.pe
    y0, y1 = max(0, math.floor(sy - 1.2 * rv)), min(rows, math.ceil(sy + 3.6 * rv) + 1)
    x0, x1 = max(0, math.floor(sx - 2.4 * rv)), min(cols, math.ceil(sx + 2.4 * rv) + 1)
    if y1 <= y0 or x1 <= x0:
        return
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - sy
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - sx
    r_body = np.hypot(dy, dx)
    body = r_body <= rv
    rim = body & (r_body > rv - max(2.0 / pe, 0.7))
    dc = np.hypot(dy - 1.45 * rv, dx)
    canal = dc <= 0.5 * rv
    arch = (dc > 0.5 * rv) & (dc <= 0.85 * rv) & (dy > 1.2 * rv)
    spinous = ((dy - 2.6 * rv) / (0.8 * rv)) ** 2 + (dx / (0.25 * rv)) ** 2 <= 1
    trans = ((dy - 1.2 * rv) / (0.25 * rv)) ** 2 + ((np.abs(dx) - 1.5 * rv) / (0.7 * rv)) ** 2 <= 1

    period = rng.uniform(28, 36) / layout.ez  # vertebral height in slices
    phase = rng.uniform(0, 1)
    is_disc = ((np.arange(slices) / period + phase) % 1.0) < 0.18
    bone_slice = np.select(
        [canal, rim | arch, body | spinous | trans], [CSF, CORTICAL, BONE], 255
    ).astype(np.uint8)
    disc_slice = np.select([canal, body], [CSF, DISC], 255).astype(np.uint8)
    sub = cls[:, y0:y1, x0:x1]
    for sel, pattern in ((~is_disc, bone_slice), (is_disc, disc_slice)):
        if sel.any():
            part = sub[sel]
            sub[sel] = np.where(pattern == 255, part, pattern)


def _paint_ribs(
    cls: np.ndarray,
    layout: _Layout,
    rng: np.random.Generator,
    rho: np.ndarray,
    fat_r: float,
    wall_r: float,
) -> None:
    """Rib cross-sections in the wall of the upper slices (down to the upper kidney poles),
    placed at angles that rotate with z as oblique ribs do."""
    lk = max(layout.kz_hi - layout.kz_lo, 1.0)
    z_end = min(layout.shape[0], math.ceil(layout.kz_lo + rng.uniform(0.1, 0.4) * lk))
    n_ribs = int(rng.integers(8, 13))
    phase = rng.uniform(0, 2 * np.pi)
    omega = 2 * np.pi / rng.uniform(40, 70) * layout.ez  # radians per slice
    half = max(3.5 / layout.pe, 0.6) / ((layout.a + layout.b) / 2)
    x, y, _ = _body_rho(layout)
    ring = (np.abs(rho - (1.0 - fat_r - 0.5 * wall_r)) < half) & (np.abs(x) > 0.25)
    iy, ix = np.nonzero(ring)
    if z_end <= 0 or iy.size == 0:
        return
    ang = np.arctan2(y[iy, ix], x[iy, ix])
    zz = np.arange(z_end, dtype=np.float32)[:, None]
    on = np.sin(n_ribs * ang[None, :] + phase + omega * zz) > 0.75
    sub = cls[:z_end, iy, ix]
    ok = on & np.isin(sub, (MUSCLE, FAT, CAVITY, LIVER, SPLEEN))
    cls[:z_end, iy, ix] = np.where(ok, np.uint8(BONE), sub)


def _paint_kidneys(
    cls: np.ndarray,
    seg: np.ndarray,
    layout: _Layout,
    rng: np.random.Generator,
    pelvis: Sequence[tuple[tuple[slice, slice, slice], np.ndarray]],
) -> str:
    """Kidney cortex / medulla / pelvis and tumour (+ necrosis) wherever the mask says so."""
    mode = str(rng.choice(["hypo", "iso", "hetero"], p=[0.35, 0.3, 0.35]))
    k_cortex = max(1, round(rng.uniform(4, 6) / layout.pe))
    k_necrosis = max(1, round(rng.uniform(5, 10) / layout.pe))
    zmax = seg.max(axis=(1, 2))
    zs = np.flatnonzero(zmax)
    if zs.size == 0:
        return mode
    z0, z1 = int(zs[0]), int(zs[-1]) + 1
    part = seg[z0:z1]
    ys = np.flatnonzero(part.max(axis=(0, 2)))
    xs = np.flatnonzero(part.max(axis=(0, 1)))
    y0, y1 = max(0, int(ys[0]) - 1), min(seg.shape[1], int(ys[-1]) + 2)
    x0, x1 = max(0, int(xs[0]) - 1), min(seg.shape[2], int(xs[-1]) + 2)
    box = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
    s = seg[box]
    kid, tum = s == 1, s == 2
    inner = _erode2d(s > 0, k_cortex)
    sub = cls[box]
    sub[kid & ~inner] = CORTEX
    sub[kid & inner] = MEDULLA
    sub[tum] = TUMOUR
    if mode == "hetero":
        sub[_erode2d(tum, k_necrosis)] = NECROSIS
    sub[s >= 3] = CYST
    for pbox, pmask in pelvis:
        _fill(cls, pbox, pmask & (seg[pbox] == 1), PELVIS)
    return mode


# --------------------------------------------------------------------------- rendering


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear interpolation weights from ``n_in`` coarse nodes to ``n_out`` samples."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    i0 = np.clip(np.floor(pos).astype(np.int64), 0, n_in - 2)
    w = (pos - i0).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), i0] = 1.0 - w
    m[np.arange(n_out), i0 + 1] = w
    return m


def _blur_inplane(hu: np.ndarray) -> np.ndarray:
    """[1 2 1]/4 along rows then columns (edges replicated): partial-volume edges and the
    spatially correlated noise of a reconstruction kernel."""
    for axis in (1, 2):
        a = np.moveaxis(hu, axis, 0)
        out = a * np.float32(0.5)
        out[1:] += np.float32(0.25) * a[:-1]
        out[:-1] += np.float32(0.25) * a[1:]
        out[0] += np.float32(0.25) * a[0]
        out[-1] += np.float32(0.25) * a[-1]
        hu = np.moveaxis(out, 0, axis)
    return hu


def _cyst_look(rng: np.random.Generator) -> tuple[float, float]:
    """Mean HU and texture amplitude of a renal cyst: near-water density (0-20 HU) and
    homogeneous (a texture of a few HU, below the scan's noise), unlike a tumour."""
    return float(rng.uniform(0, 20)), float(rng.uniform(1, 3))


def _render(cls: np.ndarray, mode: str, layout: _Layout, rng: np.random.Generator) -> np.ndarray:
    """HU = per-case tissue mean + smooth texture + correlated noise, blurred, integer HU."""
    u = rng.uniform
    mean = np.zeros(_N_CLASSES, np.float32)
    amp = np.zeros(_N_CLASSES, np.float32)
    table = {
        AIR: (-1000, -1000, 0),
        FAT: (-115, -85, 8),
        MUSCLE: (40, 60, 8),
        CAVITY: (-110, -75, 15),
        LIVER: (60, 130, 8),
        SPLEEN: (100, 130, 8),
        WALL: (60, 110, 15),
        FLUID: (0, 30, 4),
        GAS: (-950, -750, 60),
        ARTERY: (150, 250, 6),
        VEIN: (110, 200, 8),
        BONE: (200, 400, 60),
        CORTICAL: (600, 1000, 80),
        DISC: (70, 100, 8),
        CSF: (5, 25, 4),
        CORTEX: (150, 200, 10),
        MEDULLA: (80, 120, 10),
        PELVIS: (0, 30, 4),
        NECROSIS: (10, 40, 8),
    }
    for k, (lo, hi, tex) in table.items():
        mean[k] = u(lo, hi)
        amp[k] = tex
    if (cls == CYST).any():  # drawn only then: a KiTS19 case's stream stays as it was
        mean[CYST], amp[CYST] = _cyst_look(rng)
    if rng.random() < 0.25:  # nephrographic phase: medulla catches up with the cortex
        mean[MEDULLA] = mean[CORTEX] - u(10, 30)
    lo, hi, tex_lo, tex_hi = {
        "hypo": (40, 80, 8, 15),
        "iso": (110, 170, 10, 20),
        "hetero": (60, 120, 25, 45),
    }[mode]
    mean[TUMOUR] = u(lo, hi)
    amp[TUMOUR] = u(tex_lo, tex_hi)
    sigma = u(10, 25) / 0.375  # the [1 2 1]^2 blur divides the noise std by 2.67

    # Smooth texture field: coarse Gaussian nodes ~12 mm apart, linearly interpolated.
    slices, rows, cols = cls.shape
    cell = 12.0
    nz = max(2, math.ceil(slices * layout.ez / cell) + 1)
    ny = max(2, math.ceil(rows * layout.pe / cell) + 1)
    nx = max(2, math.ceil(cols * layout.pe / cell) + 1)
    coarse = rng.standard_normal((nz, ny, nx), dtype=np.float32)
    plane = _interp_matrix(rows, ny) @ (coarse @ _interp_matrix(cols, nx).T)  # (nz, rows, cols)
    # Along z the interpolation is two nodes per slice: gather them instead of a dense matmul.
    pos = np.linspace(0.0, nz - 1.0, slices)
    i0 = np.clip(np.floor(pos).astype(np.int64), 0, nz - 2)
    w = (pos - i0).astype(np.float32)[:, None, None]

    out = np.empty(cls.shape, np.float32)
    for z0 in range(0, slices, _RENDER_CHUNK):
        z1 = min(slices, z0 + _RENDER_CHUNK)
        c = cls[z0:z1]
        wz = w[z0:z1]
        field = plane[i0[z0:z1]] * (1 - wz) + plane[i0[z0:z1] + 1] * wz
        hu = np.take(mean, c)
        hu += np.take(amp, c) * field
        hu += rng.standard_normal(c.shape, dtype=np.float32) * np.float32(sigma)
        hu = _blur_inplane(hu)
        np.rint(hu, out=hu)
        np.clip(hu, _HU_MIN, _HU_MAX, out=hu)
        out[z0:z1] = hu
    return out
