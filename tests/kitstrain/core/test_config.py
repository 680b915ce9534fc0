"""Training options are declared once, on their `TrainConfig` field: the fit flags, their
parsing and what `--resume` may change all follow from that declaration."""

from __future__ import annotations

from dataclasses import fields

import click
import pytest

from kitsprep.errors import KitsError
from kitstrain.cli import fit as fit_command
from kitstrain.core.config import PRESETS, RESUMABLE, TrainConfig, parse_overrides, resolve
from kitstrain.core.options import option_of


def test_every_field_but_the_preset_name_is_a_fit_flag_with_its_declared_help() -> None:
    params = {p.name: p for p in fit_command.params if isinstance(p, click.Option)}
    declared = {f.name: option_of(f) for f in fields(TrainConfig)}
    assert declared.pop("preset") is None  # chosen by --preset itself
    for name, opt in declared.items():
        assert opt is not None, f"{name} has no declared option"
        param = params[name]
        assert param.opts == ["--" + name.replace("_", "-")]
        assert param.default is None  # the preset's value holds unless the flag is given
        assert opt.help in param.help and "[presets: default " in param.help


def test_only_limits_and_loader_knobs_may_change_on_resume() -> None:
    assert RESUMABLE == {
        "epochs",
        "workers",
        "augment_on",
        "dist_timeout",
        "max_steps",
        "time_limit",
        "val_every",
        "val_budget",
        "log_every",
    }


def test_flag_text_is_parsed_by_the_fields_own_parser() -> None:
    got = parse_overrides(
        {"time_limit": "1h30m", "batch_size": "auto", "patch": "64", "label_weights": "none"}
    )
    assert got == {"time_limit": 5400.0, "batch_size": "auto", "patch": 64, "label_weights": {}}
    assert parse_overrides({"lr": None}) == {"lr": None}  # not given: the preset's value
    with pytest.raises(KitsError, match="--batch-size must be a positive integer or 'auto'"):
        parse_overrides({"batch_size": "-3"})
    with pytest.raises(KitsError, match="unknown training option"):
        parse_overrides({"learning_rate": "1"})


def test_presets_name_only_declared_fields() -> None:
    for name, values in PRESETS.items():
        assert resolve(name, {}).preset == name
        assert set(values) <= {f.name for f in fields(TrainConfig)}


@pytest.mark.parametrize("share", [0.0, -0.1, 1.5])
def test_a_validation_budget_outside_its_share_is_refused(share: float) -> None:
    """The CLI's range refuses it first; a Python caller's config is checked here."""
    with pytest.raises(KitsError, match=r"--val-budget must be a share within \(0, 1\]"):
        resolve("default", {"val_budget": share})
    assert resolve("default", {"val_budget": 1.0}).val_budget == 1.0
