"""Training, scoring and prediction that never replace an input and never lose a run: an
output that is the store, a run's config or a source folder; predictions of two runs in
one folder; a torn metrics line; a checkpoint write that fails; an edited split or record
on --resume; case lists that are strings; the batch pool's budget and the segments a dead
process left; slices the network cannot use. Each is refused in one line, exit 1, or
goes on as it should."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kitsprep.errors import KitsError
from kitsprep.outputs import RUN_FILES
from kitsprep.store import open_store
from kitstrain.cli import main
from kitstrain.core import rundir
from kitstrain.data import batch_pool
from kitstrain.data.dataset import SliceDataset
from kitstrain.runs.provenance import PROVENANCE
from tests.kitstrain.test_hardening import TINY, assert_user_error

SRC_CASE = "case_00000"


def cli(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(loader_store: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safety") / "run"
    r = cli("fit", loader_store, "--out", out, *TINY, "--max-steps", 2)
    assert r.exit_code == 0, r.output
    return out


def copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


# --------------------------------------------------------------------------- outputs


def test_score_never_writes_over_its_inputs(trained: Path, loader_store: Path, tmp_path) -> None:
    other = copy_run(trained, tmp_path / "other")
    src = loader_store.parent / "src"
    size = loader_store.stat().st_size
    for args, needle in (
        (["--json", loader_store], "would overwrite"),
        (["--json", trained / "config.json"], "the run's own config.json"),
        (["--json", trained / "checkpoints" / "s.json"], "the run's own checkpoints"),
        (["--json", other / "s.json"], "inside the run directory"),
        (["--overlays", src / SRC_CASE], "inside the source folder"),
        (["--overlays", src / "pictures"], "inside the source folder"),
    ):
        assert_user_error(cli("score", trained, "--data", loader_store, *args), needle)
    assert loader_store.stat().st_size == size
    assert rundir.read_json(trained, "config.json")["train"]
    assert not list((src / SRC_CASE).glob("*.png"))
    r = cli("score", trained, "--data", loader_store, "--json", trained / "report.json")
    assert r.exit_code == 0, r.output  # the run's own folder, not its files: fine
    assert set(RUN_FILES) >= {rundir.CONFIG, rundir.SPLIT, rundir.METRICS, rundir.LOCK}


def test_predict_refuses_another_runs_folder_unless_overwrite(
    trained: Path, loader_store: Path, tmp_path: Path
) -> None:
    src = loader_store.parent / "src"
    other = copy_run(trained, tmp_path / "other")
    out = tmp_path / "pred"
    args = ["--src", src, "--out", out, "--cases", "0-1", "--device", "cpu"]
    assert cli("predict", trained, *args).exit_code == 0
    first = json.loads((out / PROVENANCE).read_text())
    assert first["run"] == str(trained.resolve()) and first["checkpoint"] == "best.pt"
    assert cli("predict", trained, *args).exit_code == 0  # the same run again: fine
    (out / "prediction_00005.nii.gz").write_bytes(b"old")  # one the next run would not write
    assert_user_error(cli("predict", other, *args), "holds the predictions of another model")
    assert json.loads((out / PROVENANCE).read_text()) == first
    r = cli("predict", other, *args, "--overwrite")
    assert r.exit_code == 0, r.output
    assert json.loads((out / PROVENANCE).read_text())["run"] == str(other.resolve())
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [
        "prediction_00000.nii.gz",
        "prediction_00001.nii.gz",
    ]
    assert_user_error(
        cli("predict", trained, "--src", src, "--out", other / "p"), "inside the run directory"
    )
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "prediction_00000.nii.gz").write_bytes(b"?")
    assert_user_error(cli("predict", trained, "--src", src, "--out", loose), "unknown origin")


# --------------------------------------------------------------------------- the run directory


def test_a_torn_metrics_line_is_skipped_with_a_warning_and_cut_on_resume(
    trained: Path, loader_store: Path, tmp_path: Path, capsys
) -> None:
    run = copy_run(trained, tmp_path / "run")
    log = run / rundir.METRICS
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:2]) + '\n{"kind": "tra\n' + "\n".join(lines[2:]) + "\n")
    records = rundir.read_metrics(run)
    assert len(records) == len(lines)
    assert f"{log} line 3 is not a JSON record" in capsys.readouterr().err
    r = cli("plot", run)
    assert r.exit_code == 0 and (run / "curves.png").is_file(), r.output
    # resumed further: the log is cut back to the checkpoint's step first, torn line and all
    (run / "checkpoints" / ".last.pt.999999.tmp").write_bytes(b"stale")
    r = cli("fit", loader_store, "--out", run, *TINY, "--max-steps", 3, "--resume")
    assert r.exit_code == 0, r.output
    steps = [x["step"] for x in rundir.read_metrics(run) if x["kind"] == "train"]
    assert steps == sorted(set(steps))
    assert '"tra\n' not in log.read_text()
    assert not list(run.rglob("*.tmp"))


def test_a_failing_checkpoint_write_is_one_line(
    loader_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*a, **k):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:664] . PytorchStreamWriter "
            "failed writing file data/3: file write failed"
        )

    monkeypatch.setattr(torch, "save", failing)
    out = tmp_path / "run"
    r = cli("fit", loader_store, "--out", out, *TINY, "--max-steps", 2)
    assert_user_error(r, "cannot write", "best.pt", "file write failed", "MB free", "--resume")
    monkeypatch.undo()
    r = cli("fit", loader_store, "--out", out, *TINY, "--max-steps", 2, "--resume")
    assert r.exit_code == 0, r.output


def test_resume_checks_the_split_and_the_record_as_a_new_run_does(
    trained: Path, loader_store: Path, tmp_path: Path
) -> None:
    run = copy_run(trained, tmp_path / "run")
    split = json.loads((run / rundir.SPLIT).read_text())
    (run / rundir.SPLIT).write_text(json.dumps({**split, "val": split["val"] + split["train"][:1]}))
    resume = ["fit", loader_store, "--out", run, *TINY, "--max-steps", 3, "--resume"]
    assert_user_error(cli(*resume), "split.json", "in both the training and the validation")
    (run / rundir.SPLIT).write_text(json.dumps({**split, "train": split["train"][0]}))
    assert_user_error(cli(*resume), "split.json", "expected a list of case ids")
    (run / rundir.SPLIT).write_text(json.dumps(split))
    config = json.loads((run / rundir.CONFIG).read_text())
    (run / rundir.CONFIG).write_text(json.dumps({**config, "context": "two"}))
    assert_user_error(cli(*resume), "config.json", "context is 'two', expected an integer")


def test_resume_of_a_folder_killed_before_its_record_starts_it_afresh(
    loader_store: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.SPLIT).write_text("{}")  # killed between split.json and config.json
    r = cli("fit", loader_store, "--out", run, *TINY, "--max-steps", 1, "--resume")
    assert r.exit_code == 0, r.output
    assert "starting it afresh" in r.output
    assert (run / rundir.CONFIG).is_file() and rundir.weights_path(run).is_file()


# --------------------------------------------------------------------------- API, memory


def test_a_missing_store_and_a_string_case_list_are_kits_errors(loader_store: Path) -> None:
    info = open_store(loader_store)
    with pytest.raises(KitsError, match="does not exist"):
        SliceDataset(loader_store.with_name("gone.h5"), info, info.labelled_cases[:1])
    with pytest.raises(KitsError, match=r"expected a list of case ids.*found 'case_00000'"):
        SliceDataset(loader_store, info, "case_00000")


def test_the_api_refuses_slices_the_network_cannot_use(trained: Path) -> None:
    from kitstrain import Predictor

    predictor = Predictor.from_run(trained, device="cpu")
    with pytest.raises(KitsError, match=r"slices of 1x1 pixels .* smaller than the 4x4"):
        predictor.predict(np.zeros((100000, 1, 1), np.float32))


def test_the_batch_pool_budget_is_checked_before_allocating() -> None:
    with pytest.raises(KitsError, match=r"--batch-size 40000 needs .* largest batch that fits is"):
        batch_pool.check_pool_budget(40000, 5, 64, 6, budget=2 * 2**30)
    batch_pool.check_pool_budget(16, 5, 64, 6, budget=2 * 2**30)
    msg = ""
    try:
        batch_pool.check_pool_budget(40000, 5, 64, 6, budget=2 * 2**30)
    except KitsError as exc:
        msg = str(exc)
    largest = int(msg.rsplit("fits is ", 1)[1].split(":")[0])
    batch_pool.check_pool_budget(largest, 5, 64, 6, budget=2 * 2**30)
    with pytest.raises(KitsError):
        batch_pool.check_pool_budget(largest + 1, 5, 64, 6, budget=2 * 2**30)


def test_segments_of_dead_processes_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)  # fmt: skip
    pid = int(dead.stdout)
    left = tmp_path / f"torch_{pid}_123_0"
    left.write_bytes(b"x" * 100)
    mine = tmp_path / f"torch_{os.getpid()}_456_0"
    mine.write_bytes(b"y")
    other = tmp_path / "not_torch_1_2"
    other.write_bytes(b"z")
    assert batch_pool.sweep_dead_segments(tmp_path) == [left]
    assert mine.exists() and other.exists() and not left.exists()
