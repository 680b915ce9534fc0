"""`kitstrain cv` end to end on a tiny store (2 folds, a few CPU steps): every fold's run,
the out-of-fold predictions, cv.json; a stopped cross-validation going on where it stopped;
`kitstrain score CV_DIR` (table, JSON, --partial); bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kitsprep.store import SliceReader, open_store
from kitstrain.cli import main
from kitstrain.core.record import read_record
from kitstrain.infer.engine import read_store_labels, store_box, store_spacing
from kitstrain.infer.postprocess import Decision, apply_steps
from kitstrain.metrics import score_case
from tests.kitstrain.train.test_fit import TINY

CV_ARGS = [*TINY, "--max-steps", "2", "--device", "cpu", "--folds", "2"]


def cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(r, *needles: str) -> None:
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    for n in needles:
        assert n in r.output, r.output


@pytest.fixture(scope="module")
def cv_dir(loader_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cv") / "cv"
    r = cli("cv", loader_store, "--out", out, *CV_ARGS)
    assert r.exit_code == 0, r.output
    assert "2 trained now, 0 done before" in r.output
    return out


def copy_of(cv_dir: Path, tmp_path: Path) -> Path:
    """A copy whose fold runs record the copied splits file (as if trained there)."""
    return Path(shutil.copytree(cv_dir, tmp_path / "cv"))


def test_every_fold_is_trained_and_every_case_predicted_out_of_fold(
    cv_dir: Path, loader_store: Path
) -> None:
    info = open_store(loader_store)
    record = json.loads((cv_dir / "cv.json").read_text())
    assert (record["folds"], record["done"], record["splits"]) == (2, [0, 1], "splits.json")
    assert record["store"] == str(loader_store.resolve()) and record["fit"]["width"] == 4
    folds = json.loads((cv_dir / "splits.json").read_text())
    assert sorted(c for f in folds for c in f["val"]) == sorted(info.labelled_cases)
    for k, fold in enumerate(folds):
        run = read_record(cv_dir / f"fold_{k}")
        assert (run.fold.fold, run.fold.folds, run.fold.splits) == (
            k,
            2,
            str(cv_dir / "splits.json"),
        )
        assert json.loads((cv_dir / f"fold_{k}" / "split.json").read_text())["val"] == fold["val"]
        for case in fold["val"]:
            with np.load(cv_dir / "oof" / f"{case}.npz") as z:
                pred, got = z["pred"], int(z["fold"])
            assert got == k and pred.dtype == np.uint8
            assert pred.shape == (info.cases[case].slices, info.size, info.size)
            rows, cols = store_box(info, case)
            outside = np.ones(pred.shape[1:], bool)
            outside[rows, cols] = False
            assert not pred[:, outside].any()  # the padding of a resized case: background
    unlabelled = [c for c in info.case_ids if not info.cases[c].labelled]
    assert unlabelled and not any((cv_dir / "oof" / f"{c}.npz").exists() for c in unlabelled)


def test_a_stopped_cv_goes_on_where_it_stopped(
    cv_dir: Path, loader_store: Path, tmp_path: Path
) -> None:
    out = copy_of(cv_dir, tmp_path)
    folds = json.loads((out / "splits.json").read_text())
    # stopped during fold 1's out-of-fold predictions: fold 1 trained, not marked done
    record = json.loads((out / "cv.json").read_text())
    (out / "cv.json").write_text(json.dumps({**record, "done": [0]}))
    (out / "oof" / f"{folds[1]['val'][0]}.npz").unlink()
    fold0 = (out / "fold_0" / "checkpoints" / "last.pt").stat().st_mtime_ns
    r = cli("cv", loader_store, "--out", out, *CV_ARGS)
    assert r.exit_code == 0, r.output
    assert "fold 0: done before, skipped" in r.output
    assert f"fold 1 of 2: resuming {out / 'fold_1'}" in r.output
    assert "is finished (max_steps reached at step 2)" in r.output
    assert "0 trained now" not in r.output and "1 done before" in r.output
    assert (out / "fold_0" / "checkpoints" / "last.pt").stat().st_mtime_ns == fold0
    assert json.loads((out / "cv.json").read_text())["done"] == [0, 1]
    assert (out / "oof" / f"{folds[1]['val'][0]}.npz").is_file()
    # a done fold that lost a prediction (deleted by hand) predicts its cases again
    (out / "oof" / f"{folds[0]['val'][0]}.npz").unlink()
    r = cli("cv", loader_store, "--out", out, *CV_ARGS)
    assert r.exit_code == 0, r.output
    assert "fold 0: trained before; writing its missing out-of-fold predictions" in r.output
    assert (out / "oof" / f"{folds[0]['val'][0]}.npz").is_file()


def test_a_rerun_with_other_options_is_refused(
    cv_dir: Path, loader_store: Path, tmp_path: Path
) -> None:
    r = cli("cv", loader_store, "--out", cv_dir, *CV_ARGS, "--width", "8")
    one_line_error(r, "cv.json differs from this command: --width (recorded 4, given 8)")
    r = cli("cv", loader_store, "--out", cv_dir, *CV_ARGS, "--folds", "3")
    one_line_error(r, "--folds (recorded 2, given 3)")
    other = tmp_path / "other.json"
    folds = json.loads((cv_dir / "splits.json").read_text())
    other.write_text(json.dumps(folds[::-1]))
    r = cli("cv", loader_store, "--out", cv_dir, *CV_ARGS, "--splits", other)
    one_line_error(r, f"--splits {other} holds other folds than")


@pytest.mark.parametrize("postprocess", [True, False])
def test_score_cv_dir_is_the_out_of_fold_table(
    cv_dir: Path, loader_store: Path, tmp_path: Path, postprocess: bool
) -> None:
    report = tmp_path / "oof.json"
    flags = () if postprocess else ("--no-postprocess",)
    r = cli("score", cv_dir, "--json", report, *flags)
    assert r.exit_code == 0, r.output
    decision = Decision.from_json((cv_dir / "postprocessing.json").read_text())
    steps = decision.steps if postprocess else ()
    assert got_steps(report) == [s.describe() for s in steps]
    assert "geometry: store 32x32, out of fold" in r.output and "mean ± sd" in r.output
    assert "2 of 2 folds" in r.output
    got = json.loads(report.read_text())
    info = open_store(loader_store)
    folds = json.loads((cv_dir / "splits.json").read_text())
    fold_of = {c: k for k, f in enumerate(folds) for c in f["val"]}
    assert {c["case"]: c["fold"] for c in got["cases"]} == fold_of
    reader = SliceReader(info.path, info.size, info.case_ids)
    try:
        for row in got["cases"]:
            case = row["case"]
            rows, cols = store_box(info, case)
            with np.load(cv_dir / "oof" / f"{case}.npz") as z:
                pred = apply_steps(z["pred"][:, rows, cols], steps, info.labels)
            truth = read_store_labels(reader, info, case)[:, rows, cols]
            s = score_case(case, pred, truth, info.labels, store_spacing(info, case))
            assert row["kidney_dice"] == pytest.approx(s.dice["kidney"])
            assert row["tumour_surface_dice"] == pytest.approx(s.surface_dice["tumour"])
    finally:
        reader.close()
    per_fold = {f["fold"]: f for f in got["per_fold"]}
    for k in (0, 1):
        mine = [c["mean_dice"] for c in got["cases"] if c["fold"] == k]
        assert per_fold[k]["mean_dice"] == pytest.approx(np.mean(mine))
        assert per_fold[k]["cases"] == len(mine)
    fold_means = [per_fold[k]["mean_dice"] for k in (0, 1)]
    overall = got["overall"]
    assert overall["mean_over_folds"]["mean_dice"] == pytest.approx(np.mean(fold_means))
    assert overall["sd_over_folds"]["mean_dice"] == pytest.approx(np.std(fold_means, ddof=1))
    assert got["missing_folds"] == [] and got["folds"] == 2


def got_steps(report: Path) -> list[str]:
    return json.loads(report.read_text())["postprocessing"]["steps"]


def test_cv_records_its_post_processing_decision(cv_dir: Path) -> None:
    decision = Decision.from_json((cv_dir / "postprocessing.json").read_text())
    assert decision.edition == "kits19" and decision.cases == 6
    for region, after in decision.dice_after.items():
        assert after >= decision.dice_before[region]  # a step is kept only where it helps


def test_score_of_an_unfinished_cv_names_the_folds_missing(
    cv_dir: Path, loader_store: Path, tmp_path: Path
) -> None:
    out = copy_of(cv_dir, tmp_path)
    folds = json.loads((out / "splits.json").read_text())
    (out / "oof" / f"{folds[1]['val'][0]}.npz").unlink()
    r = cli("score", out)
    one_line_error(r, "fold(s) 1 of 2 have no out-of-fold predictions", "kitstrain cv", "--partial")
    r = cli("score", out, "--partial", "--json", tmp_path / "p.json")
    assert r.exit_code == 0, r.output
    assert "partial: fold(s) 1 have no out-of-fold predictions" in r.output
    got = json.loads((tmp_path / "p.json").read_text())
    assert got["missing_folds"] == [1] and {c["fold"] for c in got["cases"]} == {0}
    assert got["overall"]["sd_over_folds"]["mean_dice"] is None  # one fold: no sd
    # a damaged prediction is named, with the fix
    (out / "oof" / f"{folds[0]['val'][0]}.npz").write_bytes(b"junk")
    r = cli("score", out, "--partial")
    one_line_error(r, "is not an out-of-fold prediction", "rerun `kitstrain cv`")


def test_bad_input_is_one_line(cv_dir: Path, loader_store: Path, tmp_path: Path) -> None:
    one_line_error(cli("score", cv_dir, "--tta"), "cross-validation folder", "--tta")
    one_line_error(cli("score", cv_dir, "--json", cv_dir / "cv.json"), "own cv.json")
    one_line_error(
        cli("score", cv_dir / "fold_0", "--partial"), "--partial applies to a cross-validation"
    )
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    one_line_error(cli("cv", loader_store, "--out", busy, *CV_ARGS), "holds other files")
    one_line_error(
        cli("cv", loader_store, "--out", tmp_path / "x", *TINY, "--folds", "9"),
        "9 folds need at least 9 labelled cases, found 6",
    )
    one_line_error(
        cli("cv", loader_store, "--out", cv_dir / "fold_0" / "cv", *CV_ARGS),
        "inside the run directory",
    )
    assert not (tmp_path / "x" / "cv.json").exists()


def test_a_fold_that_trained_too_little_says_so(loader_store: Path, tmp_path: Path) -> None:
    args = [*TINY, "--device", "cpu", "--folds", "2", "--time-limit", "2s"]
    r = cli("cv", loader_store, "--out", tmp_path / "cv", *args)
    assert r.exit_code == 0, r.output
    warned = [line for line in r.output.splitlines() if line.startswith("warning: fold ")]
    assert {line.split(":")[1].strip() for line in warned} == {"fold 0", "fold 1"}, r.output
    assert all("fewer than" in w or "of the limit" in w for w in warned), warned
