"""The time budget of a `--time-limit` run, as plain numbers: which validation cases fit the
share of the limit that validation may use (`plan_validation`), when a periodic validation
may run without eating the final one's share (`periodic_allowed`), and the warnings for a
run that trains too little (`early_warning`, `shortfall_warning`).

Everything here works from measured validation seconds per slice, whatever path validation
takes (whole slices, or kidney regions in a cascade), so the trainer's clock is the only
input that differs between runs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

FEW_STEPS = 300  # a time-limited run that trains fewer steps than this ends with a warning
EARLY_CHECK_STEP = 20  # the step whose measured pace predicts the run's steps (one line)
TRAINED_SHARE = 0.5  # a time-limited run that trains less than this share of it is warned
# the validation subset is sized for this many validations within the budget: the final
# one and up to three along the way (checkpoint selection and the curves)
VALIDATIONS_PLANNED = 4
ADVICE = (
    "validate fewer or smaller cases (--val-cases), train smaller patches (--patch), give a "
    "longer --time-limit, or change the share validation may use (--val-budget)"
)


@dataclass(frozen=True)
class ValidationPlan:
    """What in-training validation covers under a time limit, and why. `cases` are validated
    at every validation (all of the split's validation cases when they fit); `kitstrain
    score` still scores them all."""

    cases: tuple[str, ...]
    all_cases: int  # the split's validation cases
    slices: int  # slices of `cases`
    seconds_per_slice: float  # measured on this run's model, device and batch
    budget_s: float  # seconds all validation together may take
    planned: int  # validations the subset is sized for (the final one included)
    note: str = ""  # one line when the subset or the pace differs from validating all

    def seconds(self, world: int = 1) -> float:
        """One validation's estimated duration, its cases shared by `world` ranks."""
        return self.seconds_per_slice * self.slices / max(1, world)

    def to_json(self) -> dict:
        return {
            "cases": list(self.cases),
            "all_cases": self.all_cases,
            "slices": self.slices,
            "seconds_per_slice": self.seconds_per_slice,
            "budget_s": self.budget_s,
            "planned": self.planned,
            "note": self.note,
        }


def spread_cases(sizes: Mapping[str, int], n: int, seed: int) -> list[str]:
    """`n` of the cases, spread over their sizes (e.g. tumour voxels): sorted by size, cut
    into `n` runs of about equal length, one case drawn from each with `seed`. The same
    arguments give the same cases, in size order, so curves of one run compare."""
    order = sorted(sizes, key=lambda c: (sizes[c], c))
    n = max(0, min(n, len(order)))
    if n == len(order):
        return order
    rng = np.random.default_rng(seed)
    edges = np.linspace(0, len(order), n + 1).round().astype(int)
    return [order[int(rng.integers(lo, hi))] for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def plan_validation(
    slices: Mapping[str, int],
    sizes: Mapping[str, int],
    seconds_per_slice: float,
    time_limit: float,
    share: float,
    planned: int,
    seed: int,
    world: int = 1,
) -> ValidationPlan:
    """The validation cases for a run of `time_limit` seconds whose validations may take
    `share` of it together: all of them when `planned` validations of all fit, else the
    most cases (`spread_cases` over `sizes`) whose one validation fits budget/planned, else
    the most that fit the final validation alone, else the one case with fewest slices."""
    budget = share * time_limit
    cases = sorted(slices)

    def cost(chosen: Sequence[str]) -> float:
        return seconds_per_slice * sum(slices[c] for c in chosen) / max(1, world)

    def plan(chosen: Sequence[str], k: int, note: str = "") -> ValidationPlan:
        chosen = tuple(chosen)
        n = sum(slices[c] for c in chosen)
        return ValidationPlan(chosen, len(cases), n, seconds_per_slice, budget, k, note)

    every = cost(cases)
    if every * planned <= budget:
        return plan(cases, planned)
    for k in sorted({planned, 1}, reverse=True):
        for n in range(len(cases) - 1, 0, -1):
            chosen = spread_cases({c: sizes[c] for c in cases}, n, seed)
            if cost(chosen) * k <= budget:
                return plan(chosen, k, _subset_note(chosen, cases, every, budget, share, k))
    cheapest = [min(cases, key=lambda c: (slices[c], c))]
    note = (
        f"validation may use {100 * share:.0f}% of --time-limit ({seconds_text(budget)}), "
        f"but even the validation case with fewest slices ({cheapest[0]}) takes "
        f"{seconds_text(cost(cheapest))}: validating it alone during training"
        + ("" if len(cases) == 1 else f" (of {len(cases)}; `kitstrain score` scores all)")
    )
    return plan(cheapest, 1, note)


def _subset_note(
    chosen: Sequence[str],
    cases: Sequence[str],
    every: float,
    budget: float,
    share: float,
    planned: int,
) -> str:
    return (
        f"validating {len(chosen)} of {len(cases)} validation cases (seeded, spread over "
        f"tumour sizes) during training: all {len(cases)} would take {seconds_text(every)} "
        f"per validation, and validation may use {100 * share:.0f}% of --time-limit "
        f"({seconds_text(budget)}) for {planned} validation(s); `kitstrain score` scores all"
    )


def periodic_allowed(spent: float, one: float, budget: float, elapsed: float, limit: float) -> bool:
    """Whether a validation along the way fits: the final validation's share (`one`) stays
    reserved, and the rest of the budget is released in step with the run's clock, so
    validations spread over the run instead of spending the budget at its start."""
    released = (budget - one) * min(1.0, elapsed / limit)
    return spent + one <= released


def predicted_steps(
    step: int, step_seconds: float, elapsed: float, final_s: float, limit: float
) -> int:
    """Steps the run will have trained at its limit, at `step_seconds` a step from now on,
    leaving the final validation its `final_s`."""
    if step_seconds <= 0:
        return step
    return step + max(0, math.floor((limit - elapsed - final_s) / step_seconds))


def early_warning(steps: int, step_seconds: float, limit: float) -> str | None:
    """The step-~20 line: the pace so far predicts fewer than `FEW_STEPS` steps."""
    if steps >= FEW_STEPS:
        return None
    return (
        f"warning: at {step_seconds:.2f} s a step, --time-limit {seconds_text(limit)} holds "
        f"about {steps} steps (fewer than {FEW_STEPS}); {ADVICE}"
    )


def shortfall_warning(
    steps: int,
    train_s: float,
    val_s: float,
    elapsed: float,
    limit: float,
    validated: str,
) -> str | None:
    """Why a run that stopped at its time limit trained too little (less than
    `TRAINED_SHARE` of the limit in training steps, or fewer than `FEW_STEPS` steps), and
    what to change; None when it trained enough. `validated` names what one validation
    covered, e.g. "15 cases (1,530 slices at 512x512)"."""
    if train_s >= TRAINED_SHARE * limit and steps >= FEW_STEPS:
        return None
    other = max(0.0, elapsed - train_s - val_s)
    if val_s >= max(train_s, other):
        why = f"validation of {validated} took {seconds_text(val_s)}"
    elif other >= train_s:
        why = f"start-up, checkpoints and logging took {seconds_text(other)}"
    else:
        why = f"a step took {train_s / max(1, steps):.2f} s"
    return (
        f"trained {steps} step{'s' if steps != 1 else ''} in {seconds_text(limit)} "
        f"({seconds_text(train_s)} of training, {100 * train_s / limit:.0f}% of the limit): "
        f"{why}; {ADVICE}"
    )


def seconds_text(s: float) -> str:
    """9m40s, 45s, 0.4s, 1h02m: a duration as a person reads it."""
    if s < 9.95:
        return f"{max(0.0, s):.1f}s"
    s = round(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s % 60 else f"{s // 60}m"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
