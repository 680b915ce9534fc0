"""`kitstrain score`: KiTS19-official Dice per case, beside the accuracy that fools people.

Every number is the official KiTS19 evaluation (`starter_code/evaluation.py`), computed per
whole 3D case: kidney Dice on `label > 0`, tumour Dice on `label > 1`,
Dice = 2|P ∩ G| / (|P| + |G|). One deliberate difference: where prediction and truth are
both empty (a case without tumour, correctly left without one) the Dice is 1.0, where the
official code divides 0 by 0; a NaN would poison every mean. Pixel accuracy is shown next
to the accuracy of predicting background everywhere, and a row that does not beat that
baseline by more than 0.2 points, or finds under 0.1 of the kidney, is flagged
"background-only model".

Two geometries. By default the run's store: fast, but its labels were resized
(nearest neighbour) to the store's square. With `--src DIR` each case is predicted from
its NIfTI imaging through `infer.predict_volume` and scored against its own mask at source
resolution: the official setting whenever the store was resized.
"""

from __future__ import annotations

import csv
import json
import textwrap
from dataclasses import asdict, dataclass, field
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
from kitsprep.geometry import axial_axes
from kitsprep.store import SliceMap, StoreInfo, open_store
from kitsprep.window import Window
from kitstrain import run as runlib
from kitstrain.infer import (
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
from kitstrain.memory import amp_dtype
from kitstrain.metrics import CaseScore, mean_score, score_case
from kitstrain.model import pad_input_channels
from kitstrain.plots import case_overlay, overlay_slice

__all__ = [
    "BACKGROUND_FLAG",
    "DICE_NOTE",
    "ScoreConfig",
    "ScoreReport",
    "display_slice",
    "format_table",
    "load_run",
    "load_run_model",
    "overlay_title",
    "score_run",
    "write_csv",
]

BACKGROUND_FLAG = "background-only model"
DICE_NOTE = ("Dice = 2|P∩G| / (|P|+|G|) per 3D case (KiTS19 official; kidney: label > 0, "
             "tumour: label > 1); both sets empty scores 1.0")
SCORE_CSV = "score.csv"


@dataclass(frozen=True)
class ScoreConfig:
    """What `kitstrain score` was asked; None means the run's own default."""

    run_dir: Path | None = None     # None: the newest run under runs_root
    data: Path | None = None        # store override (the run's store moved)
    cases: str | None = None        # case spec; None: the run's validation cases
    src: Path | None = None         # score in source geometry against these NIfTI masks
    tta: bool = False
    json: Path | None = None        # also write the report here as JSON
    overlays: Path | None = None
    device: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    which: str = "best"
    amp: bool = True                # autocast in the run's training precision
    runs_root: Path = runlib.RUNS_ROOT


@dataclass
class ScoreReport:
    """Per-case scores, their mean and where they came from."""

    run_dir: Path
    checkpoint: Path
    store: Path | None
    src: Path | None
    geometry: str                   # "source" or "store 512x512"
    tta: bool
    scores: list[CaseScore]
    mean: CaseScore
    csv_path: Path | None = None
    json_path: Path | None = None
    overlays: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    resized: bool = False           # store-geometry scores of cases the store resized

    @property
    def flagged(self) -> list[str]:
        return [s.case for s in self.scores if s.background_only]

    def as_dict(self) -> dict:
        return {
            "run_dir": str(self.run_dir),
            "checkpoint": str(self.checkpoint),
            "store": None if self.store is None else str(self.store),
            "src": None if self.src is None else str(self.src),
            "geometry": self.geometry,
            "tta": self.tta,
            "definition": DICE_NOTE,
            "cases": [_score_dict(s) for s in self.scores],
            "mean": _score_dict(self.mean),
            "warnings": self.warnings,
        }


def _score_dict(s: CaseScore) -> dict:
    return {**asdict(s), "background_only": s.background_only}


# --------------------------------------------------------------------------- the run


@dataclass
class LoadedRun:
    """A run directory resolved to what inference needs."""

    run_dir: Path
    config: dict
    context: int
    store: StoreInfo | None      # None only where a store is optional (predict, moved)
    window: Window
    size: int
    checkpoint: Path
    warnings: list[str]


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


def _recorded_size(config: dict) -> int | None:
    size = _store_attrs(config).get("size")
    return int(size) if size is not None else None


def load_run(run_dir: Path | None, data: Path | None, *, which: str = "best",
             runs_root: Path = runlib.RUNS_ROOT, store_required: bool = True) -> LoadedRun:
    """Resolve a run directory, its checkpoint and the store it trained on (or `data`).

    A store given with `--data` must have the run's preprocessing (window and slice size;
    otherwise: error, the model would see inputs it never trained on). Other differences in
    content (cases added, rebuilt from other files) only warn: scoring other cases with the
    same preprocessing is legitimate."""
    run_dir = Path(run_dir) if run_dir is not None else runlib.newest_run(runs_root)
    if not run_dir.is_dir():
        raise KitsError(f"run directory {run_dir} does not exist; pass a folder written by "
                        "`kitstrain fit` (runs/<timestamp>)")
    config = runlib.read_config(run_dir)
    if "model" not in config:
        raise KitsError(f"{run_dir}/{runlib.CONFIG} has no model section; the run directory is "
                        "damaged or from another tool, pass one written by `kitstrain fit`")
    checkpoint = _checkpoint_used(run_dir, which)
    if not checkpoint.is_file():
        hint = "" if which == "last" else ", or pass --checkpoint last"
        raise KitsError(f"{run_dir} has no {which} checkpoint ({checkpoint} is missing); "
                        f"let `kitstrain fit` run to its first validation{hint}")
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
        where = f"the store this run trained on, {recorded_path}," if recorded_path else \
            "the store this run trained on"
        raise KitsError(f"{where} is missing (moved or deleted); pass --data FILE.h5 with "
                        "its new location, or rebuild it with `kitsprep build`")

    want_window = _recorded_window(config)
    want_size = _recorded_size(config)
    if data is not None and (want_window is None or want_size is None) and \
            recorded_path is not None and recorded_path.is_file() and \
            recorded_path.resolve() != Path(data).resolve():
        original = open_store(recorded_path)
        want_window = want_window or original.window
        want_size = want_size if want_size is not None else original.size
    if info is not None:
        if want_window is not None and want_window != info.window:
            raise KitsError(f"{info.path} was built with window {info.window.to_json()}, but "
                            f"the run trained on {want_window.to_json()}; score with the store "
                            "the run trained on, or rebuild with its --window")
        if want_size is not None and int(want_size) != info.size:
            raise KitsError(f"{info.path} holds {info.size}x{info.size} slices, but the run "
                            f"trained on {want_size}x{want_size}; score with the store the run "
                            f"trained on, or rebuild with --size {want_size}")
        fingerprint = config.get("store_fingerprint")
        if fingerprint is not None and fingerprint != info.fingerprint:
            warnings.append(
                f"warning: {info.path} (fingerprint {info.fingerprint}) is not the store the "
                f"run trained on (fingerprint {fingerprint}): same preprocessing, other "
                "content; check that the scored cases were not used for training")
        window, size = info.window, info.size
    else:
        window, size = want_window, want_size  # predict with the store gone
        warnings.append(f"warning: the run's store {recorded_path} is missing; using the "
                        "window and size recorded in the run's config")
    return LoadedRun(run_dir, config, context, info, window, size, checkpoint, warnings)


def load_run_model(lr: LoadedRun, which: str, device: torch.device) -> nn.Module:
    model, _ = runlib.load_model(lr.run_dir, which, device)
    if device.type == "cuda":
        pad_input_channels(model)  # as fit trains on CUDA: tensor-core kernels for 5 channels
    expected = 1 + 2 * lr.context
    got = getattr(getattr(model, "cfg", None), "in_channels", expected)
    if got != expected:
        raise KitsError(f"{lr.run_dir}: the model takes {got} input channel(s) but the config "
                        f"says context {lr.context} ({expected} channels); the run directory "
                        "is inconsistent, retrain or fix config.json")
    return model


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
        raise KitsError(f"{lr.run_dir} has no validation cases in {runlib.SPLIT}; name the "
                        "cases to score with --cases")
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
            raise KitsError(f"the run's validation cases {', '.join(missing[:5])} are not in "
                            f"the store {info.path}; pass --data with the store the run "
                            "trained on, or choose cases with --cases")
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
            raise KitsError(f"the run's validation cases {', '.join(missing[:5])} are not in "
                            f"--src {src}; point --src at the data the store was built from, "
                            "or choose cases with --cases")
    chosen = [refs[c] for c in ids]
    for ref in chosen:
        if ref.segmentation is None:
            raise KitsError(f"{ref.case_id} in {src} has no segmentation.nii.gz, so it cannot "
                            "be scored; leave it out of --cases, or segment it with "
                            "`kitstrain predict`")
    return chosen


def overlay_title(s: CaseScore) -> str:
    flag = f"  [{BACKGROUND_FLAG}]" if s.background_only else ""
    return (f"{s.case}  kidney Dice {s.kidney_dice:.3f}  tumour Dice {s.tumour_dice:.3f}"
            f"{flag}")


def display_slice(volume: Volume, axes: tuple[int, int, int], index: int, window: Window
                  ) -> np.ndarray:
    """One axial slice of the raw volume in HU, clipped to the window, for display."""
    raw = np.asarray(volume.data.transpose(axes)[index], np.float32)
    hu = raw * np.float32(volume.header.slope) + np.float32(volume.header.inter)
    return np.clip(hu, window.lo, window.hi)


def _score_store(lr: LoadedRun, model: nn.Module, cfg: ScoreConfig, device: torch.device,
                 progress: Progress) -> tuple[list[CaseScore], list[Path], bool]:
    info = lr.store
    cases = _store_cases(lr, cfg.cases)
    progress.start(sum(info.cases[c].slices for c in cases), "score")
    scores, pictures = [], []
    resized = any(not info.cases[c].in_plane.is_identity for c in cases)
    amp = inference_amp(lr, device) if cfg.amp else False
    sm = SliceMap(info.path, info.size, info.case_ids)
    try:
        for cid in cases:
            pred = predict_store_case(model, info, sm, cid, lr.context, device, amp=amp,
                                      tta=cfg.tta, batch_size=cfg.batch_size,
                                      progress=progress.advance)
            rows, cols = store_box(info, cid)
            truth = read_store_labels(sm, info, cid)[:, rows, cols]
            pred = pred[:, rows, cols]
            s = score_case(cid, pred, truth)
            scores.append(s)
            if cfg.overlays is not None:
                k = overlay_slice(truth, pred)
                image = sm.image(info.rows(cid)[k])[rows, cols]
                w = info.window
                pictures.append(case_overlay(
                    image, truth[k], pred[k], f"{overlay_title(s)}  (stored slice {k})",
                    Path(cfg.overlays) / f"{cid}.png", vmin=w.normalise(w.lo),
                    vmax=w.normalise(w.hi)))
            progress.case_done(cid, _case_line(s))
    finally:
        sm.close()
    return scores, pictures, resized


def _score_src(lr: LoadedRun, model: nn.Module, cfg: ScoreConfig, device: torch.device,
               progress: Progress) -> tuple[list[CaseScore], list[Path]]:
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
        pred = predict_volume(model, vol, lr.window, lr.size, lr.context, device, amp=amp,
                              tta=cfg.tta, batch_size=cfg.batch_size, case_id=ref.case_id,
                              progress=progress.advance)
        s = score_case(ref.case_id, pred, seg.data)
        scores.append(s)
        if cfg.overlays is not None:
            axes = axial_axes(vol.header.affine)
            truth, p = seg.data.transpose(axes), pred.transpose(axes)
            k = overlay_slice(truth, p)
            pictures.append(case_overlay(
                display_slice(vol, axes, k, lr.window), truth[k], p[k],
                f"{overlay_title(s)}  (slice {k})", Path(cfg.overlays) / f"{ref.case_id}.png",
                vmin=lr.window.lo, vmax=lr.window.hi))
        progress.case_done(ref.case_id, _case_line(s))
        del vol, seg, pred
    return scores, pictures


def _case_line(s: CaseScore) -> str:
    flag = f"  {BACKGROUND_FLAG}" if s.background_only else ""
    return f"kidney {s.kidney_dice:.4f}  tumour {s.tumour_dice:.4f}{flag}"


def score_run(cfg: ScoreConfig, progress: Progress | None = None) -> ScoreReport:
    """Score a run's checkpoint per case; writes <run>/score.csv, and the JSON and overlays
    when asked. Raises KitsError for anything the user can fix."""
    # In source geometry the store only lends its preprocessing, which the run also records.
    lr = load_run(cfg.run_dir, cfg.data, which=cfg.which, runs_root=cfg.runs_root,
                  store_required=cfg.src is None)
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
        run_dir=lr.run_dir, checkpoint=lr.checkpoint,
        store=lr.store.path if lr.store is not None else None,
        src=None if cfg.src is None else Path(cfg.src), geometry=geometry, tta=cfg.tta,
        scores=scores, mean=mean_score(scores), csv_path=lr.run_dir / SCORE_CSV,
        overlays=pictures, warnings=list(lr.warnings), resized=resized)
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
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "kidney_dice", "tumour_dice", "mean_dice", "accuracy",
                    "background_accuracy", "background_only"])
        for s in [*report.scores, report.mean]:
            w.writerow([s.case, repr(s.kidney_dice), repr(s.tumour_dice), repr(s.mean_dice),
                        repr(s.accuracy), repr(s.background_accuracy), int(s.background_only)])
    tmp.replace(path)
    return path


def format_table(report: ScoreReport) -> str:
    """The human table: Dice per case, accuracy beside the all-background accuracy, the
    background-only flag, then the mean row and what the numbers mean."""
    head = ("case", "kidney", "tumour", "mean", "acc %", "bg-acc %", "")
    rows = [[s.case, f"{s.kidney_dice:.4f}", f"{s.tumour_dice:.4f}", f"{s.mean_dice:.4f}",
             f"{100 * s.accuracy:.3f}", f"{100 * s.background_accuracy:.3f}",
             BACKGROUND_FLAG if s.background_only else ""] for s in report.scores]
    m = report.mean
    mean_row = [m.case, f"{m.kidney_dice:.4f}", f"{m.tumour_dice:.4f}", f"{m.mean_dice:.4f}",
                f"{100 * m.accuracy:.3f}", f"{100 * m.background_accuracy:.3f}",
                BACKGROUND_FLAG if m.background_only else ""]
    widths = [max(len(str(r[i])) for r in [head, *rows, mean_row]) for i in range(len(head))]

    def line(cells: list[str] | tuple[str, ...]) -> str:
        out = [str(cells[0]).ljust(widths[0])]
        out += [str(c).rjust(widths[i]) for i, c in enumerate(cells[1:6], start=1)]
        out.append(str(cells[6]))
        return "  ".join(out).rstrip()

    rule = "-" * len(line([*head[:6], ""]))
    lines = [line(head), rule, *(line(r) for r in rows), rule, line(mean_row), ""]
    lines.append(f"{report.run_dir}  checkpoint {report.checkpoint.name}  "
                 f"geometry: {report.geometry}" + ("  tta: flips" if report.tta else ""))
    lines += textwrap.wrap(DICE_NOTE, 96, subsequent_indent="  ")
    lines.append(f"{BACKGROUND_FLAG}: accuracy within 0.2 points of predicting background "
                 "everywhere, or kidney Dice < 0.1")
    if report.resized:
        lines.append("scored on the store's resized labels; for the official numbers score "
                     "in source geometry with --src DIR")
    flagged = report.flagged
    if flagged:
        lines.append(f"{len(flagged)} of {len(report.scores)} case(s) look like a model that "
                     "predicts background everywhere: its accuracy means nothing")
    return "\n".join(lines)
