"""Several runs, or a cross-validation folder, loaded as one ensemble for `score`, `predict`
and `Predictor`.

The paths resolve to run directories (a CV folder, the one holding `cv.json`, to its
`fold_K/`), each loaded as `runs.loaded` loads one run and checked against the first: models
averaged together must read the same input (window, slice size, 2.5D context) and speak the
same labels (edition, label set, decoding). The first run lends the store and the
preprocessing. The post-processing recorded beside the models (`postprocessing.json` in the
CV folder, or in a single run directory) comes with them, applied unless turned off. One run
is an ensemble of one: the same code path, the same masks as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kitsprep.errors import KitsError
from kitstrain.core import rundir as runlib
from kitstrain.core.cvdir import fold_dirs, is_cv_dir
from kitstrain.infer.engine import DEFAULT_BATCH_SIZE
from kitstrain.infer.inference import Inference
from kitstrain.infer.postprocess import Decision, Postprocessor
from kitstrain.runs.loaded import LoadedRun, load_run, run_inference, training_cases
from kitstrain.runs.postprocessing import POSTPROCESSING, read_decision

__all__ = ["Ensemble", "check_compatible", "load_ensemble", "member_dirs"]


@dataclass
class Ensemble:
    """The member runs (the first lends store, window, size and labels), the folder whose
    `postprocessing.json` applies (a CV folder or a single run; None for several runs), and
    the decision recorded there (None where there is none)."""

    runs: list[LoadedRun]
    folder: Path | None
    decision: Decision | None

    @property
    def primary(self) -> LoadedRun:
        return self.runs[0]

    @property
    def run_dirs(self) -> list[Path]:
        return [r.run_dir for r in self.runs]

    @property
    def warnings(self) -> list[str]:
        seen: list[str] = []
        for w in (w for r in self.runs for w in r.warnings):
            if w not in seen:
                seen.append(w)
        return seen

    def training_cases(self) -> set[str]:
        """Cases any member trained on: their scores say nothing about new patients."""
        return {c for r in self.runs for c in training_cases(r.run_dir)}

    def postprocessor(self, enabled: bool = True) -> Postprocessor | None:
        """The recorded steps as `Inference.postprocess`, or None (off, or none recorded)."""
        if not enabled or self.decision is None:
            return None
        return Postprocessor(self.decision.steps, self.primary.labels)

    def postprocessing_record(self, post: Postprocessor | None) -> dict:
        """What a report says of post-processing: applied or not, the steps, from where."""
        return {
            "applied": post is not None,
            "steps": [] if post is None else post.describe(),
            "decision": None if post is None else str(Path(self.folder) / POSTPROCESSING),
        }

    def inference(
        self,
        device: torch.device,
        *,
        amp: bool = True,
        tta: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        postprocess: bool = True,
    ) -> Inference:
        """Every member's model on `device`, probabilities averaged over models and flips,
        with the recorded post-processing unless `postprocess` is False."""
        return run_inference(
            self.runs,
            device,
            amp=amp,
            tta=tta,
            batch_size=batch_size,
            postprocess=self.postprocessor(postprocess),
        )


def member_dirs(
    paths: Sequence[Path], runs_root: Path = runlib.RUNS_ROOT
) -> tuple[list[Path], Path | None]:
    """The run directories `paths` name (none: the newest run under `runs_root`; a CV folder:
    its folds), and the folder whose post-processing applies: the CV folder or the run when
    one path was given, else None."""
    paths = [Path(p) for p in paths] or [runlib.newest_run(runs_root)]
    members: list[Path] = []
    for path in paths:
        members += fold_dirs(path) if is_cv_dir(path) else [path]
    seen: dict[Path, Path] = {}
    for m in members:
        key = m.resolve()
        if key in seen:
            raise KitsError(
                f"run {m} is in the ensemble twice (also as {seen[key]}); pass each run once"
            )
        seen[key] = m
    return members, paths[0] if len(paths) == 1 else None


def _decoding(run: LoadedRun) -> tuple:
    model = run.config.model
    return (
        bool(model.get("regions", False)),
        tuple(model.get("region_writes", ())),
        model.get("num_classes"),
    )


def check_compatible(a: LoadedRun, b: LoadedRun) -> None:
    """KitsError naming both runs and what differs, unless their models read the same input
    and decode to the same labels: averaging them would mix different questions."""
    aspects = (
        ("KiTS edition and label set", lambda r: r.labels.to_json(), lambda r: r.labels.edition),
        ("window", lambda r: r.window, lambda r: r.window.to_json()),
        ("stored slice size", lambda r: r.size, lambda r: r.size),
        ("2.5D context", lambda r: r.context, lambda r: r.context),
        ("outputs (regions or classes)", _decoding, _decoding),
    )
    for what, key, shown in aspects:
        if key(a) != key(b):
            raise KitsError(
                f"runs {a.run_dir} and {b.run_dir} differ in {what} ({shown(a)} against "
                f"{shown(b)}); an ensemble averages models trained alike: pass runs with "
                f"the same {what}"
            )


def load_ensemble(
    paths: Sequence[Path],
    data: Path | None,
    *,
    which: str = "best",
    runs_root: Path = runlib.RUNS_ROOT,
    store_required: bool = True,
) -> Ensemble:
    """Load every member (`runs.loaded.load_run`, with `data` for each), check them against
    the first, and read the post-processing of the single folder given (if any)."""
    members, folder = member_dirs(paths, runs_root)
    runs = [
        load_run(m, data, which=which, runs_root=runs_root, store_required=store_required)
        for m in members
    ]
    for other in runs[1:]:
        check_compatible(runs[0], other)
    decision = read_decision(folder, runs[0].labels) if folder is not None else None
    return Ensemble(runs, folder, decision)
