"""`kitstrain`: thin click commands (fit, cv, score, predict, export, plot, bench-loader)."""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import fields
from pathlib import Path

import click

from kitsprep.cli import KitsGroup
from kitsprep.errors import KitsError
from kitsprep.files import check_output_folder
from kitsprep.labels import EDITIONS
from kitstrain import __version__
from kitstrain.core.config import PRESETS, TrainConfig
from kitstrain.core.options import Option, option_of


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


@click.group(cls=KitsGroup)
@click.version_option(__version__, prog_name="kitstrain")
def main() -> None:
    """Train, score and apply a 2D U-Net on a kitsprep slice store."""


def train_options(command: click.Command) -> click.Command:
    """One flag per `TrainConfig` field, generated from the field's declared `Option`, with
    every preset's value in its help. The flags default to None, so that only a given flag
    overrides the preset."""
    from dataclasses import replace

    # the presets' fields as data, unchecked: checking imports the registries (and torch)
    presets = {name: replace(TrainConfig(), **values) for name, values in PRESETS.items()}
    for f in reversed(fields(TrainConfig)):
        opt = option_of(f)
        if opt is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        shown = "; ".join(
            f"{name} {_shown(getattr(preset, f.name), flag, opt)}"
            for name, preset in sorted(presets.items(), key=lambda kv: kv[0] != "default")
        )
        resume = " --resume may change it." if opt.resumable else ""
        help_text = f"{opt.help}{resume} [presets: {shown}]".strip()
        if opt.kind is bool:
            decls = [f"{flag}/{opt.off}" if opt.off else flag, f.name]
            extra = {} if opt.off else {"is_flag": True}
            command = click.option(*decls, default=None, help=help_text, **extra)(command)
        else:
            command = click.option(
                flag, f.name, type=click_type(opt), default=None, help=help_text
            )(command)
    return command


def _shown(value: object, flag: str, opt: Option) -> str:
    """A preset's value as the flag would be given."""
    if isinstance(value, bool) and opt.off:
        return flag if value else opt.off
    if isinstance(value, dict):
        return ",".join(f"{k}={v:g}" for k, v in value.items()) or "none"
    return "none" if value is None else str(value)


def click_type(opt: Option) -> click.ParamType | type:
    """The click type an `Option` declares: a bounded number, a choice, a registry's
    names, or text that `Option.parse` reads."""
    if opt.registry is not None:
        return RegistryChoice(*opt.registry)
    if opt.choices is not None:
        return click.Choice(opt.choices)
    if opt.kind is int:
        return click.IntRange(opt.low, opt.high) if (opt.low, opt.high) != (None, None) else int
    if opt.kind is float:
        if (opt.low, opt.high) == (None, None):
            return float
        return click.FloatRange(opt.low, opt.high, min_open=opt.open_low)
    return str


# the options `fit` and `cv` share beside `train_options`
_PRESET = click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    default="default",
    show_default=True,
    help="seed: the origin report's setup; default: ours.",
)
_TRAIN_DEVICE = click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Run directory [default: runs/<timestamp>].",
)
@_PRESET
@click.option("--train-cases", default=None, help="e.g. 0-159 or @file [default: seeded 80%].")
@click.option("--val-cases", default=None, help="e.g. 160-209 or @file [default: the rest].")
@click.option(
    "--fold",
    type=click.IntRange(0),
    default=None,
    help="Train cross-validation fold K (0-based) of --splits, or of splits.json beside the "
    "run (written there once, stratified by tumour size, if absent).",
)
@click.option(
    "--folds",
    type=click.IntRange(2),
    default=None,
    help="With --fold: the number of folds [default: the splits file's, or 5].",
)
@click.option(
    "--splits",
    type=click.Path(path_type=Path),
    default=None,
    help="With --fold: an nnU-Net splits_final.json or a kits splits.json.",
)
@_TRAIN_DEVICE
@click.option("--resume", is_flag=True, help="Continue the run in --out (or the newest run).")
@train_options
def fit(
    store: Path,
    out: Path | None,
    preset: str,
    train_cases: str | None,
    val_cases: str | None,
    fold: int | None,
    folds: int | None,
    splits: Path | None,
    device: str,
    resume: bool,
    **options: object,
) -> None:
    """Train a U-Net on STORE (a file written by `kitsprep build`). With --cascade (or
    --preset cascade), two stages: RUN/coarse/ then RUN/fine/ (see README)."""
    from kitstrain.core import rundir
    from kitstrain.core.cascade import read_cascade
    from kitstrain.report.plots import plot_curves
    from kitstrain.train.cascade import fit_cascade
    from kitstrain.train.fit import FitConfig
    from kitstrain.train.fit import fit as run_fit

    tc, explicit = _train_config(preset, options)
    cfg = FitConfig(
        store=store,
        train=tc,
        out=out,
        train_cases=train_cases,
        val_cases=val_cases,
        device=device,
        resume=resume,
        explicit=explicit,
        fold=fold,
        folds=folds,
        splits=splits,
    )
    cascade = tc.cascade or (resume and read_cascade(out or rundir.newest_run()) is not None)
    result = (fit_cascade if cascade else run_fit)(
        cfg, echo=lambda s: click.echo(s, err=True), on_validation=plot_curves
    )
    v = result.last_val or {}
    dice = ", ".join(f"{r} {v[f'{r}_dice']:.3f}" for r in v.get("regions", []))
    # a run that trained too little for its time limit is still a valid run: exit 0
    head = f"warning: {result.warning}; stopped" if result.warning else "done"
    click.echo(
        f"{head} ({result.stop_reason}) after {result.steps} steps: validation Dice "
        f"{dice or 'n/a'}; loader stall {100 * result.stall:.1f}%; run in "
        f"{result.run_dir}"
    )


def _train_config(preset: str, options: dict[str, object]) -> tuple[TrainConfig, frozenset[str]]:
    """The preset with the flags given on top, and which fields those flags set."""
    from kitstrain.core.config import parse_overrides, resolve

    overrides = parse_overrides(options)
    tc = resolve(preset, overrides)
    explicit = frozenset(k for k, v in overrides.items() if v is not None)
    if preset != "default":
        explicit |= {"preset"}
    return tc, explicit


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="The cross-validation folder (cv.json, splits.json, fold_K/, oof/).",
)
@_PRESET
@click.option(
    "--folds",
    type=click.IntRange(2),
    default=None,
    help="Number of folds [default: the splits file's, or 5].",
)
@click.option(
    "--splits",
    type=click.Path(path_type=Path),
    default=None,
    help="An nnU-Net splits_final.json or a kits splits.json [default: the store's recorded "
    "folds, or new ones stratified by tumour size].",
)
@_TRAIN_DEVICE
@train_options
def cv(
    store: Path,
    out: Path,
    preset: str,
    folds: int | None,
    splits: Path | None,
    device: str,
    **options: object,
) -> None:
    """Cross-validate on STORE: train every fold in turn (--time-limit is per fold), then
    predict each fold's validation cases with its model (out-of-fold predictions). Rerun
    the same command to go on where it stopped; score with `kitstrain score OUT`."""
    from kitstrain.report.plots import plot_curves
    from kitstrain.runs.cv import CvConfig, run_cv

    tc, explicit = _train_config(preset, options)
    cfg = CvConfig(
        store=store,
        out=out,
        train=tc,
        explicit=explicit,
        folds=folds,
        splits=splits,
        device=device,
    )
    result = run_cv(cfg, echo=lambda s: click.echo(s, err=True), on_validation=plot_curves)
    click.echo(
        f"done: {result.folds} folds ({len(result.trained)} trained now, "
        f"{len(result.skipped)} done before); {result.predicted} out-of-fold predictions "
        f"written to {out / 'oof'}; score them with `kitstrain score {out}`"
    )


def _writable_file(path: Path | None, option: str) -> None:
    """Refuse an output file path that cannot be one, before any work is done."""
    if path is None:
        return
    if path.is_dir():
        raise KitsError(f"{option} {path} is a folder; name a file, e.g. {path / 'scores.json'}")
    check_output_folder(path, option)


_NO_POSTPROCESS = click.option(
    "--no-postprocess",
    is_flag=True,
    help="Leave out the post-processing recorded beside the models (postprocessing.json "
    "in the CV folder or the run).",
)


@main.command()
@click.argument("run_dirs", nargs=-1, type=click.Path(path_type=Path))
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
@click.option(
    "--partial",
    is_flag=True,
    help="A cross-validation folder with folds missing: score the folds done.",
)
@_NO_POSTPROCESS
def score(
    run_dirs,
    data,
    cases,
    src,
    tta,
    json_path,
    overlays,
    device,
    batch_size,
    checkpoint,
    partial,
    no_postprocess,
) -> None:
    """Official Dice and surface Dice of every region of the store's KiTS edition, per case
    and mean, beside the all-background accuracy. RUN_DIRS: a run [default: the newest],
    or several runs or a cross-validation folder, whose probabilities are averaged. A
    cross-validation folder (`kitstrain cv`) alone, without --cases or --src: its
    out-of-fold predictions, per case, per fold and over the folds."""
    from kitstrain.core.cvdir import is_cv_dir
    from kitstrain.core.rundir import newest_run
    from kitstrain.report.score import format_table
    from kitstrain.runs.score import ScoreConfig, score_run

    _writable_file(json_path, "--json")
    if len(run_dirs) == 1 and is_cv_dir(run_dirs[0]) and cases is None and src is None:
        _score_cv(
            run_dirs[0], data, json_path, partial, not no_postprocess, tta=tta, overlays=overlays
        )
        return
    if partial:
        raise KitsError(
            "--partial applies to a cross-validation folder (one with cv.json); drop it"
        )
    cfg = ScoreConfig(
        run_dir=tuple(run_dirs) or newest_run(),
        data=data,
        cases=cases,
        src=src,
        tta=tta,
        json=json_path,
        overlays=overlays,
        device=device,
        batch_size=batch_size,
        which=checkpoint,
        postprocess=not no_postprocess,
    )
    report = score_run(cfg)
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(format_table(report))
    if report.csv_path:
        click.echo(f"scores in {report.csv_path}" + (f" and {json_path}" if json_path else ""))
    if overlays:
        click.echo(f"overlays in {overlays}")


def _score_cv(
    cv_dir: Path,
    data: Path | None,
    json_path: Path | None,
    partial: bool,
    postprocess: bool,
    **run_only: object,
) -> None:
    """`score CV_DIR`: the out-of-fold table; no model runs, so run-only options are refused."""
    from kitstrain.report.cv import format_cv
    from kitstrain.runs.cvscore import score_cv

    given = [f"--{k}" for k, v in run_only.items() if v]
    if given:
        raise KitsError(
            f"{cv_dir} is a cross-validation folder, scored from its out-of-fold predictions; "
            f"{', '.join(given)} apply to a run's own inference: drop them"
        )
    report = score_cv(cv_dir, data=data, partial=partial, json=json_path, postprocess=postprocess)
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(format_cv(report))
    if json_path:
        click.echo(f"scores in {json_path}")


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
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
    type=click.Choice([*sorted(EDITIONS), "nnunet"]),
    default=None,
    help="File names for this edition's evaluator: kits19 prediction_XXXXX.nii.gz, "
    "kits21/kits23 case_XXXXX.nii.gz; nnunet: the case name, NAME.nii.gz "
    "[default: the store's edition].",
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
@click.option(
    "--overwrite",
    is_flag=True,
    help="--out holds another run's predictions: remove them and write this run's.",
)
@_NO_POSTPROCESS
def predict(
    run_dirs,
    src,
    out,
    naming,
    cases,
    data,
    overlays,
    tta,
    device,
    batch_size,
    checkpoint,
    overwrite,
    no_postprocess,
) -> None:
    """Predictions in the source geometry, named for the edition's official evaluator.
    RUN_DIRS: a run, or several runs or a cross-validation folder, whose probabilities
    are averaged."""
    from kitsprep.cli import _warn_misnamed
    from kitstrain.report.score import format_table
    from kitstrain.runs.predict import PredictConfig, check_predict_out, predict_run

    check_predict_out(src, out, overlays, run_dirs[0] if len(run_dirs) == 1 else None)
    _warn_misnamed(src)
    cfg = PredictConfig(
        run_dir=tuple(run_dirs),
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
        overwrite=overwrite,
        postprocess=not no_postprocess,
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
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="The ONNX file to write (e.g. model.onnx); its runtime JSON goes beside it (model.json).",
)
@click.option(
    "--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True
)
@click.option("--opset", type=click.IntRange(17), default=17, show_default=True)
def export(run_dir: Path, out: Path, checkpoint: str, opset: int) -> None:
    """The run's network as ONNX (dynamic batch, height, width) and what a runtime needs."""
    from kitstrain.runs.export import export_paths, export_run

    export_paths(out)  # the name is checked before torch loads
    result = export_run(run_dir, out, which=checkpoint, opset=opset)
    click.echo(
        f"wrote {result.onnx} (opset {result.opset}, from {result.checkpoint}) and {result.meta}"
    )


@main.command()
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
def plot(run_dir: Path | None) -> None:
    """Loss and validation Dice curves of a run (of each stage of a cascade), as a PNG."""
    from kitstrain.core.cascade import STAGES, read_cascade
    from kitstrain.core.record import read_record
    from kitstrain.core.rundir import newest_run
    from kitstrain.report.plots import plot_curves

    run_dir = run_dir or newest_run()
    for folder in [run_dir / s for s in STAGES] if read_cascade(run_dir) else [run_dir]:
        read_record(folder)
        click.echo(f"wrote {plot_curves(folder)}")


@main.command("bench-loader")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option(
    "--workers",
    default="auto",
    show_default=True,
    help="N, or 'auto' (as fit); --whole-slices: 2 unless given.",
)
@click.option("--seconds", type=click.FloatRange(0.5), default=10.0, show_default=True)
@click.option(
    "--augment-on",
    type=click.Choice(["auto", "device", "workers"]),
    default="auto",
    show_default=True,
    help="As fit's. 'device' without CUDA: the workers' share, and the kernel on CPU torch.",
)
@click.option(
    "--whole-slices",
    is_flag=True,
    help="The earlier figure: whole slices (no patches, context 0, augmentation only with "
    "--augment) against the in-RAM loaders.",
)
@click.option("--augment", is_flag=True, help="--whole-slices: augmentation on.")
@click.option(
    "--context", type=click.IntRange(0, 8), default=None, help="[default: 2; --whole-slices 0]"
)
@click.option("--json", "as_json", is_flag=True)
def bench_loader(
    store, batch_size, workers, seconds, augment_on, whole_slices, augment, context, as_json
) -> None:
    """What the training loader feeds: by default the path `fit` runs (patches, context,
    augmentation on the chosen side, auto workers): samples/s, CPU ms per sample, and what
    auto workers feed on this machine."""
    from kitstrain.core.options import parse_workers

    workers = parse_workers(workers)
    if whole_slices:
        from kitstrain.data.bench import bench_loader as run_bench
        from kitstrain.data.bench import format_bench

        result = run_bench(
            store,
            batch_size=batch_size,
            workers=2 if workers == "auto" else workers,
            seconds=seconds,
            augment=augment,
            context=context or 0,
        )
        click.echo(json.dumps(result, indent=2) if as_json else format_bench(result))
        return
    from kitstrain.data.bench_train import bench_training_loader, format_training_bench

    result = bench_training_loader(
        store,
        batch_size=batch_size,
        workers=workers,
        seconds=seconds,
        augment_on=augment_on,
        context=context,
    )
    click.echo(json.dumps(result, indent=2) if as_json else format_training_bench(result))


if __name__ == "__main__":
    main(sys.argv[1:])
