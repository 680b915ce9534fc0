"""`kitstrain score` as a library call: official numbers, the flags, outputs, user errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kitsprep.cases import read_volume
from kitsprep.errors import KitsError
from kitsprep.labels import EDITIONS
from kitsprep.progress import Progress
from kitsprep.store import SliceReader, open_store
from kitstrain.core import rundir as runlib
from kitstrain.infer.cases import store_spacing
from kitstrain.infer.engine import read_store_labels, store_box
from kitstrain.metrics import CaseScore, mean_score
from kitstrain.report.score import (
    BACKGROUND_FLAG,
    OVERPREDICT_FLAG,
    TRAINED_FLAG,
    ScoreReport,
    format_table,
)
from kitstrain.runs.score import ScoreConfig, score_run
from tests.kitstrain.infer.test_engine import (
    constant_unet,
    make_cohort,
    make_run,
    make_store,
    official_dice,
)
from tests.kitstrain.metrics.test_metrics import KIDNEY_TOL, official_surface_dice

VAL = ["case_00000", "case_00001", "case_00002", "case_00004"]
QUIET = Progress(enabled=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("score")
    src = make_cohort(root)
    store = make_store(src, root / "slices.h5")
    runs = root / "runs"
    return {
        "root": root,
        "src": src,
        "store": store,
        "kidney": make_run(runs / "a_kidney", store, constant_unet(1), val=VAL),
        "background": make_run(runs / "b_background", store, constant_unet(0), val=VAL),
    }


def store_truth(store: Path, cid: str) -> np.ndarray:
    """The stored labels of a case, without the padding around the resized image."""
    info = open_store(store)
    sm = SliceReader(store, info.size)
    try:
        rows, cols = store_box(info, cid)
        return read_store_labels(sm, info, cid)[:, rows, cols]
    finally:
        sm.close()


def test_store_scores_equal_the_official_formula(setup, tmp_path: Path) -> None:
    """A model that calls everything kidney: Dice = 2|G| / (N + |G|), per the reference."""
    cfg = ScoreConfig(run_dir=setup["kidney"], device="cpu", batch_size=4, json=tmp_path / "s.json")
    report = score_run(cfg, QUIET)
    assert [s.case for s in report.scores] == VAL
    for s in report.scores:
        truth = store_truth(setup["store"], s.case)
        kidney, tumour = official_dice(np.ones_like(truth), truth)
        assert s.dice["kidney"] == pytest.approx(kidney, abs=1e-12)
        assert s.dice["tumour"] == pytest.approx(tumour, abs=1e-12) and tumour == 0.0
        assert s.mean_dice == pytest.approx((kidney + tumour) / 2)
        # a prediction that fills the volume: its surface is the volume's edge
        spacing = store_spacing(open_store(setup["store"]), s.case)
        assert s.surface_dice["kidney"] == pytest.approx(
            official_surface_dice(np.ones(truth.shape, bool), truth > 0, spacing, KIDNEY_TOL),
            abs=1e-4,
        )
        assert s.surface_dice["tumour"] == 0.0
        assert s.accuracy == pytest.approx(np.mean(truth == 1))
        assert s.background_accuracy == pytest.approx(np.mean(truth == 0))
    assert report.mean == mean_score(report.scores)
    assert report.geometry == f"store {32}x{32}" and report.resized  # case_00001 resized

    rows = list(csv.DictReader(open(report.csv_path)))
    assert report.csv_path == setup["kidney"] / "score.csv"
    assert [r["case"] for r in rows] == [*VAL, "mean"]
    assert float(rows[0]["kidney_dice"]) == report.scores[0].dice["kidney"]
    assert float(rows[0]["tumour_surface_dice"]) == report.scores[0].surface_dice["tumour"]
    assert list(rows[0])[:6] == [
        "case",
        "kidney_dice",
        "tumour_dice",
        "mean_dice",
        "kidney_surface_dice",
        "tumour_surface_dice",
    ]
    data = json.loads((tmp_path / "s.json").read_text())
    assert [c["case"] for c in data["cases"]] == VAL
    assert data["mean"]["kidney_dice"] == pytest.approx(report.mean.dice["kidney"])
    assert data["edition"] == "kits19"
    assert [r["name"] for r in data["regions"]] == ["kidney", "tumour"]
    assert data["regions"][0]["tolerance_mm"] == KIDNEY_TOL
    assert "both empty scores 1" in data["definition"]
    assert not any(c["trained_on"] for c in data["cases"])


def test_source_scores_equal_the_official_formula_at_source_resolution(
    setup, tmp_path: Path
) -> None:
    cfg = ScoreConfig(
        run_dir=setup["kidney"],
        src=setup["src"],
        device="cpu",
        batch_size=4,
        overlays=tmp_path / "png",
    )
    report = score_run(cfg, QUIET)
    assert report.geometry == "source" and not report.resized
    for s in report.scores:
        truth = read_volume(setup["src"] / s.case / "segmentation.nii.gz").data
        kidney, tumour = official_dice(np.ones_like(truth), truth)
        assert s.dice["kidney"] == pytest.approx(kidney, abs=1e-12)
        assert s.dice["tumour"] == pytest.approx(tumour, abs=1e-12)
        assert set(s.surface_dice) == {"kidney", "tumour"}
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [f"{c}.png" for c in VAL]


def test_a_background_model_is_flagged(setup, tmp_path: Path) -> None:
    cfg = ScoreConfig(
        run_dir=setup["background"], device="cpu", overlays=tmp_path / "png", tta=True
    )
    report = score_run(cfg, QUIET)
    assert all(s.dice["kidney"] == 0.0 and s.background_only for s in report.scores)
    assert not any(s.over_predicts for s in report.scores)
    assert all(s.accuracy == s.background_accuracy for s in report.scores)
    table = format_table(report)
    rows = [line for line in table.splitlines() if line.startswith("case_")]
    assert len(rows) == len(VAL) and all(r.endswith(BACKGROUND_FLAG) for r in rows)
    assert "look like a model that predicts background everywhere" in table
    assert len(report.overlays) == len(VAL) and all(p.is_file() for p in report.overlays)


def test_table_flags_only_the_rows_that_need_it(tmp_path: Path) -> None:
    def case(
        cid: str,
        kidney: float,
        acc: float,
        bg: float,
        fg_pred: int,
        fg_true: int,
    ) -> CaseScore:
        return CaseScore(
            cid,
            {"kidney": kidney, "tumour": 0.5},
            acc,
            bg,
            fg_pred,
            fg_true,
            {"kidney": 0.9, "tumour": 0.4},
        )

    good = case("case_00050", 0.95, 0.9990, 0.9852, 1000, 1000)
    # the newcomer's case: accuracy within 0.2 points of the baseline, a weak model not a
    # blind one
    weak = case("case_00051", 0.66, 0.9890, 0.9882, 700, 1000)
    blind = case("case_00052", 0.05, 0.9000, 0.9000, 40, 1000)  # almost no foreground
    over = case("case_00053", 0.30, 0.4200, 0.9960, 58000, 400)  # foreground everywhere
    scores = [good, weak, blind, over]
    report = ScoreReport(
        run_dir=tmp_path,
        checkpoint=tmp_path / "best.pt",
        store=None,
        src=None,
        geometry="source",
        tta=False,
        scores=scores,
        mean=mean_score(scores),
        labels=EDITIONS["kits19"],
        trained=["case_00050"],
    )
    table = format_table(report)
    lines = {line.split()[0]: line for line in table.splitlines() if line}
    assert lines["case_00050"].endswith(TRAINED_FLAG)
    assert not any(
        f in lines["case_00050"] or f in lines["case_00051"]
        for f in (BACKGROUND_FLAG, OVERPREDICT_FLAG)
    )
    assert lines["case_00052"].endswith(BACKGROUND_FLAG)
    assert lines["case_00053"].endswith(OVERPREDICT_FLAG)
    assert BACKGROUND_FLAG not in lines["case_00053"]
    assert "99.900" in lines["case_00050"] and "98.520" in lines["case_00050"]
    cells = lines["mean"].split()
    assert cells[1] == f"{np.mean([0.95, 0.66, 0.05, 0.30]):.4f}"  # kidney Dice, headline
    mean_dice = np.mean([(k + 0.5) / 2 for k in (0.95, 0.66, 0.05, 0.30)])
    assert cells[3] == f"{mean_dice:.4f}"  # mean Dice
    assert cells[4:6] == ["0.9000", "0.4000"]  # surface Dice
    assert "1 of 4 case(s) were in the run's training split" in table


def test_default_run_is_the_newest(setup) -> None:
    runs = setup["kidney"].parent
    newest = runlib.newest_run(runs)
    report = score_run(ScoreConfig(runs_root=runs, device="cpu", cases="0"), QUIET)
    assert report.run_dir == newest and [s.case for s in report.scores] == ["case_00000"]


def test_user_errors_are_one_line_kits_errors(setup, tmp_path: Path) -> None:
    def fails(match: str, **kw) -> None:
        with pytest.raises(KitsError, match=match):
            score_run(ScoreConfig(device="cpu", **kw), QUIET)

    (tmp_path / "empty").mkdir()
    fails("config.json is missing", run_dir=tmp_path / "empty")
    fails("not in store|not there", run_dir=setup["kidney"], cases="7")
    fails("case_00003 is unlabelled", run_dir=setup["kidney"], cases="3")
    fails(
        "case_00003 in .* has no segmentation", run_dir=setup["kidney"], cases="3", src=setup["src"]
    )

    # The store moved: name the fix, and accept it. Same content: no warning.
    moved = tmp_path / "moved.h5"
    shutil.copy(setup["store"], moved)
    run = tmp_path / "run"
    shutil.copytree(setup["kidney"], run)
    config = runlib.read_json(run, runlib.CONFIG)
    runlib.write_json(run / runlib.CONFIG, {**config, "store": str(tmp_path / "gone.h5")})
    fails("missing .*pass --data", run_dir=run)
    report = score_run(ScoreConfig(run_dir=run, data=moved, device="cpu", cases="0"), QUIET)
    assert report.store == moved and report.warnings == []

    # Other content, same preprocessing: a warning. Other preprocessing: an error.
    runlib.write_json(run / runlib.CONFIG, {**config, "store_fingerprint": "0" * 16})
    report = score_run(ScoreConfig(run_dir=run, data=moved, device="cpu", cases="0"), QUIET)
    assert len(report.warnings) == 1 and "not the store the run trained on" in report.warnings[0]
    small = make_store(setup["src"], tmp_path / "small.h5", size=16)
    fails("holds 16x16 slices, but the run trained on 32x32", run_dir=run, data=small)
