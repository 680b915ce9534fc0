"""`kitstrain fit --cascade`: both stages in one run directory, the record, --resume after
the coarse stage, score/predict through the cascade, and bad options."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from kitsprep.errors import KitsError
from kitsprep.store import open_store
from kitsprep.synth import SynthConfig, write_cohort
from kitstrain.cli import main
from kitstrain.core.record import read_record
from tests.conftest import build

SIZE = 64
TINY = ["--workers", "0", "--batch-size", "4", "--samples-per-epoch", "8", "--width", "4"]
TINY += ["--depth", "2", "--val-cases", "2", "--train-cases", "0,1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cascade")
    write_cohort(SynthConfig(cases=4, size=SIZE, seed=3), root / "src")
    build(root / "src", root / "s.h5", size=SIZE, workers=1)
    return root


@pytest.fixture(scope="module")
def run(data: Path) -> Path:
    out = data / "run"
    r = kits("fit", data / "s.h5", "--out", out, "--cascade", "--coarse-size", "32", *TINY,
             "--max-steps", "3")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "cascade: coarse stage on 32x32 slices (1 steps)" in r.output
    return out


def kits(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_both_stages_train_in_one_run_with_one_split(run: Path) -> None:
    record = json.loads((run / "config.json").read_text())
    cas = record["cascade"]
    assert cas["done"] == ["coarse", "fine"] and cas["coarse_size"] == 32
    assert cas["coarse_factor"] == 2 and cas["margin_mm"] == 20.0
    assert cas["budget"]["coarse"]["max_steps"] == 1 and cas["budget"]["fine"]["max_steps"] == 2
    coarse, fine = (json.loads((run / s / "config.json").read_text()) for s in ("coarse", "fine"))
    assert coarse["store_attrs"]["size"] == 32 and fine["store_attrs"]["size"] == cas["fine_side"]
    # the coarse stage trains half-side patches, as a single-stage run at 32² would
    assert not coarse["train"]["cascade"] and coarse["train"]["patch"] == 16
    assert cas["coarse_patch"] == 16 and cas["fine_factor"] == 1  # auto: 1 below 512²
    assert cas["fine_patch"] == fine["train"]["patch"] == min(128, cas["fine_side"])
    splits = [json.loads((run / s / "split.json").read_text()) for s in ("coarse", "fine", ".")]
    assert splits[0]["val"] == splits[1]["val"] == splits[2]["val"] == ["case_00002"]
    assert splits[0]["train"] == splits[1]["train"]
    assert (run / "fine" / "checkpoints" / "best.pt").is_file()
    fine_store = open_store(run / "stores" / "fine.h5")
    assert (
        fine_store.foreground_pixels().sum()
        == open_store(run.parent / "s.h5").foreground_pixels().sum()
    )


def test_score_and_predict_run_the_cascade(run: Path, data: Path) -> None:
    r = kits("score", run, "--json", data / "score.json")
    assert r.exit_code == 0, r.output
    case = json.loads((data / "score.json").read_text())["cases"][0]
    assert case["case"] == "case_00002"
    note = case["cascade"]
    assert 0 < note["fine_voxel_share"] <= 1 and isinstance(note["fallback"], bool)
    assert note["fallback"] or all(len(b) == 6 for b in note["regions"])
    r = kits("predict", run, "--src", data / "src", "--out", data / "pred", "--cases", "2")
    assert r.exit_code == 0, r.output
    assert (data / "pred" / "prediction_00002.nii.gz").is_file()
    r = kits("export", run, "--out", data / "m.onnx")
    assert r.exit_code == 1 and "cascade of two models" in r.output


def test_resume_after_the_coarse_stage_trains_only_the_fine(run: Path, data: Path) -> None:
    out = data / "resumed"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("fine", "lock"))
    record = json.loads((out / "config.json").read_text())
    record["cascade"]["done"] = ["coarse"]
    for key in ("fine_factor", "coarse_patch"):  # as a record written before them
        record["cascade"].pop(key)
    (out / "config.json").write_text(json.dumps(record))
    coarse_metrics = (out / "coarse" / "metrics.jsonl").read_text()
    r = kits("fit", data / "s.h5", "--out", out, "--resume", "--workers", "0")
    assert r.exit_code == 0, r.output
    assert "coarse stage" not in r.output and "cascade: fine stage" in r.output
    assert (out / "coarse" / "metrics.jsonl").read_text() == coarse_metrics
    assert json.loads((out / "config.json").read_text())["cascade"]["done"] == ["coarse", "fine"]
    assert (out / "fine" / "checkpoints" / "last.pt").is_file()
    r = kits("score", out, "--json", data / "resumed.json")  # an old record: factor 1
    assert r.exit_code == 0, r.output
    assert "fine_factor" not in json.loads((out / "config.json").read_text())["cascade"]


def test_fine_factor_2_trains_scores_and_predicts_at_half_resolution(data: Path) -> None:
    out = data / "half"
    r = kits("fit", data / "s.h5", "--out", out, "--cascade", "--coarse-size", "32",
             "--fine-factor", "2", *TINY, "--max-steps", "3")  # fmt: skip
    assert r.exit_code == 0, r.output
    cas = json.loads((out / "config.json").read_text())["cascade"]
    assert cas["fine_factor"] == 2 and cas["done"] == ["coarse", "fine"]
    fine_store = open_store(out / "stores" / "fine.h5")
    assert fine_store.size == cas["fine_side"] and cas["fine_side"] % 4 == 0
    assert fine_store.build["region_side"] == 2 * cas["fine_side"]
    assert fine_store.build["fine_factor"] == 2
    for box in fine_store.build["regions"].values():  # cut at the store's side
        assert box[3] - box[2] == box[5] - box[4] == 2 * cas["fine_side"]
    assert cas["fine_patch"] == min(128, cas["fine_side"])
    r = kits("score", out, "--json", data / "half.json")
    assert r.exit_code == 0, r.output
    case = json.loads((data / "half.json").read_text())["cases"][0]
    note = case["cascade"]
    assert 0 < note["fine_voxel_share"] <= 1
    for b in note["regions"]:  # sides fit fine factor * 2**depth = 8
        assert (b[3] - b[2]) % 8 == 0 and (b[5] - b[4]) % 8 == 0
    r = kits("predict", out, "--src", data / "src", "--out", data / "pred2", "--cases", "2")
    assert r.exit_code == 0, r.output
    assert (data / "pred2" / "prediction_00002.nii.gz").is_file()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--coarse-size", "48"], "--coarse-size 48 must divide"),
        (["--coarse-size", "128"], "--coarse-size 128 must divide"),
        (["--coarse-share", "1"], "--coarse-share must be between 0 and 1"),
        (["--fine-factor", "3"], "--fine-factor 3 must divide the store's slice side 64"),
        (["--fine-factor", "32"], "--fine-factor 32 leaves 2x2 slices"),
    ],
)
def test_bad_cascade_options_exit_1_in_one_line(
    data: Path, tmp_path: Path, flags: list[str], expected: str
) -> None:
    r = kits("fit", data / "s.h5", "--out", tmp_path / "r", "--cascade", *flags, *TINY)
    assert r.exit_code == 1 and expected in r.output, r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "r" / "config.json").exists()


def test_plot_draws_each_stage_and_a_stage_is_named_where_one_run_is_needed(run: Path) -> None:
    r = kits("plot", run)
    assert r.exit_code == 0, r.output
    assert f"wrote {run / 'coarse' / 'curves.png'}" in r.output
    assert f"wrote {run / 'fine' / 'curves.png'}" in r.output
    with pytest.raises(KitsError, match="is a cascade of two runs"):
        read_record(run)
