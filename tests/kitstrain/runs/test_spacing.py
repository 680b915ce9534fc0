"""Bad voxel spacing at prediction time: `kitstrain predict` and `Predictor.predict_nifti`
name the case, the file and the header's value in one line; `Predictor.predict` refuses a
spacing that is not three positive finite mm values with one KitsError line, never a
TypeError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kitsprep.errors import KitsError
from kitstrain.api import Predictor
from kitstrain.cli import main
from kitstrain.model.unet import UNet, UNetConfig
from tests.conftest import build
from tests.kitsprep.conftest import write_good
from tests.kitsprep.test_spacing import PIXDIM_1, bad_spacing_case, one_error_line
from tests.kitstrain.infer.test_engine import make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("spacing")
    src = root / "src"
    write_good(src, 0)
    write_good(src, 1)
    store = root / "s.h5"
    build(src, store, size=16, workers=1)
    model = UNet(UNetConfig(in_channels=1, num_classes=3, width=4, depth=2)).eval()
    return make_run(root / "run", store, model, val=["case_00001"])


@pytest.mark.parametrize("value, shown", [(0.0, "(0, "), (-1.0, "(-1, "), (np.inf, "(inf, ")])
def test_predict_names_the_case_the_file_and_the_value(
    run: Path, tmp_path: Path, value: float, shown: str
) -> None:
    src = tmp_path / "src"
    bad_spacing_case(src, 7, PIXDIM_1, value)
    out = tmp_path / "pred"
    result = CliRunner().invoke(
        main, ["predict", str(run), "--src", str(src), "--out", str(out), "--device", "cpu"]
    )
    line = one_error_line(result)
    assert "case_00007: imaging.nii.gz gives voxel spacing " + shown in line


def test_predict_nifti_refuses_a_nan_spacing(run: Path, tmp_path: Path) -> None:
    folder = bad_spacing_case(tmp_path / "src", 3, PIXDIM_1, np.nan)
    predictor = Predictor.from_run(run, device="cpu")
    with pytest.raises(KitsError, match=r"case_00003: imaging.nii.gz gives voxel spacing \(nan, "):
        predictor.predict_nifti(folder / "imaging.nii.gz")


@pytest.mark.parametrize(
    "spacing",
    ["abc", (1, None, 1), 2.5, (1.0, 0.8), (1, 1, 1, 1), (0, 0.8, 0.8), (np.nan, 1, 1),
     (1, -0.8, 0.8), (1, np.inf, 1), (True, 1, 1), {1.0, 2.0, 3.0}],
)  # fmt: skip
def test_api_bad_spacing_is_one_kits_error_line(run: Path, spacing: object) -> None:
    predictor = Predictor.from_run(run, device="cpu")
    with pytest.raises(KitsError, match="expected spacing as 3 positive mm values") as err:
        predictor.predict(np.zeros((2, 16, 16)), spacing=spacing)
    assert "\n" not in str(err.value)


def test_api_takes_spacing_as_nibabel_and_numpy_give_it(run: Path) -> None:
    predictor = Predictor.from_run(run, device="cpu")
    hu = np.zeros((2, 16, 16))
    want = predictor.predict(hu)
    for spacing in [(np.float32(2.5), np.float32(0.8), np.float32(0.8)), np.array([2.5, 1, 1])]:
        np.testing.assert_array_equal(predictor.predict(hu, spacing=spacing), want)
