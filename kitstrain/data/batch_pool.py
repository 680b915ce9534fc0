"""Shared-memory batch buffers that loader workers fill again and again.

A DataLoader worker normally hands each batch over in a freshly allocated shared-memory
segment: the worker creates it, faults in and zeroes every page while writing, passes its
file descriptor through a socket, and the main process maps it and tears it down after
the step. For a 512x512 batch of 16 that costs ~25-30 ms, far more than reading the
slices. Here each worker owns a few slots of one segment allocated up front; a batch
crosses the process boundary as a slot number, and the main process hands the slot back
once it is done with it (`PooledBatch.pin_memory` right after the pinned copy, or
`ReleasingIterator` when the next batch is asked for). A worker that finds none of its
slots free falls back to a fresh segment, so a consumer that holds batches longer than
expected costs speed, never correctness.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kitsprep.errors import KitsError

_pools: weakref.WeakValueDictionary[int, BatchPool] = weakref.WeakValueDictionary()
_tokens = itertools.count(1)


SHM = Path("/dev/shm")


def shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory, allocated there directly (no private copy
    first, no page touched until written)."""
    elem = torch.empty(0, dtype=dtype)
    storage = elem._typed_storage()._new_shared(math.prod(shape), device=elem.device)
    return elem.new(storage).resize_(shape)


def batch_nbytes(batch_size: int, channels: int, patch: int) -> int:
    """Bytes of one training batch: float16 images of `channels` and a uint8 label."""
    return batch_size * patch * patch * (2 * channels + 1)


def check_shared_memory(nbytes: int, what: str, shm: Path = SHM) -> None:
    """Refuse, in one line, a pool that /dev/shm cannot hold: past its end a worker's write
    would die of SIGBUS (Docker's default /dev/shm is 64 MB)."""
    try:
        st = os.statvfs(shm)
    except OSError:
        return  # no /dev/shm to measure (not Linux): nothing to check against
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise KitsError(
            f"the training loader needs {nbytes / 2**20:.0f} MB of shared memory for "
            f"{what}, but {shm} has {free / 2**20:.0f} MB free; give the container more "
            "(docker run --shm-size=8g) or lower --workers or --batch-size"
        )


def pool_budget(shm: Path = SHM) -> int:
    """The most shared memory a loader's pool may take: a quarter of the machine's memory
    (at least 2 GiB), and no more than /dev/shm has free."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 8 * 2**30
    budget = max(2 * 2**30, ram // 4)
    try:
        st = os.statvfs(shm)
        budget = min(budget, st.f_bavail * st.f_frsize)
    except OSError:
        pass
    return budget


def check_pool_budget(
    batch_size: int, channels: int, patch: int, slots: int, budget: int | None = None
) -> None:
    """Refuse, before anything is allocated, a pool of `slots` batches that the budget
    (`pool_budget`) cannot hold, naming the largest batch that fits."""
    budget = pool_budget() if budget is None else budget
    need = slots * batch_nbytes(batch_size, channels, patch)
    if need <= budget:
        return
    largest = budget // max(1, slots * batch_nbytes(1, channels, patch))
    raise KitsError(
        f"--batch-size {batch_size} needs {need / 2**20:.0f} MB of shared memory for the "
        f"loader's {slots} batch slots of {patch}x{patch}, more than the "
        f"{budget / 2**20:.0f} MB it may use (a quarter of this machine's memory, within "
        f"/dev/shm's free space); the largest batch that fits is {largest}: lower "
        "--batch-size (or --workers)"
    )


def sweep_dead_segments(shm: Path = SHM) -> list[Path]:
    """Remove the shared-memory segments that torch processes which are gone left in
    /dev/shm (`torch_<pid>_*`). torch names a segment, sizes it, then unlinks it once mapped;
    a process killed in between (out of memory while sizing a large pool) leaves it there,
    holding RAM, for good. Only this user's, only under torch's file_descriptor strategy
    (where no live process opens a segment by name), only of pids that no longer exist."""
    if torch.multiprocessing.get_sharing_strategy() != "file_descriptor":
        return []
    removed = []
    try:
        entries = list(shm.iterdir())
    except OSError:
        return removed
    for p in entries:
        parts = p.name.split("_")
        if len(parts) < 3 or parts[0] != "torch" or not parts[1].isdigit():
            continue
        try:
            if p.stat().st_uid != os.getuid() or _alive(int(parts[1])):
                continue
            p.unlink()
            removed.append(p)
        except OSError:
            continue
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BatchPool:
    """`slots_per_worker` (image, label) batch slots per worker in shared memory, and per
    worker a queue of its free slots (a pipe: the hand-back is ordered after the main
    process's last read of the slot, on any CPU's memory model)."""

    def __init__(
        self,
        *,
        batch_size: int,
        channels: int,
        patch: int,
        workers: int,
        slots_per_worker: int,
        multiprocessing_context: Any = None,
    ):
        if workers < 1 or slots_per_worker < 1:
            raise ValueError("a batch pool needs at least one worker and one slot each")
        ctx = multiprocessing_context
        if ctx is None:
            ctx = torch.multiprocessing.get_context()
        elif isinstance(ctx, str):
            ctx = multiprocessing.get_context(ctx)
        n = workers * slots_per_worker
        batch_bytes = batch_nbytes(batch_size, channels, patch)
        check_pool_budget(batch_size, channels, patch, n)
        sweep_dead_segments()
        check_shared_memory(
            n * batch_bytes,
            f"{workers} worker(s) x {slots_per_worker} batches of {batch_bytes / 2**20:.1f} MB",
        )
        self.batch_size = int(batch_size)
        self.slots_per_worker = int(slots_per_worker)
        self.images = shared_empty((n, batch_size, channels, patch, patch), torch.float16)
        self.labels = shared_empty((n, batch_size, patch, patch), torch.uint8)
        self.free = [ctx.SimpleQueue() for _ in range(workers)]
        for w, q in enumerate(self.free):
            for s in range(w * slots_per_worker, (w + 1) * slots_per_worker):
                q.put(s)
        self.token = next(_tokens)
        _pools[self.token] = self

    @property
    def nbytes(self) -> int:
        return self.images.nbytes + self.labels.nbytes

    def take(self, worker: int, n: int) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        """In worker `worker`: a free slot and its first `n` rows, or None when all of this
        worker's slots are still in use (or the batch is larger than a slot)."""
        q = self.free[worker]
        if n > self.batch_size or q.empty():
            return None
        slot = q.get()
        return slot, self.images[slot, :n], self.labels[slot, :n]

    def give_back(self, slot: int) -> None:
        self.free[slot // self.slots_per_worker].put(slot)


class PooledBatch:
    """What a worker returns for a batch written into a pool slot: the slot's address, not
    its bytes. In the main process `tensors()` gives views of the slot and `release()`
    hands it back; `pin_memory()` (called by the DataLoader's pinning thread) copies the
    slot into pinned memory and hands it back at once."""

    __slots__ = ("token", "slot", "n", "params", "_released")

    def __init__(self, token: int, slot: int, n: int, params: Any = None):
        # params: a small array that travels with the batch (device augmentation's draws)
        self.token, self.slot, self.n, self.params = token, slot, n, params
        self._released = False

    def __reduce__(self):
        return (PooledBatch, (self.token, self.slot, self.n, self.params))

    def _pool(self) -> BatchPool:
        pool = _pools.get(self.token)
        if pool is None:
            raise RuntimeError("a pooled batch outlived its loader's pool")
        return pool

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        pool = self._pool()
        return pool.images[self.slot, : self.n], pool.labels[self.slot, : self.n]

    def fields(self) -> tuple:
        """(image, label) views of the slot, and the params when the batch has them."""
        t = self.tensors()
        return t if self.params is None else (*t, self.params)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool().give_back(self.slot)

    def pin_memory(self, device: Any = None) -> tuple:
        pinned = tuple(t.pin_memory() for t in self.tensors())
        self.release()
        return pinned if self.params is None else (*pinned, self.params)


class ReleasingIterator:
    """A loader iterator that turns pooled batches into (image, label) views and hands the
    previous batch's slot back when the next batch is asked for: by then the training
    step that used it has finished."""

    def __init__(self, inner: Iterator):
        self._inner = inner
        self._held: PooledBatch | None = None

    def __iter__(self) -> ReleasingIterator:
        return self

    def __next__(self) -> tuple:
        self.release()
        batch = next(self._inner)
        if isinstance(batch, PooledBatch):
            self._held = batch
            return batch.fields()
        return batch

    def release(self) -> None:
        if self._held is not None:
            self._held.release()
            self._held = None

    def __getattr__(self, name: str):
        # the DataLoader iterator's own attributes (its workers, for the benchmark)
        return getattr(self._inner, name)
