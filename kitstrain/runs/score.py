"""`kitstrain score` as a job: load the run (or the ensemble of several runs or of a CV
folder's folds, `runs.ensemble`), choose the cases, predict them in store or source
geometry, score each (`kitstrain.metrics`), and hand the report to `kitstrain.report.score`
for the table, CSV and JSON."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kitsprep.cases import CaseRef, find_cases, parse_case_spec
from kitsprep.errors import KitsError
from kitsprep.labels import LabelSet
from kitsprep.outputs import check_output
from kitsprep.progress import Progress
from kitstrain.core import rundir as runlib
from kitstrain.core.device import resolve_device
from kitstrain.infer.cases import (
    CasePrediction,
    source_predictions,
    source_slices,
    store_predictions,
)
from kitstrain.infer.engine import DEFAULT_BATCH_SIZE, require_scorable
from kitstrain.metrics import CaseScore, mean_score, score_case
from kitstrain.report.plots import prediction_overlay
from kitstrain.report.score import (
    SCORE_CSV,
    ScoreReport,
    case_line,
    overlay_title,
    write_csv,
    write_report_json,
)
from kitstrain.runs.ensemble import load_ensemble
from kitstrain.runs.loaded import LoadedRun, default_cases

__all__ = ["ScoreConfig", "score_cases", "score_run"]


@dataclass(frozen=True)
class ScoreConfig:
    """What `kitstrain score` was asked; None means the run's own default."""

    # one run, several (an ensemble) or a CV folder; None or (): the newest run under runs_root
    run_dir: Path | tuple[Path, ...] | None = None
    data: Path | None = None  # store override (the run's store moved)
    cases: str | None = None  # case spec; None: the run's validation cases
    src: Path | None = None  # score in source geometry against these NIfTI masks
    tta: bool = False
    json: Path | None = None  # also write the report here as JSON
    overlays: Path | None = None
    device: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    which: str = "best"
    amp: bool = True  # autocast in the run's training precision
    postprocess: bool = True  # apply the recorded post-processing (postprocessing.json)
    runs_root: Path = runlib.RUNS_ROOT


def _store_cases(run: LoadedRun, spec: str | None) -> list[str]:
    """The store cases to score: `spec`, or the run's validation cases; all labelled."""
    info = run.store
    if spec is not None:
        try:
            cases = parse_case_spec(spec, info.case_ids)
        except KitsError as exc:
            raise KitsError(f"{exc} (in store {info.path})") from None
    else:
        cases = default_cases(run)
        missing = [c for c in cases if c not in info.cases]
        if missing:
            raise KitsError(
                f"the run's validation cases {', '.join(missing[:5])} are not in "
                f"the store {info.path}; pass --data with the store the run "
                "trained on, or choose cases with --cases"
            )
    for cid in cases:
        require_scorable(info, cid)
    return cases


def _src_cases(run: LoadedRun, src: Path, spec: str | None) -> list[CaseRef]:
    """The NIfTI cases under `src` to score: `spec`, or the run's validation cases; each
    with a segmentation."""
    refs = {r.case_id: r for r in find_cases(src)}
    if spec is not None:
        ids = parse_case_spec(spec, refs)
    else:
        ids = default_cases(run)
        missing = [c for c in ids if c not in refs]
        if missing:
            raise KitsError(
                f"the run's validation cases {', '.join(missing[:5])} are not in "
                f"--src {src}; point --src at the data the store was built from, "
                "or choose cases with --cases"
            )
    chosen = [refs[c] for c in ids]
    for ref in chosen:
        if ref.segmentation is None:
            raise KitsError(
                f"{ref.case_id} in {src} has no segmentation.nii.gz, so it cannot "
                "be scored; leave it out of --cases, or segment it with "
                "`kitstrain predict`"
            )
    return chosen


def score_cases(
    cases: Iterable[CasePrediction],
    labels: LabelSet,
    progress: Progress,
    overlays: Path | None = None,
) -> tuple[list[CaseScore], list[Path]]:
    """Score each predicted case against its truth (with surface Dice at its spacing), and
    draw its overlay into `overlays` when asked."""
    scores, pictures = [], []
    for case in cases:
        s = score_case(case.case_id, case.pred, case.truth, labels, case.spacing)
        scores.append(s)
        if overlays is not None:
            path = Path(overlays) / f"{case.case_id}.png"
            pictures.append(prediction_overlay(case, overlay_title(s), path, labels))
        progress.item_done(case.case_id, case_line(s))
        del case  # one source volume in memory at a time, not two
    return scores, pictures


def score_run(cfg: ScoreConfig, progress: Progress | None = None) -> ScoreReport:
    """Score a run's checkpoint (or an ensemble's) per case; writes <run>/score.csv (one
    run only), and the JSON and overlays when asked. Raises KitsError for anything the
    user can fix."""
    # In source geometry the store only lends its preprocessing, which the run also records.
    paths = () if cfg.run_dir is None else cfg.run_dir
    ens = load_ensemble(
        [paths] if isinstance(paths, (str, Path)) else list(paths),
        cfg.data,
        which=cfg.which,
        runs_root=cfg.runs_root,
        store_required=cfg.src is None,
    )
    run = ens.primary
    single = len(ens.runs) == 1
    reading = [run.store.path if run.store is not None else None, cfg.src]
    for path, option in ((cfg.json, "--json"), (cfg.overlays, "--overlays")):
        if path is not None:
            check_output(path, option, reading=reading, run=run.run_dir if single else None)
    if cfg.src is None:
        info = run.store
        chosen = _store_cases(run, cfg.cases)
        total, desc = sum(info.cases[c].slices for c in chosen), "score"
        resized = any(not info.cases[c].in_plane.is_identity for c in chosen)
        geometry = f"store {run.size}x{run.size}"
    else:
        refs = _src_cases(run, Path(cfg.src), cfg.cases)
        total, desc = source_slices(refs), "score --src"
        resized, geometry = False, "source"
    inference = ens.inference(
        resolve_device(cfg.device),
        amp=cfg.amp,
        tta=cfg.tta,
        batch_size=cfg.batch_size,
        postprocess=cfg.postprocess,
    )
    progress = progress if progress is not None else Progress()
    progress.start(total, desc)
    try:
        if cfg.src is None:
            cases = store_predictions(inference, info, chosen, progress=progress.advance)
        else:
            cases = source_predictions(
                inference,
                refs,
                run.window,
                run.size,
                progress=progress.advance,
                target_spacing=run.spacing,
            )
        scores, pictures = score_cases(cases, run.labels, progress, cfg.overlays)
    finally:
        progress.close()
    trained = ens.training_cases()
    report = ScoreReport(
        run_dir=run.run_dir if single else ens.folder or run.run_dir,
        checkpoint=run.checkpoint,
        store=run.store.path if run.store is not None else None,
        src=None if cfg.src is None else Path(cfg.src),
        geometry=geometry,
        tta=inference.tta,
        scores=scores,
        mean=mean_score(scores),
        labels=run.labels,
        # an ensemble owns no run directory to keep its CSV in: --json records it
        csv_path=run.run_dir / SCORE_CSV if single else None,
        overlays=pictures,
        warnings=ens.warnings,
        resized=resized,
        trained=[s.case for s in scores if s.case in trained],
        runs=[] if single else ens.run_dirs,
        postprocessing=ens.postprocessing_record(inference.postprocess),
        cascade=getattr(inference, "notes", None),
    )
    if report.csv_path is not None:
        write_csv(report, report.csv_path)
    if cfg.json is not None:
        report.json_path = write_report_json(report, Path(cfg.json))
    return report
