"""`Inference`: everything one validation, `score`, `predict` or `Predictor` applies to
every case, in one object.

The models (one, or an ensemble of folds whose probabilities are averaged), the flips of
test-time augmentation, the batch size, the autocast precision, the device, the 2.5D
context, how outputs decode to labels, and an optional post-processing step. Callers build
it once (`runs.loaded.run_inference` for a finished run, `train.trainer` for validation) and
hand it to the per-case loop (`infer.cases`), so a new way of predicting is a field here
rather than one more parameter threaded through every function of the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kitsprep.cases import Volume
from kitsprep.store import SliceReader, StoreInfo
from kitsprep.window import Window
from kitstrain.core.precision import Amp
from kitstrain.infer.engine import (
    DEFAULT_BATCH_SIZE,
    NO_FLIPS,
    TTA_FLIPS,
    Flips,
    PostProcess,
    SliceProgress,
    predict_store_case,
    predict_volume,
)

__all__ = ["Inference", "model_region_writes", "tta_flips"]


def tta_flips(tta: bool) -> Flips:
    """The flips of `--tta`: the four mirror images, or the slice alone."""
    return TTA_FLIPS if tta else NO_FLIPS


def model_region_writes(model: nn.Module) -> tuple[int, ...]:
    """The label each region output of `model` writes back, in order (`UNetConfig`), or ()
    for a model whose outputs are class logits (or that carries no config)."""
    cfg = getattr(model, "cfg", None)
    return tuple(cfg.region_writes) if cfg is not None and cfg.regions else ()


@dataclass(frozen=True)
class Inference:
    """Models and how to apply them. `amp` is `core.precision.Amp` (False, True for fp16 on
    CUDA, or a dtype); `flips` the flips averaged per model (`tta_flips`). `region_writes`
    is the decoding: () for an argmax over classes, else the label each region writes back
    in order; None (the default) reads it from the models, which must agree. `postprocess`
    runs on each case's labels (axial axis first) with their spacing; None applies nothing.

    With one model its logits are averaged over the flips and decoded, as validation always
    did; with several, their probabilities (sigmoid per region, softmax over classes) are
    averaged over models and flips, batch by batch, and decoded. Without flips, N copies of
    one model label as that model; with flips they may differ at the margin (mean logits
    against mean probabilities)."""

    models: Sequence[nn.Module]
    context: int
    device: torch.device
    amp: Amp = False
    flips: Flips = NO_FLIPS
    batch_size: int = DEFAULT_BATCH_SIZE
    region_writes: tuple[int, ...] | None = None
    postprocess: PostProcess | None = None

    def __post_init__(self) -> None:
        # frozen: normalise through object.__setattr__, once, before anyone reads a field
        models = tuple(self.models)
        if not models or not all(isinstance(m, nn.Module) for m in models):
            raise ValueError(f"Inference needs one or more models (nn.Module), found {models!r}")
        object.__setattr__(self, "models", models)
        flips = tuple(tuple(int(d) for d in dims) for dims in self.flips)
        if not flips or not all(set(dims) <= {2, 3} for dims in flips):
            raise ValueError(
                f"Inference.flips: expected flips of dims 2 and 3 (rows, columns), found {flips}"
            )
        object.__setattr__(self, "flips", flips)
        if self.context < 0:
            raise ValueError(f"context must be >= 0, found {self.context}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, found {self.batch_size}")
        writes = {model_region_writes(m) for m in models if getattr(m, "cfg", None) is not None}
        if self.region_writes is None:
            if len(writes) > 1:
                raise ValueError(
                    f"Inference: the models decode differently (region writes {sorted(writes)}); "
                    "an ensemble needs models with the same outputs"
                )
            object.__setattr__(self, "region_writes", writes.pop() if writes else ())
        else:
            object.__setattr__(self, "region_writes", tuple(self.region_writes))
            if writes - {self.region_writes}:
                raise ValueError(
                    f"Inference.region_writes {self.region_writes} differs from the models' "
                    f"own ({sorted(writes)}); leave it None to read it from them"
                )

    @property
    def tta(self) -> bool:
        """Whether test-time augmentation (more than the slice as it is) is on."""
        return self.flips != NO_FLIPS

    def store_case(
        self,
        reader: SliceReader | None,
        info: StoreInfo,
        case_id: str,
        progress: SliceProgress | None = None,
    ) -> np.ndarray:
        """Labels uint8 (slices, size, size) of a stored case, the whole squares
        (`engine.predict_store_case`). `reader` may be None to open one here."""
        return predict_store_case(self, reader, info, case_id, progress)

    def volume(
        self,
        volume: Volume,
        window: Window,
        size: int,
        case_id: str = "",
        progress: SliceProgress | None = None,
        target_spacing: float | None = None,
    ) -> np.ndarray:
        """Labels uint8 of a CT volume in its own geometry (`engine.predict_volume`),
        preprocessed with the store's `window`, slice `size` and target spacing."""
        return predict_volume(self, volume, window, size, case_id, progress, target_spacing)
