"""`kitstrain predict`: NIfTI cases in, masks for the edition's official evaluator out.

Each `case_XXXXX/imaging.nii.gz` under `--src` (labelled or not; the 90 KiTS19 test cases
have no masks) is preprocessed with the window and slice size recorded in the store the
model trained on, predicted through `infer.predict_volume`, mapped back through the
recorded in-plane fit and orientation, and written uint8 with the imaging's shape, affine
and sform/qform codes. The file name is the one the edition's evaluator expects
(`LabelSet.prediction_file`: KiTS19 `prediction_XXXXX.nii.gz`, KiTS21/23 `case_XXXXX.nii.gz`
in one folder): the store's edition by default, `--naming` to choose. Cases that do have a
segmentation are also scored (official Dice and surface Dice, source geometry), and those in
the run's training split are marked: their scores say nothing about new patients.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from kitsprep.cases import (
    check_pair,
    find_cases,
    read_header,
    read_volume,
    select_cases,
)
from kitsprep.errors import KitsError
from kitsprep.geometry import axial_axes, voxel_spacing
from kitsprep.labels import EDITIONS, LabelSet, edition
from kitstrain.infer.engine import DEFAULT_BATCH_SIZE, Progress, predict_volume, resolve_device
from kitstrain.metrics import CaseScore, mean_score, score_case
from kitstrain.report.plots import case_overlay, overlay_slice
from kitstrain.report.score import (
    TRAINED_FLAG,
    ScoreReport,
    case_line,
    display_slice,
    inference_amp,
    load_run,
    load_run_model,
    overlay_title,
    training_cases,
)

__all__ = ["PredictConfig", "PredictReport", "prediction_name", "predict_run", "write_prediction"]


@dataclass(frozen=True)
class PredictConfig:
    """What `kitstrain predict` was asked."""

    run_dir: Path
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
    naming: str | None = None  # an edition whose file names to use; None: the store's


@dataclass
class PredictReport:
    """Files written, and the scores of the cases that came with a segmentation."""

    run_dir: Path
    checkpoint: Path
    out: Path
    paths: list[Path]
    tta: bool = False
    scores: list[CaseScore] = field(default_factory=list)
    overlays: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    labels: LabelSet = EDITIONS["kits19"]
    trained: list[str] = field(default_factory=list)  # predicted cases of the training split

    # Iterating the report iterates the written files, so callers that expect the list of
    # paths keep working.
    def __iter__(self) -> Iterator[Path]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Path:
        return self.paths[i]

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
        )


def prediction_name(case_id: str, naming: LabelSet = EDITIONS["kits19"]) -> str:
    """The evaluator's file name: KiTS19 case_00210 -> prediction_00210.nii.gz, KiTS21/23
    case_00210 -> case_00210.nii.gz."""
    return naming.prediction_file(case_id)


def write_prediction(labels: np.ndarray, imaging: Path, path: Path) -> Path:
    """Write `labels` as uint8 NIfTI in the imaging's geometry: its header is copied (shape,
    affine, sform/qform codes, units), with the data type set to uint8, no scaling, and no
    CT display range. Written under a temporary name and renamed."""
    src = nib.load(str(imaging))
    if tuple(labels.shape) != tuple(src.shape):
        raise ValueError(f"prediction shape {labels.shape} differs from imaging {src.shape}")
    hdr = src.header.copy()
    hdr.set_data_dtype(np.uint8)
    hdr.set_slope_inter(1.0, 0.0)
    hdr["cal_min"] = 0.0
    hdr["cal_max"] = 0.0
    hdr["descrip"] = b"kitstrain prediction"
    # The header's best affine is the image's: nibabel then keeps the copied sform/qform
    # (and their codes) instead of re-deriving them.
    img = nib.Nifti1Image(np.asarray(labels, np.uint8), hdr.get_best_affine(), header=hdr)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name[: -len('.nii.gz')]}.partial.nii.gz")
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    except BaseException:  # a full disk leaves no half-written file
        if tmp.exists():
            tmp.unlink()
        raise
    return path


def check_predict_out(src: Path, out: Path) -> None:
    """--out is a folder for predictions: never the source folder or a case in it (next to
    the imaging a submission would mix with the data), never a file (the imaging itself)."""
    src_r, out_r = Path(src).resolve(), Path(out).resolve()
    if out_r.exists() and not out_r.is_dir():
        raise KitsError(f"--out {out} is a file; expected a folder for prediction_XXXXX.nii.gz")
    if out_r == src_r or (
        src_r in out_r.parents and out_r.relative_to(src_r).parts[0].startswith("case_")
    ):
        raise KitsError(
            f"--out {out} is the source folder or a case in it; write predictions "
            "to a folder of their own (e.g. --out predictions)"
        )
    for parent in out_r.parents:
        if parent.exists():
            if not parent.is_dir():
                raise KitsError(
                    f"--out {out}: {parent} is a file, not a folder; choose another --out"
                )
            if not os.access(parent, os.W_OK):
                raise KitsError(f"--out {out}: {parent} is not writable; choose another --out")
            break


def predict_run(cfg: PredictConfig, progress: Progress | None = None) -> PredictReport:
    """Predict every selected case under `cfg.src` into `cfg.out`. Raises KitsError for
    anything the user can fix (no run, no store, no cases, an --out that is a file)."""
    out = Path(cfg.out)
    check_predict_out(cfg.src, out)
    lr = load_run(cfg.run_dir, cfg.data, which=cfg.which, store_required=False)
    naming = lr.labels if cfg.naming is None else edition(cfg.naming)
    trained = set(training_cases(lr.run_dir))
    refs = select_cases(find_cases(Path(cfg.src)), cfg.cases)
    device = resolve_device(cfg.device)
    model = load_run_model(lr, cfg.which, device)
    amp = inference_amp(lr, device) if cfg.amp else False
    out.mkdir(parents=True, exist_ok=True)
    progress = progress if progress is not None else Progress()
    total = 0
    for ref in refs:
        hdr = read_header(ref.imaging, ref.case_id)
        total += hdr.shape[axial_axes(hdr.affine)[0]]
    report = PredictReport(
        run_dir=lr.run_dir,
        checkpoint=lr.checkpoint,
        out=out,
        paths=[],
        tta=cfg.tta,
        warnings=list(lr.warnings),
        labels=lr.labels,
    )
    progress.start(total, "predict")
    try:
        for ref in refs:
            vol = read_volume(ref.imaging, ref.case_id)
            seg = None
            if ref.segmentation is not None:
                seg = read_volume(ref.segmentation, ref.case_id)
                check_pair(ref.case_id, vol.header, seg.header)
            pred = predict_volume(
                model,
                vol,
                lr.window,
                lr.size,
                lr.context,
                device,
                amp=amp,
                tta=cfg.tta,
                batch_size=cfg.batch_size,
                case_id=ref.case_id,
                progress=progress.advance,
            )
            report.paths.append(
                write_prediction(pred, ref.imaging, out / prediction_name(ref.case_id, naming))
            )
            s = None
            if seg is not None:
                s = score_case(
                    ref.case_id, pred, seg.data, lr.labels, voxel_spacing(seg.header.affine)
                )
                report.scores.append(s)
                if ref.case_id in trained:
                    report.trained.append(ref.case_id)
            if cfg.overlays is not None:
                axes = axial_axes(vol.header.affine)
                truth = seg.data.transpose(axes) if seg is not None else None
                p = pred.transpose(axes)
                k = overlay_slice(truth, p, lr.labels)
                title = overlay_title(s) if s is not None else f"{ref.case_id}  (no truth)"
                report.overlays.append(
                    case_overlay(
                        display_slice(vol, axes, k, lr.window),
                        None if truth is None else truth[k],
                        p[k],
                        f"{title}  (slice {k})",
                        Path(cfg.overlays) / f"{ref.case_id}.png",
                        lr.labels,
                        vmin=lr.window.lo,
                        vmax=lr.window.hi,
                    )
                )
            if s is not None:
                detail = case_line(s)
            else:
                detail = "written (no segmentation to score)"
            if ref.case_id in trained:
                detail += f"  {TRAINED_FLAG}"
            progress.case_done(ref.case_id, detail)
            del vol, seg, pred
    finally:
        progress.close()
    return report
