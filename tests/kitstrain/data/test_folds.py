"""Cross-validation folds: stratified dealing on case ids and tumour sizes, the check of a
given splits list against a store, one fold as a split, and the splits file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kitsprep.errors import KitsError
from kitsprep.store import open_store
from kitstrain.data.folds import (
    check_folds,
    fold_split,
    splits_digest,
    stratified_folds,
    tumour_sizes,
)
from kitstrain.data.foldsfile import read_splits_file, write_splits_file


def sizes_of(n: int) -> dict[str, int]:
    """n cases, tumour sizes 0, 10, 20, ... (case i: 10 i), ids not in size order."""
    return {f"case_{(7 * i) % n:05d}": 10 * i for i in range(n)}


def test_folds_are_deterministic_disjoint_and_validate_every_case_once() -> None:
    sizes = sizes_of(23)
    folds = stratified_folds(sizes, 5, seed=0)
    assert folds == stratified_folds(sizes, 5, seed=0)
    assert folds != stratified_folds(sizes, 5, seed=1)
    assert len(folds) == 5
    vals = [c for f in folds for c in f["val"]]
    assert sorted(vals) == sorted(sizes)  # every case validated exactly once
    assert sorted(len(f["val"]) for f in folds) == [4, 4, 5, 5, 5]
    for f in folds:
        assert not set(f["train"]) & set(f["val"])
        assert sorted(f["train"] + f["val"]) == sorted(sizes)


def test_small_tumours_are_spread_over_the_folds() -> None:
    """The 5 smallest tumours land in 5 different folds, and so do the 5 largest: each
    stratum of `folds` cases by size gives one case to every fold."""
    sizes = sizes_of(20)
    folds = stratified_folds(sizes, 5, seed=3)
    fold_of = {c: k for k, f in enumerate(folds) for c in f["val"]}
    by_size = sorted(sizes, key=sizes.get)
    assert {fold_of[c] for c in by_size[:5]} == set(range(5))
    assert {fold_of[c] for c in by_size[-5:]} == set(range(5))
    means = [sum(sizes[c] for c in f["val"]) / len(f["val"]) for f in folds]
    assert max(means) - min(means) <= 40  # a random deal could put all the small ones in one


def test_too_few_cases_or_folds_is_one_line() -> None:
    with pytest.raises(KitsError, match="at least 3 labelled cases, found 2"):
        stratified_folds({"a": 1, "b": 2}, 3)
    with pytest.raises(KitsError, match="--folds must be at least 2"):
        stratified_folds({"a": 1, "b": 2}, 1)


def test_tumour_sizes_come_from_the_index(loader_store: Path) -> None:
    info = open_store(loader_store)
    sizes = tumour_sizes(info)
    assert sorted(sizes) == sorted(info.labelled_cases)  # the unlabelled case never enters
    for c, n in sizes.items():
        assert n == int(info.rows(c)["counts"][:, info.labels.value("tumour")].sum())
    assert any(n > 0 for n in sizes.values())


def test_a_given_list_is_checked_against_the_store(loader_store: Path) -> None:
    info = open_store(loader_store)
    labelled = sorted(info.labelled_cases)
    good = [
        {"train": labelled[2:], "val": labelled[:2]},
        {"train": labelled[:2], "val": labelled[2:]},
    ]
    assert check_folds(good, info, "f.json") == good
    unknown = [{"train": labelled[1:], "val": ["case_00099"]}]
    with pytest.raises(KitsError, match=r"f.json names case\(s\) case_00099 are not in"):
        check_folds(unknown, info, "f.json")
    overlap = [{"train": labelled, "val": labelled[:1]}]
    with pytest.raises(KitsError, match=f"fold 0 trains and validates on {labelled[0]}"):
        check_folds(overlap, info, "f.json")
    unlabelled = [c for c in info.case_ids if c not in labelled]
    with pytest.raises(KitsError, match="have no segmentation"):
        check_folds([{"train": labelled, "val": unlabelled}], info, "f.json")
    for bad in ({"train": []}, [], [{"train": "case_00000", "val": []}]):
        with pytest.raises(KitsError, match="f.json"):
            check_folds(bad, info, "f.json")


def test_one_fold_as_a_split() -> None:
    folds = stratified_folds(sizes_of(6), 3)
    split = fold_split(folds, 2, "s.json", seed=4)
    assert (list(split.train), list(split.val), split.mode, split.seed) == (
        folds[2]["train"],
        folds[2]["val"],
        "fold",
        4,
    )
    with pytest.raises(
        KitsError, match=r"--fold 3 is outside the 3 folds of s.json; expected 0..2"
    ):
        fold_split(folds, 3, "s.json", seed=0)


def test_the_digest_is_of_the_content_not_the_layout(tmp_path: Path) -> None:
    folds = stratified_folds(sizes_of(6), 2)
    path = write_splits_file(tmp_path / "splits.json", folds)
    assert read_splits_file(path) == folds
    (tmp_path / "compact.json").write_text(json.dumps(folds))
    assert splits_digest(read_splits_file(tmp_path / "compact.json")) == splits_digest(folds)
    assert splits_digest(folds[::-1]) != splits_digest(folds)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(KitsError, match="not readable JSON"):
        read_splits_file(tmp_path / "bad.json")
    with pytest.raises(KitsError, match="does not exist"):
        read_splits_file(tmp_path / "none.json")
