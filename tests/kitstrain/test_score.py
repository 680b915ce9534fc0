"""`kitstrain score` as a library call: official numbers, the flag, outputs, user errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kitsprep.cases import read_volume
from kitsprep.errors import KitsError
from kitsprep.store import SliceMap, open_store
from kitstrain import run as runlib
from kitstrain.infer import Progress, read_store_labels, store_box
from kitstrain.metrics import CaseScore, mean_score
from kitstrain.score import BACKGROUND_FLAG, ScoreConfig, ScoreReport, format_table, score_run
from tests.kitstrain.test_infer import (
    constant_unet,
    make_cohort,
    make_run,
    make_store,
    official_dice,
)

VAL = ["case_00000", "case_00001", "case_00002", "case_00004"]
QUIET = Progress(enabled=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("score")
    src = make_cohort(root)
    store = make_store(src, root / "slices.h5")
    runs = root / "runs"
    return {
        "root": root, "src": src, "store": store,
        "kidney": make_run(runs / "a_kidney", store, constant_unet(1), val=VAL),
        "background": make_run(runs / "b_background", store, constant_unet(0), val=VAL),
    }


def store_truth(store: Path, cid: str) -> np.ndarray:
    """The stored labels of a case, without the padding around the resized image."""
    info = open_store(store)
    sm = SliceMap(store, info.size)
    try:
        rows, cols = store_box(info, cid)
        return read_store_labels(sm, info, cid)[:, rows, cols]
    finally:
        sm.close()


def test_store_scores_equal_the_official_formula(setup, tmp_path: Path) -> None:
    """A model that calls everything kidney: Dice = 2|G| / (N + |G|), per the reference."""
    cfg = ScoreConfig(run_dir=setup["kidney"], device="cpu", batch_size=4,
                      json=tmp_path / "s.json")
    report = score_run(cfg, QUIET)
    assert [s.case for s in report.scores] == VAL
    for s in report.scores:
        truth = store_truth(setup["store"], s.case)
        kidney, tumour = official_dice(np.ones_like(truth), truth)
        assert s.kidney_dice == pytest.approx(kidney, abs=1e-12)
        assert s.tumour_dice == pytest.approx(tumour, abs=1e-12) and tumour == 0.0
        assert s.mean_dice == pytest.approx((kidney + tumour) / 2)
        assert s.accuracy == pytest.approx(np.mean(truth == 1))
        assert s.background_accuracy == pytest.approx(np.mean(truth == 0))
    assert report.mean == mean_score(report.scores)
    assert report.geometry == f"store {32}x{32}" and report.resized  # case_00001 resized

    rows = list(csv.DictReader(open(report.csv_path)))
    assert report.csv_path == setup["kidney"] / "score.csv"
    assert [r["case"] for r in rows] == [*VAL, "mean"]
    assert float(rows[0]["kidney_dice"]) == report.scores[0].kidney_dice
    data = json.loads((tmp_path / "s.json").read_text())
    assert [c["case"] for c in data["cases"]] == VAL
    assert data["mean"]["kidney_dice"] == pytest.approx(report.mean.kidney_dice)
    assert "both sets empty scores 1.0" in data["definition"]


def test_source_scores_equal_the_official_formula_at_source_resolution(setup,
                                                                       tmp_path: Path) -> None:
    cfg = ScoreConfig(run_dir=setup["kidney"], src=setup["src"], device="cpu", batch_size=4,
                      overlays=tmp_path / "png")
    report = score_run(cfg, QUIET)
    assert report.geometry == "source" and not report.resized
    for s in report.scores:
        truth = read_volume(setup["src"] / s.case / "segmentation.nii.gz").data
        kidney, tumour = official_dice(np.ones_like(truth), truth)
        assert s.kidney_dice == pytest.approx(kidney, abs=1e-12)
        assert s.tumour_dice == pytest.approx(tumour, abs=1e-12)
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [f"{c}.png" for c in VAL]


def test_a_background_model_is_flagged(setup, tmp_path: Path) -> None:
    cfg = ScoreConfig(run_dir=setup["background"], device="cpu", overlays=tmp_path / "png",
                      tta=True)
    report = score_run(cfg, QUIET)
    assert all(s.kidney_dice == 0.0 and s.background_only for s in report.scores)
    assert all(s.accuracy == s.background_accuracy for s in report.scores)
    table = format_table(report)
    rows = [line for line in table.splitlines() if line.startswith("case_")]
    assert len(rows) == len(VAL) and all(r.endswith(BACKGROUND_FLAG) for r in rows)
    assert "look like a model that predicts background everywhere" in table
    assert len(report.overlays) == len(VAL) and all(p.is_file() for p in report.overlays)


def test_table_flags_only_the_rows_that_need_it(tmp_path: Path) -> None:
    good = CaseScore("case_00050", 0.95, 0.70, 0.825, 0.9990, 0.9852)
    near = CaseScore("case_00051", 0.60, 0.00, 0.300, 0.9890, 0.9882)  # within 0.2 points
    blind = CaseScore("case_00052", 0.05, 0.00, 0.025, 0.9500, 0.9000)  # kidney Dice < 0.1
    scores = [good, near, blind]
    report = ScoreReport(run_dir=tmp_path, checkpoint=tmp_path / "best.pt", store=None,
                         src=None, geometry="source", tta=False, scores=scores,
                         mean=mean_score(scores))
    lines = {line.split()[0]: line for line in format_table(report).splitlines() if line}
    assert not lines["case_00050"].endswith(BACKGROUND_FLAG)
    assert lines["case_00051"].endswith(BACKGROUND_FLAG)
    assert lines["case_00052"].endswith(BACKGROUND_FLAG)
    assert "99.900" in lines["case_00050"] and "98.520" in lines["case_00050"]
    assert lines["mean"].split()[1] == f"{np.mean([0.95, 0.60, 0.05]):.4f}"


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
    fails("case_00003 in .* has no segmentation", run_dir=setup["kidney"], cases="3",
          src=setup["src"])

    # The store moved: name the fix, and accept it. Same content: no warning.
    moved = tmp_path / "moved.h5"
    shutil.copy(setup["store"], moved)
    run = tmp_path / "run"
    shutil.copytree(setup["kidney"], run)
    config = runlib.read_config(run)
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
