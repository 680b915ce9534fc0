"""One synthetic case in memory: its configuration, its draws in order (size, spacing,
layout, kidneys, tumours, cysts, tissues, HU), and how it will be stored. Pure and
deterministic; `write` puts it on disk."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kitsprep.errors import KitsError
from kitsprep.synth.anatomy import tissue_classes
from kitsprep.synth.cyst import CYST_KINDS, grow_cysts
from kitsprep.synth.kidney import Pelvis, draw_kidneys, place_kidneys
from kitsprep.synth.layout import Layout, draw_body, layout_from_mask
from kitsprep.synth.render import render
from kitsprep.synth.tumour import grow_tumours

SYNTH_EDITIONS = ("kits19", "kits23")  # kits23 adds cysts (label 3) and kits23.json
# Slice thicknesses that occur in KiTS19 (mm).
THICKNESSES = (0.5, 1.0, 1.25, 2.0, 2.5, 3.0, 3.75, 4.0, 5.0)
# Real 512x796 case: one non-square case keeps code honest about rows != cols.
WIDE_RATIO = 796 / 512


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
        """Whether the case has a mask (the cohort's last case has none, like KiTS19's test
        cases)."""
        return self.segmentation is not None


def check_config(cfg: SynthConfig) -> None:
    """Refuse a configuration the generator cannot honour, saying what it accepts."""
    if cfg.cases < 1:
        raise KitsError(f"cases must be at least 1, got {cfg.cases}")
    if cfg.size < 16:
        raise KitsError(f"size must be at least 16 pixels, got {cfg.size}")
    if cfg.edition not in SYNTH_EDITIONS:
        raise KitsError(f"edition must be one of {', '.join(SYNTH_EDITIONS)}, got {cfg.edition!r}")


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


def make_case(index: int, cfg: SynthConfig) -> SynthCase:
    """Generate case ``index`` of the cohort ``cfg`` in memory (pure, deterministic)."""
    check_config(cfg)
    if not 0 <= index < cfg.cases:
        raise KitsError(f"case index {index} outside 0..{cfg.cases - 1}")
    # SeedSequence wants non-negative words; a negative seed (the CLI allows any int) wraps.
    seed = cfg.seed % 2**64 if cfg.seed < 0 else cfg.seed
    rng = np.random.default_rng([seed, index])
    special = cfg.cases >= 3  # the odd cases only make sense in a cohort with room for them
    rows = cfg.size
    cols = round(cfg.size * WIDE_RATIO) if special and index == 1 else cfg.size
    lo = max(8, cfg.size // 4)
    slices = int(rng.integers(lo, max(lo, cfg.size // 2) + 1))
    thick = float(rng.choice(THICKNESSES))
    # Multiples of 1/1024 mm are exact in float32, so the affine reads back bit-identical.
    px = round(float(rng.uniform(0.6, 1.0)) * 1024) / 1024
    shape = (slices, rows, cols)

    # The anatomy is drawn on a nominal 512-pixel grid scale and a 300-420 mm coverage.
    layout = draw_body(shape, ez=rng.uniform(300, 420) / slices, pe=px * 512 / rows, rng=rng)
    cysts = CYST_KINDS[index % len(CYST_KINDS)] if cfg.edition == "kits23" else "no_cyst"
    seg, pelvis, kidneys = draw_kidneys(layout, rng)
    if cysts != "cysts_only":
        grow_tumours(seg, layout, kidneys, rng)
    layout = place_kidneys(seg, layout, kidneys)
    if cysts != "no_cyst":
        # A stream of their own: the anatomy around the cysts is the KiTS19 case's.
        cyst_rng = np.random.default_rng([seed, index, 3])
        grow_cysts(seg, layout, cyst_rng, beside_tumour=cysts == "cyst_beside_tumour")
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
        raise KitsError(f"segmentation must be a non-empty 3D array, got shape {seg.shape}")
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise KitsError(f"spacing must be three positive numbers, got {spacing!r}")
    layout = layout_from_mask(seg, spacing, rng)
    return _paint(seg, layout, rng, ())


def _paint(seg: np.ndarray, layout: Layout, rng: np.random.Generator, pelvis: Pelvis) -> np.ndarray:
    """Tissue classes around the mask, then HU with texture, correlated noise and blur."""
    cls, mode = tissue_classes(seg, layout, rng, pelvis)
    return render(cls, mode, layout, rng)
