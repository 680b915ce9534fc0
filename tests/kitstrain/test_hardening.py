"""What an adversarial user or the machine does to training, scoring and prediction: a
diverging run, a kill before the first checkpoint, resuming a finished run, damaged
checkpoints and run files, refused options, a full disk; each ends in a working run or one
line, exit 1, never a traceback."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kitstrain.cli import main
from kitstrain.core import rundir as runlib

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--device",
    "cpu",
    "--workers",
    "0",
    "--batch-size",
    "4",
    "--samples-per-epoch",
    "16",
    "--width",
    "4",
    "--depth",
    "2",
]


def cli(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result, *needles: str) -> str:
    """Exit 1, exactly one `Error:` line (the last) holding the needles, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert result.output.strip().splitlines()[-1] == errors[0]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def trained(loader_store: Path, tmp_path_factory) -> Path:
    """A finished tiny run: 4 steps, validated at 2 and at the end."""
    out = tmp_path_factory.mktemp("hard") / "run"
    r = cli("fit", loader_store, "--out", out, *TINY, "--max-steps", 4, "--val-every", 2)
    assert r.exit_code == 0, r.output
    return out


def copy_run(trained: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


# --------------------------------------------------------------------------- item 1


def test_a_diverging_run_stops_in_one_line_and_no_checkpoint_holds_nan(
    loader_store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "nan"
    r = cli(
        "fit",
        loader_store,
        "--out",
        out,
        *TINY,
        "--lr",
        "1e6",
        "--max-steps",
        30,
        "--val-every",
        5,
        "--log-every",
        1,
    )
    assert_user_error(r, "diverged", "lower --lr")
    for ckpt in (out / "checkpoints").glob("*.pt"):
        runlib.load_checkpoint(ckpt)  # every checkpoint left is finite


def test_a_checkpoint_with_nan_weights_is_refused_by_score(trained: Path, tmp_path: Path) -> None:
    run_dir = copy_run(trained, tmp_path)
    path = runlib.checkpoint_path(run_dir, "best")
    ckpt = torch.load(path, weights_only=True)
    first = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    t = ckpt["model"][first]
    t[(0,) * t.dim()] = float("nan")
    torch.save(ckpt, path)
    assert_user_error(cli("score", run_dir), "1 NaN/Inf weights", "lower --lr")


# --------------------------------------------------------------------------- items 3, 6


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(
    loader_store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "k"
    script = textwrap.dedent("""
        import os, signal, sys
        from kitstrain.train.trainer import Trainer
        Trainer.checkpoint = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        from kitstrain.cli import main
        main(sys.argv[1:])
    """)
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            "fit",
            str(loader_store),
            "--out",
            str(out),
            *TINY,
            "--max-steps",
            "3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == -9, p.stderr
    assert (out / "config.json").is_file() and not (out / "checkpoints").exists()
    r = cli("fit", loader_store, "--out", out, *TINY, "--max-steps", 3, "--resume")
    assert r.exit_code == 0, r.output
    assert "no checkpoint yet" in r.output and "done (max_steps) after 3 steps" in r.output


def test_resuming_a_finished_run_trains_no_step(
    trained: Path, loader_store: Path, tmp_path: Path
) -> None:
    run_dir = copy_run(trained, tmp_path)
    before = (run_dir / "metrics.jsonl").read_text()
    r = cli("fit", loader_store, "--out", run_dir, *TINY, "--max-steps", 4, "--resume")
    assert r.exit_code == 0, r.output
    assert "is finished (max_steps reached at step 4)" in r.output
    assert (run_dir / "metrics.jsonl").read_text() == before
    r = cli("fit", loader_store, "--out", run_dir, *TINY, "--max-steps", 5, "--resume")
    assert r.exit_code == 0, r.output
    assert "after 5 steps" in r.output


# --------------------------------------------------------------------------- item 8, 10


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--time-limit", "0"], "--time-limit must be longer than 0"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--patch", "30"], "--patch 30"),
    ],
)
def test_refused_options_leave_no_run_directory(
    loader_store: Path, tmp_path: Path, args, needle: str
) -> None:
    out = tmp_path / "runs" / "x"
    assert_user_error(cli("fit", loader_store, "--out", out, *TINY, *args), needle)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["truncated", "empty", "foreign", "pickle"])
def test_a_bad_checkpoint_is_one_line(trained: Path, tmp_path: Path, kind: str) -> None:
    run_dir = copy_run(trained, tmp_path)
    path = runlib.checkpoint_path(run_dir, "best")
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:4000])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign":
        torch.save({"model": {"w": torch.ones(3)}}, path)
    else:
        torch.save({"model": {}, "obj": np.dtype("float32")}, path)  # pickled objects
    assert_user_error(cli("score", run_dir), str(path))


@pytest.mark.parametrize(
    "name, text",
    [
        ("config.json", "{bad"),
        ("split.json", "[1"),
        ("split.json", '{"train": 1, "val": ["case_00004"], "mode": "x", "seed": 0}'),
        ("config.json", None),  # an unknown field in the train section
    ],
)
def test_damaged_run_files_are_one_line(
    trained: Path, loader_store: Path, tmp_path: Path, name: str, text: str | None
) -> None:
    run_dir = copy_run(trained, tmp_path)
    if text is None:
        config = json.loads((run_dir / name).read_text())
        config["train"]["bogus"] = 1
        text = json.dumps(config)
    (run_dir / name).write_text(text)
    r = cli("fit", loader_store, "--out", run_dir, *TINY, "--resume", "--max-steps", 6)
    assert_user_error(r, str(run_dir / name))


def test_score_json_into_a_folder_is_one_line(trained: Path, tmp_path: Path) -> None:
    assert_user_error(cli("score", trained, "--json", tmp_path), "is a folder")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert_user_error(
        cli("score", trained, "--json", blocker / "deeper" / "s.json"), "is a file, not a folder"
    )


def test_a_full_disk_during_fit_is_one_line_and_resume_works(
    loader_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "full"

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    r = cli("fit", loader_store, "--out", out, *TINY, "--max-steps", 2)
    assert_user_error(r, "best.pt", "No space left on device", "--resume")
    assert not list(out.rglob("*.tmp"))  # nothing half-written
    monkeypatch.undo()
    r = cli("fit", loader_store, "--out", out, *TINY, "--max-steps", 2, "--resume")
    assert r.exit_code == 0, r.output


def test_predict_refuses_an_out_inside_a_case_and_an_empty_volume(
    trained: Path, loader_store: Path, tmp_path: Path
) -> None:
    src = loader_store.parent / "src"
    assert_user_error(
        cli("predict", trained, "--src", src, "--out", src / "case_00000"),
        "is inside",
        "which this command reads",
    )
    assert_user_error(
        cli("predict", trained, "--src", src, "--out", src / "case_00000" / "imaging.nii.gz"),
        "is a file",
    )
    from tests.conftest import write_kits_case

    empty = tmp_path / "empty"
    write_kits_case(empty, "case_00000", np.zeros((0, 32, 32), np.float32), None)
    assert_user_error(
        cli("predict", trained, "--src", empty, "--out", tmp_path / "p"), "empty volume"
    )


# --------------------------------------------------------------------------- newcomer


def test_best_weights_are_exported_as_safetensors(trained: Path) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(trained / "checkpoints" / "model.safetensors"))
    best = runlib.load_checkpoint(runlib.checkpoint_path(trained, "best"))["model"]
    assert set(weights) == set(best)
    assert all(torch.equal(weights[k], best[k]) for k in best)


def test_fit_help_shows_every_presets_values() -> None:
    from kitstrain.core.config import PRESETS

    text = " ".join(cli("fit", "--help").output.split())
    default, seed = PRESETS["default"]["lr"], PRESETS["seed"]["lr"]
    assert f"[presets: default {default}; seed {seed}; cascade {default}]" in text
    assert "[presets: default --regions; seed --classes; cascade --regions]" in text
    assert "Down-sampling steps. [presets: default 4; seed 4; cascade 4]" in text  # depth
    assert "[presets: default tumour=4,cyst=2; seed none; cascade tumour=4,cyst=2]" in text


def test_the_build_time_depth_warning_matches_the_default_preset() -> None:
    from kitsprep.cli import DEFAULT_DEPTH
    from kitstrain.core.config import resolve

    assert resolve("default", {}).depth == DEFAULT_DEPTH


def test_a_missing_tensorboard_is_said_once(
    trained: Path, loader_store: Path, tmp_path: Path
) -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorboard is installed")
    r = cli("fit", loader_store, "--out", tmp_path / "tb", *TINY, "--max-steps", 1)
    assert r.exit_code == 0, r.output
    assert r.output.count("tensorboard is not installed") == 1


@pytest.mark.parametrize("kind", ["config_json", "model_field"])
def test_score_of_a_run_with_a_damaged_config_is_one_line(
    trained: Path, tmp_path: Path, kind: str
) -> None:
    run_dir = copy_run(trained, tmp_path)
    config = run_dir / "config.json"
    if kind == "config_json":
        config.write_text('{"model": ')
    else:
        c = json.loads(config.read_text())
        c["model"]["bogus"] = 1
        config.write_text(json.dumps(c))
    assert_user_error(cli("score", run_dir), str(config))


def test_an_unwritable_out_for_fit_and_predict_is_one_line(
    trained: Path, loader_store: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_user_error(
        cli("fit", loader_store, "--out", blocker / "run", *TINY), "cannot create the run directory"
    )
    src = loader_store.parent / "src"
    assert_user_error(
        cli("predict", trained, "--src", src, "--out", blocker / "p"), "is a file, not a folder"
    )


def test_scaled_fp16_runs_tolerate_skipped_steps_but_not_a_persistent_run() -> None:
    from kitstrain.core.config import resolve
    from kitstrain.train.divergence import DIVERGED_STEPS, Divergence

    tc = resolve("default", {})
    d = Divergence(torch.device("cpu"), tolerate=True)
    step = 0
    for value in [1.0, float("inf"), float("inf"), 0.9] * 3:  # the scaler's usual skips
        step += 1
        d.update(torch.tensor(value), step)
    d.check(tc)
    for _ in range(DIVERGED_STEPS):
        step += 1
        d.update(torch.tensor(float("nan")), step)
    with pytest.raises(Exception, match=r"from step 13 \(last finite loss 0.9 at step 12\)"):
        d.check(tc)
    strict = Divergence(torch.device("cpu"), tolerate=False)
    strict.update(torch.tensor(2.0), 1)
    strict.update(torch.tensor(float("nan")), 2)
    with pytest.raises(Exception, match=r"from step 2 \(last finite loss 2 at step 1\)"):
        strict.check(tc)
