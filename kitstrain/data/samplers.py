"""Which slices a training epoch draws: foreground share and per-label weights."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import numpy as np
from torch.utils.data import Sampler

from kitsprep.errors import KitsError
from kitsprep.labels import LabelSet


class Drawn(NamedTuple):
    """One sampled item: the dataset position, and where in which epoch's stream it was
    drawn. Augmentation is seeded by (dataset seed, epoch, draw), so it is the same for a
    draw whichever worker reads it, and a run resumed mid-epoch replays it exactly."""

    index: int
    epoch: int
    draw: int


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

    def __iter__(self) -> Iterator[Drawn]:
        epoch, skip = self.epoch, self._skip
        stream = self.global_stream(epoch)[skip:, self.rank]
        # a loader iterated again without set_epoch still gets a fresh order
        self.epoch += 1
        self._skip = 0
        return (Drawn(int(i), epoch, skip + k) for k, i in enumerate(stream.tolist()))


class EpochStream(Sampler[list[Drawn]]):
    """A ForegroundSampler's batches, one epoch after the next, without end: the loader
    behind it never runs dry at an epoch's end, so its workers' prefetched batches carry
    on across the boundary instead of draining and priming again.

    Epochs stay what they were: epoch e's batches are the consecutive `batch_size` draws
    of `sampler.global_stream(e)` for this rank, its remainder dropped (one short batch
    when the rank's share is under a batch), so a run sees the same items with the same
    augmentation draws as an epoch-by-epoch loader, and `start_batch` resumes inside
    `epoch`. The consumer counts `batches_per_epoch` to find the epochs' ends.
    `until_epoch` ends the stream before that epoch (a finite loader, for tests and
    tools); training leaves it None."""

    def __init__(
        self,
        sampler: ForegroundSampler,
        batch_size: int,
        epoch: int = 0,
        start_batch: int = 0,
        until_epoch: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, found {batch_size}")
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.epoch = int(epoch)
        self.start_batch = max(0, int(start_batch))
        self.until_epoch = until_epoch

    @property
    def batches_per_epoch(self) -> int:
        per_rank = self.sampler.per_rank
        return per_rank // self.batch_size if per_rank >= self.batch_size else 1

    def __iter__(self) -> Iterator[list[Drawn]]:
        s, b = self.sampler, self.batch_size
        epoch, first = self.epoch, self.start_batch
        while self.until_epoch is None or epoch < self.until_epoch:
            stream = s.global_stream(epoch)[:, s.rank].tolist()
            for k in range(first, self.batches_per_epoch):
                items = stream[k * b : (k + 1) * b]
                yield [Drawn(int(i), epoch, k * b + j) for j, i in enumerate(items)]
            epoch, first = epoch + 1, 0
