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
its NIfTI imaging and scored against its own mask at source resolution, with the header's
spacing: the official setting whenever the store was resized. In store geometry the spacing is
the source's, scaled by the recorded in-plane resize.

The job (load the run, predict, score) is `kitstrain.runs.score`; this module only formats
its report: the table, the CSV and the JSON.
"""

from __future__ import annotations

import csv
import io
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from kitsprep.files import write_atomic
from kitsprep.labels import LabelSet
from kitstrain.metrics import (
    BACKGROUND_FLAG,
    MIN_FOREGROUND_SHARE,
    OVERPREDICT_FLAG,
    OVERPREDICT_MARGIN,
    CaseScore,
    surface_tolerance,
)

__all__ = [
    "BACKGROUND_FLAG",
    "OVERPREDICT_FLAG",
    "TRAINED_FLAG",
    "ScoreReport",
    "case_line",
    "definition",
    "format_table",
    "overlay_title",
    "score_columns",
    "score_row",
    "write_csv",
    "write_report_json",
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
    labels: LabelSet
    trained: list[str] = field(default_factory=list)  # scored cases the run trained on
    csv_path: Path | None = None
    json_path: Path | None = None
    overlays: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    resized: bool = False  # store-geometry scores of cases the store resized
    runs: list[Path] = field(default_factory=list)  # an ensemble's members; [] for one run
    # {"applied": bool, "steps": [...], "decision": path or None}; None: not asked
    postprocessing: dict | None = None
    # a cascade run's per case: its fine-stage regions, their voxel share, the fallback
    cascade: dict[str, dict] | None = None

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
            "runs": [str(r) for r in self.runs],
            "postprocessing": self.postprocessing,
            "edition": ls.edition,
            "regions": [
                {"name": r.name, "labels": list(r.labels), "tolerance_mm": surface_tolerance(ls, r)}
                for r in ls.regions
            ],
            "definition": definition(ls),
            "cases": [
                {
                    **score_row(s, ls, s.case in self.trained),
                    **({"cascade": self.cascade[s.case]} if self.cascade else {}),
                }
                for s in self.scores
            ],
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


def overlay_title(s: CaseScore) -> str:
    flag = "".join(f"  [{f}]" for f in s.flags)
    dice = "  ".join(f"{name} {v:.3f}" for name, v in s.dice.items())
    return f"{s.case}  Dice {dice}{flag}"


def case_line(s: CaseScore) -> str:
    """The progress line of one scored case."""
    flag = "".join(f"  {f}" for f in s.flags)
    dice = "  ".join(f"{name} {v:.4f}" for name, v in s.dice.items())
    sd = "  ".join(f"{v:.4f}" for v in s.surface_dice.values())
    return f"Dice {dice}" + (f"  surface Dice {sd}" if sd else "") + flag


# --------------------------------------------------------------------------- output


def write_csv(report: ScoreReport, path: Path) -> Path:
    """One row per case plus the mean row, full precision, for spreadsheets and scripts."""
    cols = score_columns(report.labels)

    def cell(v: object) -> str:
        if v is None:
            return ""
        if isinstance(v, bool):
            return str(int(v))
        return repr(v) if isinstance(v, float) else str(v)

    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(cols)
    for s in [*report.scores, report.mean]:
        row = score_row(s, report.labels, s.case in report.trained)
        w.writerow([cell(row[c]) for c in cols])
    return _write(Path(path), text.getvalue())


def write_report_json(report: ScoreReport, path: Path) -> Path:
    """The report as JSON (`score --json`): cases, mean, regions and their definition."""
    return _write(Path(path), json.dumps(report.as_dict(), indent=2) + "\n")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, text.encode())  # bytes: the CSV's \r\n stays as written


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
    if report.runs:
        lines += textwrap.wrap(
            f"ensemble of {len(report.runs)} runs (probabilities averaged): "
            + ", ".join(map(str, report.runs)),
            96,
            subsequent_indent="  ",
        )
    post = report.postprocessing
    if post is not None:
        steps = "; ".join(post["steps"]) or "no step kept"
        lines.append(
            f"post-processing: {steps} ({post['decision']})"
            if post["applied"]
            else "post-processing: none"
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
            f"{len(report.trained)} of {len(report.scores)} case(s) were in the "
            + ("training split of a member run" if report.runs else "run's training split")
            + ": their scores say nothing about new patients"
        )
    return "\n".join(lines)
