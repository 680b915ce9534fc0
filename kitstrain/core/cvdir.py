"""The cross-validation folder, `kitstrain cv`'s output: one place that knows its layout, so
cv, score and predict agree. A folder is one iff it holds cv.json.

CV_DIR/cv.json        the marker: version, folds, store, splits file, fit options, folds done
       splits.json    the folds (nnU-Net splits_final.json form), read by every fold's run
       fold_K/        fold K's run directory (`kitstrain fit --fold K --splits splits.json`)
       oof/<case>.npz out-of-fold prediction: `pred` uint8 labels (slices, size, size) in
                      the store's geometry, `fold` the fold whose model predicted it

Every file is written atomically (`kitsprep.files`).
"""

from __future__ import annotations

import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kitsprep.errors import KitsError
from kitsprep.store import StoreInfo
from kitstrain.core import rundir

CV_JSON = "cv.json"
SPLITS = "splits.json"
OOF = "oof"
CV_VERSION = 1
CV_FILES = (CV_JSON, SPLITS, OOF)  # the folder's own: no report may replace them


@dataclass(frozen=True)
class CvRecord:
    """cv.json: what the cross-validation trains (the same for every fold) and how far it
    got. `fit` holds the resolved `TrainConfig` fields."""

    folds: int
    store: str
    splits: str  # the folds file, relative to the folder
    fit: dict[str, Any]
    done: list[int] = field(default_factory=list)  # folds trained and predicted out of fold
    store_fingerprint: str | None = None
    version: int = CV_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def is_cv_dir(path: Path) -> bool:
    return (Path(path) / CV_JSON).is_file()


def fold_dir(cv_dir: Path, fold: int) -> Path:
    return Path(cv_dir) / f"fold_{fold}"


def oof_path(cv_dir: Path, case_id: str) -> Path:
    return Path(cv_dir) / OOF / f"{case_id}.npz"


def read_oof(cv_dir: Path, case_id: str, info: StoreInfo, fold: int | None = None) -> np.ndarray:
    """One out-of-fold prediction, checked to be what `kitstrain cv` writes for this store
    (and, given `fold`, by that fold's model)."""
    path = oof_path(cv_dir, case_id)
    if case_id not in info.cases:
        raise KitsError(
            f"{path} predicts {case_id}, which is not in {info.path}; delete it, or pass "
            "--data with the store the cross-validation trained on"
        )
    shape = (info.cases[case_id].slices, info.size, info.size)
    fix = f"delete it and rerun `kitstrain cv` with --out {cv_dir} to predict it again"
    try:
        with np.load(path, allow_pickle=False) as z:
            pred, got_fold = z["pred"], int(z["fold"])
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise KitsError(f"{path} is not an out-of-fold prediction ({exc}); {fix}") from None
    if pred.shape != shape or pred.dtype != np.uint8 or fold not in (None, got_fold):
        raise KitsError(
            f"{path} holds {pred.dtype} {pred.shape} of fold {got_fold}, expected uint8 "
            f"{shape}{'' if fold is None else f' of fold {fold}'} ({info.path}); {fix}"
        )
    return pred


def check_report_path(cv_dir: Path, path: Path, option: str) -> None:
    """Refuse a report path that is one of the folder's own files (cv.json, splits.json,
    oof/): writing it would break the cross-validation."""
    cv_r, out_r = Path(cv_dir).resolve(), Path(path).resolve()
    if cv_r in out_r.parents and out_r.relative_to(cv_r).parts[0] in CV_FILES:
        raise KitsError(
            f"{option} {path} would replace the cross-validation's own "
            f"{out_r.relative_to(cv_r).parts[0]}; choose another {option} (e.g. "
            f"{Path(cv_dir) / 'score.json'})"
        )


def write_cv(cv_dir: Path, record: CvRecord) -> None:
    rundir.write_json(Path(cv_dir) / CV_JSON, record.to_json())


def read_cv(cv_dir: Path) -> CvRecord:
    """cv.json as a `CvRecord`; a missing, damaged or newer one is one line."""
    path = Path(cv_dir) / CV_JSON
    if not path.is_file():
        raise KitsError(
            f"{cv_dir} is not a cross-validation folder ({CV_JSON} is missing); pass a "
            "folder written by `kitstrain cv`"
        )
    raw = rundir.read_json(cv_dir, CV_JSON)
    version = raw.get("version")
    if isinstance(version, int) and version > CV_VERSION:
        raise KitsError(
            f"{path} is version {version}, written by a newer kits; upgrade kits to read it"
        )
    record = rundir.from_record(cv_dir, CV_JSON, lambda r: CvRecord(**r), raw)
    bad = [
        name
        for name, ok in (
            ("folds", isinstance(record.folds, int) and record.folds >= 1),
            ("fit", isinstance(record.fit, dict)),
            ("done", isinstance(record.done, list) and all(type(k) is int for k in record.done)),
        )
        if not ok
    ]
    if bad:
        raise KitsError(
            f"{path}: {', '.join(bad)} do not hold what `kitstrain cv` writes; restore the "
            "file, or run the cross-validation into a new --out"
        )
    return record


def fold_dirs(cv_dir: Path) -> list[Path]:
    """The folds' run directories, fold_0 .. fold_{N-1}, each finished (in cv.json's
    `done`): the members of the folder's ensemble."""
    record = read_cv(cv_dir)
    missing = [k for k in range(record.folds) if k not in record.done]
    if missing:
        raise KitsError(
            f"{cv_dir}: fold(s) {', '.join(map(str, missing))} of {record.folds} have not "
            "finished; finish the cross-validation with `kitstrain cv`, or pass the finished "
            "fold_K folders as runs"
        )
    return [fold_dir(cv_dir, k) for k in range(record.folds)]
