"""Batched inference, shared by `fit` (validation), `score` and `predict`.

One path from slices to labels, so that a validation Dice logged during training, the table
of `kitstrain score` and the masks of `kitstrain predict` cannot disagree about context
stacking, mixed precision, flip averaging or the way back to the source geometry.

Two geometries:
- store geometry: the (slices, size, size) squares that `kitsprep build` wrote. Used by
  validation and by plain `score`; labels are the store's (resized, nearest neighbour).
  Scores count the resized image only (`store_box`), never the padding around it, which
  would otherwise inflate the accuracy of a non-square case and punish stray predictions
  on pixels that do not exist.
- source geometry: the NIfTI voxel grid. `predict_volume` preprocesses raw voxels with the
  very kernels `kitsprep build` uses (window, crop, resample, pad; at the store's target
  spacing), runs the model, then inverts the in-plane transform (drop the padding, bilinear
  resize of the logits back to the crop, background around it) and the axis permutation.
  Used by `predict` and by `score --src` (the official setting).

Every function here takes an `infer.inference.Inference` (`InferenceSettings`): what one
validation, score or predict applies to all its cases. One model is decoded from its
flip-averaged logits (what validation has always logged); several (an ensemble of folds)
from their mean probability over models and flips, accumulated batch by batch.

Float logits never exist for more than one batch of slices (per model); whole cases are kept
only as uint8 labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kitsprep.cases import Volume
from kitsprep.errors import KitsError
from kitsprep.geometry import InPlane, axial_axes, voxel_spacing
from kitsprep.kernels import count_nonfinite, window_resample
from kitsprep.labels import LabelSet
from kitsprep.spacing import case_plane
from kitsprep.store import SliceReader, StoreInfo
from kitsprep.window import Window
from kitstrain.core.precision import Amp

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "NO_FLIPS",
    "InferenceSettings",
    "TTA_FLIPS",
    "Flips",
    "PostProcess",
    "SliceProgress",
    "Spacing",
    "logits_to_labels",
    "predict_stack",
    "predict_store_case",
    "predict_volume",
    "read_store_images",
    "read_store_labels",
    "require_scorable",
    "stack_context",
    "store_box",
    "store_spacing",
]

DEFAULT_BATCH_SIZE = 16

# Called with the number of slices just finished; lets a caller drive a bar.
SliceProgress = Callable[[int], None]

# Voxel spacing in mm, one value per axis of a label volume (axial axis first).
Spacing = tuple[float, float, float]

# A step applied to a whole case's labels: uint8 (slices, rows, cols), axial axis first,
# with its `Spacing`, giving labels of the same shape (e.g. keeping the largest component).
PostProcess = Callable[[np.ndarray, Spacing], np.ndarray]

# The flips a prediction averages, as dims of an (N, C, H, W) tensor: the slice as it is,
# or with `--tta` its four mirror images (none, left-right, up-down, both).
Flips = tuple[tuple[int, ...], ...]
NO_FLIPS: Flips = ((),)
TTA_FLIPS: Flips = ((), (3,), (2,), (2, 3))


class InferenceSettings(Protocol):
    """What the engine reads of an `infer.inference.Inference`, the one implementation
    (declared here because inference.py calls the engine, so the engine cannot import it)."""

    @property
    def models(self) -> Sequence[nn.Module]: ...
    @property
    def context(self) -> int: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def amp(self) -> Amp: ...
    @property
    def flips(self) -> Flips: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def region_writes(self) -> tuple[int, ...]: ...
    @property
    def postprocess(self) -> PostProcess | None: ...


# --------------------------------------------------------------------------- core


def stack_context(
    volume_slices: np.ndarray, context: int, start: int = 0, stop: int | None = None
) -> np.ndarray:
    """2.5D input for slices [start, stop): (n, 1 + 2K, H, W), channels ordered
    slice-K .. slice .. slice+K, indices clamped at the volume's ends (the first slice
    stands in for the ones above it). The training dataset must stack the same way."""
    if context < 0:
        raise ValueError(f"context must be >= 0, found {context}")
    n_slices = volume_slices.shape[0]
    stop = n_slices if stop is None else stop
    centre = np.arange(start, stop)
    idx = np.clip(centre[:, None] + np.arange(-context, context + 1)[None, :], 0, n_slices - 1)
    return volume_slices[idx]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # Validation runs in the middle of training: put the caller's mode back afterwards.
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextmanager
def _eval_modes(models: Sequence[nn.Module]) -> Iterator[None]:
    # `_eval_mode` for every model of an ensemble, each mode restored on the way out
    with ExitStack() as stack:
        for model in models:
            stack.enter_context(_eval_mode(model))
        yield


def _autocast(device: torch.device, amp: Amp) -> torch.autocast:
    # True means fp16 autocast on CUDA only; an explicit dtype (a run's training precision,
    # e.g. bf16 on CPU) applies on any device
    use_amp = isinstance(amp, torch.dtype) or (amp is True and device.type == "cuda")
    dtype = amp if isinstance(amp, torch.dtype) else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=use_amp)


def _forward(model: nn.Module, x: Tensor, *, amp: Amp, flips: Flips) -> Tensor:
    """float32 logits of one batch: the mean over `flips` of the model's logits, each flip
    undone on the output. One model's decisions are read from these logits."""
    with _autocast(x.device, amp):
        if flips == NO_FLIPS:
            return model(x).float()
        total = None
        for dims in flips:
            xi = torch.flip(x, dims) if dims else x
            yi = model(xi).float()
            yi = torch.flip(yi, dims) if dims else yi
            total = yi if total is None else total + yi
        return total / len(flips)


# Maps a batch of outputs (B, C, size, size) onto the grid labels are decided on.
ToGrid = Callable[[Tensor], Tensor]


def _mean_probabilities(
    inference: InferenceSettings, x: Tensor, to_grid: ToGrid | None = None
) -> Tensor:
    """float32 probabilities of one batch, averaged over every model and flip: a sigmoid per
    region, or a softmax over classes. Models disagree in scale, so their logits are not
    averaged; one accumulator and one model output are alive at a time. Each output's
    logits go through `to_grid` before they become probabilities, as one model's do."""
    total, regions, flips = None, bool(inference.region_writes), inference.flips
    for model in inference.models:
        for dims in flips:
            xi = torch.flip(x, dims) if dims else x
            with _autocast(x.device, inference.amp):
                yi = model(xi)
            yi = yi.float()
            yi = torch.flip(yi, dims) if dims else yi
            yi = to_grid(yi) if to_grid is not None else yi
            p = torch.sigmoid(yi) if regions else torch.softmax(yi, dim=1)
            total = p if total is None else total.add_(p)
    return total / (len(inference.models) * len(flips))


def _score_batches(
    inference: InferenceSettings,
    batch_of: Callable[[int, int], np.ndarray | Tensor],
    n: int,
    progress: SliceProgress | None = None,
    to_grid: ToGrid | None = None,
) -> Iterator[tuple[int, int, Tensor]]:
    """(start, stop, float32 scores on the inference's device) per batch, for `_labels_u8`:
    one model's flip-averaged logits, or an ensemble's mean probabilities, on the grid of
    `to_grid` (None: the input's). `batch_of(s0, s1)` supplies the (B, C, H, W) input. The
    caller must already be inside `_eval_modes` of the inference's models."""
    batch_size, device = inference.batch_size, inference.device  # checked by Inference
    non_blocking = device.type == "cuda"
    models = inference.models
    for s0 in range(0, n, batch_size):
        s1 = min(s0 + batch_size, n)
        batch = batch_of(s0, s1)
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(np.ascontiguousarray(batch))
        x = batch.to(device, non_blocking=non_blocking).float()
        if len(models) == 1:
            scores = _forward(models[0], x, amp=inference.amp, flips=inference.flips)
            scores = to_grid(scores) if to_grid is not None else scores
        else:
            scores = _mean_probabilities(inference, x, to_grid)
        yield s0, s1, scores
        if progress is not None:
            progress(s1 - s0)


def logits_to_labels(logits: Tensor, region_writes: Sequence[int] | LabelSet = ()) -> Tensor:
    """uint8 labels (N, H, W) from logits (N, C, H, W): the argmax over classes or, for
    region logits, each region whose sigmoid passes 0.5 (logit > 0) written back in the
    label set's write order (a `LabelSet`, its `write_order`, or the order a run recorded,
    `UNetConfig.region_writes`). The torch twin of `kitsprep.labels.write_back`, on the
    logits' device: same order, same overwriting, held to it by tests."""
    if isinstance(region_writes, LabelSet):
        region_writes = region_writes.write_order
    if not region_writes:
        return logits.argmax(dim=1).to(torch.uint8)
    if logits.shape[1] != len(region_writes):
        raise ValueError(
            f"logits_to_labels: expected {len(region_writes)} region logits, "
            f"found {logits.shape[1]}"
        )
    labels = torch.zeros(
        (logits.shape[0], *logits.shape[2:]), dtype=torch.uint8, device=logits.device
    )
    for k, value in enumerate(region_writes):  # a later region overwrites an earlier one
        labels[logits[:, k] > 0] = value
    return labels


def _labels_u8(inference: InferenceSettings, scores: Tensor) -> np.ndarray:
    """uint8 labels of one batch of `_score_batches` scores, with the inference's decoding."""
    writes = inference.region_writes
    if len(inference.models) > 1:
        # Mean probabilities: the argmax over classes is read from them as it is from
        # logits; a region passes where its probability exceeds 0.5, which `logits_to_labels`
        # reads as a positive value (p - 0.5 is exact and keeps its sign for p in [0, 1]).
        scores = scores - 0.5 if writes else scores
    return logits_to_labels(scores, writes).cpu().numpy()


def _post_process(inference: InferenceSettings, labels: np.ndarray, spacing: Spacing) -> np.ndarray:
    """The inference's post-processing step on a whole case's labels (axial axis first), if
    any, held to its contract: uint8 labels of the same shape."""
    if inference.postprocess is None:
        return labels
    out = inference.postprocess(labels, spacing)
    if not isinstance(out, np.ndarray) or out.shape != labels.shape or out.dtype != np.uint8:
        found = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(
            f"post-processing must return uint8 labels of shape {labels.shape}, found {found}"
        )
    return out


# --------------------------------------------------------------------------- store geometry


def read_store_images(reader: SliceReader, info: StoreInfo, case_id: str) -> np.ndarray:
    """A case's stored float16 slices (slices, size, size), CRC-checked."""
    rows = info.rows(case_id)
    # a case's chunks lie back to back: a few large reads instead of one per slice
    return reader.images(rows, np.empty((len(rows), info.size, info.size), np.float16))


def store_box(info: StoreInfo, case_id: str) -> tuple[slice, slice]:
    """Rows and columns of a stored slice that hold the (resized) image, not padding."""
    return info.cases[case_id].in_plane.box


def require_scorable(info: StoreInfo, case_id: str) -> None:
    """KitsError unless the store holds `case_id` with labels."""
    if case_id not in info.cases:
        raise KitsError(
            f"{case_id} is not in the store {info.path}; pick cases it holds "
            "(`kitsprep info` lists them)"
        )
    if not info.cases[case_id].labelled:
        raise KitsError(
            f"{case_id} is unlabelled in {info.path} (no segmentation), so it "
            "cannot be scored; leave it out of --cases, or segment it with "
            "`kitstrain predict`"
        )


def read_store_labels(reader: SliceReader, info: StoreInfo, case_id: str) -> np.ndarray:
    """A labelled case's stored labels (slices, size, size) uint8."""
    require_scorable(info, case_id)
    rows = info.rows(case_id)
    out = np.empty((len(rows), info.size, info.size), np.uint8)
    for i, row in enumerate(rows):
        out[i] = reader.label(row)
    return out


def store_spacing(info: StoreInfo, case_id: str) -> Spacing:
    """Voxel spacing (mm) of a stored case's slices inside `store_box`: the source spacing,
    in-plane scaled by the recorded resize of the crop."""
    m = info.cases[case_id]
    return squares_spacing(m.spacing, m.in_plane)


def squares_spacing(spacing: Sequence[float], plane: InPlane) -> Spacing:
    """The spacing (axial first) of a case's stored squares: the source's, in-plane scaled
    by the transform's resize of the crop."""
    return (
        spacing[0],
        spacing[1] * plane.crop_h / plane.new_h,
        spacing[2] * plane.crop_w / plane.new_w,
    )


def predict_store_case(
    inference: InferenceSettings,
    reader: SliceReader | None,
    info: StoreInfo,
    case_id: str,
    progress: SliceProgress | None = None,
) -> np.ndarray:
    """Predicted labels (slices, size, size) uint8 of one stored case, in store geometry,
    post-processed (with `store_spacing`) when the inference has a step for it. `reader`
    may be None to open (and close) one here."""
    images = read_case_images(reader, info, case_id)
    return _post_process(
        inference, predict_stack(inference, images, progress), store_spacing(info, case_id)
    )


def read_case_images(reader: SliceReader | None, info: StoreInfo, case_id: str) -> np.ndarray:
    """A stored case's images (slices, size, size); `reader` None opens (and closes) one."""
    if case_id not in info.cases:
        raise KitsError(
            f"{case_id} is not in the store {info.path}; pick cases it holds "
            "(`kitsprep info` lists them)"
        )
    own = reader is None
    sm = SliceReader(info.path, info.size, info.case_ids) if own else reader
    try:
        return read_store_images(sm, info, case_id)
    finally:
        if own:
            sm.close()


def check_volume(data: np.ndarray, case_id: str) -> None:
    """A CT volume inference can take: 3D, every voxel finite."""
    if data.ndim != 3:
        raise KitsError(f"{case_id or 'volume'}: expected a 3D volume, found shape {data.shape}")
    bad = count_nonfinite(data)
    if bad:
        raise KitsError(
            f"{case_id or 'volume'}: imaging holds {bad} NaN/Inf voxels; the scan "
            "is damaged, re-download it or leave it out with --cases"
        )


def predict_stack(
    inference: InferenceSettings,
    images: np.ndarray,
    progress: SliceProgress | None = None,
    scale: int = 1,
) -> np.ndarray:
    """Labels uint8 of a stack of preprocessed slices (N, H, W), 2.5D context clamped at
    the stack's ends; no post-processing. `scale` > 1 decides the labels on a grid that
    many times finer, (N, H*scale, W*scale): the logits (an ensemble's each) resized
    bilinearly first, as `predict_volume` takes them back to the source grid."""
    n, h, w = images.shape
    out = np.empty((n, h * scale, w * scale), np.uint8)
    context = inference.context

    def finer(logits: Tensor) -> Tensor:
        # half-pixel centres (align_corners=False): each coarse pixel is its block's centre
        return F.interpolate(logits, scale_factor=scale, mode="bilinear", align_corners=False)

    with _eval_modes(inference.models):
        for s0, s1, scores in _score_batches(
            inference,
            lambda a, b: stack_context(images, context, a, b),
            n,
            progress,
            finer if scale > 1 else None,
        ):
            out[s0:s1] = _labels_u8(inference, scores)
    return out


# --------------------------------------------------------------------------- source geometry


def predict_volume(
    inference: InferenceSettings,
    volume: Volume,
    window: Window,
    size: int,
    case_id: str = "",
    progress: SliceProgress | None = None,
    target_spacing: float | None = None,
) -> np.ndarray:
    """Labels uint8 with the shape of `volume.data` (a `kitsprep.cases.Volume`), in its
    voxel order. Preprocessing is `kitsprep build`'s, with the store's window, size and
    target spacing (`kitsprep.spacing.case_plane`: the crop is the volume's body, as for a
    new patient, whose labels are not known); voxels outside the crop are background.
    Post-processing, when the inference has a step, sees the labels axial axis first, with
    the header's spacing in that order, before they go back to the volume's voxel order."""
    squares, plane, axes, spacing = source_squares(volume, window, size, case_id, target_spacing)
    n_slices, src_h, src_w = len(squares), plane.src_h, plane.src_w
    whole = (plane.crop_h, plane.crop_w) == (src_h, src_w)
    out = (np.empty if whole else np.zeros)((n_slices, src_h, src_w), np.uint8)
    rows, cols = plane.box
    crop, context = (slice(None), *plane.crop), inference.context

    def to_source(logits: Tensor) -> Tensor:
        # Logits go back to the source grid (the crop of it) before decoding (an
        # ensemble's each, before they become probabilities), so labels are decided per
        # source voxel.
        box = logits[:, :, rows, cols]
        if (plane.new_h, plane.new_w) != (plane.crop_h, plane.crop_w):
            # Half-pixel centres (align_corners=False), the kernel's convention.
            box = F.interpolate(
                box, size=(plane.crop_h, plane.crop_w), mode="bilinear", align_corners=False
            )
        return box

    to_grid = None if plane.is_identity else to_source
    with _eval_modes(inference.models):
        for s0, s1, scores in _score_batches(
            inference,
            lambda a, b: stack_context(squares, context, a, b),
            n_slices,
            progress,
            to_grid,
        ):
            out[s0:s1][crop] = _labels_u8(inference, scores)
    out = _post_process(inference, out, spacing)
    return out.transpose(np.argsort(axes))


def source_squares(
    volume: Volume,
    window: Window,
    size: int,
    case_id: str = "",
    target_spacing: float | None = None,
) -> tuple[np.ndarray, InPlane, tuple[int, int, int], Spacing]:
    """A CT volume preprocessed as `kitsprep build` stores it (the store's window, size and
    target spacing; the crop from the volume's body alone): the squares (slices, size,
    size), their in-plane transform, the permutation that put the axial axis first, and
    the header's spacing in that order."""
    data, hdr = volume.data, volume.header
    check_volume(data, case_id)
    axes = axial_axes(hdr.affine)
    image = data.transpose(axes)
    sp = voxel_spacing(hdr.affine)
    spacing = (sp[axes[0]], sp[axes[1]], sp[axes[2]])
    plane = case_plane(image, hdr.slope, hdr.inter, spacing[1:], size, target_spacing)
    # The whole case windowed at store size costs what the raw volume does; slices are
    # needed more than once anyway (2.5D context).
    return window_resample(image, hdr.slope, hdr.inter, window, plane), plane, axes, spacing
