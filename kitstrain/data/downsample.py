"""The cascade's coarse resolution: whole slices shrunk by an integer factor, and its
labels grown back. Pure numpy, shared by the coarse stage's store (`data.derive`) and
cascade inference (`infer.cascade`), so the coarse model sees at inference exactly what
it trained on."""

from __future__ import annotations

import numpy as np

from kitsprep.errors import KitsError

__all__ = [
    "coarse_factor",
    "downsample_images",
    "downsample_labels",
    "fine_factor",
    "upsample_labels",
]


def coarse_factor(size: int, coarse_size: int | None) -> int:
    """The integer shrink factor from `size` to `coarse_size` (None: a quarter of the side
    for stores of 256 and above, the store's own side below that)."""
    if coarse_size is None:
        return 4 if size >= 256 else 1
    if coarse_size > size or size % coarse_size:
        raise KitsError(
            f"--coarse-size {coarse_size} must divide the store's slice side {size} and be "
            f"at most {size}; use e.g. {size // 4 if size % 4 == 0 else size}"
        )
    return size // coarse_size


def fine_factor(size: int, given: int | None) -> int:
    """The cascade fine stage's shrink factor on a store of side `size` (None: 2 from 512
    up, where full-resolution regions cost four times the pixels per step, else 1)."""
    if given is None:
        return 2 if size >= 512 else 1
    if given < 1 or size % given:
        raise KitsError(
            f"--fine-factor {given} must divide the store's slice side {size}; "
            f"use e.g. {2 if size % 2 == 0 else 1}"
        )
    return given


def _blocks(a: np.ndarray, factor: int) -> np.ndarray:
    n, h, w = a.shape
    if h % factor or w % factor:
        raise ValueError(f"slices {h}x{w} do not divide by factor {factor}")
    return a.reshape(n, h // factor, factor, w // factor, factor)


def downsample_images(images: np.ndarray, factor: int) -> np.ndarray:
    """(N, H, W) -> (N, H/f, W/f) float16 by area averaging (what a lower-resolution scan
    would have measured), accumulated in float32."""
    if factor == 1:
        return images.astype(np.float16, copy=False)
    return _blocks(images.astype(np.float32), factor).mean(axis=(2, 4)).astype(np.float16)


def downsample_labels(labels: np.ndarray, factor: int) -> np.ndarray:
    """(N, H, W) uint8 -> (N, H/f, W/f) by max-pooling: any foreground pixel keeps its
    block foreground, so a one-pixel tumour survives (nearest sampling would drop 15 of
    16 such tumours at factor 4). The coarse stage only localises: a region it cannot see
    is a region the fine stage never looks at, while a slightly grown one costs nothing."""
    if factor == 1:
        return labels
    return _blocks(labels, factor).max(axis=(2, 4))


def upsample_labels(labels: np.ndarray, factor: int) -> np.ndarray:
    """(N, h, w) -> (N, h*f, w*f), each coarse pixel repeated over its block."""
    if factor == 1:
        return labels
    return labels.repeat(factor, axis=1).repeat(factor, axis=2)
