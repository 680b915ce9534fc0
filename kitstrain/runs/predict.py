"""`kitstrain predict`: NIfTI cases in, masks for the edition's official evaluator out.

Each `case_XXXXX/imaging.nii.gz` under `--src` (labelled or not; the 90 KiTS19 test cases
have no masks) is preprocessed with the window and slice size recorded in the store the
model trained on, predicted through `infer.cases.source_predictions`, mapped back through the
recorded in-plane fit and orientation, and written uint8 with the imaging's shape, affine
and sform/qform codes. The file name is the one the edition's evaluator expects
(`LabelSet.prediction_file`: KiTS19 `prediction_XXXXX.nii.gz`, KiTS21/23 `case_XXXXX.nii.gz`
in one folder): the store's edition by default, `--naming` to choose another edition's, or
`nnunet` for nnU-Net's `NAME.nii.gz` (the case name). `RUN_DIR` may be several runs or a CV
folder (`runs.ensemble`), with the post-processing recorded there applied. Cases that do have a
segmentation are also scored (official Dice and surface Dice, source geometry), and those in
the run's training split are marked: their scores say nothing about new patients.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from kitsprep.cases import find_cases, select_cases
from kitsprep.errors import KitsError
from kitsprep.files import atomic_path
from kitsprep.labels import EDITIONS, LabelSet, edition
from kitsprep.outputs import check_output
from kitsprep.progress import Progress
from kitstrain.core.device import resolve_device
from kitstrain.infer.cases import source_predictions, source_slices
from kitstrain.infer.engine import DEFAULT_BATCH_SIZE
from kitstrain.metrics import CaseScore, mean_score, score_case
from kitstrain.report.plots import prediction_overlay
from kitstrain.report.score import TRAINED_FLAG, ScoreReport, case_line, overlay_title
from kitstrain.runs.ensemble import load_ensemble
from kitstrain.runs.provenance import claim_folder, provenance

__all__ = [
    "NNUNET_NAMING",
    "PredictConfig",
    "PredictReport",
    "check_predict_out",
    "prediction_image",
    "prediction_name",
    "predict_run",
    "write_prediction",
]


# `--naming nnunet`: nnU-Net's file names, the case name itself (NAME.nii.gz)
NNUNET_NAMING = "nnunet"


@dataclass(frozen=True)
class PredictConfig:
    """What `kitstrain predict` was asked."""

    run_dir: Path | tuple[Path, ...]  # one run, several (an ensemble) or a CV folder
    src: Path
    out: Path
    cases: str | None = None
    overlays: Path | None = None
    device: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    tta: bool = False
    which: str = "best"
    data: Path | None = None  # the run's store, where it has moved
    amp: bool = True  # autocast in the run's training precision
    # an edition whose file names to use, or NNUNET_NAMING; None: the store's
    naming: str | None = None
    overwrite: bool = False  # replace another run's predictions in `out`
    postprocess: bool = True  # apply the recorded post-processing (postprocessing.json)


@dataclass
class PredictReport:
    """Files written, and the scores of the cases that came with a segmentation."""

    run_dir: Path
    checkpoint: Path
    out: Path
    labels: LabelSet
    paths: list[Path] = field(default_factory=list)
    tta: bool = False
    scores: list[CaseScore] = field(default_factory=list)
    overlays: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)  # predicted cases of the training split
    runs: list[Path] = field(default_factory=list)  # an ensemble's members; [] for one run
    postprocessing: dict | None = None  # as ScoreReport.postprocessing

    @property
    def mean(self) -> CaseScore | None:
        return mean_score(self.scores) if self.scores else None

    def score_report(self) -> ScoreReport | None:
        """The scores as a ScoreReport, so `score.format_table` can print them."""
        if not self.scores:
            return None
        return ScoreReport(
            run_dir=self.run_dir,
            checkpoint=self.checkpoint,
            store=None,
            src=None,
            geometry="source",
            tta=self.tta,
            scores=self.scores,
            mean=self.mean,
            labels=self.labels,
            trained=self.trained,
            runs=self.runs,
            postprocessing=self.postprocessing,
        )


def prediction_name(case_id: str, naming: LabelSet | str = EDITIONS["kits19"]) -> str:
    """The evaluator's file name: KiTS19 case_00210 -> prediction_00210.nii.gz, KiTS21/23
    case_00210 -> case_00210.nii.gz; `NNUNET_NAMING`: the case name, case_00210.nii.gz."""
    if naming == NNUNET_NAMING:
        return f"{case_id}.nii.gz"
    return naming.prediction_file(case_id)


def prediction_image(labels: np.ndarray, imaging: nib.Nifti1Image) -> nib.Nifti1Image:
    """`labels` as a uint8 NIfTI image in the imaging's geometry: its header is copied
    (shape, affine, sform/qform codes, units), with the data type set to uint8, no scaling,
    and no CT display range, so the evaluator reads the masks on the imaging's grid."""
    if tuple(labels.shape) != tuple(imaging.shape):
        raise ValueError(f"prediction shape {labels.shape} differs from imaging {imaging.shape}")
    hdr = imaging.header.copy()
    hdr.set_data_dtype(np.uint8)
    hdr.set_slope_inter(1.0, 0.0)
    hdr["cal_min"] = 0.0
    hdr["cal_max"] = 0.0
    hdr["descrip"] = b"kitstrain prediction"
    # The header's best affine is the image's: nibabel then keeps the copied sform/qform
    # (and their codes) instead of re-deriving them.
    return nib.Nifti1Image(np.asarray(labels, np.uint8), hdr.get_best_affine(), header=hdr)


def write_prediction(labels: np.ndarray, imaging: Path, path: Path) -> Path:
    """Write `labels` as `prediction_image` of the imaging at `path` (.nii.gz), atomically:
    a full disk or a kill leaves no half-written mask for the evaluator to read."""
    img = prediction_image(labels, nib.load(str(imaging)))
    path.parent.mkdir(parents=True, exist_ok=True)
    # nibabel picks the format from the name; the temporary name has none, so gzip here
    # (level 1, nibabel's own for .nii.gz)
    with atomic_path(path) as tmp, gzip.open(tmp, "wb", compresslevel=1) as f:
        img.to_file_map({"image": nib.FileHolder(fileobj=f)})
    return path


def check_predict_out(
    src: Path, out: Path, overlays: Path | None = None, run: Path | None = None
) -> None:
    """--out is a folder for predictions: never the source folder or anything in it (next
    to the imaging a submission would mix with the data), never a file (the imaging
    itself), never inside another run's directory nor over `run`'s own files
    (`kitsprep.outputs`; a new folder inside `run`, e.g. RUN/predictions, is fine).
    --overlays likewise."""
    out_r = Path(out).resolve()
    if out_r.exists() and not out_r.is_dir():
        raise KitsError(f"--out {out} is a file; expected a folder for prediction_XXXXX.nii.gz")
    check_output(out, "--out", reading=[src], run=run)
    if overlays is not None:
        check_output(overlays, "--overlays", reading=[src], run=run)


def predict_run(cfg: PredictConfig, progress: Progress | None = None) -> PredictReport:
    """Predict every selected case under `cfg.src` into `cfg.out`. Raises KitsError for
    anything the user can fix (no run, no store, no cases, an --out that is a file)."""
    out = Path(cfg.out)
    paths = [cfg.run_dir] if isinstance(cfg.run_dir, (str, Path)) else list(cfg.run_dir)
    single_dir = paths[0] if len(paths) == 1 else None
    check_predict_out(cfg.src, out, cfg.overlays, single_dir)
    ens = load_ensemble(paths, cfg.data, which=cfg.which, store_required=False)
    run = ens.primary
    if cfg.naming is None:
        naming: LabelSet | str = run.labels
    else:
        naming = NNUNET_NAMING if cfg.naming == NNUNET_NAMING else edition(cfg.naming)
    trained = ens.training_cases()
    refs = select_cases(find_cases(Path(cfg.src)), cfg.cases)
    inference = ens.inference(
        resolve_device(cfg.device),
        amp=cfg.amp,
        tta=cfg.tta,
        batch_size=cfg.batch_size,
        postprocess=cfg.postprocess,
    )
    claim_folder(out, provenance(ens.runs, inference), cfg.overwrite)
    progress = progress if progress is not None else Progress()
    report = PredictReport(
        run_dir=run.run_dir,
        checkpoint=run.checkpoint,
        out=out,
        labels=run.labels,
        tta=inference.tta,
        warnings=ens.warnings,
        runs=[] if len(ens.runs) == 1 else ens.run_dirs,
        postprocessing=ens.postprocessing_record(inference.postprocess),
    )
    progress.start(source_slices(refs), "predict")
    try:
        for case in source_predictions(
            inference,
            refs,
            run.window,
            run.size,
            progress=progress.advance,
            target_spacing=run.spacing,
        ):
            name = prediction_name(case.case_id, naming)
            report.paths.append(write_prediction(case.pred, case.imaging, out / name))
            s = None
            if case.truth is not None:
                s = score_case(case.case_id, case.pred, case.truth, run.labels, case.spacing)
                report.scores.append(s)
                if case.case_id in trained:
                    report.trained.append(case.case_id)
            if cfg.overlays is not None:
                title = overlay_title(s) if s is not None else f"{case.case_id}  (no truth)"
                path = Path(cfg.overlays) / f"{case.case_id}.png"
                report.overlays.append(prediction_overlay(case, title, path, run.labels))
            detail = case_line(s) if s is not None else "written (no segmentation to score)"
            if case.case_id in trained:
                detail += f"  {TRAINED_FLAG}"
            progress.item_done(case.case_id, detail)
            del case  # one source volume in memory at a time, not two
    finally:
        progress.close()
    return report
