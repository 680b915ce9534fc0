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
  very kernels `kitsprep build` uses (window, resample, pad), runs the model, then inverts
  the recorded in-plane fit (crop the padding, bilinear resize of the logits) and the axis
  permutation. Used by `predict` and by `score --src` (the official setting).

Float logits never exist for more than one batch of slices; whole cases are kept only as
uint8 labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kitsprep.cases import Volume
from kitsprep.errors import KitsError
from kitsprep.geometry import axial_axes, fit_in_plane
from kitsprep.kernels import count_nonfinite, window_resample
from kitsprep.labels import LabelSet
from kitsprep.store import SliceReader, StoreInfo
from kitsprep.window import Window
from kitstrain.core.precision import Amp

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "SliceProgress",
    "logits_to_labels",
    "predict_store_case",
    "predict_volume",
    "read_store_images",
    "read_store_labels",
    "require_scorable",
    "stack_context",
    "store_box",
]

DEFAULT_BATCH_SIZE = 16

# Called with the number of slices just finished; lets a caller drive a bar.
SliceProgress = Callable[[int], None]

# The flips averaged by test-time augmentation: the four mirror images of a slice
# (none, left-right, up-down, both), as dims of an (N, C, H, W) tensor.
_TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (3,), (2,), (2, 3))


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


def _forward(model: nn.Module, x: Tensor, *, amp: Amp, tta: bool) -> Tensor:
    """float32 logits of one batch; with `tta`, the mean over the four flips."""
    # True means fp16 autocast on CUDA only; an explicit dtype (a run's training precision,
    # e.g. bf16 on CPU) applies on any device
    use_amp = isinstance(amp, torch.dtype) or (amp is True and x.device.type == "cuda")
    dtype = amp if isinstance(amp, torch.dtype) else torch.float16
    with torch.autocast(device_type=x.device.type, dtype=dtype, enabled=use_amp):
        if not tta:
            return model(x).float()
        total = None
        for dims in _TTA_FLIPS:
            xi = torch.flip(x, dims) if dims else x
            yi = model(xi).float()
            yi = torch.flip(yi, dims) if dims else yi
            total = yi if total is None else total + yi
        return total / len(_TTA_FLIPS)


def _logit_batches(
    model: nn.Module,
    batch_of: Callable[[int, int], np.ndarray | Tensor],
    n: int,
    device: torch.device,
    *,
    amp: Amp,
    tta: bool,
    batch_size: int,
    progress: SliceProgress | None = None,
) -> Iterator[tuple[int, int, Tensor]]:
    """(start, stop, float32 logits on `device`) per batch; `batch_of(s0, s1)` supplies the
    (B, C, H, W) input. The caller must already be inside `_eval_mode`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, found {batch_size}")
    non_blocking = device.type == "cuda"
    for s0 in range(0, n, batch_size):
        s1 = min(s0 + batch_size, n)
        batch = batch_of(s0, s1)
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(np.ascontiguousarray(batch))
        x = batch.to(device, non_blocking=non_blocking).float()
        yield s0, s1, _forward(model, x, amp=amp, tta=tta)
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


def _labels_u8(model: nn.Module, logits: Tensor) -> np.ndarray:
    cfg = getattr(model, "cfg", None)
    writes = cfg.region_writes if cfg is not None and cfg.regions else ()
    return logits_to_labels(logits, writes).cpu().numpy()


# --------------------------------------------------------------------------- store geometry


def read_store_images(reader: SliceReader, info: StoreInfo, case_id: str) -> np.ndarray:
    """A case's stored float16 slices (slices, size, size), CRC-checked."""
    rows = info.rows(case_id)
    # a case's chunks lie back to back: a few large reads instead of one per slice
    return reader.images(rows, np.empty((len(rows), info.size, info.size), np.float16))


def store_box(info: StoreInfo, case_id: str) -> tuple[slice, slice]:
    """Rows and columns of a stored slice that hold the (resized) image, not padding."""
    p = info.cases[case_id].in_plane
    return slice(p.pad_top, p.pad_top + p.new_h), slice(p.pad_left, p.pad_left + p.new_w)


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


def predict_store_case(
    model: nn.Module,
    info: StoreInfo,
    reader: SliceReader | None,
    case_id: str,
    context: int,
    device: torch.device,
    *,
    amp: Amp = True,
    tta: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: SliceProgress | None = None,
) -> np.ndarray:
    """Predicted labels (slices, size, size) uint8 of one stored case, in store geometry.
    `reader` may be None to open (and close) one here."""
    if case_id not in info.cases:
        raise KitsError(
            f"{case_id} is not in the store {info.path}; pick cases it holds "
            "(`kitsprep info` lists them)"
        )
    own = reader is None
    sm = SliceReader(info.path, info.size, info.case_ids) if own else reader
    try:
        images = read_store_images(sm, info, case_id)
    finally:
        if own:
            sm.close()
    out = np.empty(images.shape, np.uint8)
    with _eval_mode(model):
        for s0, s1, logits in _logit_batches(
            model,
            lambda a, b: stack_context(images, context, a, b),
            len(images),
            device,
            amp=amp,
            tta=tta,
            batch_size=batch_size,
            progress=progress,
        ):
            out[s0:s1] = _labels_u8(model, logits)
    return out


# --------------------------------------------------------------------------- source geometry


def predict_volume(
    model: nn.Module,
    volume: Volume,
    window: Window,
    size: int,
    context: int,
    device: torch.device,
    *,
    amp: Amp = True,
    tta: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    case_id: str = "",
    progress: SliceProgress | None = None,
) -> np.ndarray:
    """Labels uint8 with the shape of `volume.data` (a `kitsprep.cases.Volume`), in its
    voxel order. Preprocessing is `kitsprep build`'s, with the store's window and size."""
    data, hdr = volume.data, volume.header
    if data.ndim != 3:
        raise KitsError(f"{case_id or 'volume'}: expected a 3D volume, found shape {data.shape}")
    bad = count_nonfinite(data)
    if bad:
        raise KitsError(
            f"{case_id or 'volume'}: imaging holds {bad} NaN/Inf voxels; the scan "
            "is damaged, re-download it or leave it out with --cases"
        )
    axes = axial_axes(hdr.affine)
    image = data.transpose(axes)
    n_slices, src_h, src_w = image.shape
    plane = fit_in_plane(src_h, src_w, size)
    # The whole case windowed at store size costs what the raw volume does; slices are
    # needed more than once anyway (2.5D context).
    squares = window_resample(image, hdr.slope, hdr.inter, window, plane)
    out = np.empty((n_slices, src_h, src_w), np.uint8)
    top, left = plane.pad_top, plane.pad_left
    with _eval_mode(model):
        for s0, s1, logits in _logit_batches(
            model,
            lambda a, b: stack_context(squares, context, a, b),
            n_slices,
            device,
            amp=amp,
            tta=tta,
            batch_size=batch_size,
            progress=progress,
        ):
            if not plane.is_identity:
                box = logits[:, :, top : top + plane.new_h, left : left + plane.new_w]
                if (plane.new_h, plane.new_w) != (src_h, src_w):
                    # Half-pixel centres (align_corners=False), the kernel's convention.
                    box = F.interpolate(
                        box, size=(src_h, src_w), mode="bilinear", align_corners=False
                    )
                logits = box
            out[s0:s1] = _labels_u8(model, logits)
    return out.transpose(np.argsort(axes))
