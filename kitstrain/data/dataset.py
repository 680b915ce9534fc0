"""The store-backed slice dataset: batches read straight into shared tensors.

The hot path never touches h5py: each DataLoader worker opens the store
(`kitsprep.store.SliceReader`, lazily in the worker) and reads single slices at the byte
offsets recorded in the index with positioned reads straight into the batch's slot of the
loader's shared pool (`kitstrain.data.batch_pool`), checking each one's CRC-32 (with
augmentation on the device, where a worker reads only the rows a sample's warp reaches:
on its first read of each chunk, see `_fill_cuts`). Nothing is mapped and no whole-case
or whole-file read happens anywhere, so a worker's memory is the same for a 100 MB store
and a store larger than RAM. Samplers read only the index.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from kitsprep.errors import KitsError
from kitsprep.lifeline import die_with_parent
from kitsprep.store import SliceReader, StoreInfo
from kitstrain.data.augment import AugmentConfig, augment_slice
from kitstrain.data.batch_pool import BatchPool, PooledBatch, shared_empty
from kitstrain.data.device_augment import PARAMS, cut_side, draw_params, reach_rows
from kitstrain.data.patches import patch_origin, uniform_origin
from kitstrain.data.samplers import Drawn
from kitstrain.data.splits import require_labelled_cases


class SliceDataset(Dataset):
    """Slices of some cases: item i -> (image float16 (1+2K, H, W), label uint8 (H, W)).

    Float16 keeps the host->GPU copy at half the bytes; the training step casts on device.
    The store is opened lazily in whichever process reads first (each DataLoader worker,
    after fork or spawn); the dataset pickles as the path plus a few small arrays.

    `augment_on="device"`: items are the `cut_side` windows around each patch and a
    `device_augment.PARAMS` record per item (batches are (image, label, params)); the
    warp and the intensity changes are `device_augment.augment_batch`'s, after the copy.
    """

    augment_on = "workers"  # class defaults: what subclasses that skip __init__ get
    cut: int | None = None

    def __init__(
        self,
        store_path: Path | str,
        info: StoreInfo,
        cases: Sequence[str],
        context: int = 0,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        patch: int | None = None,
        augment_on: str = "workers",
    ):
        if context < 0:
            raise KitsError(f"--context must be >= 0, found {context}")
        if not Path(store_path).is_file():
            raise KitsError(
                f"store {store_path} does not exist or is not a file; pass the path of a "
                "store written by `kitsprep build` (e.g. open_store(path).path)"
            )
        require_labelled_cases(
            info,
            cases,
            what="case(s)",
            fix="fix the case list",
            unlabelled_fix="they cannot be loaded for training or validation",
        )
        if patch is not None and not 1 <= patch <= info.size:
            raise KitsError(
                f"patch {patch} does not fit the store's {info.size}x{info.size} "
                "slices; use at most that size"
            )
        self.store_path = Path(store_path)
        self.store_case_ids = tuple(info.case_ids)  # names a damaged slice's case
        self.store_identity = info.identity  # tells a replaced store from a damaged one
        self.size = info.size
        self.patch = info.size if patch is None else int(patch)
        self.context = int(context)
        self.case_ids = tuple(cases)
        self.augment = augment if augment is not None and augment.enabled else None
        if augment_on not in ("workers", "device"):
            raise ValueError(f"augment_on must be 'workers' or 'device', found {augment_on!r}")
        # without augmentation there is nothing to do on the device: plain crops
        self.augment_on = augment_on if self.augment is not None else "workers"
        self.cut = (
            cut_side(self.patch, self.size, self.augment) if self.augment_on == "device" else None
        )
        self.seed = int(seed)
        metas = [info.cases[c] for c in cases]
        counts = np.array([m.slices for m in metas], np.int64)
        # Global index rows of every item, in case order then slice order
        row_ids = np.concatenate(
            [np.arange(m.row_start, m.row_start + m.slices, dtype=np.int64) for m in metas]
            or [np.zeros(0, np.int64)]
        )
        self.rows = info.index[row_ids]  # a copy: what samplers read
        # slices whose index counts say "all background": no label chunk to inflate
        self._background = info.foreground_pixels(self.rows) == 0
        # Neighbours as positions into self.rows: the K slices either side, clamped at the
        # case's ends (a case's rows are contiguous here, so position = own - slice + k)
        first = np.repeat(np.cumsum(counts) - counts, counts)
        last = np.repeat(counts, counts) - 1
        k = np.arange(-self.context, self.context + 1, dtype=np.int64)
        sl = self.rows["slice"].astype(np.int64)[:, None]
        self._neighbours = first[:, None] + np.clip(sl + k, 0, last[:, None])
        self._reader: SliceReader | None = None
        self._darkest: np.ndarray | None = None  # per item, this process's: see _fill_cuts
        self._rng: np.random.Generator | None = None
        self._pid: int | None = None
        self.pool: BatchPool | None = None  # a pooled training loader's slots

    @property
    def channels(self) -> int:
        return 1 + 2 * self.context

    @property
    def side(self) -> int:
        """The side of the tensors a worker writes: the patch, or the cut around it."""
        return self.cut if self.cut is not None else self.patch

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        # The reader and RNG are per process: a worker opens and seeds its own
        return {**self.__dict__, "_reader": None, "_darkest": None, "_rng": None, "_pid": None}

    def _open(self) -> None:
        """(Re)open the reader and RNG in this process: first use, or first use after a fork."""
        self._reader = SliceReader(
            self.store_path, self.size, self.store_case_ids, identity=self.store_identity
        )
        # known from each chunk's first (whole, checked) read by this reader
        self._darkest = np.full(len(self.rows), np.nan, np.float32)
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
        self._reader.images(rows[self._neighbours[i]], img)
        if self._background[i]:
            # the index counts come from these very labels: zero-fill instead of inflating
            # 256 KB (10 us instead of ~100 us, and most CT slices hold no kidney)
            lab[...] = 0
        else:
            lab[...] = self._reader.label(rows[i])

    def _fill(
        self, indices: Sequence[int], images: torch.Tensor, labels: torch.Tensor
    ) -> np.ndarray | None:
        """Read (and on the workers' side augment) each item into row j of the batch
        tensors; with `augment_on="device"` return the items' `PARAMS`."""
        if self._pid != os.getpid():
            self._open()
        img_np, lab_np = images.numpy(), labels.numpy()
        cropping = self.patch < self.size
        if self.cut is not None:
            return self._fill_cuts(indices, img_np, lab_np)
        if cropping:
            whole_img = np.empty((self.channels, self.size, self.size), np.float16)
            whole_lab = np.empty((self.size, self.size), np.uint8)
        for j, item in enumerate(indices):
            i = item.index if isinstance(item, Drawn) else int(item)
            rng = None
            if cropping or self.augment is not None:
                rng = self._item_rng(item)
            if cropping:
                self._read_into(i, whole_img, whole_lab)
                y, x = self._origin(i, whole_lab, rng)
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
        return None

    def _item_rng(self, item) -> np.random.Generator:
        """A drawn item's own stream (seed, epoch, draw); the worker's stream otherwise."""
        if isinstance(item, Drawn):
            return np.random.default_rng([self.seed, item.epoch, item.draw])
        return self._rng

    def _origin(
        self, i: int, label: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[int, int]:
        """The patch's top-left; the index already says which labels a slice holds: no
        label (None) needed for an empty slice, one pass for the chosen label otherwise."""
        if self._background[i]:
            return uniform_origin((self.size, self.size), self.patch, rng)
        present = np.flatnonzero(self.rows["counts"][i][1:]) + 1
        try:
            return patch_origin(label, self.patch, rng, present)
        except ValueError:
            self._reader.damaged(self.rows[i], "its label disagrees with the index's counts")

    def _fill_cuts(self, indices: Sequence, img_np: np.ndarray, lab_np: np.ndarray) -> np.ndarray:
        """The device side's share: read the label, choose the patch, draw its augmentation
        (the same draws, in the same order, as the workers' side), then read only the image
        rows the warp reads (`reach_rows`) into the cut, and copy the label's same rows;
        rows of the cut that no tap reads keep whatever they held. The cut is the whole
        slice when the warp can reach that far.

        What the warp shows beyond the slice is each context slice's darkest value, a
        property of the stored slice: taken once per chunk from its first read, which is
        whole and CRC-checked (`SliceReader.image_rows`), and kept for later partial reads."""
        side, size, channels = self.cut, self.size, self.channels
        params = np.zeros(len(indices), PARAMS)
        whole = side == size
        img = None if whole else np.empty((channels, size, size), np.float16)
        items = [item.index if isinstance(item, Drawn) else int(item) for item in indices]
        labels = []
        for j, (item, i) in enumerate(zip(indices, items, strict=True)):
            rng = self._item_rng(item)
            # the index counts come from these very labels: no inflating of an empty one
            lab = None if self._background[i] else self._reader.label(self.rows[i])
            y, x = self._origin(i, lab, rng) if self.patch < size else (0, 0)
            params[j] = draw_params(rng, self.augment, y, x, self.patch, side, size)
            labels.append(lab)
        starts, stops = reach_rows(params, self.patch, size, side)
        tops, lefts = params["cut_top"].tolist(), params["cut_left"].tolist()
        fill = params["fill"]
        for j, i in enumerate(items):
            stack = self._neighbours[i]
            start, stop, ct, cl = int(starts[j]), int(stops[j]), tops[j], lefts[j]
            into = img_np[j] if whole else img
            darkest = self._darkest[stack]
            fresh = self._reader.image_rows(self.rows[stack], into, start, stop, np.isnan(darkest))
            if fresh.any():
                found = torch.from_numpy(into[fresh]).amin(dim=(1, 2)).float().numpy()
                darkest[fresh] = self._darkest[stack[fresh]] = found
            fill[j, :channels] = darkest
            reach = slice(start - ct, stop - ct)
            if not whole:
                img_np[j, :, reach] = img[:, start:stop, cl : cl + side]
            if labels[j] is None:
                lab_np[j, reach] = 0
            else:
                lab_np[j, reach] = labels[j][start:stop, cl : cl + side]
        return params

    def __getitem__(self, i: int):
        images, labels = self._batch_tensors(1, shared=False)
        params = self._fill([i], images, labels)
        if params is not None:
            return images[0], labels[0], params
        return images[0], labels[0]

    def __getitems__(self, indices: list[int]) -> list[tuple] | PooledBatch:
        """A whole batch read straight into one tensor per field, so neither a per-slice
        allocation nor collate's stacking copy happens. Inside a worker of a pooled loader
        (`pool`, set by `train_loader_for`) the tensors are a slot of the pool and the batch
        crosses to the main process as the slot's number (`PooledBatch`); otherwise they are
        fresh (shared memory in a worker) and items are views of them: `collate_slices` hands
        the tensors on as they are, and any other collate still works (it stacks the views).
        """
        worker = get_worker_info()
        slot = None
        if worker is not None and self.pool is not None:
            slot = self.pool.take(worker.id, len(indices))
        if slot is not None:
            number, images, labels = slot
            params = self._fill(indices, images, labels)
            return PooledBatch(self.pool.token, number, len(indices), params)
        images, labels = self._batch_tensors(len(indices), shared=worker is not None)
        params = self._fill(indices, images, labels)
        if params is not None:
            return [(images[j], labels[j], params[j : j + 1]) for j in range(len(indices))]
        return [(images[j], labels[j]) for j in range(len(indices))]

    def _batch_tensors(self, n: int, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh batch tensors; in shared memory when they will cross processes (as
        default_collate does: moving them there later would copy them)."""
        s = self.side
        empty = shared_empty if shared else lambda shape, dtype: torch.empty(shape, dtype=dtype)
        return empty((n, self.channels, s, s), torch.float16), empty((n, s, s), torch.uint8)


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


def collate_slices(batch: list[tuple] | PooledBatch) -> tuple | PooledBatch:
    """Collate for SliceDataset: pooled batches and batches that `__getitems__` already laid
    out in one tensor per field pass through without a copy; anything else goes to torch's
    default_collate."""
    if isinstance(batch, PooledBatch):
        return batch
    fields = list(zip(*batch, strict=True))
    out = []
    for parts in fields:
        if isinstance(parts[0], np.ndarray) and parts[0].dtype.names:  # device_augment.PARAMS
            out.append(np.concatenate(parts))
            continue
        whole = _views_of_one_batch(parts) if isinstance(parts[0], torch.Tensor) else None
        out.append(whole if whole is not None else default_collate(list(parts)))
    return tuple(out)


def worker_init_fn(worker_id: int) -> None:
    """Die with the main process (a `kill -9` of fit leaves no loader worker behind), and
    seed numpy's and Python's global RNGs per worker from torch's per-worker seed, so any
    stray use of them differs between workers and repeats for a seed."""
    die_with_parent()
    seed = torch.initial_seed()
    np.random.seed(seed % 2**32)
    random.seed(seed)
