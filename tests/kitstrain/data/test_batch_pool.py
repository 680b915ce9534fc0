"""The batch pool on its own: slot hand-back on the pinning path, and the /dev/shm check."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data._utils.pin_memory import pin_memory

from kitsprep.errors import KitsError
from kitstrain.data.batch_pool import BatchPool, PooledBatch, ReleasingIterator, check_shared_memory


def _pool(workers: int = 2, slots: int = 2) -> BatchPool:
    return BatchPool(batch_size=3, channels=1, patch=4, workers=workers, slots_per_worker=slots)


def _free(pool: BatchPool) -> list[int]:
    out = []
    for q in pool.free:
        while not q.empty():
            out.append(q.get())
    for s in out:
        pool.give_back(s)
    return sorted(out)


def test_workers_take_only_their_own_slots_and_get_none_when_all_are_held():
    pool = _pool()
    taken = [pool.take(1, 3) for _ in range(3)]
    assert [t[0] for t in taken[:2]] == [2, 3] and taken[2] is None
    assert pool.take(0, 4) is None  # larger than a slot: the caller allocates fresh
    assert _free(pool) == [0, 1]


def test_pinning_thread_copies_the_slot_and_hands_it_back_at_once(monkeypatch):
    # CPU-only torch cannot pin: a clone stands in for the pinned copy
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self.clone())
    pool = _pool()
    slot, img, lab = pool.take(0, 2)
    img.fill_(1.5)
    lab.fill_(2)
    pinned = pin_memory(PooledBatch(pool.token, slot, 2))  # what the DataLoader thread does
    assert isinstance(pinned, tuple) and pinned[0].shape == (2, 1, 4, 4)
    assert slot in _free(pool)  # handed back before the step sees the batch
    pool.images[slot].fill_(0)  # a worker reuses the slot: the pinned copy keeps its bytes
    assert bool((pinned[0] == 1.5).all()) and bool((pinned[1] == 2).all())


def test_releasing_iterator_hands_each_slot_back_when_the_next_batch_is_asked_for():
    pool = _pool(workers=1, slots=3)
    batches = []
    for _ in range(3):
        slot, img, lab = pool.take(0, 3)
        img.fill_(slot)
        batches.append(PooledBatch(pool.token, slot, 3))
    it = ReleasingIterator(iter(batches))
    img, _ = next(it)
    assert img.shape == (3, 1, 4, 4) and _free(pool) == []
    next(it)
    assert _free(pool) == [0]
    next(it)
    with pytest.raises(StopIteration):
        next(it)
    assert _free(pool) == [0, 1, 2]


def test_a_pool_larger_than_free_shared_memory_is_refused_in_one_line(tmp_path):
    with pytest.raises(KitsError, match=r"shared memory.*--shm-size.*--workers"):
        check_shared_memory(2**62, "2 worker(s) x 6 batches", shm=tmp_path)
    check_shared_memory(1, "a tiny pool", shm=tmp_path)
