"""numba kernels: the per-voxel work of a build, one fused pass each.

`window_resample` reads the raw stored voxels (any dtype, any strides), applies the NIfTI
scale/intercept, clips and normalises (window), resamples in-plane (bilinear, half-pixel
centres), and writes IEEE float16 bits. `labels_resample` does nearest neighbour for labels
and counts classes per slice on the way.

Memory order is what these kernels are about. NIfTI volumes are Fortran-ordered: the slice
axis is contiguous, and for one column x the whole (slice, row) plane is one contiguous run.
The output is C-ordered (slices, size, size). So the work is a 3D transpose of slices and
columns with the rows in the middle, plus arithmetic. Both kernels walk tiles of up to _TS
slices x one block of output columns, with the rows inside a tile:
- reads: per row, each column of the block is one contiguous run over the tile's slices
  (with the whole call range in one tile, the column's plane is read front to back): a few
  streams, which a software prefetch of the next row's runs keeps ahead of;
- compute: along each run (a view indexed from 0, so it vectorises), into a tile buffer;
- writes: the tile buffer is transposed in registers (8x8 uint16, 16x16 uint8 blocks) into
  one segment per slice of whole cache lines, whose next-row counterparts are prefetched
  for writing so the stores don't wait for each line's read-for-ownership in turn.
Longer slice ranges per call mean longer runs: callers should pass many slices at once.
Results are bit-exact with the plain per-voxel formulas (no fastmath: the float32
operations, their order and the float16 rounding are those of the reference).

One module a job: `image` (`window_resample`, `f32_to_f16_bits`), `labels`
(`labels_resample`), `nonfinite` (`count_nonfinite`), `tiles` (tile sizes, prefetch and
write helpers, flat views) and `intrinsics` (the LLVM instructions they use). Names with
a leading underscore are this package's own, shared between its modules.

numba's on-disk cache (`cache=True`) checks only the file of the function it caches: after
editing `tiles.py` or `intrinsics.py`, delete `kitsprep/kernels/__pycache__` (or touch
`image.py` and `labels.py`), or the kernels keep their old machine code.
"""

from kitsprep.kernels.image import f32_to_f16_bits, window_resample
from kitsprep.kernels.labels import (
    MAX_LABEL_VALUES,
    NEGATIVE_LABEL,
    label_counts,
    labels_resample,
)
from kitsprep.kernels.nonfinite import count_nonfinite

__all__ = [
    "MAX_LABEL_VALUES",
    "NEGATIVE_LABEL",
    "count_nonfinite",
    "f32_to_f16_bits",
    "label_counts",
    "labels_resample",
    "window_resample",
]
