"""`kitstrain score CV_DIR` as a job: each case's out-of-fold prediction (`oof/`, written by
`kitstrain cv`) scored against the store's truth with the edition's official definitions
(`kitstrain.metrics.score_case`, surface Dice at the store's spacing), handed to
`kitstrain.report.cv` for the table and the JSON. No model runs here."""

from __future__ import annotations

from pathlib import Path

from kitsprep.errors import KitsError
from kitsprep.outputs import check_output
from kitsprep.progress import Progress
from kitsprep.store import SliceReader, StoreInfo, open_store
from kitstrain.core.cvdir import CvRecord, check_report_path, oof_path, read_cv, read_oof
from kitstrain.data.folds import check_folds
from kitstrain.data.foldsfile import read_splits_file
from kitstrain.infer.engine import read_store_labels, store_box, store_spacing
from kitstrain.infer.postprocess import apply_steps
from kitstrain.metrics import score_case
from kitstrain.report.cv import CvReport, write_cv_json
from kitstrain.report.score import case_line
from kitstrain.runs.postprocessing import POSTPROCESSING, read_decision

__all__ = ["cv_folds", "missing_folds", "score_cv"]


def cv_folds(cv_dir: Path, record: CvRecord, info: StoreInfo) -> list[dict]:
    """The folder's folds (its splits.json), checked against the store."""
    path = Path(cv_dir) / record.splits
    return check_folds(read_splits_file(path), info, str(path))


def missing_folds(cv_dir: Path, record: CvRecord, folds: list[dict]) -> list[int]:
    """Folds not done, or done but missing an out-of-fold prediction of a case."""
    return [
        k
        for k, fold in enumerate(folds)
        if k not in record.done or not all(oof_path(cv_dir, c).is_file() for c in fold["val"])
    ]


def score_cv(
    cv_dir: Path,
    *,
    data: Path | None = None,
    partial: bool = False,
    json: Path | None = None,
    postprocess: bool = True,
    progress: Progress | None = None,
) -> CvReport:
    """Score every out-of-fold prediction of `cv_dir` against the store it trained on (or
    `data`), after the post-processing decided on them (`postprocessing.json`) unless
    `postprocess` is False. A cross-validation with folds missing is refused unless
    `partial`."""
    cv_dir = Path(cv_dir)
    record = read_cv(cv_dir)
    store = Path(data) if data is not None else Path(record.store)
    if not store.is_file():
        raise KitsError(
            f"the store {store} of {cv_dir} is missing (moved or deleted); pass --data "
            "FILE.h5 with its new location"
        )
    info = open_store(store)
    warnings = []
    if record.store_fingerprint not in (None, info.fingerprint):
        warnings.append(
            f"{info.path} (fingerprint {info.fingerprint}) is not the store {cv_dir} trained "
            f"on ({record.store_fingerprint}): its labels may not be the ones the folds saw"
        )
    if json is not None:
        check_report_path(cv_dir, json, "--json")
        check_output(json, "--json", reading=[store])
    folds = cv_folds(cv_dir, record, info)
    missing = missing_folds(cv_dir, record, folds)
    done = [k for k in range(len(folds)) if k not in missing]
    if missing and (not partial or not done):
        raise KitsError(
            f"{cv_dir}: fold(s) {', '.join(map(str, missing))} of {len(folds)} have no "
            f"out-of-fold predictions yet; finish them with `kitstrain cv {record.store} "
            f"--out {cv_dir}` (the same options)"
            + (", or pass --partial to score the folds done" if done else "")
        )
    decision = read_decision(cv_dir, info.labels) if postprocess else None
    steps = decision.steps if decision is not None else ()
    chosen = [(c, k) for k in done for c in sorted(folds[k]["val"])]
    progress = progress if progress is not None else Progress()
    progress.start(len(chosen), "score out of fold", unit="case")
    scores = []
    reader = SliceReader(info.path, info.size, info.case_ids, identity=info.identity)
    try:
        for case_id, k in chosen:
            rows, cols = store_box(info, case_id)
            pred = read_oof(cv_dir, case_id, info, k)[:, rows, cols]
            pred = apply_steps(pred, steps, info.labels)  # as decided: inside the stored image
            truth = read_store_labels(reader, info, case_id)[:, rows, cols]
            s = score_case(case_id, pred, truth, info.labels, store_spacing(info, case_id))
            scores.append(s)
            progress.item_done(case_id, f"fold {k}  {case_line(s)}")
            progress.advance()
    finally:
        reader.close()
        progress.close()
    report = CvReport(
        cv_dir=cv_dir,
        store=info.path,
        labels=info.labels,
        geometry=f"store {info.size}x{info.size}",
        folds=len(folds),
        scores=scores,
        case_fold=dict(chosen),
        missing=missing,
        warnings=warnings,
        postprocessing={
            "applied": bool(steps),
            "steps": [s.describe() for s in steps],
            "decision": str(cv_dir / POSTPROCESSING) if decision is not None else None,
        },
    )
    if json is not None:
        report.json_path = write_cv_json(report, json)
    return report
