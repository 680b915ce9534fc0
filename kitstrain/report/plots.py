"""Pictures: per-case overlays (truth beside prediction) and training curves.

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas, never through
pyplot, so that plotting from a training loop or a worker thread neither opens windows nor
changes a global backend. Outlines are the edition's scored regions, in its write-back
order; the first two take the colours of the official KiTS19 starter code
(`starter_code/visualize.py`): kidney red, tumour blue.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kitsprep.errors import KitsError
from kitsprep.files import atomic_path
from kitsprep.labels import LabelSet, region_masks
from kitstrain.core import rundir as runlib

if TYPE_CHECKING:
    from kitstrain.infer.cases import CasePrediction

__all__ = [
    "case_overlay",
    "dice_curves",
    "overlay_slice",
    "plot_curves",
    "prediction_overlay",
    "region_colours",
]

_MIDDLE_COLOURS = ("tab:green", "tab:purple", "tab:brown", "tab:orange")


def region_colours(n: int) -> list[str]:
    """A colour for each of n regions in write-back order: the outermost red and the
    innermost blue, as kidney and tumour in KiTS19's starter code (KiTS21/23:
    kidney_and_mass red, mass green, tumor blue)."""
    if n <= 1:
        return ["red"][:n]
    return ["red", *(_MIDDLE_COLOURS[i % len(_MIDDLE_COLOURS)] for i in range(n - 2)), "blue"]


def _save(fig: Figure, path: Path) -> Path:
    """PNG written under a temporary name and renamed: a reader never sees half an image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _outline(ax, mask: np.ndarray, colour: str) -> None:
    # contour() warns on a constant field: an empty mask has no outline, and a full one is
    # framed by padding it with background first.
    if not mask.any():
        return
    h, w = mask.shape
    padded = np.pad(mask.astype(np.float32), 1)
    ax.contour(
        np.arange(-1, w + 1),
        np.arange(-1, h + 1),
        padded,
        levels=[0.5],
        colors=[colour],
        linewidths=1.0,
    )
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)


def overlay_slice(truth: np.ndarray | None, pred: np.ndarray, ls: LabelSet) -> int:
    """Slice (axis 0) to show: the most of the innermost true region (KiTS19 tumour), else of
    the next one out, and so on, else the same on the prediction (unlabelled cases, or a
    truth without foreground), else the middle slice."""
    for vol in (truth, pred):
        if vol is None:
            continue
        flat = np.asarray(vol).reshape(vol.shape[0], -1)
        for region in reversed(ls.regions):
            counts = np.count_nonzero(np.isin(flat, region.labels), axis=1)
            if counts.max() > 0:
                return int(np.argmax(counts))
    return pred.shape[0] // 2


def case_overlay(
    image2d: np.ndarray,
    truth2d: np.ndarray | None,
    pred2d: np.ndarray,
    title: str,
    path: Path | str,
    ls: LabelSet,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """One PNG: the slice with each scored region of the edition outlined (KiTS19: kidney
    red, tumour blue), truth beside prediction when there is a truth."""
    image2d = np.asarray(image2d, np.float32)
    panels = (
        [("truth", truth2d), ("prediction", pred2d)]
        if truth2d is not None
        else [("prediction", pred2d)]
    )
    h, w = image2d.shape
    panel_w = 4.0
    fig = Figure(figsize=(panel_w * len(panels), panel_w * h / w + 0.9), dpi=100)
    colours = region_colours(len(ls.regions))
    lo = float(np.min(image2d)) if vmin is None else vmin
    hi = float(np.max(image2d)) if vmax is None else vmax
    for i, (name, labels) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(
            image2d, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest"
        )
        for mask, colour in zip(region_masks(np.asarray(labels), ls), colours, strict=True):
            _outline(ax, mask, colour)
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    legend = ", ".join(f"{r.name}: {c}" for r, c in zip(ls.regions, colours, strict=True))
    fig.suptitle(f"{title}\n{legend}", fontsize=9)
    fig.tight_layout()
    return _save(fig, Path(path))


def prediction_overlay(case: CasePrediction, title: str, path: Path | str, ls: LabelSet) -> Path:
    """The overlay of one predicted case (`infer.cases`): the axial slice `overlay_slice`
    picks, truth beside prediction, titled with the slice's index."""
    truth = None if case.truth is None else case.truth.transpose(case.axes)
    pred = case.pred.transpose(case.axes)
    k = overlay_slice(truth, pred, ls)
    lo, hi = case.display_range
    return case_overlay(
        case.slice_image(k),
        None if truth is None else truth[k],
        pred[k],
        f"{title}  ({case.slice_name} {k})",
        path,
        ls,
        vmin=lo,
        vmax=hi,
    )


def dice_curves(val: list[dict]) -> list[tuple[str, str, str]]:
    """(metrics key, legend label, colour) of each validation curve: one per region the run
    logged in its validation records (KiTS19: kidney, tumour; KiTS21/23: the three HECs),
    then the mean."""
    regions = next((r["regions"] for r in reversed(val) if r.get("regions")), [])
    return [
        (f"{name}_dice", name, colour)
        for name, colour in zip(regions, region_colours(len(regions)), strict=True)
    ] + [("mean_dice", "mean", "black")]


def plot_curves(run_dir: Path | str, path: Path | str | None = None) -> Path:
    """Training loss and validation Dice against the step, from the run's metrics log;
    writes <run>/curves.png (or `path`). `fit` may call it after every validation."""
    run_dir = Path(run_dir)
    records = runlib.read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train" and "loss" in r and "step" in r]
    val = [r for r in records if r.get("kind") == "val" and "step" in r]
    if not train and not val:
        raise KitsError(
            f"{run_dir} has no training metrics yet ({runlib.METRICS} is missing "
            "or empty); pass a run written by `kitstrain fit`, or wait for its "
            "first logged step"
        )
    fig = Figure(figsize=(11, 4), dpi=100)
    ax_loss = fig.add_subplot(1, 2, 1)
    if train:
        ax_loss.plot(
            [r["step"] for r in train],
            [r["loss"] for r in train],
            lw=1.0,
            color="tab:gray",
            label="train loss",
        )
        ax_loss.legend(loc="upper right", fontsize=8)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training loss", fontsize=10)
    ax_loss.grid(alpha=0.3)

    ax_dice = fig.add_subplot(1, 2, 2, sharex=ax_loss if train else None)
    steps = [r["step"] for r in val]
    for key, label, colour in dice_curves(val):
        pts = [(s, r[key]) for s, r in zip(steps, val, strict=True) if r.get(key) is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax_dice.plot(xs, ys, marker="o", ms=3, lw=1.2, color=colour, label=label)
    best = [r for r in val if r.get("mean_dice") is not None]
    if best:
        b = max(best, key=lambda r: r["mean_dice"])
        ax_dice.annotate(
            f"best {b['mean_dice']:.3f}",
            (b["step"], b["mean_dice"]),
            textcoords="offset points",
            xytext=(4, 6),
            fontsize=8,
        )
        ax_dice.legend(loc="upper left", fontsize=8)
    ax_dice.set_ylim(0.0, 1.0)
    ax_dice.set_xlabel("step")
    ax_dice.set_ylabel("Dice (per case, 3D)")
    ax_dice.set_title("validation Dice", fontsize=10)
    ax_dice.grid(alpha=0.3)
    fig.suptitle(run_dir.name, fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(path) if path is not None else run_dir / "curves.png")
