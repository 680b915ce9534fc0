"""`kitstrain score`: the official Dice and surface Dice of every scored region of the
store's KiTS edition per case, beside the accuracy that fools people.

The regions, their tolerances and the definitions are `kitstrain.metrics`'s: per whole 3D case,
Dice = 2|P ∩ G| / (|P| + |G|) per region (KiTS19: kidney = label > 0, tumour = label > 1, the
starter code's; KiTS21/23: kidney_and_mass, mass, tumor), surface Dice at each region's
tolerance with the voxel spacing, both empty scoring 1 and one empty 0 (the KiTS19 code would
divide 0 by 0). For KiTS19 the headline stays kidney and tumour Dice and their mean; its surface
Dice is an extra column at the KiTS21 tolerances. Pixel accuracy is shown next to the accuracy
of predicting background everywhere, and rows are flagged "background-only model" (truth has
foreground, the prediction almost none) or "over-predicts foreground" (accuracy far below that
baseline).

Two geometries. By default the run's store: fast, but its labels were resized
(nearest neighbour) to the store's square. With `--src DIR` each case is predicted from
its NIfTI imaging through `infer.predict_volume` and scored against its own mask at source
resolution, with the header's spacing: the official setting whenever the store was resized.
In store geometry the spacing is the source's, scaled by the recorded in-plane resize.
"""

from __future__ import annotations

import csv
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kitsprep.cases import (
    CaseRef,
    Volume,
    check_pair,
    find_cases,
    parse_case_spec,
    read_header,
    read_volume,
)
from kitsprep.errors import KitsError
from kitsprep.geometry import axial_axes, voxel_spacing
from kitsprep.labels import EDITIONS, LabelSet
from kitsprep.store import SliceMap, StoreInfo, open_store
from kitsprep.window import Window
from kitstrain.infer.engine import (
    DEFAULT_BATCH_SIZE,
    Amp,
    Progress,
    predict_store_case,
    predict_volume,
    read_store_labels,
    require_scorable,
    resolve_device,
    store_box,
)
from kitstrain.metrics import (
    BACKGROUND_FLAG,
    MIN_FOREGROUND_SHARE,
    OVERPREDICT_FLAG,
    OVERPREDICT_MARGIN,
    CaseScore,
    mean_score,
    score_case,
    surface_tolerance,
)
from kitstrain.model.unet import pad_input_channels
from kitstrain.report.plots import case_overlay, overlay_slice
from kitstrain.train import rundir as runlib
from kitstrain.train.memory import amp_dtype

__all__ = [
    "BACKGROUND_FLAG",
    "OVERPREDICT_FLAG",
    "TRAINED_FLAG",
    "ScoreConfig",
    "ScoreReport",
    "display_slice",
    "format_table",
    "load_run",
    "load_run_model",
    "overlay_title",
    "score_run",
    "definition",
    "score_columns",
    "training_cases",
    "write_csv",
]

SCORE_CSV = "score.csv"
TRAINED_FLAG = "in the training split"


def definition(ls: LabelSet) -> str:
    """What the numbers are, for the table's footnote and the JSON report."""
    regions = "; ".join(f"{r.name}: labels {', '.join(map(str, r.labels))}" for r in ls.regions)
    tols = ", ".join(f"{r.name} {surface_tolerance(ls, r):.3f} mm" for r in ls.regions)
    own = all(r.tolerance_mm is not None for r in ls.regions)
    return (
        f"{ls.edition}: Dice = 2|P∩G| / (|P|+|G|) per 3D case and region ({regions}); "
        f"surface Dice at {tols}"
        + ("" if own else " (KiTS21's: KiTS19 has no official surface Dice)")
        + "; both empty scores 1, one empty 0; mean = mean of the regions' Dice"
    )


@dataclass(frozen=True)
class ScoreConfig:
    """What `kitstrain score` was asked; None means the run's own default."""

    run_dir: Path | None = None  # None: the newest run under runs_root
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
    runs_root: Path = runlib.RUNS_ROOT


@dataclass
class ScoreReport:
    """Per-case scores, their mean and where they came from."""

    run_dir: Path
    checkpoint: Path
    store: Path | None
    src: Path | None
    geometry: str  # "source" or "store 512x512"
    tta: bool
    scores: list[CaseScore]
    mean: CaseScore
    labels: LabelSet = EDITIONS["kits19"]
    trained: list[str] = field(default_factory=list)  # scored cases the run trained on
    csv_path: Path | None = None
    json_path: Path | None = None
    overlays: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    resized: bool = False  # store-geometry scores of cases the store resized

    @property
    def flagged(self) -> list[str]:
        return [s.case for s in self.scores if s.flags]

    def as_dict(self) -> dict:
        ls = self.labels
        return {
            "run_dir": str(self.run_dir),
            "checkpoint": str(self.checkpoint),
            "store": None if self.store is None else str(self.store),
            "src": None if self.src is None else str(self.src),
            "geometry": self.geometry,
            "tta": self.tta,
            "edition": ls.edition,
            "regions": [
                {"name": r.name, "labels": list(r.labels), "tolerance_mm": surface_tolerance(ls, r)}
                for r in ls.regions
            ],
            "definition": definition(ls),
            "cases": [score_row(s, ls, s.case in self.trained) for s in self.scores],
            "mean": score_row(self.mean, ls),
            "warnings": self.warnings,
        }


def score_columns(ls: LabelSet) -> list[str]:
    """The CSV's and JSON's keys, one set for every edition: region Dice, their mean, region
    surface Dice, the accuracies, the flags."""
    return [
        "case",
        *(f"{r.name}_dice" for r in ls.regions),
        "mean_dice",
        *(f"{r.name}_surface_dice" for r in ls.regions),
        "accuracy",
        "background_accuracy",
        "background_only",
        "over_predicts",
        "trained_on",
    ]


def score_row(s: CaseScore, ls: LabelSet, trained: bool = False) -> dict:
    """One case (or the mean) as flat keys, `score_columns` order; NaN-free: a surface Dice
    that was not computed is None. ``trained``: the case is in the run's training split."""
    row: dict = {"case": s.case}
    row.update({f"{r.name}_dice": s.dice.get(r.name) for r in ls.regions})
    row["mean_dice"] = s.mean_dice
    row.update({f"{r.name}_surface_dice": s.surface_dice.get(r.name) for r in ls.regions})
    row.update(
        accuracy=s.accuracy,
        background_accuracy=s.background_accuracy,
        background_only=s.background_only,
        over_predicts=s.over_predicts,
        trained_on=trained,
    )
    return row


# --------------------------------------------------------------------------- the run


@dataclass
class LoadedRun:
    """A run directory resolved to what inference needs."""

    run_dir: Path
    config: dict
    context: int
    store: StoreInfo | None  # None only where a store is optional (predict, moved)
    window: Window
    size: int
    checkpoint: Path
    warnings: list[str]
    labels: LabelSet = EDITIONS["kits19"]  # the store's; recorded in the run when it is gone


def _checkpoint_used(run_dir: Path, which: str) -> Path:
    # Mirrors run.load_model's fallback, so reports name the file actually used.
    path = runlib.checkpoint_path(run_dir, which)
    if not path.is_file() and which == "best":
        last = runlib.checkpoint_path(run_dir, "last")
        if last.is_file():
            return last
    return path


def _store_attrs(config: dict) -> dict:
    """The preprocessing `fit` recorded from its store (config["store_attrs"])."""
    attrs = config.get("store_attrs")
    return attrs if isinstance(attrs, dict) else {}


def _recorded_window(config: dict) -> Window | None:
    w = _store_attrs(config).get("window")
    if isinstance(w, str):
        try:
            w = json.loads(w)
        except ValueError:
            return None
    if isinstance(w, dict):
        try:
            return Window(**w)
        except TypeError:
            return None
    return None


def _recorded_labels(config: dict) -> LabelSet:
    """The label set `fit` recorded from its store; runs from before editions were KiTS19."""
    labels = _store_attrs(config).get("labels")
    if isinstance(labels, dict):
        try:
            return LabelSet.from_json(json.dumps(labels))
        except (KeyError, TypeError, ValueError):
            pass
    return EDITIONS["kits19"]


def _recorded_size(config: dict) -> int | None:
    size = _store_attrs(config).get("size")
    return int(size) if size is not None else None


def load_run(
    run_dir: Path | None,
    data: Path | None,
    *,
    which: str = "best",
    runs_root: Path = runlib.RUNS_ROOT,
    store_required: bool = True,
) -> LoadedRun:
    """Resolve a run directory, its checkpoint and the store it trained on (or `data`).

    A store given with `--data` must have the run's preprocessing (window and slice size;
    otherwise: error, the model would see inputs it never trained on). Other differences in
    content (cases added, rebuilt from other files) only warn: scoring other cases with the
    same preprocessing is legitimate."""
    run_dir = Path(run_dir) if run_dir is not None else runlib.newest_run(runs_root)
    if not run_dir.is_dir():
        raise KitsError(
            f"run directory {run_dir} does not exist; pass a folder written by "
            "`kitstrain fit` (runs/<timestamp>)"
        )
    config = runlib.read_config(run_dir)
    if "model" not in config:
        raise KitsError(
            f"{run_dir}/{runlib.CONFIG} has no model section; the run directory is "
            "damaged or from another tool, pass one written by `kitstrain fit`"
        )
    checkpoint = _checkpoint_used(run_dir, which)
    if not checkpoint.is_file():
        hint = "" if which == "last" else ", or pass --checkpoint last"
        raise KitsError(
            f"{run_dir} has no {which} checkpoint ({checkpoint} is missing); "
            f"let `kitstrain fit` run to its first validation{hint}"
        )
    context = int(config.get("context", 0))
    warnings: list[str] = []
    recorded = config.get("store")
    recorded_path = Path(recorded) if recorded else None
    info: StoreInfo | None = None
    if data is not None:
        info = open_store(Path(data))
    elif recorded_path is not None and recorded_path.is_file():
        info = open_store(recorded_path)
    elif store_required or _recorded_window(config) is None or _recorded_size(config) is None:
        where = (
            f"the store this run trained on, {recorded_path},"
            if recorded_path
            else "the store this run trained on"
        )
        raise KitsError(
            f"{where} is missing (moved or deleted); pass --data FILE.h5 with "
            "its new location, or rebuild it with `kitsprep build`"
        )

    want_window = _recorded_window(config)
    want_size = _recorded_size(config)
    if (
        data is not None
        and (want_window is None or want_size is None)
        and recorded_path is not None
        and recorded_path.is_file()
        and recorded_path.resolve() != Path(data).resolve()
    ):
        original = open_store(recorded_path)
        want_window = want_window or original.window
        want_size = want_size if want_size is not None else original.size
    if info is not None:
        if want_window is not None and want_window != info.window:
            raise KitsError(
                f"{info.path} was built with window {info.window.to_json()}, but "
                f"the run trained on {want_window.to_json()}; score with the store "
                "the run trained on, or rebuild with its --window"
            )
        if want_size is not None and int(want_size) != info.size:
            raise KitsError(
                f"{info.path} holds {info.size}x{info.size} slices, but the run "
                f"trained on {want_size}x{want_size}; score with the store the run "
                f"trained on, or rebuild with --size {want_size}"
            )
        fingerprint = config.get("store_fingerprint")
        if fingerprint is not None and fingerprint != info.fingerprint:
            warnings.append(
                f"warning: {info.path} (fingerprint {info.fingerprint}) is not the store the "
                f"run trained on (fingerprint {fingerprint}): same preprocessing, other "
                "content; check that the scored cases were not used for training"
            )
        window, size, labels = info.window, info.size, info.labels
    else:
        window, size = want_window, want_size  # predict with the store gone
        labels = _recorded_labels(config)
        warnings.append(
            f"warning: the run's store {recorded_path} is missing; using the "
            "window and size recorded in the run's config"
        )
    return LoadedRun(run_dir, config, context, info, window, size, checkpoint, warnings, labels)


def load_run_model(lr: LoadedRun, which: str, device: torch.device) -> nn.Module:
    model, _ = runlib.load_model(lr.run_dir, which, device)
    if device.type == "cuda":
        pad_input_channels(model)  # as fit trains on CUDA: tensor-core kernels for 5 channels
    expected = 1 + 2 * lr.context
    got = getattr(getattr(model, "cfg", None), "in_channels", expected)
    if got != expected:
        raise KitsError(
            f"{lr.run_dir}: the model takes {got} input channel(s) but the config "
            f"says context {lr.context} ({expected} channels); the run directory "
            "is inconsistent, retrain or fix config.json"
        )
    return model


def training_cases(run_dir: Path) -> list[str]:
    """The run's training split (empty when the run records none)."""
    return list(runlib.read_split(run_dir).get("train") or [])


def inference_amp(lr: LoadedRun, device: torch.device) -> Amp:
    """Autocast in the precision the run trained and validated in (bf16 where the GPU has
    it), so `score` and `predict` give the numbers `fit` logged: fp16 would differ, and
    can overflow at 65,504. fp32 where that precision is unavailable on `device`."""
    train = lr.config.get("train", {})
    precision = train.get("precision")
    if precision is None:  # runs recorded before --precision: a boolean `amp`
        precision = "auto" if train.get("amp", True) else "fp32"
    try:
        dtype = amp_dtype(device, precision)
    except KitsError:  # e.g. a GPU run's fp16, scored on a CPU
        dtype = None
    return dtype if dtype is not None else False


def _default_cases(lr: LoadedRun) -> list[str]:
    split = runlib.read_split(lr.run_dir)
    val = list(split.get("val") or [])
    if not val:
        raise KitsError(
            f"{lr.run_dir} has no validation cases in {runlib.SPLIT}; name the "
            "cases to score with --cases"
        )
    return val


# --------------------------------------------------------------------------- scoring


def _store_cases(lr: LoadedRun, spec: str | None) -> list[str]:
    info = lr.store
    if spec is not None:
        try:
            cases = parse_case_spec(spec, info.case_ids)
        except KitsError as exc:
            raise KitsError(f"{exc} (in store {info.path})") from None
    else:
        cases = _default_cases(lr)
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


def _src_cases(lr: LoadedRun, src: Path, spec: str | None) -> list[CaseRef]:
    refs = {r.case_id: r for r in find_cases(src)}
    if spec is not None:
        ids = parse_case_spec(spec, refs)
    else:
        ids = _default_cases(lr)
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


def overlay_title(s: CaseScore) -> str:
    flag = "".join(f"  [{f}]" for f in s.flags)
    dice = "  ".join(f"{name} {v:.3f}" for name, v in s.dice.items())
    return f"{s.case}  Dice {dice}{flag}"


def store_spacing(info: StoreInfo, case_id: str) -> tuple[float, float, float]:
    """Voxel spacing (mm) of a stored case's slices inside `store_box`: the source spacing,
    in-plane scaled by the recorded resize."""
    m = info.cases[case_id]
    p = m.in_plane
    return (m.spacing[0], m.spacing[1] * p.src_h / p.new_h, m.spacing[2] * p.src_w / p.new_w)


def display_slice(
    volume: Volume, axes: tuple[int, int, int], index: int, window: Window
) -> np.ndarray:
    """One axial slice of the raw volume in HU, clipped to the window, for display."""
    raw = np.asarray(volume.data.transpose(axes)[index], np.float32)
    hu = raw * np.float32(volume.header.slope) + np.float32(volume.header.inter)
    return np.clip(hu, window.lo, window.hi)


def _score_store(
    lr: LoadedRun, model: nn.Module, cfg: ScoreConfig, device: torch.device, progress: Progress
) -> tuple[list[CaseScore], list[Path], bool]:
    info = lr.store
    cases = _store_cases(lr, cfg.cases)
    progress.start(sum(info.cases[c].slices for c in cases), "score")
    scores, pictures = [], []
    resized = any(not info.cases[c].in_plane.is_identity for c in cases)
    amp = inference_amp(lr, device) if cfg.amp else False
    sm = SliceMap(info.path, info.size, info.case_ids)
    try:
        for cid in cases:
            pred = predict_store_case(
                model,
                info,
                sm,
                cid,
                lr.context,
                device,
                amp=amp,
                tta=cfg.tta,
                batch_size=cfg.batch_size,
                progress=progress.advance,
            )
            rows, cols = store_box(info, cid)
            truth = read_store_labels(sm, info, cid)[:, rows, cols]
            pred = pred[:, rows, cols]
            s = score_case(cid, pred, truth, info.labels, store_spacing(info, cid))
            scores.append(s)
            if cfg.overlays is not None:
                k = overlay_slice(truth, pred, info.labels)
                image = sm.image(info.rows(cid)[k])[rows, cols]
                w = info.window
                pictures.append(
                    case_overlay(
                        image,
                        truth[k],
                        pred[k],
                        f"{overlay_title(s)}  (stored slice {k})",
                        Path(cfg.overlays) / f"{cid}.png",
                        info.labels,
                        vmin=w.normalise(w.lo),
                        vmax=w.normalise(w.hi),
                    )
                )
            progress.case_done(cid, case_line(s))
    finally:
        sm.close()
    return scores, pictures, resized


def _score_src(
    lr: LoadedRun, model: nn.Module, cfg: ScoreConfig, device: torch.device, progress: Progress
) -> tuple[list[CaseScore], list[Path]]:
    refs = _src_cases(lr, Path(cfg.src), cfg.cases)
    total = 0
    for ref in refs:
        hdr = read_header(ref.imaging, ref.case_id)
        total += hdr.shape[axial_axes(hdr.affine)[0]]
    progress.start(total, "score --src")
    scores, pictures = [], []
    amp = inference_amp(lr, device) if cfg.amp else False
    for ref in refs:
        vol = read_volume(ref.imaging, ref.case_id)
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
        s = score_case(ref.case_id, pred, seg.data, lr.labels, voxel_spacing(seg.header.affine))
        scores.append(s)
        if cfg.overlays is not None:
            axes = axial_axes(vol.header.affine)
            truth, p = seg.data.transpose(axes), pred.transpose(axes)
            k = overlay_slice(truth, p, lr.labels)
            pictures.append(
                case_overlay(
                    display_slice(vol, axes, k, lr.window),
                    truth[k],
                    p[k],
                    f"{overlay_title(s)}  (slice {k})",
                    Path(cfg.overlays) / f"{ref.case_id}.png",
                    lr.labels,
                    vmin=lr.window.lo,
                    vmax=lr.window.hi,
                )
            )
        progress.case_done(ref.case_id, case_line(s))
        del vol, seg, pred
    return scores, pictures


def case_line(s: CaseScore) -> str:
    """The progress line of one scored case."""
    flag = "".join(f"  {f}" for f in s.flags)
    dice = "  ".join(f"{name} {v:.4f}" for name, v in s.dice.items())
    sd = "  ".join(f"{v:.4f}" for v in s.surface_dice.values())
    return f"Dice {dice}" + (f"  surface Dice {sd}" if sd else "") + flag


def score_run(cfg: ScoreConfig, progress: Progress | None = None) -> ScoreReport:
    """Score a run's checkpoint per case; writes <run>/score.csv, and the JSON and overlays
    when asked. Raises KitsError for anything the user can fix."""
    # In source geometry the store only lends its preprocessing, which the run also records.
    lr = load_run(
        cfg.run_dir,
        cfg.data,
        which=cfg.which,
        runs_root=cfg.runs_root,
        store_required=cfg.src is None,
    )
    device = resolve_device(cfg.device)
    progress = progress if progress is not None else Progress()
    model = load_run_model(lr, cfg.which, device)
    try:
        if cfg.src is None:
            scores, pictures, resized = _score_store(lr, model, cfg, device, progress)
            geometry = f"store {lr.size}x{lr.size}"
        else:
            scores, pictures = _score_src(lr, model, cfg, device, progress)
            resized, geometry = False, "source"
    finally:
        progress.close()
    report = ScoreReport(
        run_dir=lr.run_dir,
        checkpoint=lr.checkpoint,
        store=lr.store.path if lr.store is not None else None,
        src=None if cfg.src is None else Path(cfg.src),
        geometry=geometry,
        tta=cfg.tta,
        scores=scores,
        mean=mean_score(scores),
        labels=lr.labels,
        csv_path=lr.run_dir / SCORE_CSV,
        overlays=pictures,
        warnings=list(lr.warnings),
        resized=resized,
        trained=[s.case for s in scores if s.case in set(training_cases(lr.run_dir))],
    )
    write_csv(report, report.csv_path)
    if cfg.json is not None:
        report.json_path = Path(cfg.json)
        _write_text(report.json_path, json.dumps(report.as_dict(), indent=2) + "\n")
    return report


# --------------------------------------------------------------------------- output


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_csv(report: ScoreReport, path: Path) -> Path:
    """One row per case plus the mean row, full precision, for spreadsheets and scripts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    cols = score_columns(report.labels)

    def cell(v: object) -> str:
        if v is None:
            return ""
        if isinstance(v, bool):
            return str(int(v))
        return repr(v) if isinstance(v, float) else str(v)

    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for s in [*report.scores, report.mean]:
            row = score_row(s, report.labels, s.case in report.trained)
            w.writerow([cell(row[c]) for c in cols])
    tmp.replace(path)
    return path


def format_table(report: ScoreReport) -> str:
    """The human table: Dice of every region and their mean (the headline), surface Dice,
    accuracy beside the all-background accuracy, the flags; then the mean row and what the
    numbers mean."""
    ls = report.labels
    names = [r.name for r in ls.regions]
    head = [
        "case",
        *(f"Dice {n}" for n in names),
        "mean",
        *(f"surface {n}" for n in names),
        "acc %",
        "bg-acc %",
        "",
    ]

    def cells(s: CaseScore) -> list[str]:
        return [
            s.case,
            *(f"{s.dice[n]:.4f}" for n in names),
            f"{s.mean_dice:.4f}",
            *(f"{s.surface_dice[n]:.4f}" if n in s.surface_dice else "-" for n in names),
            f"{100 * s.accuracy:.3f}",
            f"{100 * s.background_accuracy:.3f}",
            ", ".join(s.flags + ([TRAINED_FLAG] if s.case in report.trained else [])),
        ]

    rows = [cells(s) for s in report.scores]
    mean_row = cells(report.mean)
    widths = [max(len(r[i]) for r in [head, *rows, mean_row]) for i in range(len(head))]
    last = len(head) - 1

    def line(c: list[str]) -> str:
        out = [c[0].ljust(widths[0])]
        out += [v.rjust(widths[i]) for i, v in enumerate(c[1:last], start=1)]
        out.append(c[last])
        return "  ".join(out).rstrip()

    rule = "-" * len(line([*head[:last], ""]))
    lines = [line(head), rule, *(line(r) for r in rows), rule, line(mean_row), ""]
    lines.append(
        f"{report.run_dir}  checkpoint {report.checkpoint.name}  "
        f"geometry: {report.geometry}" + ("  tta: flips" if report.tta else "")
    )
    lines += textwrap.wrap(definition(ls), 96, subsequent_indent="  ")
    lines += textwrap.wrap(
        f"{BACKGROUND_FLAG}: the truth has foreground and the prediction under "
        f"{MIN_FOREGROUND_SHARE:.0%} of its volume; {OVERPREDICT_FLAG}: accuracy more than "
        f"{100 * OVERPREDICT_MARGIN:g} point below predicting background everywhere",
        96,
        subsequent_indent="  ",
    )
    if report.resized:
        lines.append(
            "scored on the store's resized labels; for the official numbers score "
            "in source geometry with --src DIR"
        )
    blind = [s.case for s in report.scores if s.background_only]
    over = [s.case for s in report.scores if s.over_predicts]
    if blind:
        lines.append(
            f"{len(blind)} of {len(report.scores)} case(s) look like a model that "
            "predicts background everywhere: its accuracy means nothing"
        )
    if over:
        lines.append(
            f"{len(over)} of {len(report.scores)} case(s) paint foreground where "
            "there is none: accuracy far below predicting nothing"
        )
    if report.trained:
        lines.append(
            f"{len(report.trained)} of {len(report.scores)} case(s) were in the run's "
            "training split: their scores say nothing about new patients"
        )
    return "\n".join(lines)
