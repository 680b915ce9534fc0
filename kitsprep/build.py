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

import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from kitsprep import __version__
from kitsprep.cases import CaseRef, check_pair, find_cases, read_header, read_volume, select_cases
from kitsprep.errors import KitsError
from kitsprep.geometry import axcodes, axial_axes, fit_in_plane, voxel_spacing
from kitsprep.kernels import count_nonfinite, labels_resample, window_resample
from kitsprep.store import (
    CaseMeta,
    CasePlan,
    CaseWritten,
    compress_label_slice,
    crc32,
    create_layout,
    finalize,
    image_offsets,
)
from kitsprep.window import Window

SLAB = 32  # slices decoded per kernel call: bounds the output buffer to SLAB*size*size*2


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

    def identity(self) -> dict:
        """The options that decide the store's contents: a resume must match them."""
        return {"size": self.size, "window": json.loads(self.window.to_json())}


@dataclass(frozen=True)
class CaseJob:
    ref: CaseRef
    store: Path
    offsets: np.ndarray
    size: int
    window: Window
    record: Path
    fsync: bool


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

    @property
    def slices_per_s(self) -> float:
        return self.slices / self.seconds if self.seconds > 0 else float("inf")


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


# --------------------------------------------------------------------------- one case


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


def process_case(job: CaseJob) -> CaseWritten:
    """Decode, check, window and resample one case; write its image slices into the store
    and its commit record. Runs in a worker process."""
    ref, window = job.ref, job.window
    vol = read_volume(ref.imaging, ref.case_id)
    seg = None
    if ref.segmentation is not None:
        seg = read_volume(ref.segmentation, ref.case_id)
        check_pair(ref.case_id, vol.header, seg.header)
    bad = count_nonfinite(vol.data)
    if bad:
        raise KitsError(f"{ref.case_id}: imaging holds {bad} NaN/Inf voxels; the scan is "
                        "damaged, re-download it or skip it with --skip-bad")
    affine = vol.header.affine
    axes = axial_axes(affine)
    image = vol.data.transpose(axes)
    n_slices, h, w = image.shape
    plane = fit_in_plane(h, w, job.size)
    counts = np.zeros((n_slices, 3), np.int64)
    crc = np.zeros(n_slices, np.uint32)
    chunks: list[bytes] | None = [] if seg is not None else None
    labels = seg.data.transpose(axes) if seg is not None else None
    top = 0
    slab = np.full((SLAB, job.size, job.size), window.pad_value, np.float16)
    lab_slab = np.zeros((SLAB, job.size, job.size), np.uint8)
    fd = os.open(job.store, os.O_WRONLY)
    try:
        for s0 in range(0, n_slices, SLAB):
            s1 = min(s0 + SLAB, n_slices)
            out = window_resample(image, vol.header.slope, vol.header.inter, window, plane,
                                  s0, s1, slab[: s1 - s0])
            _write_runs(fd, out, job.offsets[s0:s1])
            crc[s0:s1] = [crc32(out[i]) for i in range(s1 - s0)]
            if labels is not None:
                lab, t = labels_resample(labels, plane, counts, s0, s1, lab_slab[: s1 - s0])
                top = max(top, t)
                chunks.extend(compress_label_slice(lab[i]) for i in range(s1 - s0))
        if job.fsync:
            os.fdatasync(fd)
    finally:
        os.close(fd)
    if top > 255:
        raise KitsError(f"{ref.case_id}: segmentation holds label {top}; labels must be "
                        "0..255 (KiTS uses 0 background, 1 kidney, 2 tumour, 3 cyst)")
    fingerprint = {"imaging": vol.fingerprint, "imaging_dtype": str(vol.header.dtype),
                   "slope": vol.header.slope, "inter": vol.header.inter}
    if seg is not None:
        fingerprint.update(segmentation=seg.fingerprint, segmentation_dtype=str(seg.header.dtype))
    meta = CaseMeta(
        case_id=ref.case_id, labelled=seg is not None, slices=n_slices, row_start=0,
        source_shape=tuple(int(v) for v in vol.header.shape),
        spacing=tuple(voxel_spacing(affine)[a] for a in axes), affine=affine,
        axcodes=axcodes(affine), axes=axes, in_plane=plane, fingerprint=fingerprint)
    written = CaseWritten(meta, counts, chunks, top, crc)
    _save_record(job.record, written)
    return written


def _save_record(path: Path, w: CaseWritten) -> None:
    meta = {**w.meta.__dict__, "affine": w.meta.affine.tolist(),
            "in_plane": w.meta.in_plane.as_dict()}
    chunks = w.label_chunks or []
    lengths = np.array([len(c) for c in chunks], np.int64)
    blob = np.frombuffer(b"".join(chunks), np.uint8)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, meta=json.dumps(meta), counts=w.counts, lengths=lengths, blob=blob,
             labelled=w.label_chunks is not None, top=w.max_label, crc=w.image_crc)
    os.replace(tmp, path)


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
            chunks = [blob[e - n:e] for e, n in zip(ends, z["lengths"])]
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


def _prepare(cfg: BuildConfig, refs: list[CaseRef], bad: dict[str, str]
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
                "the same --size/--window/--cases, or start over with --overwrite")
        bad.update(manifest["bad"])
        plans = [CasePlan(**p) for p in manifest["plans"]]
        try:
            offsets = image_offsets(store)
        except (OSError, KeyError) as exc:  # HDF5 metadata torn by a kill, or a stray edit
            raise KitsError(f"the interrupted build in {work} is damaged ({exc}); start over "
                            "with --overwrite") from None
        return store, plans, offsets
    if work.exists():
        if not (cfg.overwrite or cfg.resume):
            raise KitsError(f"an interrupted build of {cfg.out} is in {work}; continue it with "
                            "--resume, or start over with --overwrite")
        shutil.rmtree(work)
    plans = _plan(refs, cfg.skip_bad, bad)
    if not plans:
        raise KitsError(f"no usable case in {cfg.src}: " + "; ".join(bad.values()))
    (work / "cases").mkdir(parents=True)
    build_opts = {**cfg.identity(), "src": str(cfg.src), "cases": cfg.cases,
                  "skip_bad": cfg.skip_bad, "kitsprep_version": __version__}
    offsets = create_layout(store, plans, cfg.size, cfg.window, build_opts)
    manifest = {"identity": cfg.identity(), "selected": [r.case_id for r in refs],
                "plans": [asdict(p) for p in plans], "bad": bad}
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, manifest_path)
    return store, plans, offsets


def build_store(cfg: BuildConfig, on_case: Callable[[CaseEvent], None] | None = None,
                on_start: Callable[[int, int], None] | None = None) -> BuildReport:
    """Run a build. `on_start(cases, slices)` fires once the plan is known; `on_case` after
    each case. Raises KitsError for bad input (naming the case); OUT is untouched then."""
    t0 = time.perf_counter()
    notify = on_case or (lambda e: None)
    if cfg.out.exists() and not cfg.overwrite:
        raise KitsError(f"{cfg.out} already exists; pass --overwrite to replace it, or choose "
                        "another --out")
    if cfg.out.exists() and cfg.out.is_dir():
        raise KitsError(f"--out {cfg.out} is a folder; expected a file path like slices.h5")
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    refs = select_cases(find_cases(cfg.src), cfg.cases)
    bad: dict[str, str] = {}
    store, plans, offsets = _prepare(cfg, refs, bad)
    work = store.parent
    record = {p.case_id: work / "cases" / f"{p.case_id}.npz" for p in plans}
    todo = [p for p in plans if not record[p.case_id].is_file()]
    if on_start:
        on_start(len(plans), sum(p.slices for p in plans))
    for p in plans:
        if p not in todo:
            notify(CaseEvent(p.case_id, p.slices, 0.0, resumed=True))
    by_id = {r.case_id: r for r in refs}
    jobs = [CaseJob(by_id[p.case_id], store, offsets[p.case_id], cfg.size, cfg.window,
                    record[p.case_id], cfg.fsync) for p in todo]
    _run_jobs(jobs, cfg, bad, notify)
    written = [_load_record(record[p.case_id]) for p in plans if record[p.case_id].is_file()]
    if not written:
        raise KitsError(f"every case in {cfg.src} was bad: " + "; ".join(bad.values()))
    finalize(store, written, bad)
    _fsync_path(store)
    os.replace(store, cfg.out)
    _fsync_path(cfg.out.parent)
    shutil.rmtree(work, ignore_errors=True)
    return BuildReport(out=cfg.out, cases=len(written), slices=sum(w.meta.slices for w in written),
                       bytes=cfg.out.stat().st_size, seconds=time.perf_counter() - t0,
                       resumed_cases=len(plans) - len(todo), bad_cases=bad)


def _run_jobs(jobs: list[CaseJob], cfg: BuildConfig, bad: dict[str, str],
              notify: Callable[[CaseEvent], None]) -> None:
    def failed(job: CaseJob, exc: KitsError) -> None:
        if not cfg.skip_bad:
            raise KitsError(f"{exc} (finished cases are kept in {partial_dir(cfg.out)}; "
                            "after fixing, rerun with --resume)") from None
        bad[job.ref.case_id] = str(exc)
        notify(CaseEvent(job.ref.case_id, 0, 0.0, error=str(exc)))

    if cfg.workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            t = time.perf_counter()
            try:
                w = process_case(job)
            except KitsError as exc:
                failed(job, exc)
                continue
            notify(CaseEvent(job.ref.case_id, w.meta.slices, time.perf_counter() - t))
        return
    # spawn, not fork: the parent may hold threads (progress bar, h5py) that fork would copy
    # mid-lock. Jobs go in no faster than workers take them, so memory stays a few volumes.
    ctx = get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(cfg.workers, len(jobs)), mp_context=ctx) as pool:
        pending = {}
        queue = list(jobs)
        try:
            while queue or pending:
                while queue and len(pending) < cfg.workers * 2:
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
                    notify(CaseEvent(job.ref.case_id, w.meta.slices, time.perf_counter() - t))
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
