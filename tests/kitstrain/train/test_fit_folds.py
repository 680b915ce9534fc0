"""`kitstrain fit --fold K`: the folds written once beside the run and read by every fold,
an nnU-Net splits file, the fold recorded in config.json and kept by --resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kitsprep.store import open_store
from kitstrain.cli import main
from kitstrain.core.record import read_record
from kitstrain.data.folds import splits_digest
from tests.kitstrain.train.test_fit import TINY


def fit_cli(store: Path, out: Path, *extra: str):
    return CliRunner().invoke(
        main, ["fit", str(store), "--out", str(out), *TINY, "--max-steps", "1", *extra]
    )


def test_folds_are_written_once_beside_the_runs_and_read_by_each_fold(
    loader_store: Path, tmp_path: Path
) -> None:
    r0 = fit_cli(loader_store, tmp_path / "f0", "--fold", "0", "--folds", "3")
    assert r0.exit_code == 0, r0.output
    splits_file = tmp_path / "splits.json"
    assert (
        f"folds: wrote 3 folds of 6 labelled cases, stratified by tumour size, to {splits_file}"
        in r0.output
    )
    folds = json.loads(splits_file.read_text())
    assert len(folds) == 3
    first = splits_file.stat().st_mtime_ns
    r1 = fit_cli(loader_store, tmp_path / "f1", "--fold", "1")
    assert r1.exit_code == 0, r1.output
    assert f"folds: read 3 folds from {splits_file}" in r1.output
    assert splits_file.stat().st_mtime_ns == first  # read, not written again
    for k in (0, 1):
        split = json.loads((tmp_path / f"f{k}" / "split.json").read_text())
        assert (split["train"], split["val"], split["mode"]) == (
            folds[k]["train"],
            folds[k]["val"],
            "fold",
        )
        record = read_record(tmp_path / f"f{k}").fold
        assert (record.fold, record.folds, record.splits) == (k, 3, str(splits_file))
        assert record.sha256 == splits_digest(folds)
    # --resume keeps the recorded fold (`kitstrain cv` resumes folds): another is refused
    r = fit_cli(loader_store, tmp_path / "f1", "--resume", "--fold", "2")
    assert r.exit_code == 1 and "--fold 2 differs" in r.output and "(fold 1)" in r.output


def test_an_nnunet_splits_file_is_read(loader_store: Path, tmp_path: Path) -> None:
    labelled = sorted(open_store(loader_store).labelled_cases)
    nnunet = tmp_path / "splits_final.json"
    nnunet.write_text(
        json.dumps(
            [
                {"train": labelled[:4], "val": labelled[4:]},
                {"train": labelled[2:], "val": labelled[:2]},
            ]
        )
    )
    r = fit_cli(loader_store, tmp_path / "runs" / "a", "--fold", "1", "--splits", str(nnunet))
    assert r.exit_code == 0, r.output
    assert f"folds: read 2 folds from {nnunet}" in r.output
    assert json.loads((tmp_path / "runs" / "a" / "split.json").read_text())["val"] == labelled[:2]
    assert not (tmp_path / "runs" / "splits.json").exists()  # a given file: nothing written


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--fold", "0", "--train-cases", "0-3"], "give one or the other"),
        (["--folds", "3"], "add --fold K"),
        (["--fold", "0", "--folds", "7"], "7 folds need at least 7 labelled cases, found 6"),
        (["--fold", "3", "--folds", "3"], "--fold 3 is outside the 3 folds"),
        (["--fold", "0", "--splits", "BAD"], "names case(s) case_00042 are not in"),
        (["--fold", "0", "--splits", "OVERLAP"], "fold 0 trains and validates on case_00000"),
        (["--fold", "0", "--folds", "3", "--splits", "TWO"], "--folds 3, but"),
        (["--fold", "0", "--splits", "MISSING"], "does not exist"),
    ],
)
def test_bad_fold_options_are_one_line(
    loader_store: Path, tmp_path: Path, extra: list[str], expected: str
) -> None:
    (tmp_path / "bad.json").write_text(
        json.dumps([{"train": ["case_00000"], "val": ["case_00042"]}] * 2)
    )
    (tmp_path / "overlap.json").write_text(
        json.dumps([{"train": ["case_00000"], "val": ["case_00000", "case_00001"]}])
    )
    (tmp_path / "two.json").write_text(
        json.dumps([{"train": ["case_00000"], "val": ["case_00001"]}] * 2)
    )
    names = {"BAD": "bad", "OVERLAP": "overlap", "TWO": "two", "MISSING": "none"}
    extra = [str(tmp_path / f"{names[a]}.json") if a in names else a for a in extra]
    r = fit_cli(loader_store, tmp_path / "r", *extra)
    assert r.exit_code == 1, r.output
    assert expected in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
    assert not (tmp_path / "splits.json").exists()  # nothing written for a refused fold
