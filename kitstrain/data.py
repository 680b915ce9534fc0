"""Training data: patient-level splits, the store-backed slice dataset, samplers, loaders.

The hot path never touches h5py: each DataLoader worker opens the store
(`kitsprep.store.SliceMap`, lazily in the worker) and reads single slices at the byte
offsets recorded in the index with positioned reads straight into the batch tensor,
checking each one's CRC-32. Nothing is mapped and no whole-case or whole-file read happens
anywhere, so a worker's memory is the same for a 100 MB store and a store larger than RAM.
Samplers read only the index.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from kitsprep.cases import parse_case_spec
from kitsprep.errors import KitsError
from kitsprep.labels import LabelSet
from kitsprep.store import SliceMap, StoreInfo
from kitstrain.augment import AugmentConfig, augment_slice
from kitstrain.patches import patch_origin, uniform_origin

# --------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Split:
    """Patient-level train/validation case lists and how they were chosen."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    mode: str  # "explicit" (from --train-cases/--val-cases) or "seeded" (default split)
    seed: int

    def to_json(self) -> dict:
        return {
            "train": list(self.train),
            "val": list(self.val),
            "mode": self.mode,
            "seed": self.seed,
        }

    @classmethod
    def from_json(cls, d: dict) -> Split:
        return cls(
            train=tuple(d["train"]), val=tuple(d["val"]), mode=str(d["mode"]), seed=int(d["seed"])
        )


def _shown(ids: Sequence[str]) -> str:
    return ", ".join(ids[:5]) + (f" ... ({len(ids)} cases)" if len(ids) > 5 else "")


def check_split(split: Split, info: StoreInfo) -> None:
    """Fail loudly unless both sides are non-empty, disjoint, present and labelled: a case in
    both would leak into its own validation score; an unlabelled one has nothing to learn."""
    both = sorted(set(split.train) & set(split.val))
    if both:
        raise KitsError(
            f"{len(both)} case(s) are in both the training and the validation "
            f"split: {_shown(both)}; a patient must be in only one, fix "
            "--train-cases/--val-cases"
        )
    for side, ids in (("training", split.train), ("validation", split.val)):
        if not ids:
            raise KitsError(
                f"the {side} split is empty; expected at least one labelled "
                "case, fix --train-cases/--val-cases"
            )
        absent = [c for c in ids if c not in info.cases]
        if absent:
            raise KitsError(
                f"{side} case(s) {_shown(absent)} are not in {info.path}; "
                "expected cases of this store, fix the case list or the store"
            )
        unlabelled = [c for c in ids if not info.cases[c].labelled]
        if unlabelled:
            raise KitsError(
                f"{side} case(s) {_shown(unlabelled)} have no segmentation "
                "(unlabelled test cases); leave them out of "
                "--train-cases/--val-cases"
            )


def make_split(
    info: StoreInfo,
    train_spec: str | None,
    val_spec: str | None,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> Split:
    """Explicit case lists when given (one side alone: the other is the rest of the labelled
    cases), else a seeded ~80/20 shuffle of the labelled cases. Unlabelled cases never
    enter either side."""
    labelled = sorted(info.labelled_cases)
    if train_spec is None and val_spec is None:
        if len(labelled) < 2:
            raise KitsError(
                f"{info.path} holds {len(labelled)} labelled case(s); a "
                "train/validation split needs at least 2, build the store from "
                "more cases"
            )
        if not 0.0 < val_fraction < 1.0:
            raise KitsError(f"validation fraction must be in (0, 1), found {val_fraction}")
        n_val = min(max(1, round(len(labelled) * val_fraction)), len(labelled) - 1)
        order = np.random.default_rng(seed).permutation(len(labelled))
        val = sorted(labelled[i] for i in order[:n_val])
        train = sorted(labelled[i] for i in order[n_val:])
        split = Split(tuple(train), tuple(val), "seeded", int(seed))
    else:
        train = parse_case_spec(train_spec, info.case_ids) if train_spec is not None else None
        val = parse_case_spec(val_spec, info.case_ids) if val_spec is not None else None
        named = set(train or []) | set(val or [])
        unlabelled = sorted(c for c in named if not info.cases[c].labelled)
        if unlabelled:
            raise KitsError(
                f"case(s) {_shown(unlabelled)} have no segmentation (unlabelled "
                "test cases) and cannot be trained or validated on; leave them "
                "out of --train-cases/--val-cases"
            )
        if train is None:
            train = [c for c in labelled if c not in set(val)]
        if val is None:
            val = [c for c in labelled if c not in set(train)]
        split = Split(tuple(train), tuple(val), "explicit", int(seed))
    check_split(split, info)
    return split


# --------------------------------------------------------------------------- dataset


class Draw(NamedTuple):
    """One sampled item: the dataset position, and where in which epoch's stream it was
    drawn. Augmentation is seeded by (dataset seed, epoch, draw), so it is the same for a
    draw whichever worker reads it, and a run resumed mid-epoch replays it exactly."""

    index: int
    epoch: int
    draw: int


class SliceDataset(Dataset):
    """Slices of some cases: item i -> (image float16 (1+2K, H, W), label uint8 (H, W)),
    plus the slice's global index row when `return_row` (validation, to regroup per case).

    Float16 keeps the host->GPU copy at half the bytes; the training step casts on device.
    The store is mapped lazily in whichever process reads first (each DataLoader worker,
    after fork or spawn); the dataset pickles as the path plus a few small arrays.
    """

    def __init__(
        self,
        store_path: Path | str,
        info: StoreInfo,
        cases: Sequence[str],
        context: int = 0,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        return_row: bool = False,
        patch: int | None = None,
    ):
        if context < 0:
            raise KitsError(f"--context must be >= 0, found {context}")
        unknown = [c for c in cases if c not in info.cases]
        if unknown:
            raise KitsError(
                f"case(s) {_shown(unknown)} are not in {info.path}; expected cases of this store"
            )
        unlabelled = [c for c in cases if not info.cases[c].labelled]
        if unlabelled:
            raise KitsError(
                f"case(s) {_shown(unlabelled)} are unlabelled; they cannot be "
                "loaded for training or validation"
            )
        if patch is not None and not 1 <= patch <= info.size:
            raise KitsError(
                f"patch {patch} does not fit the store's {info.size}x{info.size} "
                "slices; use at most that size"
            )
        self.store_path = Path(store_path)
        self.store_case_ids = tuple(info.case_ids)  # names a damaged slice's case
        self.size = info.size
        self.patch = info.size if patch is None else int(patch)
        self.context = int(context)
        self.case_ids = tuple(cases)
        self.augment = augment if augment is not None and augment.enabled else None
        self.seed = int(seed)
        self.return_row = return_row
        metas = [info.cases[c] for c in cases]
        counts = np.array([m.slices for m in metas], np.int64)
        # Global index rows of every item, in case order then slice order
        self.row_ids = np.concatenate(
            [np.arange(m.row_start, m.row_start + m.slices, dtype=np.int64) for m in metas]
            or [np.zeros(0, np.int64)]
        )
        self.rows = info.index[self.row_ids]  # a copy: what samplers read
        # slices whose index counts say "all background": no label chunk to inflate
        self._background = info.foreground_pixels(self.rows) == 0
        # Neighbours as positions into self.rows: the K slices either side, clamped at the
        # case's ends (a case's rows are contiguous here, so position = own - slice + k)
        first = np.repeat(np.cumsum(counts) - counts, counts)
        last = np.repeat(counts, counts) - 1
        k = np.arange(-self.context, self.context + 1, dtype=np.int64)
        sl = self.rows["slice"].astype(np.int64)[:, None]
        self._neighbours = first[:, None] + np.clip(sl + k, 0, last[:, None])
        self._map: SliceMap | None = None
        self._rng: np.random.Generator | None = None
        self._pid: int | None = None

    @property
    def channels(self) -> int:
        return 1 + 2 * self.context

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        # The map and RNG are per process: a worker opens and seeds its own
        return {**self.__dict__, "_map": None, "_rng": None, "_pid": None}

    def _open(self) -> None:
        """(Re)open the map and RNG in this process: first use, or first use after a fork."""
        self._map = SliceMap(self.store_path, self.size, self.store_case_ids)
        self._seed_rng()

    def _seed_rng(self) -> None:
        worker = get_worker_info()
        # per-worker stream: torch gives each worker base_seed + id, base_seed drawn from
        # the loader's seeded generator; in the main process the dataset seed alone fixes it
        self._rng = np.random.default_rng(
            [self.seed] if worker is None else [self.seed, worker.seed]
        )
        self._pid = os.getpid()

    def _read_into(self, i: int, img: np.ndarray, lab: np.ndarray) -> None:
        """Item i's context slices and centre label, read straight into `img` (C, H, W)
        float16 (adjacent chunks in one system call) and `lab` (H, W) uint8."""
        rows = self.rows
        self._map.images(rows[self._neighbours[i]], img)
        if self._background[i]:
            # the index counts come from these very labels: zero-fill instead of inflating
            # 256 KB (10 us instead of ~100 us, and most CT slices hold no kidney)
            lab[...] = 0
        else:
            lab[...] = self._map.label(rows[i])

    def _fill(self, indices: Sequence[int], images: torch.Tensor, labels: torch.Tensor) -> None:
        if self._pid != os.getpid():
            self._open()
        img_np, lab_np = images.numpy(), labels.numpy()
        cropping = self.patch < self.size
        if cropping:
            whole_img = np.empty((self.channels, self.size, self.size), np.float16)
            whole_lab = np.empty((self.size, self.size), np.uint8)
        for j, item in enumerate(indices):
            i = item.index if isinstance(item, Draw) else int(item)
            rng = None
            if cropping or self.augment is not None:
                rng = (
                    np.random.default_rng([self.seed, item.epoch, item.draw])
                    if isinstance(item, Draw)
                    else self._rng
                )
            if cropping:
                self._read_into(i, whole_img, whole_lab)
                # the index already says which slices are empty: no label scan for those
                y, x = (
                    uniform_origin(whole_lab.shape, self.patch, rng)
                    if self._background[i]
                    else patch_origin(whole_lab, self.patch, rng)
                )
                if self.augment is not None:
                    # warped about the window's centre, sampled from the whole slice
                    img_np[j], lab_np[j] = augment_slice(
                        whole_img,
                        whole_lab,
                        rng,
                        self.augment,
                        window=(y, x, self.patch, self.patch),
                    )
                else:
                    box = (slice(y, y + self.patch), slice(x, x + self.patch))
                    img_np[j] = whole_img[(slice(None), *box)]
                    lab_np[j] = whole_lab[box]
            else:
                self._read_into(i, img_np[j], lab_np[j])
                if self.augment is not None:
                    img_np[j], lab_np[j] = augment_slice(img_np[j], lab_np[j], rng, self.augment)

    def __getitem__(self, i: int):
        images, labels = self._batch_tensors(1, shared=False)
        self._fill([i], images, labels)
        if self.return_row:
            return images[0], labels[0], int(self.row_ids[i])
        return images[0], labels[0]

    def __getitems__(self, indices: list[int]) -> list[tuple]:
        """A whole batch read straight into one tensor per field, in shared memory inside a
        worker, so neither a per-slice allocation nor collate's stacking copy happens and
        the batch crosses to the main process without another copy. Items are views of
        those tensors: `collate_slices` hands the tensors on as they are, and any other
        collate still works (it stacks the views)."""
        images, labels = self._batch_tensors(len(indices), shared=get_worker_info() is not None)
        self._fill(indices, images, labels)
        if self.return_row:
            return [(images[j], labels[j], int(self.row_ids[i])) for j, i in enumerate(indices)]
        return [(images[j], labels[j]) for j in range(len(indices))]

    def _batch_tensors(self, n: int, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.patch
        return (
            _empty((n, self.channels, s, s), torch.float16, shared),
            _empty((n, s, s), torch.uint8, shared),
        )


def _empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor, allocated in shared memory when it will cross processes
    (as default_collate does: moving it there later would copy it)."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    elem = torch.empty(0, dtype=dtype)
    storage = elem._typed_storage()._new_shared(math.prod(shape), device=elem.device)
    return elem.new(storage).resize_(shape)


def _views_of_one_batch(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The tensor that `parts` are consecutive leading-index views of, else None."""
    first = parts[0]
    numel = first.numel()
    storage = first.untyped_storage()
    if storage.nbytes() != len(parts) * numel * first.element_size():
        return None
    ptr = storage.data_ptr()
    for j, t in enumerate(parts):
        if (
            t.untyped_storage().data_ptr() != ptr
            or t.storage_offset() != j * numel
            or not t.is_contiguous()
        ):
            return None
    return first.new_empty(0).set_(storage, 0, (len(parts), *first.shape))


def collate_slices(batch: list[tuple]) -> tuple:
    """Collate for SliceDataset: batches that `__getitems__` already laid out in one tensor
    per field pass through without a copy; anything else goes to torch's default_collate."""
    fields = list(zip(*batch, strict=True))
    out = []
    for parts in fields:
        whole = _views_of_one_batch(parts) if isinstance(parts[0], torch.Tensor) else None
        out.append(whole if whole is not None else default_collate(list(parts)))
    return tuple(out)


def worker_init_fn(worker_id: int) -> None:
    """Seed numpy's and Python's global RNGs per worker from torch's per-worker seed, so
    any stray use of them differs between workers and repeats for a seed."""
    seed = torch.initial_seed()
    np.random.seed(seed % 2**32)
    random.seed(seed)


# --------------------------------------------------------------------------- samplers


def label_weights_by_value(
    labels: LabelSet, weights: Mapping[str, float], *, strict: bool
) -> dict[int, float]:
    """Sampler weights keyed by label value from weights keyed by label name. A name the
    edition lacks is a user error when the user gave it (``strict``), and is dropped when it
    came from a preset (the default preset weighs cysts, which KiTS19 has not)."""
    unknown = sorted(set(weights) - set(labels.names))
    if unknown and strict:
        raise KitsError(
            f"--label-weights names {', '.join(unknown)}, which the store's "
            f"{labels.edition} labels do not include; use its label names: "
            f"{', '.join(labels.names)}"
        )
    return {labels.value(n): float(w) for n, w in weights.items() if n in labels.names}


def slice_weights(counts: np.ndarray, weights: Mapping[int, float]) -> np.ndarray:
    """Per-row weight of (N, values) label pixel counts: the largest weight among the labels
    a row holds, a label without a weight weighing 1; 0 for a row with no foreground."""
    counts = np.asarray(counts)
    bad = [v for v in weights if not 0 < v < counts.shape[1]]
    if bad:
        raise ValueError(
            f"label weights for values {bad}, but the index counts labels 1..{counts.shape[1] - 1}"
        )
    out = np.zeros(len(counts))
    for v in range(1, counts.shape[1]):
        held = counts[:, v] > 0
        out[held] = np.maximum(out[held], float(weights.get(v, 1.0)))
    return out


class ForegroundSampler(Sampler[int]):
    """Positions into `rows` (a dataset's index rows): a set share of draws from slices with
    any foreground label, weighted per label (`slice_weights`; `label_weights` keyed by
    label value, see `label_weights_by_value`), the rest uniform over all slices.

    The uniform part walks seeded epoch permutations (each slice once before any repeats).
    Foreground draws are spread evenly through the stream, so any run of B consecutive
    draws (a batch) holds round(fg_fraction * B) of them, +-1. With DDP every rank builds
    the same global stream for (seed, epoch) and takes every world_size-th draw: disjoint
    positions, equal lengths, each rank still fg_fraction foreground per batch.
    """

    def __init__(
        self,
        rows: np.ndarray,
        num_samples: int,
        fg_fraction: float = 0.33,
        label_weights: Mapping[int, float] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0.0 <= fg_fraction <= 1.0:
            raise KitsError(f"foreground fraction must be in [0, 1], found {fg_fraction}")
        label_weights = dict(label_weights or {})
        if any(not w > 0 for w in label_weights.values()):
            raise KitsError(f"label weights must be > 0, found {label_weights}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise KitsError(f"rank {rank} is outside world size {world_size}")
        if len(rows) == 0:
            raise KitsError("no slices to sample from; the case list is empty")
        self.n = len(rows)
        self.num_samples = int(num_samples)
        self.fg_fraction = float(fg_fraction)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        weights = slice_weights(rows["counts"], label_weights)
        self.fg_positions = np.flatnonzero(weights)
        w = weights[self.fg_positions]
        self.fg_p = w / w.sum() if len(w) else w
        self.per_rank = math.ceil(self.num_samples / self.world_size)
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip_next(self, draws: int) -> None:
        """Start the next iteration `draws` into this rank's stream: a run resumed mid-epoch
        sees exactly the slices it had not yet drawn, without reading the others."""
        self._skip = min(max(int(draws), 0), self.per_rank)

    def __len__(self) -> int:
        return self.per_rank - self._skip

    def global_stream(self, epoch: int) -> np.ndarray:
        """All ranks' draws of one epoch, shape (per_rank, world_size): column r is rank r's."""
        rng = np.random.default_rng([self.seed, epoch])
        k = np.arange(self.per_rank)
        f = self.fg_fraction if len(self.fg_positions) else 0.0  # no foreground: uniform
        # rank-local draw k is foreground when floor((k + 1) f + phase) steps up: an even
        # spread, so every batch gets its share regardless of batch size
        phase = rng.random()
        fg = np.floor((k + 1) * f + phase) > np.floor(k * f + phase)
        fg = np.repeat(fg[:, None], self.world_size, axis=1)
        out = np.empty(fg.shape, np.int64)
        n_fg = int(fg.sum())
        if n_fg:
            out[fg] = rng.choice(self.fg_positions, size=n_fg, p=self.fg_p)
        n_uni = out.size - n_fg
        perms = [rng.permutation(self.n) for _ in range(math.ceil(n_uni / self.n))]
        out[~fg] = np.concatenate(perms)[:n_uni] if perms else []
        return out

    def __iter__(self) -> Iterator[Draw]:
        epoch, skip = self.epoch, self._skip
        stream = self.global_stream(epoch)[skip:, self.rank]
        # a loader iterated again without set_epoch still gets a fresh order
        self.epoch += 1
        self._skip = 0
        return (Draw(int(i), epoch, skip + k) for k, i in enumerate(stream.tolist()))


# --------------------------------------------------------------------------- loaders

# Why these settings:
# - persistent_workers: workers (and their maps, numba kernels, RNG streams) live across
#   epochs; restarting them costs seconds per epoch under spawn and reseeds the streams.
# - prefetch_factor up to 4 per worker: with 2 workers, 8 batches in flight cover the
#   jitter of a step (validation, logging, a slow augmented batch) without holding much
#   memory (512x512 batch of 16: 8 MB image + 4 MB label); `fit` lowers it for large
#   batches (`prefetch_for`) so that shared memory stays bounded.
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
    batch_size: int,
    workers: int,
    context: int,
    augment: AugmentConfig | None,
    fg_fraction: float,
    label_weights: Mapping[int, float] | None,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    samples_per_epoch: int | None = None,
    pin_memory: bool,
    prefetch_factor: int = 4,
    persistent_workers: bool = True,
    multiprocessing_context=None,
    epoch: int = 0,
    start_batch: int = 0,
    patch: int | None = None,
) -> DataLoader:
    """Training batches (image float16 (B, 1+2K, P, P), label uint8 (B, P, P)) drawn by a
    ForegroundSampler; `samples_per_epoch` (default: one per slice) counts all ranks. P is
    `patch` (see `kitstrain.patches.patch_origin`), the whole slice when None.

    `epoch` fixes the sampler's order and the augmentation streams (each draw is seeded by
    (seed, rank, epoch, draw)), so one loader for a whole run (`loader.sampler.set_epoch`
    at each epoch's end, what `fit` does) varies per epoch; `start_batch` resumes
    mid-epoch on the same slices with the same augmentations."""
    ds = SliceDataset(
        store_path,
        info,
        cases,
        context=context,
        augment=augment,
        seed=_stream_seed(seed, rank),
        patch=patch,
    )
    return train_loader_for(
        ds,
        batch_size=batch_size,
        workers=workers,
        fg_fraction=fg_fraction,
        label_weights=label_weights,
        seed=seed,
        rank=rank,
        world_size=world_size,
        samples_per_epoch=samples_per_epoch,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
        persistent_workers=persistent_workers,
        multiprocessing_context=multiprocessing_context,
        epoch=epoch,
        start_batch=start_batch,
    )


def _stream_seed(seed: int, rank: int) -> int:
    """Augmentation seed per (seed, rank): ranks differ; the epoch and the draw come with
    each sampled item (`Draw`), so the seed need not change when the epoch does."""
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


def prefetch_for(batch_bytes: int, workers: int, budget: int = PREFETCH_BYTES) -> int:
    """Batches each worker prepares ahead: 4 where they are small (covers a slow step's
    jitter), down to 1 where workers x 4 batches would pass `budget`."""
    return max(1, min(4, budget // max(1, workers * batch_bytes)))


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
    prefetch_factor: int = 4,
    persistent_workers: bool = True,
    multiprocessing_context=None,
    epoch: int = 0,
    start_batch: int = 0,
) -> DataLoader:
    """The training DataLoader around any dataset with `rows`: one place for the settings,
    so the loader benchmark's in-RAM ceiling runs exactly what training runs."""
    sampler = ForegroundSampler(
        ds.rows,
        samples_per_epoch or len(ds),
        fg_fraction=fg_fraction,
        label_weights=label_weights,
        seed=seed,
        rank=rank,
        world_size=world_size,
    )
    sampler.set_epoch(epoch)
    sampler.skip_next(start_batch * batch_size)
    # workers' seeds derive from this generator (base_seed + worker id)
    generator = torch.Generator().manual_seed(_stream_seed(seed, rank))
    # from the whole epoch's length, not what a mid-epoch resume leaves of it: the loader
    # serves later epochs too (batches_per_epoch counts the same way)
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=sampler.per_rank >= batch_size,
        pin_memory=pin_memory,
        generator=generator,
        collate_fn=collate_slices,
        **_loader_kwargs(workers, prefetch_factor, persistent_workers, multiprocessing_context),
    )


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


def make_val_loader(
    store_path: Path | str,
    info: StoreInfo,
    cases: Sequence[str],
    *,
    batch_size: int,
    workers: int,
    context: int,
    pin_memory: bool,
    rank: int = 0,
    world_size: int = 1,
    prefetch_factor: int = 2,
    persistent_workers: bool = True,
    multiprocessing_context=None,
) -> DataLoader:
    """Every slice of this rank's cases, case by case in slice order, never augmented.
    Yields (image, label, row): `row` is the global index row of each slice, so
    `info.index[row]["case"]` (a position in `info.case_ids`) and `["slice"]` place it.
    Workers persist so repeated validations do not restart them."""
    mine = shard_cases(info, cases, rank, world_size)
    ds = SliceDataset(store_path, info, mine, context=context, augment=None, return_row=True)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        pin_memory=pin_memory,
        collate_fn=collate_slices,
        **_loader_kwargs(
            workers if len(ds) else 0, prefetch_factor, persistent_workers, multiprocessing_context
        ),
    )
