"""`kitstrain cv` as a job: the folds (`splits.json`), every fold trained in turn in its own
run directory (`kitstrain.train.fit.fit` with `--fold K`), then each fold's validation
cases predicted by that fold's best checkpoint into `oof/` (the out-of-fold predictions).
The folder's layout is `kitstrain.core.cvdir`'s.

Resumable per fold: a rerun of the same command skips the folds cv.json lists as done,
resumes a fold whose run has started (`fit --resume`), and predicts a trained fold's cases
again if it was stopped before its out-of-fold predictions were all written."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from kitsprep.errors import KitsError
from kitsprep.files import atomic_path, remove_stale_temps
from kitsprep.outputs import check_output
from kitsprep.progress import Progress
from kitsprep.store import StoreInfo, open_store
from kitstrain.core import rundir
from kitstrain.core.config import RESUMABLE, TrainConfig
from kitstrain.core.cvdir import (
    OOF,
    SPLITS,
    CvRecord,
    fold_dir,
    is_cv_dir,
    oof_path,
    read_cv,
    write_cv,
)
from kitstrain.core.device import resolve_device
from kitstrain.data.folds import splits_digest
from kitstrain.data.foldsfile import write_splits_file
from kitstrain.infer.cases import store_predictions
from kitstrain.infer.engine import DEFAULT_BATCH_SIZE, store_box
from kitstrain.runs.cvscore import missing_folds
from kitstrain.runs.loaded import default_cases, load_run, run_inference
from kitstrain.runs.postprocessing import POSTPROCESSING, read_decision, record_postprocessing
from kitstrain.train.fit import FitConfig, fit
from kitstrain.train.folds import Folds, resolve_folds, store_folds

__all__ = ["CvConfig", "CvResult", "run_cv"]


@dataclass(frozen=True)
class CvConfig:
    """What `kitstrain cv` was asked."""

    store: Path
    out: Path
    train: TrainConfig
    explicit: frozenset[str] = frozenset()  # TrainConfig fields given on the command line
    folds: int | None = None  # None: the splits file's count, or 5
    splits: Path | None = None  # None: the store's recorded folds, or new stratified ones
    device: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE  # slices per inference batch (out-of-fold)


@dataclass
class CvResult:
    out: Path
    folds: int
    trained: list[int] = field(default_factory=list)  # folds this call trained or resumed
    skipped: list[int] = field(default_factory=list)  # folds done before this call
    predicted: int = 0  # out-of-fold cases written by this call


def run_cv(
    cfg: CvConfig,
    echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    show_progress: bool = True,
    on_validation: Callable[[Path], object] | None = None,
) -> CvResult:
    """Train every fold not yet done, then its out-of-fold predictions; returns what this
    call did. Raises KitsError for anything the user can fix."""
    info = open_store(cfg.store)
    out = Path(cfg.out)
    check_output(out, "--out", reading=[cfg.store])
    fit_options = json.loads(json.dumps(asdict(cfg.train)))  # as cv.json holds them
    if is_cv_dir(out):
        record, folds = _continue(cfg, info, out, fit_options, echo)
    else:
        record, folds = _start(cfg, info, out, fit_options, echo)
    (out / OOF).mkdir(exist_ok=True)
    remove_stale_temps(out / OOF)
    result = CvResult(out, record.folds)
    unpredicted = missing_folds(out, record, folds.splits)
    for k in range(record.folds):
        if k in record.done and k not in unpredicted:
            echo(f"fold {k}: done before, skipped")
            result.skipped.append(k)
            continue
        if k in record.done:
            echo(f"fold {k}: trained before; writing its missing out-of-fold predictions")
        else:
            _train_fold(cfg, out, k, record.folds, echo, show_progress, on_validation)
            result.trained.append(k)
        result.predicted += _out_of_fold(cfg, info, out, k, show_progress)
        record = replace(record, done=sorted({*record.done, k}))
        write_cv(out, record)
    if result.trained or result.predicted or not (out / POSTPROCESSING).is_file():
        record_postprocessing(out)
        decision = read_decision(out, info.labels)
        echo(f"post-processing decided on the out-of-fold predictions: {decision.summary()}")
    return result


def _train_fold(
    cfg: CvConfig,
    out: Path,
    k: int,
    folds: int,
    echo: Callable[[str], None],
    show_progress: bool,
    on_validation: Callable[[Path], object] | None,
) -> None:
    """Fold `k` trained in fold_K/, or resumed there where its run has started."""
    run_dir = fold_dir(out, k)
    resume = (run_dir / rundir.CONFIG).is_file()
    echo(f"fold {k} of {folds}: {'resuming' if resume else 'training'} {run_dir}")
    result = fit(
        FitConfig(
            store=cfg.store,
            train=cfg.train,
            out=run_dir,
            device=cfg.device,
            resume=resume,
            explicit=cfg.explicit,
            fold=k,
            splits=out / SPLITS,
        ),
        show_progress=show_progress,
        echo=echo,
        on_validation=on_validation,
    )
    if result.warning:
        echo(f"warning: fold {k}: {result.warning}")


def _start(
    cfg: CvConfig, info: StoreInfo, out: Path, fit_options: dict, echo: Callable[[str], None]
) -> tuple[CvRecord, Folds]:
    """A new cross-validation in `out` (absent, empty, or left by a start killed before its
    cv.json): its folds copied into splits.json, then cv.json (the marker, written last)."""
    if out.is_dir() and any(p.name != SPLITS for p in out.iterdir()):
        raise KitsError(
            f"--out {out} holds other files and no {out / 'cv.json'}; choose a new or empty "
            "folder for the cross-validation"
        )
    out.mkdir(parents=True, exist_ok=True)
    folds = resolve_folds(
        info,
        cfg.folds,
        cfg.splits,
        out / SPLITS,
        cfg.train.seed,
        recorded=store_folds(info),
        echo=echo,
    )
    if folds.source != str(out / SPLITS):
        write_splits_file(out / SPLITS, folds.splits)
    record = CvRecord(
        folds=len(folds.splits),
        store=str(Path(cfg.store).resolve()),
        splits=SPLITS,
        fit=fit_options,
        store_fingerprint=info.fingerprint,
    )
    write_cv(out, record)
    return record, folds


def _continue(
    cfg: CvConfig, info: StoreInfo, out: Path, fit_options: dict, echo: Callable[[str], None]
) -> tuple[CvRecord, Folds]:
    """A cross-validation `out` already holds: the same store, folds and training options
    (only what `fit --resume` may change, limits and loader knobs, may differ)."""
    record = read_cv(out)
    fix = "rerun with the options cv.json records, or choose another --out"
    if record.store_fingerprint not in (None, info.fingerprint):
        raise KitsError(
            f"{out} is a cross-validation of another store ({record.store}, fingerprint "
            f"{record.store_fingerprint}; {cfg.store} has {info.fingerprint}); {fix}"
        )
    differ = [
        f"--{k.replace('_', '-')} (recorded {record.fit.get(k)!r}, given {v!r})"
        for k, v in fit_options.items()
        if k not in RESUMABLE and record.fit.get(k) != v
    ]
    if cfg.folds is not None and cfg.folds != record.folds:
        differ.append(f"--folds (recorded {record.folds}, given {cfg.folds})")
    if differ:
        raise KitsError(f"{out}/cv.json differs from this command: {'; '.join(differ)}; {fix}")
    folds = resolve_folds(info, record.folds, out / record.splits, out / SPLITS, cfg.train.seed)
    if cfg.splits is not None:
        given = resolve_folds(info, None, cfg.splits, out / SPLITS, cfg.train.seed)
        if splits_digest(given.splits) != splits_digest(folds.splits):
            raise KitsError(
                f"--splits {cfg.splits} holds other folds than {out / record.splits}, which "
                f"this cross-validation trains; {fix}"
            )
    echo(f"continuing the cross-validation in {out}: folds done {record.done or 'none'}")
    record = replace(record, fit=fit_options)  # the limits and loader knobs given now
    write_cv(out, record)
    return record, folds


def _out_of_fold(cfg: CvConfig, info: StoreInfo, out: Path, fold: int, show: bool) -> int:
    """Fold `fold`'s validation cases, predicted by its best checkpoint in the store's
    geometry, each written to oof/<case>.npz (padding around a resized case: background)."""
    run = load_run(fold_dir(out, fold), cfg.store, which="best")
    cases = default_cases(run)
    inference = run_inference([run], resolve_device(cfg.device), batch_size=cfg.batch_size)
    progress = Progress(enabled=show).start(
        sum(info.cases[c].slices for c in cases), f"fold {fold} out-of-fold"
    )
    try:
        for case in store_predictions(inference, info, cases, progress=progress.advance):
            rows, cols = store_box(info, case.case_id)
            pred = np.zeros((info.cases[case.case_id].slices, info.size, info.size), np.uint8)
            pred[:, rows, cols] = case.pred
            with atomic_path(oof_path(out, case.case_id)) as tmp, open(tmp, "wb") as f:
                np.savez_compressed(f, pred=pred, fold=np.int64(fold))
            progress.item_done(case.case_id, f"fold {fold}")
    finally:
        progress.close()
    return len(cases)
