"""The time budget as plain numbers: the validation subset (deterministic, spread over
tumour sizes, stable), the plan under a budget, the pace of validations along the way, and
the warnings for a run that trains too little."""

from __future__ import annotations

import pytest

from kitstrain.train.budget import (
    FEW_STEPS,
    early_warning,
    periodic_allowed,
    plan_validation,
    predicted_steps,
    seconds_text,
    shortfall_warning,
    spread_cases,
)

# twelve cases: tumour voxels 0, 100, ..., 1100 (listed out of order), 50 slices each
SIZES = {f"case_{i:05d}": (i * 7 % 12) * 100 for i in range(12)}
SLICES = dict.fromkeys(SIZES, 50)


def test_the_subset_is_seeded_stable_and_spread_over_tumour_sizes() -> None:
    picked = spread_cases(SIZES, 4, seed=0)
    assert picked == spread_cases(dict(reversed(SIZES.items())), 4, seed=0)  # stable
    assert len(set(picked)) == 4
    # one from each quarter of the cases sorted by tumour size, in size order
    ranks = sorted(SIZES.values())
    for quarter, case in enumerate(picked):
        assert ranks[3 * quarter] <= SIZES[case] <= ranks[3 * quarter + 2]
    others = {tuple(spread_cases(SIZES, 4, seed=s)) for s in range(10)}
    assert len(others) > 1  # the seed draws within each quarter
    assert spread_cases(SIZES, 12, seed=0) == sorted(SIZES, key=SIZES.get)
    assert spread_cases(SIZES, 1, seed=3) == spread_cases(SIZES, 1, seed=3)


def test_validation_that_fits_the_budget_covers_every_case() -> None:
    # 600 slices at 0.01 s: 6 s a validation; 4 of them fit 15 % of 10 minutes (90 s)
    v = plan_validation(SLICES, SIZES, 0.01, 600.0, 0.15, 4, seed=0)
    assert v.cases == tuple(sorted(SIZES)) and v.note == "" and v.planned == 4
    assert v.seconds() == pytest.approx(6.0) and v.budget_s == pytest.approx(90.0)


def test_a_budget_that_cannot_validate_every_case_picks_a_spread_subset() -> None:
    # 600 slices at 0.3 s: 180 s a validation; 90 s / 4 validations leaves 22.5 s: one case
    # (50 slices, 15 s) fits, two (30 s) do not
    v = plan_validation(SLICES, SIZES, 0.3, 600.0, 0.15, 4, seed=0)
    assert len(v.cases) == 1 and v.planned == 4 and v.slices == 50
    assert v.seconds() * v.planned <= v.budget_s
    assert "validating 1 of 12 validation cases" in v.note and "3m" in v.note
    assert v.cases == tuple(spread_cases(SIZES, 1, seed=0))
    # 2.5 s a case: 9 of the 12 fit 22.5 s
    v = plan_validation(SLICES, SIZES, 0.05, 600.0, 0.15, 4, seed=0)
    assert len(v.cases) == 9 and v.seconds() * 4 <= 90.0
    assert v.to_json()["cases"] == list(v.cases)
    # shared by two ranks, a validation takes half the time: 3 cases (22.5 s) fit
    assert len(plan_validation(SLICES, SIZES, 0.3, 600.0, 0.15, 4, seed=0, world=2).cases) == 3


def test_when_no_case_fits_four_validations_the_final_one_alone_is_planned() -> None:
    # 1 s a slice: one case is 50 s, more than 90 s / 4 but within 90 s
    v = plan_validation(SLICES, SIZES, 1.0, 600.0, 0.15, 4, seed=0)
    assert (len(v.cases), v.planned) == (1, 1)
    # 3 s a slice: one case is 150 s, over the budget: the case with fewest slices alone
    slices = {**SLICES, "case_00005": 20}
    v = plan_validation(slices, SIZES, 3.0, 600.0, 0.15, 4, seed=0)
    assert v.cases == ("case_00005",) and "even the validation case with fewest" in v.note


def test_validations_along_the_way_keep_the_final_share_and_spread_over_the_run() -> None:
    # budget 90 s, 20 s a validation: 70 s for the ones along the way, released with time
    assert not periodic_allowed(0.0, 20.0, 90.0, elapsed=60.0, limit=600.0)  # 7 s released
    assert periodic_allowed(0.0, 20.0, 90.0, elapsed=180.0, limit=600.0)  # 21 s
    assert not periodic_allowed(20.0, 20.0, 90.0, elapsed=300.0, limit=600.0)  # 35 s
    assert periodic_allowed(40.0, 20.0, 90.0, elapsed=600.0, limit=600.0)  # 60 of 70 s
    assert not periodic_allowed(60.0, 20.0, 90.0, elapsed=600.0, limit=600.0)  # the final's


def test_the_early_line_predicts_too_few_steps() -> None:
    steps = predicted_steps(20, 2.0, elapsed=40.0, final_s=60.0, limit=600.0)
    assert steps == 20 + 250
    line = early_warning(steps, 2.0, 600.0)
    assert line is not None and "about 270 steps" in line and "--time-limit 10m" in line
    assert "--val-budget" in line and "--patch" in line
    assert early_warning(predicted_steps(20, 0.1, 2.0, 60.0, 600.0), 0.1, 600.0) is None


def test_a_run_that_trained_too_little_is_told_why() -> None:
    # the measured case: one step, then the rest of 10 minutes in validation
    line = shortfall_warning(1, 3.0, 580.0, 598.0, 600.0, "15 case(s) (1,530 slices)")
    assert line is not None
    assert line.startswith("trained 1 step in 10m (3.0s of training, 0% of the limit)")
    assert "validation of 15 case(s) (1,530 slices) took 9m40s" in line
    assert "--val-cases" in line and "--val-budget" in line
    # enough of the budget, but slow steps
    line = shortfall_warning(100, 500.0, 60.0, 590.0, 600.0, "1 case(s)")
    assert line is not None and "a step took 5.00 s" in line
    # enough steps and enough of the budget: no warning
    assert shortfall_warning(FEW_STEPS, 400.0, 80.0, 590.0, 600.0, "x") is None
    assert shortfall_warning(5000, 200.0, 80.0, 590.0, 600.0, "x") is not None  # 33 %


def test_durations_read_as_a_person_reads_them() -> None:
    assert [seconds_text(s) for s in (0.42, 45, 580, 600, 3720)] == [
        "0.4s",
        "45s",
        "9m40s",
        "10m",
        "1h02m",
    ]
