"""Cascade inference, the same path for `score`, `predict` and `Predictor`: the coarse
model on the whole volume at its low resolution, its kidney labels grown back and split
into 3D connected components with the margin (`infer.regions`), the fine model on those
crops only (with their 2.5D context; shrunk by the fine factor, its logits resized back
bilinearly before they become labels), pasted into full-resolution labels that are
background elsewhere. A volume where the coarse model finds no kidney gets the fine model
on whole slices. `CascadeInference` has `Inference`'s `store_case` and `volume`, so the
per-case loop (`infer.cases`) runs it unchanged; `notes` keeps per case what it did."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from kitsprep.cases import Volume
from kitsprep.geometry import restore_labels
from kitsprep.store import SliceReader, StoreInfo
from kitsprep.window import Window
from kitstrain.data.downsample import downsample_images, upsample_labels
from kitstrain.infer.engine import (
    SliceProgress,
    predict_stack,
    read_case_images,
    source_squares,
    squares_spacing,
    store_spacing,
)
from kitstrain.infer.inference import Inference
from kitstrain.infer.postprocess import KIDNEY_SHARE, keep_large_components
from kitstrain.infer.regions import Box, find_regions, fit_box, merge_boxes, paste, voxel_share

__all__ = ["CascadeInference", "fine_boxes"]


def fine_boxes(
    mask: np.ndarray, spacing: Sequence[float], margin_mm: float, divisor: int
) -> list[Box]:
    """The fine stage's boxes for a (slices, H, W) kidney `mask`: components with the
    margin, fitted to the network's `divisor`, merged again where fitting made them meet
    (until nothing changes: boxes only grow)."""
    boxes = find_regions(mask, spacing, margin_mm)
    while True:
        fitted = merge_boxes([fit_box(b, divisor, mask.shape) for b in boxes])
        if fitted == boxes:
            return boxes
        boxes = fitted


@dataclass(frozen=True)
class CascadeInference:
    """A coarse and a fine `Inference`; `factor` shrinks slices to the coarse side,
    `divisor` is the fine network's 2**depth, `fine_factor` shrinks the fine stage's
    crops (1: full resolution; a record without one)."""

    coarse: Inference
    fine: Inference
    factor: int
    margin_mm: float
    divisor: int
    fine_factor: int = 1
    # case id -> {"regions", "fine_voxel_share", "fallback"}: what `score --json` reports
    notes: dict[str, dict] = field(default_factory=dict)

    @property
    def tta(self) -> bool:
        return self.fine.tta

    @property
    def context(self) -> int:
        return self.fine.context

    @property
    def postprocess(self) -> None:
        """No post-processing step: the regions already confine the labels."""
        return None

    def labels(
        self,
        images: np.ndarray,
        spacing: Sequence[float],
        case_id: str = "",
        progress: SliceProgress | None = None,
    ) -> np.ndarray:
        """Labels uint8 (slices, S, S) of preprocessed slices at the store's side S."""
        coarse = predict_stack(self.coarse, downsample_images(images, self.factor), progress)
        # specks of the coarse stage are no kidney: components under a share of the largest
        # would each cost a fine region and paste the fine model's guesses there
        found = keep_large_components(coarse > 0, KIDNEY_SHARE)
        mask = upsample_labels(found, self.factor)
        # the mask and `spacing` are at the store's side, so the margin is measured there;
        # sides fitted to factor * 2**depth shrink to what the fine network takes
        boxes = fine_boxes(mask, spacing, self.margin_mm, self.divisor * self.fine_factor)
        if not boxes:
            self.notes[case_id] = {"regions": [], "fine_voxel_share": 1.0, "fallback": True}
            return self._fine(images)
        crops = [self._crop(images, b) for b in boxes]
        self.notes[case_id] = {
            "regions": [list(b) for b in boxes],
            "fine_voxel_share": round(voxel_share(boxes, images.shape), 6),
            "fallback": False,
        }
        return paste(images.shape, boxes, crops)

    def _fine(self, images: np.ndarray) -> np.ndarray:
        """The fine model's labels of full-resolution slices (N, H, W; H and W multiples of
        the fine factor): shrunk as its store was, decided back at (H, W)."""
        f = self.fine_factor
        return predict_stack(self.fine, downsample_images(images, f), scale=f)

    def _crop(self, images: np.ndarray, box: Box) -> np.ndarray:
        """The fine model's labels inside `box`, its slices' 2.5D context read beyond the
        box (clamped at the volume's ends, as on whole volumes)."""
        k = self.fine.context
        z0, z1 = max(0, box.z0 - k), min(len(images), box.z1 + k)
        sub = np.ascontiguousarray(images[z0:z1, box.y0 : box.y1, box.x0 : box.x1])
        out = self._fine(sub)
        return out[box.z0 - z0 : box.z1 - z0]

    def store_case(
        self,
        reader: SliceReader | None,
        info: StoreInfo,
        case_id: str,
        progress: SliceProgress | None = None,
    ) -> np.ndarray:
        """Labels uint8 (slices, size, size) of a stored case, as `Inference.store_case`."""
        images = read_case_images(reader, info, case_id)
        return self.labels(images, store_spacing(info, case_id), case_id, progress)

    def volume(
        self,
        volume: Volume,
        window: Window,
        size: int,
        case_id: str = "",
        progress: SliceProgress | None = None,
        target_spacing: float | None = None,
    ) -> np.ndarray:
        """Labels uint8 of a CT volume in its own geometry, as `Inference.volume`: the
        store's preprocessing, the cascade at the store's side, and the labels taken back
        to the source grid (nearest neighbour where the store resized the slices)."""
        squares, plane, axes, sp = source_squares(volume, window, size, case_id, target_spacing)
        out = self.labels(squares, squares_spacing(sp, plane), case_id, progress)
        return restore_labels(out, plane).transpose(np.argsort(axes))
