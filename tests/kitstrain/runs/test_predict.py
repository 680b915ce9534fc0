"""`kitstrain predict`: submission files in the imaging's own geometry, labelled or not,
named for the edition's evaluator; training cases marked."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from kitsprep.errors import KitsError
from kitsprep.labels import EDITIONS
from kitsprep.progress import Progress
from kitstrain.core import rundir as runlib
from kitstrain.model.unet import UNet
from kitstrain.report.score import TRAINED_FLAG, format_table
from kitstrain.runs.predict import PredictConfig, predict_run, prediction_name
from tests.kitstrain.infer.test_engine import (
    COHORT,
    UNET,
    constant_unet,
    make_cohort,
    make_run,
    make_store,
    official_dice,
)

QUIET = Progress(enabled=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("predict")
    src = make_cohort(root)
    store = make_store(src, root / "slices.h5")
    return {
        "root": root,
        "src": src,
        "store": store,
        "kidney": make_run(
            root / "runs" / "kidney",
            store,
            constant_unet(1),
            val=["case_00000"],
            train=["case_00001", "case_00002"],
        ),
        "random": make_run(
            root / "runs" / "random", store, UNet(UNET).eval(), val=["case_00000"], context=0
        ),
    }


def test_prediction_name() -> None:
    assert prediction_name("case_00210") == "prediction_00210.nii.gz"
    assert prediction_name("case_00210", EDITIONS["kits19"]) == "prediction_00210.nii.gz"
    assert prediction_name("case_00210", EDITIONS["kits23"]) == "case_00210.nii.gz"


def test_predictions_have_the_imaging_geometry(setup, tmp_path: Path) -> None:
    """Non-square, int16-with-intercept, unlabelled and slices-last cases: shape, affine,
    sform/qform codes as the imaging's; uint8 without scaling; overlays for every case."""
    out = tmp_path / "pred"
    report = predict_run(
        PredictConfig(
            run_dir=setup["random"],
            src=setup["src"],
            out=out,
            device="cpu",
            batch_size=3,
            overlays=tmp_path / "png",
        ),
        QUIET,
    )
    assert sorted(p.name for p in report.paths) == [prediction_name(c) for c in COHORT]
    assert len(report.paths) == len(COHORT)
    for cid in COHORT:
        img = nib.load(str(setup["src"] / cid / "imaging.nii.gz"))
        pred = nib.load(str(out / prediction_name(cid)))
        assert pred.shape == img.shape
        np.testing.assert_allclose(pred.affine, img.affine)
        assert pred.get_data_dtype() == np.uint8
        assert int(pred.header["sform_code"]) == int(img.header["sform_code"]) == 2
        assert int(pred.header["qform_code"]) == int(img.header["qform_code"]) == 1
        data = np.asanyarray(pred.dataobj)
        assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1, 2}
        assert pred.header.get_slope_inter() in ((None, None), (1.0, 0.0))
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [f"{c}.png" for c in COHORT]
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_labelled_cases_are_scored_with_the_official_formula(setup, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    report = predict_run(
        PredictConfig(
            run_dir=setup["kidney"], src=setup["src"], out=out, cases="0-3", device="cpu", tta=True
        ),
        QUIET,
    )
    assert [s.case for s in report.scores] == ["case_00000", "case_00001", "case_00002"]
    for s in report.scores:
        truth = np.asanyarray(nib.load(str(setup["src"] / s.case / "segmentation.nii.gz")).dataobj)
        pred = np.asanyarray(nib.load(str(out / prediction_name(s.case))).dataobj)
        assert (pred == 1).all()
        kidney, tumour = official_dice(pred, truth)
        assert s.dice["kidney"] == pytest.approx(kidney, abs=1e-12)
        assert s.dice["tumour"] == pytest.approx(tumour, abs=1e-12)
        assert set(s.surface_dice) == {"kidney", "tumour"}
    assert report.trained == ["case_00001", "case_00002"]
    table = format_table(report.score_report())
    assert "case_00003" not in table and "mean" in table
    lines = {line.split()[0]: line for line in table.splitlines() if line.startswith("case_")}
    assert TRAINED_FLAG not in lines["case_00000"]
    assert lines["case_00001"].endswith(TRAINED_FLAG) and lines["case_00002"].endswith(TRAINED_FLAG)
    assert "2 of 3 case(s) were in the run's training split" in table


def test_naming_follows_the_store_edition_or_the_option(setup, tmp_path: Path) -> None:
    report = predict_run(
        PredictConfig(
            run_dir=setup["kidney"], src=setup["src"], out=tmp_path / "a", cases="3", device="cpu"
        ),
        QUIET,
    )
    assert [p.name for p in report.paths] == ["prediction_00003.nii.gz"]  # a KiTS19 store
    report = predict_run(
        PredictConfig(
            run_dir=setup["kidney"],
            src=setup["src"],
            out=tmp_path / "b",
            cases="3",
            device="cpu",
            naming="kits23",
        ),
        QUIET,
    )
    assert [p.name for p in report.paths] == ["case_00003.nii.gz"]
    with pytest.raises(KitsError, match="unknown KiTS edition 'kits20'"):
        predict_run(
            PredictConfig(
                run_dir=setup["kidney"],
                src=setup["src"],
                out=tmp_path / "c",
                cases="3",
                device="cpu",
                naming="kits20",
            ),
            QUIET,
        )


def test_predict_survives_a_moved_store_and_names_user_errors(setup, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(setup["kidney"], run)
    config = runlib.read_json(run, runlib.CONFIG)
    runlib.write_json(run / runlib.CONFIG, {**config, "store": str(tmp_path / "gone.h5")})
    # The window and size recorded in the run are all that preprocessing needs.
    report = predict_run(
        PredictConfig(run_dir=run, src=setup["src"], out=tmp_path / "p", cases="3", device="cpu"),
        QUIET,
    )
    assert len(report.paths) == 1 and "missing" in report.warnings[0]

    (tmp_path / "file").write_text("")
    with pytest.raises(KitsError, match="is a file"):
        predict_run(
            PredictConfig(run_dir=run, src=setup["src"], out=tmp_path / "file", device="cpu"), QUIET
        )
    with pytest.raises(KitsError, match="not there"):
        predict_run(
            PredictConfig(
                run_dir=run, src=setup["src"], out=tmp_path / "p", cases="42", device="cpu"
            ),
            QUIET,
        )
    runlib.write_json(
        run / runlib.CONFIG, {k: v for k, v in config.items() if k not in ("store", "store_attrs")}
    )
    with pytest.raises(KitsError, match="pass --data"):
        predict_run(
            PredictConfig(run_dir=run, src=setup["src"], out=tmp_path / "p", device="cpu"), QUIET
        )
