"""Validation during training: every region's Dice on the validation cases, through the
inference engine that `score` uses, sharded over ranks; and when a validation is due, so
that validating stays a bounded share of the run."""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import asdict

import torch

from kitsprep.progress import Progress
from kitsprep.store import StoreInfo
from kitstrain.data.loaders import shard_cases
from kitstrain.infer.cases import score_store_cases
from kitstrain.infer.inference import Inference
from kitstrain.metrics import CaseScore, mean_score
from kitstrain.train import distributed
from kitstrain.train.config import Plan
from kitstrain.train.memory import cudnn_tuning

VAL_SHARE = 0.10  # epoch-end validations skip while they would cost more than this
PROBE_SLICES = 8  # validation slices timed, after one warm-up batch, to price a validation


def evaluate(model: torch.nn.Module, plan: Plan, progress: Progress | None = None) -> dict:
    """Per-case 3D Dice of every region of the store's label set on the plan's validation
    cases (`Plan.val_cases`: under a time budget, its subset), whole cases sharded across
    ranks by slice count (`shard_cases`) and gathered, so every rank sees the same numbers.
    Rank 0's batch-norm statistics are broadcast first: DDP here does not broadcast buffers
    each forward, and every rank must score the same model. Keys: ``<region>_dice`` per
    region (KiTS19: kidney_dice, tumour_dice), ``mean_dice`` (their mean, what picks the
    best checkpoint), ``regions`` (the names, in order) and ``per_case`` (each case's region
    Dice, in that order). `progress` (rank 0's) shows this rank's cases as `predict` does:
    slices with an ETA on a terminal, a line per case otherwise; it is driven from the
    inference loop, never from a training step."""
    net, d, info = unwrap(model), plan.d, plan.info
    distributed.broadcast_buffers(net, d)
    net.eval()
    mine = shard_cases(info, plan.val_cases, d.rank, d.world)
    report = _CaseReport(progress, info, mine) if progress is not None and mine else None
    try:
        with torch.no_grad():
            scores = (
                score_store_cases(
                    _inference(net, plan),
                    info,
                    mine,
                    progress=report.slices if report else None,
                    on_case=report.case if report else None,
                )
                if mine
                else []
            )
    finally:
        if report is not None:
            report.close()
    net.train()
    if d.world > 1:
        parts = distributed.gather(d, [asdict(s) for s in scores])
        scores = [CaseScore(**s) for part in parts for s in part]
    scores.sort(key=lambda s: s.case)
    m = mean_score(scores)
    return {
        **{f"{name}_dice": v for name, v in m.dice.items()},
        "mean_dice": m.mean_dice,
        "accuracy": m.accuracy,
        "background_accuracy": m.background_accuracy,
        "background_only": m.background_only,
        "over_predicts": m.over_predicts,
        "regions": list(m.dice),
        "per_case": {s.case: [round(v, 4) for v in s.dice.values()] for s in scores},
    }


class _CaseReport:
    """One validation's progress: its slices on the bar, a line per case scored."""

    def __init__(self, progress: Progress, info: StoreInfo, cases: list[str]) -> None:
        self.progress, self.n, self.done = progress, len(cases), 0
        self.slices_of = {c: info.cases[c].slices for c in cases}
        progress.start(sum(self.slices_of.values()), "validate", leave=False)

    def slices(self, n: int) -> None:
        self.progress.advance(n)

    def case(self, score: CaseScore) -> None:
        self.done += 1
        dice = " ".join(f"{name} {v:.3f}" for name, v in score.dice.items())
        self.progress.item_done(
            f"validate {score.case}",
            f"({self.done}/{self.n}, {self.slices_of[score.case]} slices) Dice {dice}",
        )

    def close(self) -> None:
        self.progress.close()


def validation_due(trained_s: float, last_val_s: float, share: float = VAL_SHARE) -> bool:
    """Validate at an epoch's end only when the training since the last validation has
    been long enough for that validation's cost to stay within `share` of the time."""
    return last_val_s <= 0 or trained_s * share >= last_val_s * (1 - share)


class _Probed(Exception):
    """Enough slices timed: leaves the probe's inference loop."""


def seconds_per_slice(model: torch.nn.Module, plan: Plan) -> float:
    """A validation slice's cost on this run's model, device, precision and batch, timed on
    the path validation takes (`score_store_cases`' inference of one validation case, the
    smallest that has enough slices): the median per slice of the batches after a warm-up
    one (which pays for first-call set-up), over `PROBE_SLICES` slices, so one stalled
    batch on a busy machine does not set the run's plan. Before any validation has run,
    this prices the final one, so --time-limit holds."""
    net, info = unwrap(model), plan.info
    need = PROBE_SLICES + plan.val_batch
    case = min(plan.split.val, key=lambda c: (info.cases[c].slices < need, info.cases[c].slices, c))
    marks: list[tuple[float, int]] = []  # (time, slices) after each batch

    def tick(n: int) -> None:
        marks.append((time.perf_counter(), n))
        if sum(k for _, k in marks[1:]) >= PROBE_SLICES:
            raise _Probed

    t0 = time.perf_counter()
    try:
        with torch.no_grad(), cudnn_tuning(False):
            _inference(net, plan).store_case(None, info, case, tick)
    except _Probed:
        pass
    if len(marks) < 2:  # a one-batch case: warm-up included, an over-estimate
        return (marks[0][0] - t0) / marks[0][1]
    return statistics.median((b - a) / n for (a, _), (b, n) in itertools.pairwise(marks))


def _inference(net: torch.nn.Module, plan: Plan) -> Inference:
    """Validation's inference settings: the run's context, device, precision and batch."""
    return Inference(
        [net], plan.tc.context, plan.device, amp=plan.dtype or False, batch_size=plan.val_batch
    )


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain U-Net inside DDP and torch.compile wrappers, in either order."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner
