"""fit's loader and precision options: --workers auto recorded with its reason, absurd
counts and --augment-on device without CUDA refused in one line; the batch search times
5 steps after warm-up and takes the median."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner

from kitsprep.labels import EDITIONS
from kitstrain.cli import main
from kitstrain.core.config import resolve
from kitstrain.model.losses import make_loss
from kitstrain.model.unet import UNetConfig, build_model
from kitstrain.train.memory import median_rate, search_batch_size

TINY = ["--batch-size", "2", "--samples-per-epoch", "8", "--width", "4", "--depth", "2"]


def fit(*args: object):
    return CliRunner().invoke(main, ["fit", *map(str, args)])


def test_bad_loader_options_are_one_line(loader_store: Path, tmp_path: Path) -> None:
    r = fit(
        loader_store, "--out", tmp_path / "a", *TINY, "--augment-on", "device", "--device", "cpu"
    )
    assert r.exit_code == 1 and "--augment-on device needs a CUDA device" in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    r = fit(loader_store, "--out", tmp_path / "b", *TINY, "--workers", "1000", "--device", "cpu")
    assert r.exit_code == 1 and "--workers 1000 is more than 4x" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_resolved_loader_is_recorded_with_its_reasons(loader_store: Path, tmp_path: Path):
    out = tmp_path / "run"
    r = fit(loader_store, "--out", out, *TINY, "--max-steps", "1", "--device", "cpu")
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["workers"] == "auto" and config["train"]["augment_on"] == "auto"
    assert config["train"]["dist_timeout"] == 300.0
    assert config["workers"] >= 1 and "usable core" in config["workers_reason"]
    assert config["augment_side"] == "workers"  # auto off CUDA
    assert config["precision_reason"].startswith(("fp32", "bf16"))
    assert "loader: " in r.output and "augmentation in the workers" in r.output


def test_batch_search_times_five_steps_after_warm_up_and_takes_the_median() -> None:
    assert median_rate(4, [1.0, 1.0, 1.0, 100.0, 0.5]) == 4.0  # one slow step does not count
    labels = EDITIONS["kits19"]
    model = build_model(UNetConfig(in_channels=1, num_classes=3, width=4, depth=2))
    calls: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    tc = resolve("default", {"context": 0, "width": 4, "depth": 2})
    found = search_batch_size(
        model, make_loss("ce", labels), tc, 16, 3, torch.device("cpu"), None, cap=4
    )
    assert [calls.count(n) for n in (2, 4)] == [6, 6]  # 1 warm-up + 5 timed, per size
    assert [t["batch"] for t in found["tried"]] == [2, 4]
