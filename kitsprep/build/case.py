"""One case, start to commit: decode and check its files, window and resample it with the
kernels, write its image slices straight into their pre-allocated chunks, and save its
commit record; the checks of the label values a mask holds."""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
from numpy.typing import DTypeLike

from kitsprep import failpoints
from kitsprep.build.config import AllowedLabels, CaseJob
from kitsprep.build.resume import save_record
from kitsprep.cases import CaseRef, Volume, check_pair, read_volume
from kitsprep.errors import KitsError
from kitsprep.geometry import axcodes, axial_axes, voxel_spacing
from kitsprep.kernels.image import window_resample
from kitsprep.kernels.labels import NEGATIVE_LABEL, label_counts, labels_resample
from kitsprep.kernels.nonfinite import count_nonfinite
from kitsprep.labels import counted_values
from kitsprep.spacing import case_plane
from kitsprep.store.format import CaseMeta, CaseWritten, compress_label_slice, crc32

# Output buffer of one kernel call (float16 image; labels take half as much): at 512x512 up
# to 128 slices a call. The kernels read each column's run of slices in one go, so longer
# slabs are faster (`kitsprep.kernels`); this bounds the memory it costs.
SLAB_BYTES = 64 << 20


def _uncache(fd: int, offsets: np.ndarray, slice_bytes: int) -> None:
    """posix_fadvise(DONTNEED) over these slices: drops them from the page cache once they
    are on disk; on dirty ones it starts their writeback (without waiting for it)."""
    if len(offsets) and hasattr(os, "posix_fadvise"):
        start = int(offsets.min())
        with contextlib.suppress(OSError):
            os.posix_fadvise(
                fd, start, int(offsets.max()) + slice_bytes - start, os.POSIX_FADV_DONTNEED
            )


def _write_runs(fd: int, buf: np.ndarray, offsets: np.ndarray) -> None:
    """pwrite consecutive slices as one call wherever their chunks are adjacent on disk."""
    n = buf.shape[0]
    slice_bytes = buf[0].nbytes
    flat = buf.reshape(n, -1).view(np.uint8)
    start = 0
    while start < n:
        end = start + 1
        while end < n and offsets[end] == offsets[end - 1] + slice_bytes:
            end += 1
        os.pwrite(fd, flat[start:end].reshape(-1), int(offsets[start]))
        start = end


@dataclass(frozen=True)
class Loaded:
    """A case inflated and checked, ready for the kernels."""

    imaging: Volume
    segmentation: Volume | None


def load_case(ref: CaseRef) -> Loaded:
    """Read and inflate both files and check them."""
    return _finish_load(ref, read_volume(ref.imaging, ref.case_id))


def _finish_load(ref: CaseRef, vol: Volume | Future) -> Loaded:
    """The segmentation and the checks, given the imaging (or a future of it, still being
    inflated by another thread: then both inflate at once). The imaging's errors come
    first, as if it had been read first."""
    seg = seg_error = None
    if ref.segmentation is not None:
        try:
            seg = read_volume(ref.segmentation, ref.case_id)
        except KitsError as exc:
            seg_error = exc
    if isinstance(vol, Future):
        vol = vol.result()
    if seg_error is not None:
        raise seg_error
    if seg is not None:
        check_pair(ref.case_id, vol.header, seg.header)
    bad = count_nonfinite(vol.data)
    if bad:
        raise KitsError(
            f"{ref.case_id}: imaging holds {bad} NaN/Inf voxels; the scan is "
            "damaged, re-download it or skip it with --skip-bad"
        )
    return Loaded(vol, seg)


# Imaging volumes inflated (or being inflated) by the thread that runs `workers._run_here`,
# ahead of their case: `process_case` takes its case's from here when it is there (its
# signature stays `process_case(job)`).
read_ahead: dict[CaseRef, Future] = {}


def _loaded(ref: CaseRef) -> Loaded:
    ahead = read_ahead.pop(ref, None)
    return load_case(ref) if ahead is None else _finish_load(ref, ahead)


def _slab_len(n_slices: int, size: int) -> int:
    """Slices per kernel call: as many as SLAB_BYTES of float16 hold, split evenly."""
    most = max(1, SLAB_BYTES // (2 * size * size))
    calls = -(-n_slices // most)
    return max(1, -(-n_slices // max(1, calls)))


_buffers = threading.local()  # one process_case at a time per thread


def _buffer(name: str, shape: tuple[int, ...], dtype: DTypeLike) -> np.ndarray:
    """An uninitialised array on a cache-line boundary (the kernels' row segments are then
    whole lines), kept per thread and reused by the next case: no page faults per case."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = getattr(_buffers, name, None)
    if raw is None or raw.nbytes < nbytes + 64:
        raw = np.empty(nbytes + 64, np.uint8)
        raw[::4096] = 0  # fault its pages in now
        setattr(_buffers, name, raw)
    start = -raw.ctypes.data % 64
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def process_case(job: CaseJob) -> CaseWritten:
    """Decode and check one case (or take it from `read_ahead`), window and resample it,
    write its image slices into the store and its commit record. Runs in a worker process,
    or on the kernel thread of `workers._run_here`."""
    ref, window = job.ref, job.window
    # Output buffers first: on the kernel thread of `workers._run_here` their first touch then
    # overlaps the inflating of this case's imaging.
    n_slab = _slab_len(len(job.offsets), job.size)
    slab = _buffer("image", (n_slab, job.size, job.size), np.float16)
    lab_slab = None
    if ref.segmentation is not None:
        lab_slab = _buffer("labels", (n_slab, job.size, job.size), np.uint8)
    loaded = _loaded(ref)
    vol, seg = loaded.imaging, loaded.segmentation
    affine = vol.header.affine
    axes = axial_axes(affine)
    image = vol.data.transpose(axes)
    n_slices, h, w = image.shape
    if n_slices != len(job.offsets):  # the file changed after the build was planned
        raise KitsError(
            f"{ref.case_id}: {ref.imaging.name} now has {n_slices} slices, but "
            f"the build planned {len(job.offsets)}; start over with --overwrite"
        )
    spacing = tuple(voxel_spacing(affine)[a] for a in axes)
    labels = seg.data.transpose(axes) if seg is not None else None
    plane = case_plane(
        image, vol.header.slope, vol.header.inter, spacing[1:], job.size, job.target_spacing, labels
    )
    counts = label_counts(n_slices, counted_values(job.labels.labels))
    crc = np.zeros(n_slices, np.uint32)
    chunks: list[bytes] | None = [] if seg is not None else None
    top = 0
    if (plane.new_h, plane.new_w) != (job.size, job.size):  # else the kernels fill them
        slab[...] = window.pad_value
        if lab_slab is not None:
            lab_slab[...] = 0
    slice_bytes = job.size * job.size * 2
    fd = os.open(job.store, os.O_WRONLY)
    try:
        for s0 in range(0, n_slices, n_slab):
            s1 = min(s0 + n_slab, n_slices)
            out = window_resample(
                image, vol.header.slope, vol.header.inter, window, plane, s0, s1, slab[: s1 - s0]
            )
            _write_runs(fd, out, job.offsets[s0:s1])
            failpoints.hit(f"write {ref.case_id} slices {s0}-{s1}")
            _uncache(fd, job.offsets[s0:s1], slice_bytes)  # starts their writeback
            crc[s0:s1] = [crc32(out[i]) for i in range(s1 - s0)]
            if labels is not None:
                lab, t = labels_resample(labels, plane, counts, s0, s1, lab_slab[: s1 - s0])
                top = max(top, t)
                chunks.extend(compress_label_slice(lab[i]) for i in range(s1 - s0))
            if job.fsync:
                os.fdatasync(fd)  # slab by slab: their writeback is mostly done by now
            # Out of the page cache once on disk: nothing reads it during the build, and
            # the next slab's writes reuse those pages instead of taking fresh memory (slow
            # to get, notably in VMs; the store may also be far larger than RAM).
            _uncache(fd, job.offsets[s0:s1], slice_bytes)
    finally:
        os.close(fd)
    if labels is not None:
        _check_label_values(ref.case_id, counts, top, job.labels)
    fingerprint = {
        "imaging": vol.fingerprint,
        "imaging_dtype": str(vol.header.dtype),
        "slope": vol.header.slope,
        "inter": vol.header.inter,
    }
    if seg is not None:
        fingerprint.update(segmentation=seg.fingerprint, segmentation_dtype=str(seg.header.dtype))
    meta = CaseMeta(
        case_id=ref.case_id,
        labelled=seg is not None,
        slices=n_slices,
        row_start=0,
        source_shape=tuple(int(v) for v in vol.header.shape),
        spacing=spacing,
        affine=affine,
        axcodes=axcodes(affine),
        axes=axes,
        in_plane=plane,
        fingerprint=fingerprint,
        unlabelled_reason=ref.unlabelled_reason,
    )
    written = CaseWritten(meta, counts, chunks, top, crc)
    save_record(job.record, written, job.fsync)
    return written


def present_values(counts: np.ndarray, top: int) -> list[int]:
    """Foreground label values a case holds, from its per-slice counts of values 1..k and
    its largest label (`labels_resample` reports a negative label v as NEGATIVE_LABEL - v)."""
    found = {int(v) + 1 for v in np.flatnonzero(np.asarray(counts).sum(0))}
    if top > NEGATIVE_LABEL:
        found.add(int(NEGATIVE_LABEL - top))
    elif top > counts.shape[1]:
        found.add(int(top))
    return sorted(found)


def _check_label_values(case_id: str, counts: np.ndarray, top: int, allowed: AllowedLabels) -> None:
    unknown = allowed.unknown_values(present_values(counts, top))
    if unknown:
        shown = ", ".join(str(v) for v in unknown)
        names = ", ".join(f"{v} {n}" for n, v in allowed.labels)
        raise KitsError(
            f"{case_id}: segmentation holds label value(s) {shown}, outside the labels of "
            f"{allowed.name} (0 background, {names}); fix the mask, choose another --edition, "
            "or pass --skip-bad to leave the case out"
        )
