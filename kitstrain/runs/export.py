"""`kitstrain export`: a trained run's network as ONNX, for runtimes outside kits
(onnxruntime, TensorRT, OpenVINO, a hospital's inference server), with a small JSON beside
it saying what the network expects and how its outputs become labels.

The graph is the network alone (slices in, logits out) with dynamic batch, height and width:
windowing, resizing to the slice size, 2.5D stacking and the region write-back stay with the
runtime, described in the JSON, because they are a few lines of array code in any language
and a graph that held them would fix the volume's shape. What the JSON says is what
`kitstrain predict` does (`kitstrain.infer.engine`), so a runtime that follows it gets the
same labels.

A cascade run (a low-resolution stage, then a full-resolution one) does not exist in kits
yet; when it does, each stage exports as its own graph and the JSON lists both.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from kitsprep import __version__
from kitsprep.errors import KitsError
from kitsprep.files import atomic_path, write_atomic
from kitsprep.outputs import check_output
from kitsprep.spacing import BODY_HU
from kitstrain.infer.inference import model_region_writes
from kitstrain.runs.loaded import LoadedRun, load_run, load_run_model

__all__ = ["EXPORT_FORMAT", "ExportResult", "export_run", "export_paths"]

EXPORT_FORMAT = "kits-onnx"
OPSET = 17  # LayerNorm and the rest of today's ops; onnxruntime >= 1.14 runs it
INPUT, OUTPUT = "image", "logits"
DYNAMIC = {0: "batch", 2: "height", 3: "width"}


@dataclass(frozen=True)
class ExportResult:
    """What `export_run` wrote."""

    onnx: Path
    meta: Path
    checkpoint: Path
    opset: int


def export_paths(out: Path) -> tuple[Path, Path]:
    """The ONNX file and its JSON beside it (`model.onnx` -> `model.json`)."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise KitsError(f"--out {out}: expected a file name ending in .onnx, e.g. model.onnx")
    return out, out.with_suffix(".json")


def _refuse_inputs(run: LoadedRun, targets: tuple[Path, ...]) -> None:
    """An export never replaces what it or a run reads: the run's store, its own files, a
    source folder or another run's directory (`kitsprep.outputs.check_output`). A new file
    inside this run's directory is fine."""
    store = run.store.path if run.store is not None else None
    recorded = Path(run.config.store) if run.config.store else None
    for target in targets:
        if target.is_dir():
            raise KitsError(f"--out: {target} is a folder; name a file, e.g. {target}/model.onnx")
        check_output(target, "--out", reading=(store, recorded), run=run.run_dir)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def runtime_meta(run: LoadedRun, model: torch.nn.Module, onnx_name: str, opset: int) -> dict:
    """What a runtime needs besides the graph, in the order it applies it."""
    cfg = model.cfg
    writes = model_region_writes(model)
    labels, window = run.labels, run.window
    k = run.context
    return {
        "format": EXPORT_FORMAT,
        "version": 1,
        "onnx": onnx_name,
        "opset": opset,
        "network": getattr(cfg, "network", "unet"),
        "input": {
            "name": INPUT,
            "shape": ["batch", 1 + 2 * k, "height", "width"],
            "dtype": "float32",
            "channels": 1 + 2 * k,
            "context": k,
            "channel_order": f"axial slices i-{k} .. i .. i+{k}, indices clamped to the "
            "volume (the first slice stands in for those above it)",
            "divisor": cfg.contract.divisor,
        },
        "window": {
            "lo": window.lo,
            "hi": window.hi,
            "offset": window.offset,
            "divisor": window.divisor,
            "name": window.name,
            "formula": "(clip(HU, lo, hi) - offset) / divisor",
        },
        "slice": {
            "size": run.size,
            "target_spacing": run.spacing,
            "fit": (
                "axial axis first; each slice resized bilinearly keeping its aspect ratio "
                "so its longer side is size"
                if run.spacing is None
                else f"axial axis first; each slice resized bilinearly to target_spacing mm "
                f"per pixel, cropped to the body (HU > {BODY_HU:g}; a case too large for "
                "size x size is resized further down until it fits)"
            )
            + ", centred and padded to size x size with air "
            f"(-1024 HU, {window.pad_value:.6g} after the window); invert by cropping the "
            "pad and resizing the logits back (to the crop, background around it)",
        },
        "output": {
            "name": OUTPUT,
            "shape": ["batch", cfg.contract.out_channels, "height", "width"],
            "kind": "regions" if writes else "classes",
            "decode": (
                "labels = 0; for each region k in order: labels[logits[:, k] > 0] = writes[k] "
                "(sigmoid > 0.5; a later region overwrites an earlier one)"
                if writes
                else "labels = argmax over channels"
            ),
        },
        "labels": {
            "edition": labels.edition,
            "background": 0,
            "names": dict(labels.labels),
        },
        "regions": [
            {"name": r.name, "labels": list(r.labels), "writes": r.writes} for r in labels.regions
        ],
        "write_order": list(writes),
        "checkpoint": {
            "run": str(run.run_dir),
            "which": run.which,
            "file": str(run.checkpoint),
            "sha256": _sha256(run.checkpoint),
        },
        "kits_version": __version__,
    }


def export_run(
    run_dir: Path, out: Path, *, which: str = "best", opset: int = OPSET
) -> ExportResult:
    """Write the run's network as ONNX to `out` (dynamic batch, height and width) and its
    runtime JSON beside it, both atomically. The store is not needed: a run whose store has
    moved exports from the window and size it recorded."""
    if opset < 17:
        raise KitsError(f"--opset must be at least 17, found {opset}")
    onnx_path, meta_path = export_paths(out)
    run = load_run(Path(run_dir), None, which=which, store_required=False)
    if run.stages is not None:
        raise KitsError(
            f"{run_dir} is a cascade of two models; export each stage: "
            f"{Path(run_dir) / 'coarse'} and {Path(run_dir) / 'fine'}"
        )
    _refuse_inputs(run, (onnx_path, meta_path))
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    model = load_run_model(run, torch.device("cpu")).to(memory_format=torch.contiguous_format)
    model.eval()
    side = max(run.size, model.cfg.contract.divisor)
    example = torch.zeros(1, model.cfg.contract.in_channels, side, side)
    with atomic_path(onnx_path) as tmp, warnings.catch_warnings():
        # the TorchScript exporter's deprecation and trace notes: the graph is checked by
        # tests against the run's own logits at several shapes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: DYNAMIC, OUTPUT: DYNAMIC},
        )
    meta = runtime_meta(run, model, onnx_path.name, opset)
    write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
    return ExportResult(onnx_path, meta_path, run.checkpoint, opset)
