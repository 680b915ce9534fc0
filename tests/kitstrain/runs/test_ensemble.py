"""Ensembles: several runs or a cross-validation folder averaged by `kitstrain predict`,
`kitstrain score` and `Predictor.from_run` alike, with the recorded post-processing applied
unless turned off; runs that differ are refused in one line, before anything is written."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kitsprep.errors import KitsError
from kitsprep.labels import EDITIONS
from kitstrain.api import Predictor
from kitstrain.cli import main as train_main
from kitstrain.infer.postprocess import KIDNEY_SHARE, LARGEST, Decision, Step, apply_steps
from kitstrain.model.unet import UNet
from kitstrain.runs.postprocessing import POSTPROCESSING
from kitstrain.runs.predict import prediction_name
from tests.conftest import build
from tests.kitstrain.infer.test_engine import COHORT, UNET, make_cohort, make_run, make_store

# slices-first cases: the engine's post-processing sees them in the file's own axis order
CASES = ["case_00000", "case_00001", "case_00002"]


def random_unet(seed: int, **cfg) -> UNet:
    torch.manual_seed(seed)
    return UNet(replace(UNET, **cfg)).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two random runs of one store (b trained on case_00001), their CV folder with a
    recorded decision, a run with another context and one on a store of another window."""
    root = tmp_path_factory.mktemp("ensemble")
    src = make_cohort(root)
    store = make_store(src, root / "slices.h5")
    runs = root / "runs"
    a = make_run(runs / "a", store, random_unet(1), val=["case_00000"])
    b = make_run(runs / "b", store, random_unet(2), val=["case_00000"], train=["case_00001"])
    ctx = make_run(runs / "ctx", store, random_unet(3, in_channels=3), val=["x"], context=1)
    other = root / "abdomen.h5"
    build(src, other, size=32, workers=1, window="abdomen")
    win = make_run(runs / "win", other, random_unet(4), val=["case_00000"])
    cv = root / "cv"
    cv.mkdir()
    (cv / "cv.json").write_text(
        json.dumps(
            {
                "version": 1,
                "folds": 2,
                "store": str(store),
                "splits": "splits.json",
                "fit": {},
                "done": [0, 1],
            }
        )
    )
    shutil.copytree(a, cv / "fold_0")
    shutil.copytree(b, cv / "fold_1")
    decision = Decision("kits19", (Step(LARGEST, "kidney", KIDNEY_SHARE),), {}, {}, 3)
    (cv / POSTPROCESSING).write_text(decision.to_json())
    return {"src": src, "a": a, "b": b, "ctx": ctx, "win": win, "cv": cv, "steps": decision.steps}


def invoke(*args: object) -> str:
    result = CliRunner().invoke(train_main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def written(out: Path, cid: str, naming=EDITIONS["kits19"]) -> np.ndarray:
    return np.asanyarray(nib.load(str(out / prediction_name(cid, naming))).dataobj)


def test_cli_and_api_give_the_same_ensemble_masks(setup, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    invoke("predict", setup["a"], setup["b"], "--src", setup["src"], "--out", out)
    ensemble = Predictor.from_run([setup["a"], setup["b"]], device="cpu")
    alone = Predictor.from_run(setup["a"], device="cpu")
    differs = False
    for cid in COHORT:
        image = setup["src"] / cid / "imaging.nii.gz"
        mask = np.asanyarray(ensemble.predict_nifti(image).dataobj)
        np.testing.assert_array_equal(mask, written(out, cid))
        differs |= not np.array_equal(mask, np.asanyarray(alone.predict_nifti(image).dataobj))
    assert differs  # the second model counts
    record = json.loads((out / "kitstrain-predict.json").read_text())
    assert record["run"] == f"{setup['a'].resolve()}, {setup['b'].resolve()}"


def test_a_cv_folder_applies_its_post_processing_unless_told_not_to(setup, tmp_path) -> None:
    on, off = tmp_path / "on", tmp_path / "off"
    invoke("predict", setup["cv"], "--src", setup["src"], "--out", on)
    invoke("predict", setup["cv"], "--src", setup["src"], "--out", off, "--no-postprocess")
    folds = Predictor.from_run([setup["a"], setup["b"]], device="cpu")
    cv = Predictor.from_run(setup["cv"], device="cpu")
    changed = False
    for cid in CASES:
        image = setup["src"] / cid / "imaging.nii.gz"
        raw = np.asanyarray(folds.predict_nifti(image).dataobj)
        np.testing.assert_array_equal(written(off, cid), raw)
        expected = apply_steps(raw, setup["steps"], EDITIONS["kits19"])
        np.testing.assert_array_equal(written(on, cid), expected)
        np.testing.assert_array_equal(np.asanyarray(cv.predict_nifti(image).dataobj), expected)
        changed |= not np.array_equal(expected, raw)
    assert changed  # the random models leave components for the step to remove
    record = json.loads((on / "kitstrain-predict.json").read_text())
    assert record["postprocessing"] == ["kidney: keep components of >= 0.2 of the largest"]


def test_score_of_an_ensemble_names_its_runs_steps_and_trained_cases(setup, tmp_path) -> None:
    report = tmp_path / "score.json"
    spec = "case_00000,case_00001"
    out = invoke("score", setup["cv"], "--cases", spec, "--json", report, "--device", "cpu")
    assert "ensemble of 2 runs" in out and "post-processing: kidney: keep components" in out
    assert "1 of 2 case(s) were in the training split of a member run" in out
    data = json.loads(report.read_text())
    assert data["runs"] == [str(setup["cv"] / "fold_0"), str(setup["cv"] / "fold_1")]
    assert data["postprocessing"] == {
        "applied": True,
        "steps": ["kidney: keep components of >= 0.2 of the largest"],
        "decision": str(setup["cv"] / POSTPROCESSING),
    }
    assert [c["trained_on"] for c in data["cases"]] == [False, True]
    assert not (setup["cv"] / "score.csv").exists() and not (setup["a"] / "score.csv").exists()
    invoke("score", setup["cv"], "--cases", spec, "--json", report, "--no-postprocess")
    data = json.loads(report.read_text())
    assert data["postprocessing"] == {"applied": False, "steps": [], "decision": None}
    # the same two runs named one by one score as their CV folder without its decision
    invoke("score", setup["a"], setup["b"], "--cases", spec, "--json", tmp_path / "ab.json")
    ab = json.loads((tmp_path / "ab.json").read_text())
    assert [c["mean_dice"] for c in ab["cases"]] == [c["mean_dice"] for c in data["cases"]]


@pytest.mark.parametrize(
    "other, what", [("ctx", "2.5D context"), ("win", "window")], ids=["context", "window"]
)
def test_runs_that_differ_are_refused_in_one_line(setup, tmp_path, other, what) -> None:
    out = tmp_path / "pred"
    for args in (
        ["predict", setup["a"], setup[other], "--src", setup["src"], "--out", out],
        ["score", setup["a"], setup[other], "--json", tmp_path / "s.json"],
    ):
        result = CliRunner().invoke(train_main, [str(a) for a in args])
        assert result.exit_code == 1
        line = result.output.strip()
        assert "\n" not in line and "Traceback" not in result.output
        assert f"runs {setup['a']} and {setup[other]} differ in {what}" in line
    assert not out.exists() and not (tmp_path / "s.json").exists()


def test_naming_nnunet_writes_the_case_name(setup, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    invoke("predict", setup["a"], "--src", setup["src"], "--out", out, "--naming", "nnunet")
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{c}.nii.gz" for c in COHORT]
    assert prediction_name("case_00210", "nnunet") == "case_00210.nii.gz"


def test_an_unfinished_cv_folder_or_a_run_twice_is_refused(setup, tmp_path: Path) -> None:
    cv = tmp_path / "cv"
    shutil.copytree(setup["cv"], cv)
    (cv / "cv.json").write_text(
        json.dumps(
            {"folds": 3, "store": "s.h5", "splits": "splits.json", "fit": {}, "done": [0, 1]}
        )
    )
    with pytest.raises(KitsError, match="fold.s. 2 of 3 have not finished"):
        Predictor.from_run(cv, device="cpu")
    with pytest.raises(KitsError, match="is in the ensemble twice"):
        Predictor.from_run([setup["cv"], setup["cv"] / "fold_1"], device="cpu")
