"""`kitsprep build`: every case -> one store, in parallel, atomically, resumably.

How it stays correct when killed at any instant:
1. Headers are read first (cheap), so the whole layout is known before any voxel is decoded;
   `store.create_layout` creates every dataset with image chunks allocated up front, in
   `OUT.partial/store.h5`, and records the plan in `OUT.partial/manifest.json`.
2. Worker processes decode cases and write image slices with `pwrite` straight to their
   pre-allocated chunks (disjoint byte ranges; the HDF5 metadata is never touched), fsync,
   then drop the case's labels and counts in `OUT.partial/cases/<id>.npz` by atomic rename.
   That file is the case's commit record: `--resume` redoes every case without one.
3. The single writer (`store.finalize`) then writes labels, attributes and the index, and
   the store is renamed onto OUT. A file at OUT is therefore always complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import (
    FIRST_COMPLETED,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import DTypeLike

from kitsprep import __version__
from kitsprep.cases import (
    CaseRef,
    Volume,
    check_pair,
    find_cases,
    folder_edition,
    read_header,
    read_volume,
    select_cases,
    source_fingerprint,
)
from kitsprep.errors import KitsError
from kitsprep.files import atomic_path, check_output_folder, fsync_path, write_atomic
from kitsprep.geometry import axcodes, axial_axes, fit_in_plane, voxel_spacing
from kitsprep.kernels import (
    NEGATIVE_LABEL,
    count_nonfinite,
    labels_resample,
    window_resample,
)
from kitsprep.labels import ANY_EDITION, EDITIONS, LabelSet, any_edition_labels
from kitsprep.store import (
    CaseMeta,
    CasePlan,
    CaseWritten,
    clear_write_flags,
    compress_label_slice,
    crc32,
    create_layout,
    finalize,
    image_offsets,
)
from kitsprep.window import Window

# Output buffer of one kernel call (float16 image; labels take half as much): at 512x512 up
# to 128 slices a call. The kernels read each column's run of slices in one go, so longer
# slabs are faster (kernels.py); this bounds the memory it costs.
SLAB_BYTES = 64 << 20


@dataclass(frozen=True)
class AllowedLabels:
    """The label values a case's mask may hold, and the name a refusal gives them: an
    edition's labels, or under ``--edition auto`` (edition not known yet) any edition's."""

    name: str  # an edition, or labels.ANY_EDITION
    labels: tuple[tuple[str, int], ...]  # (name, value) of the foreground labels

    def unknown_values(self, present: list[int]) -> list[int]:
        """Values among ``present`` that are neither background nor one of these labels."""
        allowed = {0, *(v for _, v in self.labels)}
        return sorted(int(v) for v in present if int(v) not in allowed)


@dataclass(frozen=True)
class BuildConfig:
    src: Path
    out: Path
    window: Window
    size: int = 512
    workers: int = 1
    cases: str | None = None
    resume: bool = False
    overwrite: bool = False
    skip_bad: bool = False
    fsync: bool = True
    edition: str = "auto"  # a key of labels.EDITIONS, or "auto" (from the folder or masks)

    def identity(self) -> dict:
        """The options that decide the store's contents: a resume must match them."""
        return {
            "size": self.size,
            "window": json.loads(self.window.to_json()),
            "edition": self.edition,
        }

    @property
    def allowed_labels(self) -> AllowedLabels:
        """The labels a mask may hold: the edition's; under auto, a value no edition has is
        refused now and the edition is decided once every case is read (`decide_labels`)."""
        if self.edition == "auto":
            return AllowedLabels(ANY_EDITION, any_edition_labels())
        return AllowedLabels(self.edition, EDITIONS[self.edition].labels)


@dataclass(frozen=True)
class CaseJob:
    ref: CaseRef
    store: Path
    offsets: np.ndarray
    size: int
    window: Window
    record: Path
    fsync: bool
    labels: AllowedLabels  # values outside it stop the case


@dataclass(frozen=True)
class CaseEvent:
    """Progress: one case finished (or was skipped as bad)."""

    case_id: str
    slices: int
    seconds: float
    error: str | None = None
    resumed: bool = False


@dataclass
class BuildReport:
    out: Path
    cases: int
    slices: int
    bytes: int
    seconds: float
    resumed_cases: int = 0
    bad_cases: dict[str, str] = field(default_factory=dict)
    edition: str = ""
    edition_reason: str = ""
    compile_seconds: float = 0.0  # kernels compiled or loaded from cache; not in `seconds`

    @property
    def slices_per_s(self) -> float:
        """The build's rate, kernel compilation excluded (what a rerun would see)."""
        return self.slices / self.seconds if self.seconds > 0 else float("inf")


def partial_dir(out: Path) -> Path:
    """Where a build of ``out`` lives until it is complete (and where --resume finds it)."""
    return out.with_name(out.name + ".partial")


# --------------------------------------------------------------------------- one case


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


# Imaging volumes inflated (or being inflated) by the thread that runs `_run_here`, ahead
# of their case: `process_case` takes its case's from here when it is there (its signature
# stays `process_case(job)`).
_read_ahead: dict[CaseRef, Future] = {}


def _loaded(ref: CaseRef) -> Loaded:
    ahead = _read_ahead.pop(ref, None)
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
    """Decode and check one case (or take it from `_read_ahead`), window and resample it,
    write its image slices into the store and its commit record. Runs in a worker process,
    or on the kernel thread of `_run_here`."""
    ref, window = job.ref, job.window
    # Output buffers first: on the kernel thread of `_run_here` their first touch then
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
    plane = fit_in_plane(h, w, job.size)
    counts = np.zeros((n_slices, 3), np.int64)
    crc = np.zeros(n_slices, np.uint32)
    chunks: list[bytes] | None = [] if seg is not None else None
    labels = seg.data.transpose(axes) if seg is not None else None
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
        spacing=tuple(voxel_spacing(affine)[a] for a in axes),
        affine=affine,
        axcodes=axcodes(affine),
        axes=axes,
        in_plane=plane,
        fingerprint=fingerprint,
        unlabelled_reason=ref.unlabelled_reason,
    )
    written = CaseWritten(meta, counts, chunks, top, crc)
    _save_record(job.record, written)
    return written


def present_values(counts: np.ndarray, top: int) -> list[int]:
    """Foreground label values a case holds, from its per-slice counts of values 1..3 and
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


def decide_labels(
    requested: str, written: list[CaseWritten], folder: tuple[str, str] | None = None
) -> tuple[LabelSet, str]:
    """The store's label set, and why: the requested edition; under ``auto`` the edition the
    source folder declares (`cases.folder_edition`), else KiTS23 when any mask holds a label
    only KiTS21/23 have (a cyst), else KiTS19."""
    if requested != "auto":
        return EDITIONS[requested], "--edition"
    if folder is not None:
        return EDITIONS[folder[0]], folder[1]
    kits19 = EDITIONS["kits19"]
    for w in written:
        if w.label_chunks is not None and kits19.unknown_values(
            present_values(w.counts, w.max_label)
        ):
            return EDITIONS["kits23"], f"{w.meta.case_id} holds a cyst label"
    return kits19, "no mask holds a label beyond kidney and tumour"


def _save_record(path: Path, w: CaseWritten) -> None:
    meta = {
        **w.meta.__dict__,
        "affine": w.meta.affine.tolist(),
        "in_plane": w.meta.in_plane.as_dict(),
    }
    chunks = w.label_chunks or []
    lengths = np.array([len(c) for c in chunks], np.int64)
    blob = np.frombuffer(b"".join(chunks), np.uint8)
    # The record is the case's commit: atomic, so --resume never trusts half of one.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            meta=json.dumps(meta),
            counts=w.counts,
            lengths=lengths,
            blob=blob,
            labelled=w.label_chunks is not None,
            top=w.max_label,
            crc=w.image_crc,
        )


def _load_record(path: Path) -> CaseWritten:
    from kitsprep.geometry import InPlane

    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        meta["affine"] = np.asarray(meta["affine"])
        meta["in_plane"] = InPlane(**meta["in_plane"])
        for k in ("source_shape", "spacing", "axes"):
            meta[k] = tuple(meta[k])
        chunks = None
        if bool(z["labelled"]):
            ends = np.cumsum(z["lengths"])
            blob = z["blob"].tobytes()
            chunks = [blob[e - n : e] for e, n in zip(ends, z["lengths"], strict=True)]
        return CaseWritten(CaseMeta(**meta), z["counts"], chunks, int(z["top"]), z["crc"])


# --------------------------------------------------------------------------- whole build


def _plan(refs: list[CaseRef], skip_bad: bool, bad: dict[str, str]) -> list[CasePlan]:
    plans = []
    for ref in refs:
        try:
            img = read_header(ref.imaging, ref.case_id)
            if ref.segmentation is not None:
                check_pair(ref.case_id, img, read_header(ref.segmentation, ref.case_id))
        except KitsError as exc:
            if not skip_bad:
                raise
            bad[ref.case_id] = str(exc)
            continue
        axial = axial_axes(img.affine)[0]
        plans.append(CasePlan(ref.case_id, img.shape[axial], ref.labelled))
    return plans


def _prepare(
    cfg: BuildConfig, refs: list[CaseRef], bad: dict[str, str]
) -> tuple[Path, list[CasePlan], dict[str, np.ndarray]]:
    """Create the partial build, or reopen it for --resume after checking it matches."""
    work = partial_dir(cfg.out)
    manifest_path = work / "manifest.json"
    store = work / "store.h5"
    if work.exists() and cfg.resume and manifest_path.is_file() and store.is_file():
        manifest = json.loads(manifest_path.read_text())
        wanted = [r.case_id for r in refs]
        if manifest["identity"] != cfg.identity() or manifest["selected"] != wanted:
            raise KitsError(
                f"the interrupted build in {work} used other options or cases "
                f"({manifest['identity']}, {len(manifest['selected'])} cases); rerun it with "
                "the same --size/--window/--cases, or start over with --overwrite"
            )
        bad.update(manifest["bad"])
        plans = [CasePlan(**p) for p in manifest["plans"]]
        try:
            clear_write_flags(store)  # a kill during finalize left the file "open for write"
            offsets = image_offsets(store)
        except (OSError, KeyError) as exc:  # HDF5 metadata torn by a kill, or a stray edit
            raise KitsError(
                f"the interrupted build in {work} is damaged ({exc}); start over with --overwrite"
            ) from None
        return store, plans, offsets
    if work.exists():
        if not (cfg.overwrite or cfg.resume):
            raise KitsError(
                f"an interrupted build of {cfg.out} is in {work}; continue it with "
                "--resume, or start over with --overwrite"
            )
        shutil.rmtree(work)
    plans = _plan(refs, cfg.skip_bad, bad)
    if not plans:
        raise KitsError(f"no usable case in {cfg.src}: " + "; ".join(bad.values()))
    (work / "cases").mkdir(parents=True)
    build_opts = {
        **cfg.identity(),
        "src": str(cfg.src),
        "cases": cfg.cases,
        "skip_bad": cfg.skip_bad,
        "kitsprep_version": __version__,
    }
    offsets = create_layout(store, plans, cfg.size, cfg.window, build_opts)
    manifest = {
        "identity": cfg.identity(),
        "selected": [r.case_id for r in refs],
        "plans": [asdict(p) for p in plans],
        "bad": bad,
    }
    write_atomic(manifest_path, json.dumps(manifest, indent=1))
    return store, plans, offsets


def build_store(
    cfg: BuildConfig,
    on_case: Callable[[CaseEvent], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> BuildReport:
    """Run a build. `on_start(cases, slices)` fires once the plan is known; `on_case` after
    each case. Raises KitsError for bad input (naming the case); OUT is untouched then."""
    t0 = time.perf_counter()
    check_out_path(cfg.src, cfg.out)
    with _build_lock(cfg.out):
        try:
            return _build_locked(cfg, t0, on_case, on_start)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise KitsError(
                f"the disk holding {cfg.out} is full ({exc.strerror}"
                + (f": {exc.filename}" if exc.filename else "")
                + "); free space, "
                f"then rerun with --resume (finished cases are kept in "
                f"{partial_dir(cfg.out)})"
            ) from None


def check_out_path(src: Path, out: Path) -> None:
    """A store inside the source folder could replace a scan (`--out src/case_1/imaging...`
    with --overwrite) and would be read as data by the next build."""
    src_r, out_r = Path(src).resolve(), Path(out).resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise KitsError(
            f"--out {out} is inside --src {src}; write the store outside the "
            "source folder (e.g. --out slices.h5 next to it)"
        )
    check_output_folder(out, "--out")
    try:
        out_r.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KitsError(
            f"cannot create the folder of --out {out} ({exc.strerror}); choose "
            "an --out in a writable folder"
        ) from None


@contextlib.contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    """One build of OUT at a time: a second one is told the first is running, instead of
    being sent to --resume a build that is still going. flock, so a killed build's lock
    is free at once."""
    path = out.with_name(out.name + ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise KitsError(
            f"cannot write next to --out {out} ({exc.strerror}); choose an --out "
            "in a writable folder"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise KitsError(
                f"a build of {out} is running (process {pid}); wait for it to "
                "finish, or stop it and rerun with --resume"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
    finally:
        os.close(fd)


def _build_locked(
    cfg: BuildConfig,
    t0: float,
    on_case: Callable[[CaseEvent], None] | None,
    on_start: Callable[[int, int], None] | None,
) -> BuildReport:
    notify = on_case or (lambda e: None)
    if cfg.out.exists() and not cfg.overwrite:
        raise KitsError(
            f"{cfg.out} already exists; pass --overwrite to replace it, or choose another --out"
        )
    if cfg.out.exists() and cfg.out.is_dir():
        raise KitsError(f"--out {cfg.out} is a folder; expected a file path like slices.h5")
    refs = select_cases(find_cases(cfg.src), cfg.cases)
    bad: dict[str, str] = {}
    store, plans, offsets = _prepare(cfg, refs, bad)
    work = store.parent
    record = {p.case_id: work / "cases" / f"{p.case_id}.npz" for p in plans}
    by_id = {r.case_id: r for r in refs}
    if cfg.resume:
        _check_changed_sources(plans, by_id, record)
    todo = [p for p in plans if not record[p.case_id].is_file()]
    if on_start:
        on_start(len(plans), sum(p.slices for p in plans))
    for p in plans:
        if p not in todo:
            notify(CaseEvent(p.case_id, p.slices, 0.0, resumed=True))
    jobs = [
        CaseJob(
            by_id[p.case_id],
            store,
            offsets[p.case_id],
            cfg.size,
            cfg.window,
            record[p.case_id],
            cfg.fsync,
            cfg.allowed_labels,
        )
        for p in todo
    ]
    compile_s = _warm_kernels([j.ref for j in jobs], cfg.window) if jobs else 0.0
    _run_jobs(jobs, cfg, bad, notify)
    written = [_load_record(record[p.case_id]) for p in plans if record[p.case_id].is_file()]
    if not written:
        raise KitsError(f"every case in {cfg.src} was bad: " + "; ".join(bad.values()))
    labels, why = decide_labels(cfg.edition, written, folder_edition(cfg.src, refs))
    finalize(store, written, bad, labels, why)
    # Not `atomic_path`: the store was built in OUT.partial, where --resume finds it.
    fsync_path(store)
    os.replace(store, cfg.out)
    fsync_path(cfg.out.parent)
    shutil.rmtree(work, ignore_errors=True)
    return BuildReport(
        out=cfg.out,
        cases=len(written),
        slices=sum(w.meta.slices for w in written),
        bytes=cfg.out.stat().st_size,
        seconds=max(0.0, time.perf_counter() - t0 - compile_s),
        resumed_cases=len(plans) - len(todo),
        bad_cases=bad,
        compile_seconds=compile_s,
        edition=labels.edition,
        edition_reason=why,
    )


def _warm_kernels(refs: list[CaseRef], window: Window) -> float:
    """Compile the kernels for these cases' voxel types (the first build after an install)
    or load them from numba's cache, here, before any case is timed: the reported rate is
    then the build's, not the compiler's, and forked workers inherit them compiled. Tiny
    read-only arrays, as `read_volume` gives, so they are the build's own specialisations.
    Returns the seconds it took."""
    t = time.perf_counter()
    seen: set[tuple] = set()
    for ref in refs:
        try:
            img = read_header(ref.imaging, ref.case_id).dtype.newbyteorder("=")
            seg = (
                read_header(ref.segmentation, ref.case_id).dtype.newbyteorder("=")
                if ref.segmentation is not None
                else None
            )
        except KitsError:
            continue  # the case's own run names the problem
        if (img, seg) in seen:
            continue
        seen.add((img, seg))
        plane = fit_in_plane(2, 2, 4)
        try:
            vol = np.frombuffer(bytes(8 * img.itemsize), img).reshape((2, 2, 2), order="F")
            count_nonfinite(vol)
            window_resample(vol, 1.0, 0.0, window, plane, 0, 2, np.empty((2, 4, 4), np.float16))
            if seg is not None:
                lab = np.frombuffer(bytes(8 * seg.itemsize), seg).reshape((2, 2, 2), order="F")
                labels_resample(
                    lab, plane, np.zeros((2, 3), np.int64), 0, 2, np.empty((2, 4, 4), np.uint8)
                )
        except Exception:  # noqa: BLE001 - a voxel type the kernels refuse: the case says so
            continue
    return time.perf_counter() - t


def _check_changed_sources(
    plans: list[CasePlan], by_id: dict[str, CaseRef], record: dict[str, Path]
) -> None:
    """On --resume, a committed case whose source files changed since (a repaired case) is
    redone; any case whose slice count no longer fits the planned layout is refused by
    name, as the layout's space is fixed."""
    for p in plans:
        ref = by_id[p.case_id]
        rec = record[p.case_id]
        if rec.is_file() and _record_fingerprint(rec) == _source_fingerprints(ref):
            continue
        if ref.labelled != p.labelled:
            raise KitsError(
                f"{ref.case_id} changed since the interrupted build: its "
                "segmentation was "
                + ("added" if ref.labelled else "removed")
                + "; start over with --overwrite"
            )
        img = read_header(ref.imaging, ref.case_id)
        n = img.shape[axial_axes(img.affine)[0]]
        if n != p.slices:
            raise KitsError(
                f"{ref.case_id} changed since the interrupted build: it now has {n} "
                f"slices, the build planned {p.slices}; start over with --overwrite"
            )
        if rec.is_file():
            rec.unlink()  # redone from its new source


def _source_fingerprints(ref: CaseRef) -> dict:
    fp = {"imaging": source_fingerprint(ref.imaging)}
    if ref.segmentation is not None:
        fp["segmentation"] = source_fingerprint(ref.segmentation)
    return fp


def _record_fingerprint(path: Path) -> dict:
    with np.load(path) as z:
        fp = json.loads(str(z["meta"]))["fingerprint"]
    return {k: fp[k] for k in ("imaging", "segmentation") if k in fp}


def _run_jobs(
    jobs: list[CaseJob], cfg: BuildConfig, bad: dict[str, str], notify: Callable[[CaseEvent], None]
) -> None:
    def failed(job: CaseJob, exc: KitsError) -> None:
        if not cfg.skip_bad:
            raise KitsError(
                f"{exc} (finished cases are kept in {partial_dir(cfg.out)}; "
                "after fixing, rerun with --resume)"
            ) from None
        bad[job.ref.case_id] = str(exc)
        notify(CaseEvent(job.ref.case_id, 0, 0.0, error=str(exc)))

    if not jobs:
        return
    if cfg.workers <= 1 or len(jobs) <= 1:
        with _reuse_freed_memory():
            _run_here(jobs, failed, notify)
        return
    _run_pool(jobs, cfg, failed, notify)


def _run_here(
    jobs: list[CaseJob],
    failed: Callable[[CaseJob, KitsError], None],
    notify: Callable[[CaseEvent], None],
) -> None:
    """One process, two threads: this one inflates the imaging of case i+1 (isal releases
    the GIL) while a kernel thread inflates the small segmentation of case i and runs its
    kernels (nogil) and writes, so the build costs about its decompression, not the sum.
    Inflating the big volumes here, not on a helper thread, keeps them on the main malloc
    arena, where `_reuse_freed_memory` applies. Two imaging volumes in flight at most."""
    imaging: list[Future | None] = [Future() for _ in jobs]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kitsprep-kernels") as kernels:
        try:
            _read_ahead[jobs[0].ref] = imaging[0]
            for i, job in enumerate(jobs):
                t = time.perf_counter()
                running = kernels.submit(process_case, job)
                if i == 0:  # the kernel thread inflates the segmentation meanwhile
                    _inflate_imaging(job.ref, imaging[0])
                if i + 1 < len(jobs):
                    _read_ahead[jobs[i + 1].ref] = imaging[i + 1]
                    _inflate_imaging(jobs[i + 1].ref, imaging[i + 1])
                try:
                    w = running.result()
                except KitsError as exc:
                    failed(job, exc)
                    continue
                finally:
                    _read_ahead.pop(job.ref, None)
                    imaging[i] = None  # the volume goes with its case
                notify(CaseEvent(job.ref.case_id, w.meta.slices, time.perf_counter() - t))
        finally:
            _read_ahead.clear()
            for ahead in imaging:  # never leave the kernel thread waiting on one
                if ahead is not None and not ahead.done():
                    ahead.set_exception(KitsError("the build stopped"))


def _inflate_imaging(ref: CaseRef, into: Future) -> None:
    """read_volume of the imaging into `into`: a bad file's KitsError goes there too, for
    process_case to raise; anything else is set there (so the kernel thread never waits
    forever) and raised here."""
    try:
        into.set_result(read_volume(ref.imaging, ref.case_id))
    except KitsError as exc:
        into.set_exception(exc)
    except BaseException as exc:
        into.set_exception(exc)
        raise


def _run_pool(
    jobs: list[CaseJob],
    cfg: BuildConfig,
    failed: Callable[[CaseJob, KitsError], None],
    notify: Callable[[CaseEvent], None],
) -> None:
    """Worker processes, one case each at a time. Jobs go in no faster than workers take
    them (two queued a worker), so memory stays a few volumes a worker. Biggest cases first
    (by compressed size, which is what decoding costs), so no worker is left with a big one
    at the end while the others idle."""
    n_workers = min(cfg.workers, len(jobs))
    with ProcessPoolExecutor(
        max_workers=n_workers, mp_context=_pool_context(), initializer=_worker_init
    ) as pool:
        pending: dict[Future, tuple[CaseJob, float]] = {}
        queue = sorted(jobs, key=_job_cost, reverse=True)
        try:
            while queue or pending:
                while queue and len(pending) < n_workers * 2:
                    job = queue.pop(0)
                    pending[pool.submit(process_case, job)] = (job, time.perf_counter())
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    job, t = pending.pop(fut)
                    try:
                        w = fut.result()
                    except KitsError as exc:
                        failed(job, exc)
                        continue
                    except BrokenProcessPool:
                        cases = ", ".join(
                            sorted({job.ref.case_id} | {j.ref.case_id for j, _ in pending.values()})
                        )
                        raise KitsError(
                            f"a worker process died (killed, most likely out of memory) while "
                            f"building {cases}; finished cases are kept in "
                            f"{partial_dir(cfg.out)}: rerun with fewer --workers (e.g. "
                            f"--workers {max(1, n_workers // 2)}) and --resume"
                        ) from None
                    notify(CaseEvent(job.ref.case_id, w.meta.slices, time.perf_counter() - t))
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


def _job_cost(job: CaseJob) -> int:
    try:
        return sum(
            p.stat().st_size for p in (job.ref.imaging, job.ref.segmentation) if p is not None
        )
    except OSError:
        return 0  # process_case will name the problem


def _pool_context() -> multiprocessing.context.BaseContext:
    """'fork' when this process runs no other thread: workers start in milliseconds with
    everything imported (spawn re-imports numba, h5py and nibabel and reloads the kernels in
    each worker, about a second). Forking while another thread may hold a lock is unsafe,
    so otherwise 'forkserver' (its server imports this module once), else 'spawn'."""
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


def _worker_init() -> None:
    _tune_malloc(True)


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _tune_malloc(reuse: bool) -> bool:
    """glibc serves each inflated volume (hundreds of MB) with a fresh mmap and unmaps it
    when freed, so every case page-faults its volumes in again, which costs about a third as
    much as inflating them. `reuse`: keep big blocks on the heap (no mmap, no trimming) so
    the next case reuses memory that is already mapped; the heap then holds the build's
    peak, a few volumes. It pays where big blocks come from the main arena: the main
    thread's, as in `_run_here` and in worker processes. False: the free heap goes back to
    the system and both thresholds to glibc's start values (128 KiB), so a process that
    goes on after a build (a notebook, a test run) keeps a lean heap; glibc no longer
    adapts them once set. No-op off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if reuse:
        return bool(
            mallopt(_M_MMAP_THRESHOLD, 1 << 30) and mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
        )
    mallopt(_M_MMAP_THRESHOLD, 128 << 10)
    mallopt(_M_TRIM_THRESHOLD, 128 << 10)
    with contextlib.suppress(AttributeError):
        libc.malloc_trim(0)
    return True


@contextlib.contextmanager
def _reuse_freed_memory() -> Iterator[None]:
    tuned = _tune_malloc(True)
    try:
        yield
    finally:
        if tuned:
            _tune_malloc(False)
