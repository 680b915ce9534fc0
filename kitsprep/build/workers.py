"""Running the case jobs: in this process (imaging inflated ahead on this thread, kernels
on another) or in a pool of worker processes, and the malloc tuning both rely on."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
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

from kitsprep.build.case import process_case, read_ahead
from kitsprep.build.config import BuildConfig, CaseEvent, CaseJob
from kitsprep.build.resume import partial_dir
from kitsprep.cases import CaseRef, read_volume
from kitsprep.errors import KitsError
from kitsprep.lifeline import die_with_parent


def run_jobs(
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
            read_ahead[jobs[0].ref] = imaging[0]
            for i, job in enumerate(jobs):
                t = time.perf_counter()
                running = kernels.submit(process_case, job)
                if i == 0:  # the kernel thread inflates the segmentation meanwhile
                    _inflate_imaging(job.ref, imaging[0])
                if i + 1 < len(jobs):
                    read_ahead[jobs[i + 1].ref] = imaging[i + 1]
                    _inflate_imaging(jobs[i + 1].ref, imaging[i + 1])
                try:
                    w = running.result()
                except KitsError as exc:
                    failed(job, exc)
                    continue
                finally:
                    read_ahead.pop(job.ref, None)
                    imaging[i] = None  # the volume goes with its case
                notify(CaseEvent(job.ref.case_id, w.meta.slices, time.perf_counter() - t))
        finally:
            read_ahead.clear()
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
    die_with_parent()  # a killed build leaves no worker behind
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
