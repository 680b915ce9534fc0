"""`kitstrain`: thin click commands (fit, score, predict, plot, bench-loader)."""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
from pathlib import Path

import click

from kitsprep.cli import KitsGroup
from kitsprep.errors import KitsError
from kitsprep.files import check_output_folder
from kitsprep.labels import EDITIONS
from kitstrain import __version__
from kitstrain.core.config import PATCH_CHOICES, PRECISIONS, PRESETS


class RegistryChoice(click.Choice):
    """The names of a registry (`--loss` from losses.LOSSES, ...), read when click first
    needs them: the registries live beside torch code, and importing the CLI (`--help`,
    `plot`) must not import torch."""

    def __init__(self, module: str, registry: str) -> None:
        self._registry = (module, registry)
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:
        module, name = self._registry
        return tuple(sorted(getattr(importlib.import_module(module), name)))

    @choices.setter
    def choices(self, value: object) -> None:  # click.Choice.__init__ assigns: ignored
        pass


def parse_duration(text: str | None) -> float | None:
    """`90s`, `10m`, `2h`, `1h30m` or plain seconds -> seconds."""
    if text is None:
        return None
    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", t)
    if not parts or "".join(a + b for a, b in parts) != t:
        raise KitsError(f"cannot read duration {text!r}; expected e.g. 90s, 10m, 2h or 1h30m")
    unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(float(v) * unit[u] for v, u in parts)


def parse_batch(text: str | None) -> int | str | None:
    if text is None:
        return None
    if text == "auto":
        return "auto"
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise KitsError(f"--batch-size must be a positive integer or 'auto', found {text!r}")


def parse_patch(text: str | None) -> int | str | None:
    if text is None or text in ("auto", "full"):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise KitsError(f"--patch must be {PATCH_CHOICES}; found {text!r}")


def parse_label_weights(text: str | None) -> dict[str, float] | None:
    """`tumour=4,cyst=2` -> {"tumour": 4.0, "cyst": 2.0}; `none` -> {} (every foreground
    slice weighs 1). Names are checked against the store's edition when fit opens it."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return {}
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = (x.strip() for x in part.partition("="))
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not name or name in out or not weight > 0 or not math.isfinite(weight):
            raise KitsError(
                f"--label-weights expects distinct label=weight pairs with "
                f"positive weights, e.g. tumour=4,cyst=2 (or 'none'); found "
                f"{text!r}"
            )
        out[name] = weight
    return out


@click.group(cls=KitsGroup)
@click.version_option(__version__, prog_name="kitstrain")
def main() -> None:
    """Train, score and apply a 2D U-Net on a kitsprep slice store."""


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Run directory [default: runs/<timestamp>].",
)
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    default="default",
    show_default=True,
    help="seed: the origin report's setup; default: ours.",
)
@click.option("--epochs", type=click.IntRange(1), default=None)
@click.option(
    "--batch-size",
    default=None,
    help="N, or 'auto' (on CUDA the batch with the fastest per-sample step; on CPU the preset's).",
)
@click.option("--lr", type=float, default=None)
@click.option("--workers", type=click.IntRange(0), default=None, help="DataLoader workers.")
@click.option(
    "--context",
    type=click.IntRange(0, 8),
    default=None,
    help="2.5D: K neighbouring slices each side as channels.",
)
@click.option("--train-cases", default=None, help="e.g. 0-159 or @file [default: seeded 80%].")
@click.option("--val-cases", default=None, help="e.g. 160-209 or @file [default: the rest].")
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option("--resume", is_flag=True, help="Continue the run in --out (or the newest run).")
@click.option("--max-steps", type=click.IntRange(1), default=None)
@click.option("--time-limit", default=None, help="Stop cleanly after e.g. 90s, 10m, 2h.")
@click.option(
    "--val-every", type=click.IntRange(1), default=None, help="Also validate every N steps."
)
@click.option("--seed", type=int, default=None)
@click.option("--compile", "compile_", is_flag=True, default=None, help="torch.compile the model.")
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=None,
    help="auto: bf16 (else fp16) on CUDA, fp32 on CPU. bf16 on CPU is ~2x faster "
    "where the CPU has AMX/AVX512-BF16.",
)
@click.option("--samples-per-epoch", type=click.IntRange(1), default=None)
@click.option(
    "--width",
    type=click.IntRange(1),
    default=None,
    help="U-Net features at the first level (doubling per level).",
)
@click.option("--depth", type=click.IntRange(1, 8), default=None, help="Down-sampling steps.")
@click.option(
    "--deep-supervision",
    type=click.IntRange(0, 7),
    default=None,
    help="Also supervise N coarser decoder levels (1/2, 1/4, ...) in training.",
)
@click.option("--norm", type=RegistryChoice("kitstrain.model.unet", "NORMS"), default=None)
@click.option(
    "--patch",
    default=None,
    help="Training patch: 'auto' (half the slice side), 'full' or a side in pixels.",
)
@click.option(
    "--optimizer", type=RegistryChoice("kitstrain.train.optim", "OPTIMIZERS"), default=None
)
@click.option("--weight-decay", type=click.FloatRange(0), default=None)
@click.option("--schedule", type=RegistryChoice("kitstrain.train.optim", "SCHEDULES"), default=None)
@click.option(
    "--warmup",
    type=click.FloatRange(0, 1),
    default=None,
    help="Share of the run spent warming the learning rate up.",
)
@click.option("--loss", type=RegistryChoice("kitstrain.model.losses", "LOSSES"), default=None)
@click.option(
    "--fg-fraction",
    type=click.FloatRange(0, 1),
    default=None,
    help="Share of each batch drawn from slices with foreground.",
)
@click.option(
    "--label-weights",
    default=None,
    help="Weight of a foreground slice within that share, by the labels it holds, "
    "e.g. tumour=4,cyst=2 (the largest applies; other labels weigh 1), or "
    "'none'.",
)
@click.option(
    "--regions/--classes",
    default=None,
    help="Train one sigmoid per region the store's edition scores (KiTS19: "
    "kidney+tumour, tumour) instead of a softmax over its labels.",
)
@click.option("--augment/--no-augment", default=None, help="Spatial and intensity augmentation.")
@click.option("--grad-clip", type=click.FloatRange(0, min_open=True), default=None)
@click.option("--log-every", type=click.IntRange(1), default=None, help="Steps per log line.")
def fit(
    store: Path,
    out: Path | None,
    preset: str,
    epochs,
    batch_size,
    lr,
    workers,
    context,
    train_cases,
    val_cases,
    device,
    resume,
    max_steps,
    time_limit,
    val_every,
    seed,
    compile_,
    precision,
    samples_per_epoch,
    width,
    depth,
    deep_supervision,
    norm,
    patch,
    optimizer,
    weight_decay,
    schedule,
    warmup,
    loss,
    fg_fraction,
    label_weights,
    regions,
    augment,
    grad_clip,
    log_every,
) -> None:
    """Train a U-Net on STORE (a file written by `kitsprep build`)."""
    from kitstrain.core.config import resolve
    from kitstrain.train.fit import FitConfig
    from kitstrain.train.fit import fit as run_fit

    overrides = {
        "epochs": epochs,
        "batch_size": parse_batch(batch_size),
        "lr": lr,
        "workers": workers,
        "context": context,
        "max_steps": max_steps,
        "time_limit": parse_duration(time_limit),
        "val_every": val_every,
        "seed": seed,
        "compile": compile_,
        "precision": precision,
        "samples_per_epoch": samples_per_epoch,
        "width": width,
        "depth": depth,
        "deep_supervision": deep_supervision,
        "norm": norm,
        "patch": parse_patch(patch),
        "optimizer": optimizer,
        "weight_decay": weight_decay,
        "schedule": schedule,
        "warmup": warmup,
        "loss": loss,
        "fg_fraction": fg_fraction,
        "label_weights": parse_label_weights(label_weights),
        "regions": regions,
        "augment": augment,
        "grad_clip": grad_clip,
        "log_every": log_every,
    }
    tc = resolve(preset, overrides)
    explicit = frozenset(k for k, v in overrides.items() if v is not None)
    if preset != "default":
        explicit |= {"preset"}
    cfg = FitConfig(
        store=store,
        train=tc,
        out=out,
        train_cases=train_cases,
        val_cases=val_cases,
        device=device,
        resume=resume,
        explicit=explicit,
    )
    from kitstrain.report.plots import plot_curves

    result = run_fit(cfg, echo=lambda s: click.echo(s, err=True), on_validation=plot_curves)
    v = result.last_val or {}
    dice = ", ".join(f"{r} {v[f'{r}_dice']:.3f}" for r in v.get("regions", []))
    click.echo(
        f"done ({result.stop_reason}) after {result.steps} steps: validation Dice "
        f"{dice or 'n/a'}; loader stall {100 * result.stall:.1f}%; run in "
        f"{result.run_dir}"
    )


def _show_preset_defaults(command: click.Command) -> click.Command:
    """`fit --help` shows the `default` preset's value beside each preset field's flag (the
    options default to None so that only given flags override the preset)."""
    from dataclasses import replace

    from kitstrain.core.config import FIELD_NAMES, TrainConfig

    # the preset's fields as data, unchecked: checking imports the registries (and torch)
    preset = replace(TrainConfig(), **PRESETS["default"])
    names = (FIELD_NAMES - {"preset"}) | {"compile_"}
    for param in command.params:
        if isinstance(param, click.Option) and param.name in names:
            value = getattr(preset, param.name.rstrip("_"))
            if isinstance(value, bool) and param.secondary_opts:
                value = param.opts[0] if value else param.secondary_opts[0]
            shown = "none" if value is None else value
            param.help = f"{param.help or ''} [default preset: {shown}]".strip()
    return command


_show_preset_defaults(fit)


def _writable_file(path: Path | None, option: str) -> None:
    """Refuse an output file path that cannot be one, before any work is done."""
    if path is None:
        return
    if path.is_dir():
        raise KitsError(f"{option} {path} is a folder; name a file, e.g. {path / 'scores.json'}")
    check_output_folder(path, option)


@main.command()
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="Store to score on [default: the one the run trained on].",
)
@click.option("--cases", default=None, help="Cases [default: the run's validation cases].")
@click.option(
    "--src",
    type=click.Path(path_type=Path),
    default=None,
    help="Score against the source masks in their own geometry (official).",
)
@click.option("--tta", is_flag=True, help="Average logits over flips.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
@click.option(
    "--overlays",
    type=click.Path(path_type=Path),
    default=None,
    help="Write a PNG per case into this folder.",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option(
    "--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True
)
def score(
    run_dir, data, cases, src, tta, json_path, overlays, device, batch_size, checkpoint
) -> None:
    """Official Dice and surface Dice of every region of the store's KiTS edition, per case
    and mean, beside the all-background accuracy."""
    from kitstrain.core.rundir import newest_run
    from kitstrain.report.score import format_table
    from kitstrain.runs.score import ScoreConfig, score_run

    _writable_file(json_path, "--json")
    run_dir = run_dir or newest_run()
    cfg = ScoreConfig(
        run_dir=run_dir,
        data=data,
        cases=cases,
        src=src,
        tta=tta,
        json=json_path,
        overlays=overlays,
        device=device,
        batch_size=batch_size,
        which=checkpoint,
    )
    report = score_run(cfg)
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(format_table(report))
    if report.csv_path:
        click.echo(f"scores in {report.csv_path}" + (f" and {json_path}" if json_path else ""))
    if overlays:
        click.echo(f"overlays in {overlays}")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--src",
    type=click.Path(path_type=Path),
    required=True,
    help="KiTS19-layout folder of cases to predict (labelled or not).",
)
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="Folder for the predictions."
)
@click.option(
    "--naming",
    type=click.Choice(sorted(EDITIONS)),
    default=None,
    help="File names for this edition's evaluator: kits19 prediction_XXXXX.nii.gz, "
    "kits21/kits23 case_XXXXX.nii.gz [default: the store's edition].",
)
@click.option("--cases", default=None)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="The run's store, if it has moved (its parameters are used).",
)
@click.option("--overlays", type=click.Path(path_type=Path), default=None)
@click.option("--tta", is_flag=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option(
    "--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True
)
def predict(
    run_dir, src, out, naming, cases, data, overlays, tta, device, batch_size, checkpoint
) -> None:
    """Predictions in the source geometry, named for the edition's official evaluator."""
    from kitsprep.cli import _warn_misnamed
    from kitstrain.report.score import format_table
    from kitstrain.runs.predict import PredictConfig, check_predict_out, predict_run

    check_predict_out(src, out)
    _warn_misnamed(src)
    cfg = PredictConfig(
        run_dir=run_dir,
        src=src,
        out=out,
        cases=cases,
        overlays=overlays,
        device=device,
        batch_size=batch_size,
        tta=tta,
        which=checkpoint,
        data=data,
        naming=naming,
    )
    report = predict_run(cfg)
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    if report.scores:
        click.echo(format_table(report.score_report()))
    click.echo(
        f"wrote {len(report.paths)} predictions to {out}"
        + (f", overlays in {overlays}" if overlays else "")
    )


@main.command()
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
def plot(run_dir: Path | None) -> None:
    """Loss and validation Dice curves of a run, as a PNG."""
    from kitstrain.core.rundir import newest_run, read_config
    from kitstrain.report.plots import plot_curves

    run_dir = run_dir or newest_run()
    read_config(run_dir)
    click.echo(f"wrote {plot_curves(run_dir)}")


@main.command("bench-loader")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--workers", type=click.IntRange(0), default=2, show_default=True)
@click.option("--seconds", type=click.FloatRange(0.5), default=10.0, show_default=True)
@click.option("--augment", is_flag=True, help="Augmentation on (off by default).")
@click.option("--context", type=click.IntRange(0, 8), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_loader(store, batch_size, workers, seconds, augment, context, as_json) -> None:
    """Loader throughput against an in-RAM ceiling, and per-worker peak memory."""
    from kitstrain.data.bench import bench_loader as run_bench
    from kitstrain.data.bench import format_bench

    result = run_bench(
        store,
        batch_size=batch_size,
        workers=workers,
        seconds=seconds,
        augment=augment,
        context=context,
    )
    click.echo(json.dumps(result, indent=2) if as_json else format_bench(result))


if __name__ == "__main__":
    main(sys.argv[1:])
