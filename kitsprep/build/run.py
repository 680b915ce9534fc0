"""`build_store`: the build from start to finish, under the build lock: plan (or reopen),
warm the kernels, run the cases, finish; a full disk becomes one line."""

from __future__ import annotations

import errno
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kitsprep.build.config import BuildConfig, BuildReport, CaseEvent, CaseJob
from kitsprep.build.finish import FINISHED_MARK, finish_build
from kitsprep.build.lock import build_lock
from kitsprep.build.plan import build_spacing, check_changed_sources, open_partial_build
from kitsprep.build.resume import load_record, partial_dir, readable_records
from kitsprep.build.workers import run_jobs
from kitsprep.cases import CaseRef, check_edition, find_cases, read_header, select_cases
from kitsprep.errors import KitsError
from kitsprep.files import remove_stale_temps
from kitsprep.geometry import fit_in_plane
from kitsprep.kernels.image import window_resample
from kitsprep.kernels.labels import label_counts, labels_resample
from kitsprep.kernels.nonfinite import count_nonfinite
from kitsprep.labels import counted_values
from kitsprep.outputs import check_output
from kitsprep.store.info import open_store, shrunk_cases
from kitsprep.window import Window

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def build_store(
    cfg: BuildConfig,
    on_case: Callable[[CaseEvent], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> BuildReport:
    """Run a build. `on_start(cases, slices)` fires once the plan is known; `on_case` after
    each case; `on_note` gets warnings (an unreadable commit record redone). Raises
    KitsError for bad input (naming the case); OUT is untouched then."""
    t0 = time.perf_counter()
    check_out_path(cfg.src, cfg.out)
    with build_lock(cfg.out):
        try:
            return _build_locked(cfg, t0, on_case, on_start, on_note or (lambda s: None))
        except OSError as exc:
            if exc.errno not in DISK_FULL:
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
    with --overwrite) and would be read as data by the next build; one inside a run
    directory could replace its files (`kitsprep.outputs`)."""
    src_r, out_r = Path(src).resolve(), Path(out).resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise KitsError(
            f"--out {out} is inside --src {src}; write the store outside the "
            "source folder (e.g. --out slices.h5 next to it)"
        )
    check_output(out, "--out", reading=[src])
    try:
        out_r.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KitsError(
            f"cannot create the folder of --out {out} ({exc.strerror}); choose "
            "an --out in a writable folder"
        ) from None


def _build_locked(
    cfg: BuildConfig,
    t0: float,
    on_case: Callable[[CaseEvent], None] | None,
    on_start: Callable[[int, int], None] | None,
    note: Callable[[str], None],
) -> BuildReport:
    notify = on_case or (lambda e: None)
    if finished_earlier(cfg):  # killed after its final rename, before cleaning up
        return _report_finished(cfg, t0)
    if cfg.out.exists() and not cfg.overwrite:
        raise KitsError(
            f"{cfg.out} already exists; pass --overwrite to replace it, or choose another --out"
        )
    if cfg.out.exists() and cfg.out.is_dir():
        raise KitsError(f"--out {cfg.out} is a folder; expected a file path like slices.h5")
    refs = select_cases(find_cases(cfg.src), cfg.cases)
    check_edition(cfg.src, cfg.edition)
    bad: dict[str, str] = {}
    spacing = build_spacing(cfg, refs)
    store, plans, offsets = open_partial_build(cfg, refs, bad, spacing)
    work = store.parent
    for folder in (work, work / "cases"):
        remove_stale_temps(folder)
    record = {p.case_id: work / "cases" / f"{p.case_id}.npz" for p in plans}
    by_id = {r.case_id: r for r in refs}
    loaded = readable_records(record, note) if cfg.resume else {}
    if cfg.resume:
        check_changed_sources(plans, by_id, record)
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
            spacing.mm,
        )
        for p in todo
    ]
    compile_s = _warm_kernels([j.ref for j in jobs], cfg.window) if jobs else 0.0
    run_jobs(jobs, cfg, bad, notify)
    written = [
        loaded[p.case_id]
        if p not in todo and p.case_id in loaded
        else load_record(record[p.case_id])
        for p in plans
        if record[p.case_id].is_file()
    ]
    if not written:
        raise KitsError(f"every case in {cfg.src} was bad: " + "; ".join(bad.values()))
    labels, why = finish_build(cfg, refs, store, written, bad, offsets)
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
        spacing=spacing,
        shrunk=shrunk_cases(w.meta for w in written),
    )


def finished_earlier(cfg: BuildConfig) -> bool:
    """A --resume of a build that was killed after renaming its store onto OUT, while it
    removed OUT.partial: the store is complete (the rename is atomic), only the cleanup is
    left. OUT.partial then holds no store.h5."""
    work = partial_dir(cfg.out)
    return (
        cfg.resume
        and work.is_dir()
        and not (work / "store.h5").exists()
        and ((work / FINISHED_MARK).exists() or not any(work.iterdir()))
        and cfg.out.is_file()
    )


def _report_finished(cfg: BuildConfig, t0: float) -> BuildReport:
    info = open_store(cfg.out)
    shutil.rmtree(partial_dir(cfg.out), ignore_errors=True)
    return BuildReport(
        out=cfg.out,
        cases=len(info.cases),
        slices=len(info.index),
        bytes=cfg.out.stat().st_size,
        seconds=max(0.0, time.perf_counter() - t0),
        resumed_cases=len(info.cases),
        bad_cases=info.bad_cases,
        edition=info.labels.edition,
        edition_reason=info.edition_reason,
        spacing=info.spacing,
        shrunk=shrunk_cases(info.cases.values()),
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
                counts = label_counts(2, counted_values())
                labels_resample(lab, plane, counts, 0, 2, np.empty((2, 4, 4), np.uint8))
        except Exception:  # noqa: BLE001 - a voxel type the kernels refuse: the case says so
            continue
    return time.perf_counter() - t
