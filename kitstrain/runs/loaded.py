"""A run directory resolved for inference: checkpoint, preprocessing, label set, model.

`score`, `predict` and the Python API (`kitstrain.api.Predictor`) all load a run here, so
they agree on which checkpoint is used, which store lends the preprocessing (the one the run
trained on, `--data` where it moved, or the window and size the run recorded where it is
gone) and which precision inference runs in (the run's own, as `fit` validated).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kitsprep.errors import KitsError
from kitsprep.labels import LabelSet
from kitsprep.store import StoreInfo, open_store
from kitsprep.window import Window
from kitstrain.core import rundir as runlib
from kitstrain.core.cascade import CASCADE, read_cascade
from kitstrain.core.precision import Amp, amp_dtype
from kitstrain.core.record import RunRecord, StoreAttrs, read_record
from kitstrain.infer.cascade import CascadeInference
from kitstrain.infer.engine import DEFAULT_BATCH_SIZE, PostProcess
from kitstrain.infer.inference import Inference, tta_flips
from kitstrain.model.load import load_model
from kitstrain.model.unet import pad_input_channels

__all__ = [
    "LoadedRun",
    "default_cases",
    "inference_amp",
    "load_run",
    "load_run_model",
    "run_inference",
    "training_cases",
]


@dataclass
class LoadedRun:
    """A run directory resolved to what inference needs."""

    run_dir: Path
    config: RunRecord
    context: int
    store: StoreInfo | None  # None only where a store is optional (predict, store gone)
    window: Window
    size: int
    labels: LabelSet  # the store's; the run's record of it when the store is gone
    which: str  # the checkpoint asked for: best or last
    checkpoint: Path  # the file `which` resolves to (best falls back to last)
    warnings: list[str]
    spacing: float | None = None  # the store's target in-plane spacing (None: slices whole)
    # a cascade run (`fit --cascade`): its coarse and fine stages, each loaded as a run,
    # and RUN/config.json's cascade record; `config` and `checkpoint` are the fine stage's
    stages: tuple[LoadedRun, LoadedRun] | None = None
    cascade: dict | None = None


def load_run(
    run_dir: Path | None,
    data: Path | None,
    *,
    which: str = "best",
    runs_root: Path = runlib.RUNS_ROOT,
    store_required: bool = True,
) -> LoadedRun:
    """Resolve a run directory (None: the newest under `runs_root`), its checkpoint and the
    store it trained on (or `data`).

    A store given with `--data` must have the run's preprocessing (window, slice size and
    target spacing;
    otherwise: error, the model would see inputs it never trained on). Other differences in
    content (cases added, rebuilt from other files) only warn: scoring other cases with the
    same preprocessing is legitimate. Without `store_required` a missing store is replaced
    by the window, size, spacing and label set the run recorded."""
    run_dir = Path(run_dir) if run_dir is not None else runlib.newest_run(runs_root)
    if not run_dir.is_dir():
        raise KitsError(
            f"run directory {run_dir} does not exist; pass a folder written by "
            "`kitstrain fit` (runs/<timestamp>)"
        )
    cascade = read_cascade(run_dir)
    if cascade is not None:
        return _load_cascade(run_dir, cascade[CASCADE], data, which, store_required)
    config = read_record(run_dir)
    checkpoint = runlib.resolve_checkpoint(run_dir, which)
    if not checkpoint.is_file():
        hint = "" if which == "last" else ", or pass --checkpoint last"
        raise KitsError(
            f"{run_dir} has no {which} checkpoint ({checkpoint} is missing); "
            f"let `kitstrain fit` run to its first validation{hint}"
        )
    context = config.context
    recorded = config.store_attrs or StoreAttrs()
    warnings: list[str] = []
    recorded_path = Path(config.store) if config.store else None
    info: StoreInfo | None = None
    if data is not None:
        info = open_store(Path(data))
    elif recorded_path is not None and recorded_path.is_file():
        info = open_store(recorded_path)
    elif store_required or None in (recorded.window, recorded.size, recorded.labels):
        where = (
            f"the store this run trained on, {recorded_path},"
            if recorded_path
            else "the store this run trained on"
        )
        raise KitsError(
            f"{where} is missing (moved or deleted); pass --data FILE.h5 with "
            "its new location, or rebuild it with `kitsprep build`"
        )

    if info is None:  # the store is gone: what the run recorded is all preprocessing needs
        warnings.append(
            f"the run's store {recorded_path} is missing; using the window, size and "
            "spacing recorded in the run's config"
        )
        return LoadedRun(
            run_dir,
            config,
            context,
            None,
            recorded.window,
            recorded.size,
            recorded.labels,
            which,
            checkpoint,
            warnings,
            recorded.spacing,
        )
    want_window, want_size = recorded.window, recorded.size
    if want_window is not None and want_window != info.window:
        raise KitsError(
            f"{info.path} was built with window {info.window.to_json()}, but "
            f"the run trained on {want_window.to_json()}; score with the store "
            "the run trained on, or rebuild with its --window"
        )
    if want_size is not None and int(want_size) != info.size:
        raise KitsError(
            f"{info.path} holds {info.size}x{info.size} slices, but the run "
            f"trained on {want_size}x{want_size}; score with the store the run "
            f"trained on, or rebuild with --size {want_size}"
        )
    if config.store_attrs is not None and recorded.spacing != info.spacing.mm:

        def shown(mm: float | None) -> str:
            return "none" if mm is None else f"{mm:g}"

        raise KitsError(
            f"{info.path} was built with --spacing {shown(info.spacing.mm)}, but the run "
            f"trained on --spacing {shown(recorded.spacing)}; score with the store the run "
            f"trained on, or rebuild with --spacing {shown(recorded.spacing)}"
        )
    fingerprint = config.store_fingerprint
    if fingerprint is not None and fingerprint != info.fingerprint:
        warnings.append(
            f"{info.path} (fingerprint {info.fingerprint}) is not the store the "
            f"run trained on (fingerprint {fingerprint}): same preprocessing, other "
            "content; check that the scored cases were not used for training"
        )
    return LoadedRun(
        run_dir,
        config,
        context,
        info,
        info.window,
        info.size,
        info.labels,
        which,
        checkpoint,
        warnings,
        info.spacing.mm,
    )


def _load_cascade(
    run_dir: Path, cascade: dict, data: Path | None, which: str, store_required: bool
) -> LoadedRun:
    """A cascade run: both stages loaded from their own folders, and the preprocessing of
    the store the cascade was derived from (`data` where it moved), at whose side the
    cascade predicts. Without that store, the stages' shared window and its recorded side."""
    coarse, fine = (
        load_run(run_dir / s, None, which=which, store_required=False) for s in ("coarse", "fine")
    )
    size = int(cascade["store_size"])
    path = Path(data) if data is not None else Path(cascade["store"])
    info = None
    warnings = [*coarse.warnings, *fine.warnings]
    if path.is_file():
        info = open_store(path)
        if info.size != size or info.window != fine.window:
            raise KitsError(
                f"{info.path} holds {info.size}x{info.size} slices with window "
                f"{info.window.to_json()}, but the cascade in {run_dir} was trained from "
                f"{size}x{size} slices with {fine.window.to_json()}; pass the store it "
                "trained from with --data"
            )
    elif store_required or data is not None:
        raise KitsError(
            f"the store the cascade in {run_dir} trained from, {path}, is missing (moved or "
            "deleted); pass --data FILE.h5 with its new location"
        )
    else:
        warnings.append(
            f"the cascade's store {path} is missing; using its recorded window and size"
        )
    return LoadedRun(
        run_dir,
        fine.config,
        fine.context,
        info,
        fine.window,
        size,
        info.labels if info is not None else fine.labels,
        which,
        fine.checkpoint,
        warnings,
        stages=(coarse, fine),
        cascade=cascade,
    )


def load_run_model(run: LoadedRun, device: torch.device) -> nn.Module:
    """The run's model from its resolved checkpoint, on `device`, checked against the
    context the run recorded (a model fed the wrong number of slices is silently wrong)."""
    model, _ = load_model(run.run_dir, run.which, device, run.config)
    if device.type == "cuda":
        pad_input_channels(model)  # as fit trains on CUDA: tensor-core kernels for 5 channels
    expected = 1 + 2 * run.context
    got = getattr(getattr(model, "cfg", None), "in_channels", expected)
    if got != expected:
        raise KitsError(
            f"{run.run_dir}: the model takes {got} input channel(s) but the config "
            f"says context {run.context} ({expected} channels); the run directory "
            "is inconsistent, retrain or fix config.json"
        )
    return model


def inference_amp(run: LoadedRun, device: torch.device) -> Amp:
    """Autocast in the precision the run trained and validated in (bf16 where the GPU has
    it), so `score` and `predict` give the numbers `fit` logged: fp16 would differ, and
    can overflow at 65,504. fp32 where that precision is unavailable on `device`."""
    try:
        dtype = amp_dtype(device, run.config.train.precision)
    except KitsError:  # e.g. a GPU run's fp16, scored on a CPU
        dtype = None
    return dtype if dtype is not None else False


def run_inference(
    runs: Sequence[LoadedRun],
    device: torch.device,
    *,
    amp: bool = True,
    tta: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    postprocess: PostProcess | None = None,
) -> Inference | CascadeInference:
    """The runs' models on `device`, applied as `fit` validated them (an `Inference` of one
    model, or an ensemble averaging their probabilities, its decoding read from the models);
    `amp=False` forces fp32 (as does a precision the runs do not share), `tta` averages the
    four flips, `postprocess` runs on each case's labels. A cascade run gives a
    `CascadeInference` of its two stages so loaded."""
    cascades = [run for run in runs if run.stages is not None]
    if cascades and len(runs) > 1:
        raise KitsError(
            f"{cascades[0].run_dir} is a cascade run (fit --cascade), which cannot join an "
            "ensemble yet; predict or score it alone"
        )
    if cascades:
        run = cascades[0]
        coarse, fine = (
            run_inference([s], device, amp=amp, tta=tta, batch_size=batch_size) for s in run.stages
        )
        return CascadeInference(
            coarse,
            fine,
            factor=int(run.cascade["coarse_factor"]),
            margin_mm=float(run.cascade["margin_mm"]),
            divisor=2 ** int(run.stages[1].config.train.depth),
            fine_factor=int(run.cascade.get("fine_factor", 1)),  # older records: full size
        )
    amps = {inference_amp(run, device) for run in runs} if amp else {False}
    return Inference(
        [load_run_model(run, device) for run in runs],
        runs[0].context,
        device,
        amp=amps.pop() if len(amps) == 1 else False,
        flips=tta_flips(tta),
        batch_size=batch_size,
        postprocess=postprocess,
    )


def training_cases(run_dir: Path) -> list[str]:
    """The run's training split (empty when the run records none): scores of these cases
    say nothing about new patients."""
    return list(runlib.read_split(run_dir).get("train") or [])


def default_cases(run: LoadedRun) -> list[str]:
    """The run's validation cases: what `score` scores unless told otherwise."""
    val = list(runlib.read_split(run.run_dir).get("val") or [])
    if not val:
        raise KitsError(
            f"{run.run_dir} has no validation cases in {runlib.SPLIT}; name the "
            "cases to score with --cases"
        )
    return val
