"""kitstrain fit: a few CPU steps, the run directory, resume after kill -9, OOM back-off,
limits, bad input, and a 2-process gloo run under torchrun."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kitsprep.labels import EDITIONS
from kitsprep.store import open_store
from kitsprep.synth import SynthConfig, write_cohort
from kitstrain.cli import main
from kitstrain.core import rundir as runlib
from kitstrain.core.config import PRESETS, TrainConfig, resolve
from kitstrain.core.options import parse_duration
from kitstrain.core.rundir import State
from kitstrain.data.loaders import shard_cases
from kitstrain.infer.engine import predict_store_case
from kitstrain.infer.inference import Inference
from kitstrain.model.load import load_model
from kitstrain.train.optim import lr_at, progress_of
from tests.conftest import blob_labels, build, write_kits_case

SIZE = 32
# a tiny model so that CPU steps take milliseconds
TINY = [
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
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fit")
    write_cohort(SynthConfig(cases=6, size=SIZE, seed=3), root / "src")
    out = root / "s.h5"
    build(root / "src", out, size=SIZE, workers=1, fsync=True)
    return out


def fit_cli(*args: str) -> object:
    result = CliRunner().invoke(main, ["fit", *map(str, args)])
    return result


def tiny_args(store: Path, out: Path, *extra: str) -> list[str]:
    return [str(store), "--out", str(out), *TINY, *extra]


def test_a_few_steps_write_a_self_describing_run(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    r = fit_cli(*tiny_args(store, out, "--max-steps", "6", "--val-every", "3"))
    assert r.exit_code == 0, r.output
    assert "done (max_steps) after 6 steps" in r.output
    config = json.loads((out / "config.json").read_text())
    assert config["store_fingerprint"] and config["train"]["max_steps"] == 6
    assert config["validation"] == {}  # no --time-limit: no budget, every case validated
    # the store's label set is recorded; the preset's cyst weight does not apply to KiTS19
    assert config["store_attrs"]["labels"]["edition"] == "kits19"
    assert config["label_weights_applied"] == {"tumour": 4.0}
    assert config["model"]["region_writes"] == [1, 2]
    assert config["model"]["in_channels"] == 5  # default preset: context 2
    assert config["env"]["torch"] == torch.__version__
    split = json.loads((out / "split.json").read_text())
    assert split["train"] and split["val"] and not set(split["train"]) & set(split["val"])
    records = runlib.read_metrics(out)
    kinds = [r["kind"] for r in records]
    assert "train" in kinds and kinds.count("val") >= 2 and kinds[-1] == "end"
    train = [r for r in records if r["kind"] == "train"]
    assert all(0.0 <= r["stall"] <= 1.0 and r["slices_per_s"] > 0 for r in train)
    val = [r for r in records if r["kind"] == "val"][-1]
    assert 0.0 <= val["kidney_dice"] <= 1.0 and set(val["per_case"]) == set(split["val"])
    assert val["regions"] == ["kidney", "tumour"]  # every region of the store's label set
    assert val["mean_dice"] == pytest.approx((val["kidney_dice"] + val["tumour_dice"]) / 2)
    assert config["store_attrs"]["labels"]["edition"] == "kits19"
    assert "validation Dice kidney" in r.output
    # validation shows its progress as predict does: off a terminal, a line per case
    info = open_store(store)
    for i, case in enumerate(split["val"], 1):
        line = f"validate {case}  ({i}/{len(split['val'])}, {info.cases[case].slices} slices)"
        assert r.output.count(line + " Dice kidney ") == kinds.count("val"), r.output
    assert " parameters, device " in r.output  # the start-up line counts the model's
    for which in ("last", "best"):
        ckpt = torch.load(out / "checkpoints" / f"{which}.pt", weights_only=True)
        assert json.loads(ckpt["state"])["step"] >= 3
    assert not (out / "lock").exists()


def test_patches_train_and_an_epoch_covers_the_training_pixels(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "patched"
    r = fit_cli(
        str(store),
        "--out",
        str(out),
        "--workers",
        "0",
        "--batch-size",
        "4",
        "--width",
        "4",
        "--depth",
        "2",
        "--patch",
        "auto",
        "--max-steps",
        "3",
    )
    assert r.exit_code == 0, r.output
    assert "of 16x16 patches" in r.output
    config = json.loads((out / "config.json").read_text())
    assert config["patch_size"] == 16 and config["train"]["patch"] == "auto"
    assert config["val_batch_size"] == 1  # 4 patches of 16x16 hold one 32x32 slice's pixels
    split = json.loads((out / "split.json").read_text())
    info = open_store(store)
    train_slices = sum(info.cases[c].slices for c in split["train"])
    # (32 / 16)**2 = 4 patches per training slice, in batches of 4
    assert config["steps_per_epoch"] == train_slices
    val = [x for x in runlib.read_metrics(out) if x["kind"] == "val"][-1]
    assert set(val["per_case"]) == set(split["val"])  # validated on whole slices


def test_every_preset_field_has_a_flag_that_overrides_it(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "flags"
    r = fit_cli(
        *tiny_args(
            store,
            out,
            "--max-steps",
            "1",
            "--optimizer",
            "sgd",
            "--weight-decay",
            "0.001",
            "--schedule",
            "poly",
            "--warmup",
            "0.1",
            "--loss",
            "ce",
            "--fg-fraction",
            "0.5",
            "--label-weights",
            "tumour=3, kidney=0.5",
            "--no-augment",
            "--grad-clip",
            "5",
            "--log-every",
            "7",
            "--norm",
            "group",
            "--patch",
            "full",
        )
    )
    assert r.exit_code == 0, r.output
    t = json.loads((out / "config.json").read_text())["train"]
    assert (
        t["optimizer"],
        t["weight_decay"],
        t["schedule"],
        t["warmup"],
        t["loss"],
        t["fg_fraction"],
        t["label_weights"],
        t["augment"],
        t["grad_clip"],
        t["log_every"],
        t["norm"],
        t["patch"],
    ) == (
        "sgd",
        0.001,
        "poly",
        0.1,
        "ce",
        0.5,
        {"tumour": 3.0, "kidney": 0.5},
        False,
        5.0,
        7,
        "group",
        "full",
    )
    from dataclasses import fields

    from kitstrain.cli import fit as fit_command

    flags = {p.name for p in fit_command.params}
    internal = {"preset", "compile", "batch_size"}  # --preset, --compile, --batch-size
    missing = {f.name for f in fields(TrainConfig)} - flags - internal
    assert not missing, f"TrainConfig fields without a fit flag: {missing}"


def test_seed_preset_is_the_origin_setup(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "seed"
    r = fit_cli(
        str(store),
        "--out",
        str(out),
        "--preset",
        "seed",
        "--workers",
        "0",
        "--max-steps",
        "3",
        "--width",
        "4",
        "--depth",
        "2",
    )
    assert r.exit_code == 0, r.output
    t = json.loads((out / "config.json").read_text())["train"]
    assert (
        t["optimizer"],
        t["lr"],
        t["batch_size"],
        t["epochs"],
        t["loss"],
        t["norm"],
        t["fg_fraction"],
        t["augment"],
        t["patch"],
    ) == ("adam", 0.002, 4, 1, "ce", "none", 0.0, False, "full")


def test_injected_oom_halves_the_micro_batch_and_carries_on(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KITS_INJECT_OOM_AT_STEP", "2")
    out = tmp_path / "oom"
    r = fit_cli(*tiny_args(store, out, "--max-steps", "5"))
    assert r.exit_code == 0, r.output
    records = runlib.read_metrics(out)
    ooms = [x for x in records if x["kind"] == "oom"]
    assert len(ooms) == 1 and ooms[0]["micro_batch"] == 2 and ooms[0]["accumulation"] == 2
    assert records[-1]["step"] == 5  # the step was retried, not lost
    assert [x for x in records if x["kind"] == "train"][-1]["micro_batch"] == 2


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_resume_after_kill_matches_an_uninterrupted_run(store: Path, tmp_path: Path) -> None:
    """kill -9 mid-run, then --resume: same step count and the same weights as a run that
    was never interrupted (same split, optimizer, schedule, sampler and RNG streams)."""
    common = [str(store), *TINY, "--max-steps", "24", "--val-every", "6", "--context", "0"]
    cmd = [sys.executable, "-m", "kitstrain", "fit"]
    env = ENV
    ref = tmp_path / "ref"
    subprocess.run(
        [*cmd, *common, "--out", str(ref)], check=True, env=env, capture_output=True, timeout=300
    )
    run_dir = tmp_path / "killed"
    p = subprocess.Popen(
        [*cmd, *common, "--out", str(run_dir)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        recs = runlib.read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
        if any(r["kind"] == "val" and r["step"] >= 6 for r in recs):
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    recs = runlib.read_metrics(run_dir)
    assert recs[-1]["kind"] != "end", "the run finished before it could be killed"
    r = subprocess.run(
        [*cmd, *common, "--out", str(run_dir), "--resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "resuming at step" in r.stderr
    end = runlib.read_metrics(run_dir)[-1]
    assert end["kind"] == "end" and end["step"] == 24
    a, b = _weights(ref), _weights(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_time_limit_stops_cleanly(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """...and a run that trained too few steps for its limit (here: any run, the threshold
    raised) ends with the warning line, not "done", still exiting 0, and records it."""
    from kitstrain.train import budget

    monkeypatch.setattr(budget, "FEW_STEPS", 10**6)
    out = tmp_path / "timed"
    r = fit_cli(*tiny_args(store, out, "--time-limit", "2s", "--epochs", "1000"))
    assert r.exit_code == 0, r.output
    end = runlib.read_metrics(out)[-1]
    assert end["reason"] == "time_limit"
    assert [x for x in runlib.read_metrics(out) if x["kind"] == "val"][-1]["final"]
    assert (out / "checkpoints" / "last.pt").is_file()
    last = r.output.strip().splitlines()[-1]
    assert last.startswith(f"warning: {end['warning']}; stopped (time_limit) after "), last
    assert re.match(rf"trained {end['step']} steps? in 2\.0s \(", end["warning"])
    assert "--val-budget" in last and "done (" not in r.output
    assert end["train_seconds"] > 0 and end["val_seconds"] > 0


def test_a_time_budget_validates_a_recorded_subset_and_resume_keeps_it(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation priced at 1 s a slice (injected): 33 slices of 3 cases do not fit 4
    validations in 15 % of 10 minutes, so a subset is validated, said, and recorded; a
    resume on a machine where everything would fit validates the same cases."""
    from kitstrain.train import setup as setup_module

    monkeypatch.setattr(setup_module, "seconds_per_slice", lambda model, plan: 1.0)
    out = tmp_path / "budget"
    limits = ("--time-limit", "10m", "--max-steps")
    r = fit_cli(*tiny_args(store, out, "--train-cases", "0-1", "--val-cases", "2-4", *limits, "3"))
    assert r.exit_code == 0, r.output
    assert "done (max_steps) after 3 steps" in r.output  # the steps it asked for: no warning
    v = json.loads((out / "config.json").read_text())["validation"]
    assert v["all_cases"] == 3 and 1 <= len(v["cases"]) < 3 and v["seconds_per_slice"] == 1.0
    assert v["budget_s"] == pytest.approx(90.0) and v["slices"] * v["planned"] <= 90
    assert f"validating {len(v['cases'])} of 3 validation cases" in v["note"]
    assert v["note"] in r.output
    monkeypatch.setattr(setup_module, "seconds_per_slice", lambda model, plan: 1e-6)
    r = fit_cli(*tiny_args(store, out, *limits, "5", "--resume"))
    assert r.exit_code == 0, r.output
    vals = [x for x in runlib.read_metrics(out) if x["kind"] == "val"]
    assert [x["step"] for x in vals] == [3, 5]
    assert all(sorted(x["per_case"]) == sorted(v["cases"]) for x in vals)
    assert runlib.read_metrics(out)[-1]["warning"] is None


@pytest.mark.parametrize(
    "make_args, expected",
    [
        (lambda s, t: [str(t / "nope.h5")], "does not exist"),
        (lambda s, t: [str(s), "--train-cases", "0-2", "--val-cases", "2-3"], "both"),
        (lambda s, t: [str(s), "--train-cases", "0-3", "--val-cases", "99"], "not there"),
        (lambda s, t: [str(s), "--train-cases", "0-5"], "unlabelled"),
        (lambda s, t: [str(s), "--batch-size", "zero"], "--batch-size"),
        (lambda s, t: [str(s), "--time-limit", "ten minutes"], "duration"),
        (lambda s, t: [str(s), "--patch", "half"], "--patch"),
        (lambda s, t: [str(s), "--patch", "24"], "multiple of 16"),
        (lambda s, t: [str(s), "--patch", "64"], "larger than"),
        (lambda s, t: [str(s), "--device", "cpu", "--precision", "fp16"], "needs a CUDA device"),
        (lambda s, t: [str(s), "--depth", "2", "--deep-supervision", "2"], "within 0..depth-1"),
        (lambda s, t: [str(s), "--label-weights", "tumour4"], "label=weight pairs"),
        (lambda s, t: [str(s), "--label-weights", "tumour=-1"], "positive weights"),
        (lambda s, t: [str(s), "--label-weights", "tumour=2,tumour=3"], "distinct"),
        (lambda s, t: [str(s), "--label-weights", "cyst=2"], "its label names: kidney, tumour"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(
    store: Path, tmp_path: Path, make_args, expected: str
) -> None:
    r = fit_cli(*make_args(store, tmp_path), "--out", str(tmp_path / "r"), "--workers", "0")
    assert r.exit_code == 1, r.output
    assert expected in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_not_a_store_and_unknown_version(store: Path, tmp_path: Path) -> None:
    import shutil

    import h5py

    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    r = fit_cli(str(junk), "--out", str(tmp_path / "r"))
    assert r.exit_code == 1 and "not an HDF5 file" in r.output
    newer = tmp_path / "newer.h5"
    shutil.copy(store, newer)
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = 99
    r = fit_cli(str(newer), "--out", str(tmp_path / "r"))
    assert r.exit_code == 1 and "format version 99" in r.output


@pytest.mark.parametrize("regions", [False, True])
def test_bf16_on_cpu_with_deep_supervision_trains_and_scores(
    store: Path, tmp_path: Path, regions: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kitstrain.infer.inference as scoremod  # where the per-case loop predicts a case

    used = []
    real = scoremod.predict_store_case
    monkeypatch.setattr(
        scoremod, "predict_store_case", lambda *a, **k: used.append(a[0].amp) or real(*a, **k)
    )
    out = tmp_path / "bf16"
    r = fit_cli(
        *tiny_args(
            store,
            out,
            "--max-steps",
            "3",
            "--device",
            "cpu",
            "--precision",
            "bf16",
            "--deep-supervision",
            "1",
            "--regions" if regions else "--classes",
        )
    )
    assert r.exit_code == 0, r.output
    assert "bfloat16" in r.output.splitlines()[0]
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["precision"] == "bf16" and config["model"]["deep_supervision"] == 1
    assert config["train"]["regions"] is regions and config["model"]["regions"] is regions
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert any(k.startswith("aux_heads.0.") for k in ckpt["model"])
    # two region logits (kidney+tumour, tumour) or three class logits
    assert ckpt["model"]["head.weight"].shape[0] == (2 if regions else 3)
    train = [x for x in runlib.read_metrics(out) if x["kind"] == "train"]
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in train)
    # inference uses the full-resolution head only
    used.clear()  # validation predicts through the same loop: count score's calls alone
    scored = CliRunner().invoke(main, ["score", str(out), "--json", str(out / "score.json")])
    assert scored.exit_code == 0, scored.output
    cases = json.loads((out / "score.json").read_text())["cases"]
    assert used and set(used) == {torch.bfloat16}
    # score autocasts in the run's precision (bf16 here), as fit's validation did: the same
    # Dice per case from the same (best = final) checkpoint
    final = [x for x in runlib.read_metrics(out) if x["kind"] == "val"][-1]
    assert final["final"] and cases
    for c in cases:
        assert [round(c["kidney_dice"], 4), round(c["tumour_dice"], 4)] == final["per_case"][
            c["case"]
        ], c["case"]


@pytest.fixture(scope="module")
def kits23_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four hand-painted KiTS23 cases: kidney boxes with tumour, and cysts (label 3), one
    case's cysts alone on their slices."""
    root = tmp_path_factory.mktemp("fit23")
    rng = np.random.default_rng(7)
    for i in range(4):
        seg = blob_labels((6, SIZE, SIZE), i)
        seg[2, 20:24, 20:24] = 3
        if i == 0:
            seg[0, 4:8, 4:8] = 3  # a cyst-only slice
        write_kits_case(
            root / "src", f"case_{i:05d}", rng.uniform(-300, 500, seg.shape).astype(np.float32), seg
        )
    out = root / "s23.h5"
    build(root / "src", out, size=SIZE, workers=1)
    return out


@pytest.mark.parametrize("regions, outputs", [(True, 3), (False, 4)])
def test_a_kits23_store_trains_over_its_regions_or_classes(
    kits23_store: Path, tmp_path: Path, regions: bool, outputs: int
) -> None:
    assert open_store(kits23_store).labels.edition == "kits23"
    out = tmp_path / "k23"
    r = fit_cli(
        *tiny_args(kits23_store, out, "--max-steps", "2", "--regions" if regions else "--classes")
    )
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    assert config["store_attrs"]["labels"]["edition"] == "kits23"
    assert config["model"]["num_classes"] == 4
    assert config["model"]["region_writes"] == ([1, 3, 2] if regions else [])
    assert config["label_weights_applied"] == {"tumour": 4.0, "cyst": 2.0}
    assert _weights(out)["head.weight"].shape[0] == outputs
    model, _ = load_model(out, "last")
    labels = predict_store_case(
        Inference([model], 2, torch.device("cpu"), amp=False),
        None,
        open_store(kits23_store),
        "case_00000",
    )
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2, 3}


def test_runs_of_another_edition_or_version_are_refused(
    store: Path, kits23_store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "k19"
    assert fit_cli(*tiny_args(store, out, "--max-steps", "1")).exit_code == 0
    r = fit_cli(*tiny_args(kits23_store, out, "--max-steps", "2", "--resume"))
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert "trained on kits19 labels" in r.output and "holds kits23 labels" in r.output
    # a run recorded by 0.1.0 (its sampler option is gone) is refused in one line
    config = json.loads((out / "config.json").read_text())
    config["train"]["tumour_weight"] = 4.0
    (out / "config.json").write_text(json.dumps(config))
    r = fit_cli(*tiny_args(store, out, "--max-steps", "2", "--resume"))
    assert r.exit_code == 1 and "tumour_weight" in r.output
    assert len(r.output.strip().splitlines()) == 1
    # a region model recorded without its write-back labels cannot be decoded
    del config["train"]["tumour_weight"]
    del config["model"]["region_writes"]
    (out / "config.json").write_text(json.dumps(config))
    r = CliRunner().invoke(main, ["score", str(out)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "region_writes" in r.output and len(r.output.strip().splitlines()) == 1


def test_a_run_recorded_with_the_old_amp_flag_is_refused_in_one_line(
    store: Path, tmp_path: Path
) -> None:
    """No shim reads the pre-0.1 `amp` flag: such a config names the field in one line."""
    out = tmp_path / "legacy"
    assert fit_cli(*tiny_args(store, out, "--max-steps", "2")).exit_code == 0
    config = json.loads((out / "config.json").read_text())
    config["train"]["amp"] = config["train"].pop("precision") == "auto"
    (out / "config.json").write_text(json.dumps(config))
    r = fit_cli(*tiny_args(store, out, "--max-steps", "3", "--resume"))
    assert r.exit_code == 1 and "amp" in r.output and "config.json" in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_run_directory_in_use_is_refused(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    holder = subprocess.Popen(  # another process holding the run's lock
        [
            sys.executable,
            "-c",
            "import sys; from kitsprep import locks; locks.take(sys.argv[1]); "
            "print('held', flush=True); sys.stdin.read()",
            str(out / "lock"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        r = fit_cli(*tiny_args(store, out, "--max-steps", "1"))
        assert r.exit_code == 1 and f"in use by process {holder.pid}" in r.output
    finally:
        holder.stdin.close()
        holder.wait()
    (out / "lock").write_text(str(os.getppid()))  # a pid in a lock file nobody holds: free
    assert fit_cli(*tiny_args(store, out, "--max-steps", "1")).exit_code == 0


def test_existing_run_needs_resume(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "once"
    assert fit_cli(*tiny_args(store, out, "--max-steps", "1")).exit_code == 0
    r = fit_cli(*tiny_args(store, out, "--max-steps", "2"))
    assert r.exit_code == 1 and "--resume" in r.output
    r = fit_cli(*tiny_args(store, out, "--max-steps", "2", "--lr", "0.1", "--resume"))
    assert r.exit_code == 1 and "lr" in r.output


def test_durations_and_schedule() -> None:
    assert parse_duration("90s") == 90 and parse_duration("10m") == 600
    assert parse_duration("2h") == 7200 and parse_duration("1h30m") == 5400
    assert parse_duration("45") == 45
    tc = resolve("default", {})
    assert lr_at(0.0, tc) < tc.lr * 0.05 and lr_at(tc.warmup, tc) == pytest.approx(tc.lr)
    assert lr_at(1.0, tc) == pytest.approx(0.02 * tc.lr)
    assert lr_at(0.5, resolve("seed", {})) == 0.002
    # whichever limit comes first drives the schedule
    timed = TrainConfig(time_limit=100.0)
    assert progress_of(State(step=10, elapsed=50.0), 1000, timed) == 0.5
    assert progress_of(State(step=900, elapsed=50.0), 1000, timed) == 0.9
    # the schedule ends where training stops: before the final validation's reserve
    assert progress_of(State(step=10, elapsed=40.0), 1000, timed, reserve_s=20.0) == 0.5
    assert progress_of(State(step=10, elapsed=90.0), 1000, timed, reserve_s=20.0) == 1.0


def test_presets_are_data_and_flags_override() -> None:
    assert resolve("seed", {"lr": 0.01}).lr == 0.01
    assert resolve("default", {}).patch == "auto" and resolve("seed", {}).patch == "full"
    assert resolve("default", {}).norm == "batch"
    assert resolve("default", {"patch": 64}).patch == 64
    assert resolve("default", {}).regions and not resolve("seed", {}).regions
    assert not resolve("default", {"regions": False}).regions  # --classes
    assert resolve("default", {}).label_weights == {"tumour": 4.0, "cyst": 2.0}
    assert resolve("seed", {}).label_weights == {}
    resolve("default", {}).label_weights["kidney"] = 9.0  # a run's copy, not the preset's
    assert "kidney" not in resolve("default", {}).label_weights
    assert set(PRESETS) == {"seed", "default", "cascade"}
    assert resolve("cascade", {}) == replace(resolve("default", {}), preset="cascade", cascade=True)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_process_gloo_run(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "kitstrain",
        "fit",
        str(store),
        "--out",
        str(out),
        *TINY,
        "--max-steps",
        "4",
        "--val-every",
        "2",
        "--device",
        "cpu",
    ]
    r = subprocess.run(cmd, env={**ENV}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["env"]["world_size"] == 2
    records = runlib.read_metrics(out)
    assert records[-1]["kind"] == "end" and records[-1]["step"] == 4
    vals = [x for x in records if x["kind"] == "val"]
    split = json.loads((out / "split.json").read_text())
    # validation gathered every case from both ranks
    assert set(vals[-1]["per_case"]) == set(split["val"])
    # rank 0 alone wrote: one record per step window, not two
    assert len([x for x in records if x["kind"] == "end"]) == 1
    # and rank 0 alone shows validation progress: a line per case of its own shard
    mine = shard_cases(open_store(store), split["val"], 0, 2)
    shown = [ln for ln in r.stderr.splitlines() if ln.startswith("validate case_")]
    assert len(shown) == len(vals) * len(mine) and {ln.split()[1] for ln in shown} == set(mine)


def test_start_up_window_does_not_count_as_loader_stall() -> None:
    from kitstrain.train.log import LogWindow, RunLog

    log = RunLog(None, main=False)
    start = LogWindow(wait=5.0, slices=4, loss=1.0, steps=1, t0=time.perf_counter() - 6.0)
    log.flush(start, State(step=1), 0.1)
    assert (log.stall_wait, log.stall_wall) == (0.0, 0.0)  # workers starting: not steady
    steady = LogWindow(wait=1.0, slices=80, loss=2.0, steps=20, t0=time.perf_counter() - 4.0)
    log.flush(steady, State(step=21), 0.1)
    assert log.stall_wait == 1.0 and 3.9 < log.stall_wall < 5.0


def test_batch_search_leaves_weights_bn_statistics_and_gradients_untouched() -> None:
    """Tries that ran (and moved the batch-norm statistics) and a try that ran out of memory
    mid-backward (leaving partial gradients) must not reach the first real step."""
    from kitstrain.model.losses import make_loss
    from kitstrain.model.unet import UNetConfig, build_model
    from kitstrain.train.memory import search_batch_size

    torch.manual_seed(0)
    model = build_model(UNetConfig(in_channels=1, num_classes=3, width=4, depth=2, norm="batch"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))

    def oom_in_backward(grad):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected mid-backward)")

    def hook(module, args, out):
        if out.shape[0] >= 4:  # by the time the gradient gets here, deeper layers have theirs
            out.register_hook(oom_in_backward)

    first.register_forward_hook(hook)
    tc = TrainConfig(width=4, depth=2, context=0)
    loss_fn = make_loss("ce", EDITIONS["kits19"])
    found = search_batch_size(model, loss_fn, tc, 16, 3, torch.device("cpu"), None, cap=8, steps=1)
    assert found["batch_size"] == 2 and found["tried"][-1] == {"batch": 4, "result": "oom"}
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k  # weights, running mean/var, num_batches_tracked
    assert all(p.grad is None for p in model.parameters())


def test_rng_streams_round_trip_and_each_rank_takes_its_own_device_s(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import random

    from kitstrain.core import rundir

    saved = rundir.rng_state(torch.device("cpu"))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda s, device: calls.append((int(s[0]), device))
    )
    ranks = {
        "ranks": [{**saved, "cuda": torch.full((16,), r, dtype=torch.uint8)} for r in range(8)]
    }
    # rank 0 on CPU: torch, NumPy and Python streams continue where they were saved
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    rundir.set_rng_state(ranks, 0, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), saved["torch"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
    assert calls == []  # no device stream on CPU
    # per-rank states of 8 ranks, resumed on 2 GPUs: rank 1 (on its device 1) takes its own
    rundir.set_rng_state(ranks, 1, torch.device("cuda", 1))
    assert calls == [(1, torch.device("cuda", 1))]
    # more ranks than the saved run had: the extra rank keeps its freshly seeded streams
    calls.clear()
    rundir.set_rng_state({"ranks": ranks["ranks"][:1]}, 1, torch.device("cuda", 1))
    assert calls == []


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_one_failing_rank_stops_every_rank_within_seconds(store: Path, tmp_path: Path) -> None:
    """Rank 1 alone hits an OOM (one job) or another error (a second job): both ranks of
    both jobs must end, with one line each, never hang in a collective. No torchrun here:
    the surviving rank must stop by itself, not be killed by the launcher."""
    jobs = {}
    for fault in ("OOM", "ERROR"):
        port = _free_port()
        out = tmp_path / fault
        for rank in (0, 1):
            env = {
                **ENV,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "KITS_INJECT_RANK": "1",
                f"KITS_INJECT_{fault}_AT_STEP": "2",
            }
            jobs[fault, rank] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kitstrain",
                    "fit",
                    *tiny_args(store, out),
                    "--max-steps",
                    "8",
                    "--device",
                    "cpu",
                ],
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
    results = {}
    try:
        for key, p in jobs.items():
            _, err = p.communicate(timeout=150)
            results[key] = (p.returncode, err)
    finally:
        for p in jobs.values():
            if p.poll() is None:
                p.kill()
    for (fault, rank), (rc, err) in results.items():
        assert rc != 0, f"{fault} rank {rank} finished as if nothing happened:\n{err[-2000:]}"
    rc, err = results["OOM", 1]
    assert rc == 1 and "rank 1 ran out of GPU memory at step 2" in err, err[-2000:]
    assert len([x for x in err.splitlines() if x.strip()]) == 1, err
    assert json.loads((tmp_path / "OOM" / "oom.json").read_text())["micro_batch"] == 2
    assert "failure injected" in results["ERROR", 1][1]
    for fault in ("OOM", "ERROR"):
        # rank 0's watcher names rank 1's failure (or its collective saw rank 1 go first)
        err = results[fault, 0][1]
        assert "rank 1 failed" in err or "another rank stopped" in err, err[-2000:]


def test_epoch_end_validation_costs_a_bounded_share() -> None:
    from kitstrain.train.evaluate import validation_due

    assert validation_due(trained_s=0.0, last_val_s=0.0)  # none yet: validate
    assert not validation_due(trained_s=50.0, last_val_s=10.0)  # would be 17 % of the time
    assert validation_due(trained_s=90.0, last_val_s=10.0)  # 10 %


def test_a_damaged_label_chunk_stops_fit_with_one_line(store: Path, tmp_path: Path) -> None:
    """Read in a DataLoader worker: the worker's traceback must not reach the user."""
    import shutil

    damaged = tmp_path / "damaged.h5"
    shutil.copy(store, damaged)
    info = open_store(damaged)
    with open(damaged, "r+b") as f:
        for row in info.index[info.index["label_nbytes"] > 0]:
            f.seek(int(row["label_offset"]))
            f.write(b"\x00" * 4)  # no longer a zlib header: every labelled chunk fails
    r = fit_cli(
        str(damaged),
        "--out",
        str(tmp_path / "run"),
        *TINY[2:],
        "--workers",
        "1",
        "--max-steps",
        "2",
        "--fg-fraction",
        "1",
    )
    assert r.exit_code == 1
    err = r.output.strip().splitlines()[-1]
    assert "label chunk does not inflate" in err and "kitsprep verify" in err, r.output
    assert "Traceback" not in r.output


def test_resume_after_a_ddp_oom_continues_with_half_the_micro_batch(
    store: Path, tmp_path: Path
) -> None:
    """What the DDP OOM message promises: `--resume` picks up the recorded micro-batch."""
    out = tmp_path / "oom-resume"
    r = fit_cli(*tiny_args(store, out, "--max-steps", "2"))
    assert r.exit_code == 0, r.output
    runlib.write_json(out / "oom.json", {"step": 2, "rank": 1, "micro_batch": 2})
    r = fit_cli(*tiny_args(store, out, "--max-steps", "3", "--log-every", "1", "--resume"))
    assert r.exit_code == 0, r.output
    train = [x for x in runlib.read_metrics(out) if x["kind"] == "train"]
    assert train[-1]["step"] == 3 and train[-1]["micro_batch"] == 2


def test_unwrap_peels_compile_and_ddp_style_wrappers_in_either_order() -> None:
    from kitstrain.train.evaluate import unwrap

    net = torch.nn.Linear(2, 2)

    class Wrapper(torch.nn.Module):  # what DDP looks like from outside: `.module`
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    assert unwrap(torch.compile(Wrapper(net))) is net  # compile after the DDP wrap
    assert unwrap(Wrapper(torch.compile(net))) is net
    assert unwrap(net) is net


def test_cli_choices_and_the_preset_check_read_the_registries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kitsprep.errors import KitsError
    from kitstrain.cli import fit as fit_command
    from kitstrain.model.losses import LOSSES
    from kitstrain.model.networks import NETWORKS
    from kitstrain.model.unet import NORMS
    from kitstrain.train import optim
    from kitstrain.train.setup import check_names

    params = {p.name: p for p in fit_command.params}
    for option, registry in (
        ("loss", LOSSES),
        ("norm", NORMS),
        ("optimizer", optim.OPTIMIZERS),
        ("schedule", optim.SCHEDULES),
        ("network", NETWORKS),
    ):
        assert list(params[option].type.choices) == sorted(registry), option
        with pytest.raises(KitsError, match=f"--{option} 'bogus' unknown; expected one of"):
            check_names(resolve("default", {option: "bogus"}))
    # a new entry is a new choice, and a valid preset value, with nothing else to edit
    monkeypatch.setitem(optim.OPTIMIZERS, "nadam", optim.OPTIMIZERS["adam"])
    assert "nadam" in params["optimizer"].type.choices
    check_names(resolve("default", {"optimizer": "nadam"}))
