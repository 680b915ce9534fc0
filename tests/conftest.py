"""Shared fixtures: one small slice store, built once per session from hand-written NIfTI."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from kitsprep.build import BuildConfig, build_store
from kitsprep.window import WINDOW_PRESETS

KITS_AFFINE = np.array(
    [[0.0, 0.0, -0.8, 0.0], [0.0, -0.8, 0.0, 0.0], [-2.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)

# (slices, rows, cols) per labelled case; one non-square case is resampled into the store
LOADER_CASES = [(7, 32, 32), (9, 32, 32), (5, 40, 48), (8, 32, 32), (6, 32, 32), (10, 32, 32)]
LOADER_UNLABELLED = (4, 32, 32)
LOADER_SIZE = 32


def write_kits_case(
    root: Path,
    case_id: str,
    image: np.ndarray,
    seg: np.ndarray | None,
    affine: np.ndarray = KITS_AFFINE,
    gz: bool = True,
) -> Path:
    """`root/case_id/imaging.nii[.gz]` float32 HU (+ `segmentation` uint8 when given)."""
    folder = Path(root) / case_id
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".nii.gz" if gz else ".nii"
    nib.save(nib.Nifti1Image(np.asarray(image, np.float32), affine), folder / f"imaging{ext}")
    if seg is not None:
        nib.save(nib.Nifti1Image(np.asarray(seg, np.uint8), affine), folder / f"segmentation{ext}")
    return folder


def blob_labels(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Kidney boxes on the middle slices, tumour inside some of them, empty ends."""
    n, h, w = shape
    rng = np.random.default_rng(seed)
    seg = np.zeros(shape, np.uint8)
    for s in range(n // 4, n - n // 4):
        y, x = rng.integers(2, h // 2), rng.integers(2, w // 2)
        seg[s, y : y + h // 3, x : x + w // 3] = 1
        if s % 2 == 0:
            seg[s, y + 1 : y + 4, x + 1 : x + 4] = 2
    return seg


@pytest.fixture(scope="session")
def loader_store(tmp_path_factory) -> Path:
    """Six labelled cases (5-10 slices, 32x32 store) and one unlabelled case."""
    root = tmp_path_factory.mktemp("loader_store")
    src = root / "src"
    rng = np.random.default_rng(0)
    for i, shape in enumerate(LOADER_CASES):
        hu = rng.uniform(-300, 500, shape).astype(np.float32)
        write_kits_case(src, f"case_{i:05d}", hu, blob_labels(shape, i))
    n = len(LOADER_CASES)
    write_kits_case(src, f"case_{n:05d}", rng.uniform(-300, 500, LOADER_UNLABELLED), None)
    out = root / "s.h5"
    build(src, out, size=LOADER_SIZE, workers=1)
    return out


def build(src: Path, out: Path, size: int = 32, window: str = "mlperf", **kw):
    """build_store with test defaults: tiny size, one worker, no fsync (speed only)."""
    cfg = BuildConfig(
        src=Path(src),
        out=Path(out),
        window=WINDOW_PRESETS[window],
        size=size,
        fsync=kw.pop("fsync", False),
        **kw,
    )
    return build_store(cfg)
