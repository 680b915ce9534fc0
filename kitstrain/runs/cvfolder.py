"""A cross-validation folder as `kitstrain cv` lays it out: `cv.json` marks it (folds, the
store, the folds done), `fold_K/` are the folds' run directories, `oof/<case>.npz` the
out-of-fold predictions (key `pred`: uint8 labels in the store's (slices, H, W) geometry),
`postprocessing.json` the decision taken on them. Read here for the ensemble and the
post-processing decision."""

from __future__ import annotations

import json
from pathlib import Path

from kitsprep.errors import KitsError

__all__ = ["CV_JSON", "OOF", "fold_dirs", "is_cv_folder", "read_cv"]

CV_JSON = "cv.json"
OOF = "oof"


def is_cv_folder(folder: Path) -> bool:
    """A folder is a cross-validation folder iff it holds `cv.json`."""
    return (Path(folder) / CV_JSON).is_file()


def read_cv(cv_dir: Path) -> dict:
    """`cv.json`, checked to hold the fold count and the store."""
    path = Path(cv_dir) / CV_JSON
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise KitsError(
            f"{path} is unreadable ({exc}); restore the file `kitstrain cv` wrote"
        ) from None
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("folds"), int)
        or record["folds"] < 1
        or not isinstance(record.get("store"), str)
    ):
        raise KitsError(
            f'{path} lacks a fold count and a store (expected {{"folds": N, "store": '
            "PATH, ...}); restore the file `kitstrain cv` wrote"
        )
    return record


def fold_dirs(cv_dir: Path) -> list[Path]:
    """The folds' run directories, fold_0 .. fold_{N-1}, each finished (in `cv.json`'s
    `done` where it keeps that list)."""
    record = read_cv(cv_dir)
    done = record.get("done")
    folds = []
    for k in range(record["folds"]):
        fold = Path(cv_dir) / f"fold_{k}"
        if not fold.is_dir() or (isinstance(done, list) and k not in done):
            raise KitsError(
                f"{cv_dir}: fold {k} of {record['folds']} has not finished ({fold.name}/ "
                "is missing or not in cv.json's done); finish the cross-validation with "
                "`kitstrain cv`, or pass the finished fold_K folders as runs"
            )
        folds.append(fold)
    return folds
