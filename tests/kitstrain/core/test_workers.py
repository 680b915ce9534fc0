"""Loader workers sized to the machine: `--workers auto`, and absurd counts refused."""

from __future__ import annotations

import pytest

from kitsprep.errors import KitsError
from kitstrain.core import workers as w
from kitstrain.core.config import resolve
from kitstrain.core.options import parse_workers
from kitstrain.core.record import RunRecord, read_record, write_record


def cores(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr(w.os, "sched_getaffinity", lambda pid: set(range(n)))


@pytest.mark.parametrize(
    "n, ranks, expected", [(1, 1, 1), (2, 1, 1), (8, 1, 7), (64, 1, 16), (16, 4, 3), (2, 4, 1)]
)
def test_auto_is_the_rank_s_cores_minus_one_within_1_to_16(monkeypatch, n, ranks, expected):
    cores(monkeypatch, n)
    got, why = w.resolve_workers("auto", ranks)
    assert got == expected and "auto" in why and f"{n} usable core(s)" in why


def test_local_ranks_come_from_torchrun(monkeypatch):
    cores(monkeypatch, 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert w.resolve_workers("auto") == (3, w.resolve_workers("auto", 4)[1])


def test_a_count_above_four_times_the_cores_is_refused_naming_both(monkeypatch):
    cores(monkeypatch, 2)
    assert w.resolve_workers(8, 1)[0] == 8
    with pytest.raises(KitsError, match=r"--workers 1000 is more than 4x the 2 core\(s\).*8"):
        w.resolve_workers(1000, 1)
    assert w.resolve_workers(0, 1)[0] == 0  # batches in the training process


def test_workers_flag_text_and_old_records(tmp_path):
    assert parse_workers("auto") == "auto" and parse_workers("3") == 3
    with pytest.raises(KitsError, match="'auto' or a count"):
        parse_workers("-1")
    assert resolve("default", {}).workers == "auto"
    with pytest.raises(KitsError, match="'auto' or a count"):
        resolve("default", {"workers": "many"})
    # a record from before `auto` holds an int, and loads as it is
    write_record(tmp_path, RunRecord(train=resolve("default", {"workers": 2}), model={}))
    record = read_record(tmp_path)
    assert record.train.workers == 2 and record.workers is None and record.workers_reason == ""
