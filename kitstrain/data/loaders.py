"""The training DataLoader: one place for its settings; and how validation shards cases."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from kitsprep.errors import KitsError
from kitsprep.store import StoreInfo
from kitstrain.data.augment import AugmentConfig
from kitstrain.data.batch_pool import BatchPool, ReleasingIterator, batch_nbytes
from kitstrain.data.dataset import SliceDataset, collate_slices, worker_init_fn
from kitstrain.data.samplers import EpochStream, ForegroundSampler

# Why these settings:
# - persistent_workers: workers (and their maps, numba kernels, RNG streams) live across
#   epochs; restarting them costs seconds per epoch under spawn and reseeds the streams.
# - prefetch_factor up to 4 per worker: with 2 workers, 8 batches in flight cover the
#   jitter of a step (validation, logging, a slow augmented batch) without holding much
#   memory (512x512 batch of 16: 8 MB image + 4 MB label); by default it is lowered for
#   large batches (`prefetch_for`) so that the shared batch pool stays bounded.
# - pin_memory only when the batches go to CUDA: pinned host memory is what makes
#   `.to(device, non_blocking=True)` asynchronous; on CPU it only costs a copy.
# - drop_last for training: equal batch sizes (batch-norm statistics) and an equal number
#   of steps on every DDP rank, which all-reduce would otherwise deadlock on.
# - a seeded generator: torch derives each worker's seed from it, so augmentation streams
#   repeat for a seed.


def _loader_kwargs(
    workers: int, prefetch_factor: int | None, persistent_workers: bool, multiprocessing_context
) -> dict:
    if workers <= 0:
        return {"num_workers": 0}
    return {
        "num_workers": workers,
        "prefetch_factor": prefetch_factor,
        "persistent_workers": persistent_workers,
        "worker_init_fn": worker_init_fn,
        "multiprocessing_context": multiprocessing_context,
    }


def make_train_loader(
    store_path: Path | str,
    info: StoreInfo,
    cases: Sequence[str],
    *,
    context: int,
    augment: AugmentConfig | None,
    seed: int,
    rank: int = 0,
    patch: int | None = None,
    augment_on: str = "workers",
    **settings,
) -> DataLoader:
    """Training batches (image float16 (B, 1+2K, P, P), label uint8 (B, P, P)) of `cases`:
    a SliceDataset (P is `patch`, see `kitstrain.data.patches.patch_origin`, the whole
    slice when None) in `train_loader_for`, which takes the other settings.

    Each draw's augmentation is seeded by (seed, rank, epoch, draw), so one loader for a
    whole run (its batches run on from epoch to epoch, `EpochStream`) varies per epoch,
    and `start_batch` resumes mid-epoch on the same slices with the same augmentations.
    `augment_on="device"`: workers cut windows and batches carry the draws
    (`kitstrain.data.device_augment`)."""
    ds = SliceDataset(
        store_path,
        info,
        cases,
        context=context,
        augment=augment,
        seed=_stream_seed(seed, rank),
        patch=patch,
        augment_on=augment_on,
    )
    return train_loader_for(ds, seed=seed, rank=rank, **settings)


def _stream_seed(seed: int, rank: int) -> int:
    """Augmentation seed per (seed, rank): ranks differ; the epoch and the draw come with
    each sampled item (`Drawn`), so the seed need not change when the epoch does."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1)


def batches_per_epoch(samples_per_epoch: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps in one epoch: what a training loader yields per rank (drop_last
    on each rank's ceil(samples / world) draws, one short batch when fewer than a batch).
    Schedules count these, so a cosine ends where the data does."""
    per_rank = math.ceil(samples_per_epoch / world_size)
    return per_rank // batch_size if per_rank >= batch_size else 1


# In-flight batches (workers x prefetch) a rank may hold in shared memory: prefetch shrinks
# for large batches rather than filling /dev/shm (16 workers x 4 of 700 MB is 44 GB).
PREFETCH_BYTES = 2 * 2**30


# Pool slots per worker beyond its prefetched batches: the batch in the training step, and
# one spare so a worker never waits for the step to hand a slot back
POOL_SPARE_SLOTS = 2


def prefetch_for(batch_bytes: int, workers: int, budget: int = PREFETCH_BYTES) -> int:
    """Batches each worker prepares ahead: 4 where they are small (covers a slow step's
    jitter), down to 1 where the pool (workers x (prefetch + spare) batches) would pass
    `budget`."""
    fits = budget // max(1, workers * batch_bytes) - POOL_SPARE_SLOTS
    return max(1, min(4, fits))


def close_loader(loader: DataLoader) -> None:
    """Stop persistent workers now rather than at garbage collection."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    loader._iterator = None


def train_loader_for(
    ds: SliceDataset,
    *,
    batch_size: int,
    workers: int,
    fg_fraction: float,
    label_weights: Mapping[int, float] | None,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    samples_per_epoch: int | None = None,
    pin_memory: bool,
    prefetch_factor: int | None = None,
    persistent_workers: bool = True,
    multiprocessing_context=None,
    epoch: int = 0,
    start_batch: int = 0,
    until_epoch: int | None = None,
) -> DataLoader:
    """The training DataLoader around any dataset with `rows`: one place for the settings,
    so the loader benchmark's in-RAM ceiling runs exactly what training runs. Draws come
    from a ForegroundSampler, batched epoch after epoch without end (`EpochStream`: the
    iterator never stops, the consumer counts `batches_per_epoch`); `samples_per_epoch`
    (default: one per slice) counts all ranks; `epoch` is where the stream starts,
    `start_batch` skips into it, `until_epoch` (None: never) where it ends."""
    sampler = ForegroundSampler(
        ds.rows,
        samples_per_epoch or len(ds),
        fg_fraction=fg_fraction,
        label_weights=label_weights,
        seed=seed,
        rank=rank,
        world_size=world_size,
    )
    stream = EpochStream(
        sampler, batch_size, epoch=epoch, start_batch=start_batch, until_epoch=until_epoch
    )
    # workers' seeds derive from this generator (base_seed + worker id)
    generator = torch.Generator().manual_seed(_stream_seed(seed, rank))
    # from the whole epoch's length, not what a mid-epoch resume leaves of it: the loader
    # serves later epochs too (batches_per_epoch counts the same way)
    if prefetch_factor is None:
        prefetch_factor = prefetch_for(batch_nbytes(batch_size, ds.channels, ds.side), workers)
    pool = None
    if workers > 0:
        # a copy: the pool belongs to this loader's workers, whatever else uses `ds`
        ds = copy.copy(ds)
        ds.pool = pool = BatchPool(
            batch_size=batch_size,
            channels=ds.channels,
            patch=ds.side,
            workers=workers,
            slots_per_worker=prefetch_factor + POOL_SPARE_SLOTS,
            multiprocessing_context=multiprocessing_context,
        )
    return TrainLoader(
        ds,
        pool=pool,
        batch_sampler=stream,
        pin_memory=pin_memory,
        generator=generator,
        collate_fn=collate_slices,
        **_loader_kwargs(workers, prefetch_factor, persistent_workers, multiprocessing_context),
    )


class TrainLoader(DataLoader):
    """A DataLoader whose workers write batches into `pool`'s reused slots (see
    `kitstrain.data.batch_pool`); iterating it yields (image, label) tensors as any
    DataLoader does, and hands each slot back when the next batch is asked for."""

    def __init__(self, *args, pool: BatchPool | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pool = pool

    @property
    def stream(self) -> EpochStream:
        """The endless batch sampler: its `batches_per_epoch` and `sampler`."""
        return self.batch_sampler

    def __iter__(self):
        return ReleasingIterator(super().__iter__())


def next_batch(it: Iterator) -> tuple | None:
    """The loader's next batch, None at the epoch's end. A KitsError raised in a worker
    (a damaged slice) arrives wrapped in the worker's traceback: unwrap it to its one line."""
    try:
        return next(it, None)
    except KitsError as exc:
        text = str(exc).strip()
        marker = "KitsError: "
        raise KitsError(
            text[text.rindex(marker) + len(marker) :] if marker in text else text
        ) from None


def shard_cases(info: StoreInfo, cases: Sequence[str], rank: int, world_size: int) -> list[str]:
    """This rank's cases: whole cases (so per-case 3D Dice needs no gathering of slices),
    balanced by slice count (largest first onto the lightest rank), deterministic."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise KitsError(f"rank {rank} is outside world size {world_size}")
    load = [0] * world_size
    mine = []
    for c in sorted(cases, key=lambda c: (-info.cases[c].slices, c)):
        r = min(range(world_size), key=lambda i: (load[i], i))
        load[r] += info.cases[c].slices
        if r == rank:
            mine.append(c)
    return sorted(mine)
