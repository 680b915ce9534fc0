"""The run record (config.json): typed, versioned, written and read in one place; a damaged,
mistyped or newer file is one line naming the file and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kitsprep.errors import KitsError
from kitsprep.labels import EDITIONS
from kitsprep.window import WINDOW_PRESETS
from kitstrain.core import rundir
from kitstrain.core.config import resolve
from kitstrain.core.record import RECORD_VERSION, RunRecord, StoreAttrs, read_record, write_record


def record() -> RunRecord:
    return RunRecord(
        train=resolve("default", {"lr": 0.01}),
        model={"in_channels": 5, "num_classes": 3, "width": 4},
        store="/data/s.h5",
        store_fingerprint="ab" * 8,
        store_attrs=StoreAttrs(WINDOW_PRESETS["mlperf"], 64, 3, EDITIONS["kits19"]),
        context=2,
        batch={"size": 16, "reason": "preset"},
        batch_size=16,
        lr_scaling={"lr": 0.01},
    )


def test_a_record_reads_back_as_written(tmp_path: Path) -> None:
    write_record(tmp_path, record())
    assert read_record(tmp_path) == record()
    assert json.loads((tmp_path / rundir.CONFIG).read_text())["version"] == RECORD_VERSION


def test_a_record_from_before_the_version_key_is_read(tmp_path: Path) -> None:
    write_record(tmp_path, record())
    raw = json.loads((tmp_path / rundir.CONFIG).read_text())
    del raw["version"]
    rundir.write_json(tmp_path / rundir.CONFIG, raw)
    assert read_record(tmp_path) == record()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"version": RECORD_VERSION + 1}, "written by a newer kits.*upgrade kits"),
        ({"version": "one"}, "not a run record version"),
        ({"context": "two"}, r"context is 'two', expected an integer"),
        ({"train": "default"}, "train is 'default', expected a JSON object"),
        ({"batch_size": 2.5}, "batch_size is 2.5, expected an integer or null"),
        ({"unknown_key": 1}, "unknown_key"),
    ],
)
def test_a_damaged_record_is_one_line_naming_the_file(
    tmp_path: Path, change: dict, message: str
) -> None:
    write_record(tmp_path, record())
    raw = json.loads((tmp_path / rundir.CONFIG).read_text())
    rundir.write_json(tmp_path / rundir.CONFIG, {**raw, **change})
    with pytest.raises(KitsError, match=message) as err:
        read_record(tmp_path)
    assert str(tmp_path / rundir.CONFIG) in str(err.value) and "\n" not in str(err.value)


def test_a_mistyped_training_option_is_named(tmp_path: Path) -> None:
    write_record(tmp_path, record())
    raw = json.loads((tmp_path / rundir.CONFIG).read_text())
    raw["train"]["epochs"] = "many"
    rundir.write_json(tmp_path / rundir.CONFIG, raw)
    with pytest.raises(KitsError, match="train.epochs is 'many', expected an integer"):
        read_record(tmp_path)


def test_a_record_from_before_the_time_budget_is_read(tmp_path: Path) -> None:
    """Records written before --val-budget and the validation plan existed still load, with
    the defaults: the whole validation set, the default share."""
    write_record(tmp_path, record())
    raw = json.loads((tmp_path / rundir.CONFIG).read_text())
    del raw["validation"], raw["train"]["val_budget"]
    (tmp_path / rundir.CONFIG).write_text(json.dumps(raw))
    got = read_record(tmp_path)
    assert got.validation == {} and got.train.val_budget == 0.15
    assert got == record()
