"""`kitstrain score CV_DIR`: the out-of-fold table of a cross-validation. Every case is
scored once, by the fold whose model did not see it (the per-case table and its mean are
`kitstrain.report.score`'s); then each fold's mean, and the mean ± sd of those over the
folds, as nnU-Net reports its 5-fold figures. The job is `kitstrain.runs.cvscore`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kitsprep.files import write_atomic
from kitsprep.labels import LabelSet
from kitstrain.metrics import CaseScore, mean_score, surface_tolerance
from kitstrain.report.score import ScoreReport, definition, format_table, score_row

__all__ = ["CvReport", "fold_statistics", "format_cv", "write_cv_json"]


@dataclass
class CvReport:
    """Out-of-fold scores of a cross-validation folder, with the fold of each case."""

    cv_dir: Path
    store: Path
    labels: LabelSet
    geometry: str  # "store 512x512"
    folds: int
    scores: list[CaseScore]  # one per case, in fold order
    case_fold: dict[str, int]
    missing: list[int] = field(default_factory=list)  # folds not scored (--partial)
    warnings: list[str] = field(default_factory=list)
    json_path: Path | None = None
    # {"applied": bool, "steps": [...], "decision": path or None}, as ScoreReport's
    postprocessing: dict | None = None

    def fold_means(self) -> dict[int, CaseScore]:
        """Each scored fold's mean over its cases."""
        by_fold: dict[int, list[CaseScore]] = {}
        for s in self.scores:
            by_fold.setdefault(self.case_fold[s.case], []).append(s)
        return {k: mean_score(v) for k, v in sorted(by_fold.items())}

    def as_dict(self) -> dict:
        ls = self.labels
        means = self.fold_means()
        stats = fold_statistics(list(means.values()), ls)
        return {
            "cv_dir": str(self.cv_dir),
            "store": str(self.store),
            "geometry": self.geometry,
            "edition": ls.edition,
            "regions": [
                {"name": r.name, "labels": list(r.labels), "tolerance_mm": surface_tolerance(ls, r)}
                for r in ls.regions
            ],
            "definition": definition(ls),
            "folds": self.folds,
            "missing_folds": self.missing,
            "postprocessing": self.postprocessing,
            "cases": [{**score_row(s, ls), "fold": self.case_fold[s.case]} for s in self.scores],
            "per_fold": [
                {**score_row(m, ls), "case": f"fold {k}", "fold": k, "cases": _count(self, k)}
                for k, m in means.items()
            ],
            "overall": {
                "mean_of_cases": score_row(mean_score(self.scores), ls),
                "mean_over_folds": {k: v[0] for k, v in stats.items()},
                "sd_over_folds": {k: v[1] for k, v in stats.items()},
            },
            "warnings": self.warnings,
        }


def _count(report: CvReport, fold: int) -> int:
    return sum(1 for k in report.case_fold.values() if k == fold)


def _metrics(ls: LabelSet) -> list[str]:
    """The keys summarised over folds: each region's Dice, their mean, surface Dice."""
    return [
        *(f"{r.name}_dice" for r in ls.regions),
        "mean_dice",
        *(f"{r.name}_surface_dice" for r in ls.regions),
    ]


def fold_statistics(
    fold_means: Sequence[CaseScore], ls: LabelSet
) -> dict[str, tuple[float, float | None]]:
    """Mean and sample sd (ddof 1; None for one fold) over the folds' means, per metric;
    a metric some fold lacks (no surface Dice) is left out."""
    out: dict[str, tuple[float, float | None]] = {}
    rows = [score_row(m, ls) for m in fold_means]
    for key in _metrics(ls):
        values = [r[key] for r in rows]
        if not values or any(v is None for v in values):
            continue
        sd = float(np.std(values, ddof=1)) if len(values) > 1 else None
        out[key] = (float(np.mean(values)), sd)
    return out


def format_cv(report: CvReport) -> str:
    """The per-case table (`report.score.format_table`), then one line per fold and the
    mean ± sd over the folds."""
    ls = report.labels
    cases = ScoreReport(
        run_dir=report.cv_dir,
        checkpoint=Path("best.pt"),  # each fold's own best checkpoint
        store=report.store,
        src=None,
        geometry=f"{report.geometry}, out of fold",
        tta=False,
        scores=report.scores,
        mean=mean_score(report.scores),
        labels=ls,
        warnings=report.warnings,
        resized=False,
        postprocessing=report.postprocessing,
    )
    means = report.fold_means()
    stats = fold_statistics(list(means.values()), ls)
    keys = list(stats)
    names = (k.removesuffix("_dice").replace("_surface", " surface") for k in keys)
    head = ["fold", "cases", *names]
    rows = [
        [str(k), str(_count(report, k)), *(f"{score_row(m, ls)[key]:.4f}" for key in keys)]
        for k, m in means.items()
    ]
    summary = [
        "mean ± sd",
        str(len(report.scores)),
        *(
            f"{stats[key][0]:.4f}" + ("" if stats[key][1] is None else f" ± {stats[key][1]:.4f}")
            for key in keys
        ),
    ]
    widths = [max(len(r[i]) for r in [head, *rows, summary]) for i in range(len(head))]

    def line(c: list[str]) -> str:
        cells = [v.rjust(w) for v, w in zip(c[1:], widths[1:], strict=True)]
        return "  ".join([c[0].ljust(widths[0]), *cells])

    rule = "-" * len(line(head))
    lines = [format_table(cases), "", line(head), rule, *map(line, rows), rule, line(summary)]
    lines.append(
        f"{len(means)} of {report.folds} folds; each case scored by the model "
        "of the fold that did not train on it; sd over the folds' means (ddof 1)"
    )
    if report.missing:
        lines.append(
            f"partial: fold(s) {', '.join(map(str, report.missing))} have no out-of-fold "
            "predictions yet and are not in these numbers"
        )
    return "\n".join(lines)


def write_cv_json(report: CvReport, path: Path) -> Path:
    """The report as JSON (`score CV_DIR --json`): per case with its fold, per fold, and
    overall (mean of cases, mean and sd over folds)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, json.dumps(report.as_dict(), indent=2) + "\n")
