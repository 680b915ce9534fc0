"""The Python API for notebooks and scripts: a trained run (or an ensemble of runs, or of a
cross-validation folder's folds) as a function from CT to labels.

`Predictor` wraps what `kitstrain predict` does for one volume at a time, through the same
code (`runs.loaded` to load the run into an `infer.inference.Inference`, whose `volume`
windows, resizes, runs the model and maps back), so an array or file predicted here equals
the mask the command writes. `open_store` and `SliceDataset` give the slice store to a loop
of one's own.

Axis convention: arrays are (slices, rows, cols), the axial axis first, as KiTS19 stores its
volumes (`imaging.nii.gz` of shape (num_slices, 512, 512)). Other layouts go through
`predict_nifti`, which reads the orientation from the header.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from kitsprep.cases import NiftiHeader, Volume, read_volume
from kitsprep.errors import KitsError
from kitsprep.geometry import shown_spacing, valid_spacing
from kitsprep.labels import LabelSet
from kitsprep.store import open_store
from kitstrain.core.device import resolve_device
from kitstrain.data.dataset import SliceDataset
from kitstrain.infer.engine import DEFAULT_BATCH_SIZE
from kitstrain.infer.inference import Inference
from kitstrain.runs.ensemble import load_ensemble
from kitstrain.runs.loaded import LoadedRun
from kitstrain.runs.predict import prediction_image

__all__ = ["Predictor", "SliceDataset", "open_store"]


def _spacing(spacing: object) -> tuple[float, float, float]:
    """`Predictor.predict`'s spacing as three positive finite mm values, or one KitsError
    line: a string, a bare number, None inside, the wrong length, zero, negative, NaN or
    Inf are all the user's to fix, never a TypeError from deep inside."""
    expected = "expected spacing as 3 positive mm values, one per axis"
    fix = "pass e.g. (2.5, 0.8, 0.8), or leave it out"
    if isinstance(spacing, (str, bytes)) or not isinstance(spacing, (Sequence, np.ndarray)):
        raise KitsError(f"Predictor.predict: {expected}, found {spacing!r}; {fix}")
    values = list(np.ravel(spacing)) if isinstance(spacing, np.ndarray) else list(spacing)
    if len(values) != 3 or not all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values
    ):
        raise KitsError(f"Predictor.predict: {expected}, found {tuple(values)!r}; {fix}")
    out = tuple(float(v) for v in values)
    if not valid_spacing(out):
        raise KitsError(f"Predictor.predict: {expected}, found {shown_spacing(out)}; {fix}")
    return out  # type: ignore[return-value]


def _slices_first_affine(spacing: Sequence[float]) -> np.ndarray:
    """An affine whose first voxel axis is the superior-inferior one, as in KiTS19's
    headers: `geometry.axial_axes` then keeps the array's axis order."""
    s0, s1, s2 = (float(v) for v in spacing)
    return np.array([[0, 0, s2, 0], [0, s1, 0, 0], [s0, 0, 0, 0], [0, 0, 0, 1]], np.float64)


class Predictor:
    """A trained run ready to segment CT volumes in memory or on disk.

    >>> predictor = Predictor.from_run("runs/demo", device="cpu")
    >>> labels = predictor.predict(hu)  # hu: (slices, rows, cols) in HU

    Labels are the values of the edition of the store the run trained on (`labels`; KiTS19:
    0 background, 1 kidney, 2 tumour). The run's store lends its window and slice size;
    where it has moved or is gone, the ones the run recorded are used.
    """

    def __init__(self, run: LoadedRun, inference: Inference) -> None:
        self.run = run
        self.inference = inference

    @classmethod
    def from_run(
        cls,
        run_dir: Path | str | Sequence[Path | str],
        which: str = "best",
        device: str = "auto",
        tta: bool = False,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        postprocess: bool = True,
    ) -> Predictor:
        """Load `run_dir` (written by `kitstrain fit`; several runs or a cross-validation
        folder: an ensemble averaging their probabilities) with its `which` checkpoint
        ("best", falling back to "last" before the first validation, or "last") on `device`
        ("auto", "cpu", "cuda"); `tta` averages the four flips; `postprocess` applies the
        post-processing recorded beside the models (`postprocessing.json`), as `kitstrain
        predict` does. KitsError when a run is missing or incomplete, or the runs differ."""
        if which not in ("best", "last"):
            raise KitsError(f"which={which!r}: expected 'best' or 'last'")
        paths = [run_dir] if isinstance(run_dir, (str, Path)) else list(run_dir)
        if not paths:
            raise KitsError("Predictor.from_run: expected a run directory, found none")
        ens = load_ensemble([Path(p) for p in paths], None, which=which, store_required=False)
        inference = ens.inference(
            resolve_device(device), tta=tta, batch_size=batch_size, postprocess=postprocess
        )
        return cls(ens.primary, inference)

    @property
    def labels(self) -> LabelSet:
        """The label set of the run's edition: names, values and scored regions."""
        return self.run.labels

    def predict(self, volume: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
        """Labels (uint8, the shape of `volume`) of a CT volume in HU, shaped (slices, rows,
        cols) with the axial axis first (module docstring). `spacing` (mm per axis) is
        needed when the run's store has a target spacing (`kitsprep build --spacing`): the
        slices are resampled to it as the store's were. Otherwise it is optional and only
        checked: each slice is resized whole to the store's square, whatever its spacing."""
        volume = np.asarray(volume)
        if volume.ndim != 3 or 0 in volume.shape:
            raise KitsError(
                f"Predictor.predict: expected a 3D volume (slices, rows, cols), found "
                f"shape {volume.shape}; pass one CT volume, axial axis first"
            )
        if not (np.issubdtype(volume.dtype, np.number) and not np.iscomplexobj(volume)):
            raise KitsError(
                f"Predictor.predict: expected real numbers (HU), found dtype {volume.dtype}; "
                "pass the image data, e.g. nib.load(path).get_fdata()"
            )
        if spacing is None and self.run.spacing is not None:
            raise KitsError(
                f"Predictor.predict: this run's store resamples slices to "
                f"{self.run.spacing:g} mm per pixel, so the volume's spacing is needed; pass "
                "spacing=(slice, row, col) mm, e.g. nib.load(path).header.get_zooms()"
            )
        spacing = (1.0, 1.0, 1.0) if spacing is None else _spacing(spacing)
        self._check_in_plane(volume.shape)
        # float32, the precision the windowing kernel reads a float32 NIfTI in: the labels
        # equal `kitstrain predict`'s for the same voxels
        data = np.asarray(volume, np.float32)
        affine = _slices_first_affine(spacing)
        header = NiftiHeader(data.shape, affine, data.dtype, 1.0, 0.0, 0, 0)
        return self._predict(Volume(data, header, ""), "volume")

    def predict_nifti(self, path: Path | str) -> nib.Nifti1Image:
        """The labels of a CT NIfTI file as a uint8 NIfTI image in its geometry (same shape,
        affine and sform/qform codes), as `kitstrain predict` writes it; save it with
        `nib.save(image, "prediction.nii.gz")`."""
        path = Path(path)
        if not path.is_file():
            raise KitsError(
                f"Predictor.predict_nifti: {path} does not exist or is not a file; "
                "expected a CT volume such as case_00000/imaging.nii.gz"
            )
        volume = read_volume(path, path.parent.name)
        labels = self._predict(volume, path.parent.name)
        return prediction_image(labels, nib.load(str(path)))

    def _check_in_plane(self, shape: tuple[int, ...]) -> None:
        """Slices smaller than the network's down-sampling (2**depth pixels a side) hold
        nothing it can segment, and resized to the store's size each one costs a whole
        slice: (100000, 1, 1) would run for minutes on gigabytes. Refused in one line; it is
        most often a volume with its axes in another order."""
        # an ensemble's members may differ in depth: the deepest one decides
        side = max(2 ** int(m.cfg.depth) for m in self.inference.models)
        rows, cols = shape[1], shape[2]
        if rows < side or cols < side:
            raise KitsError(
                f"Predictor.predict: slices of {rows}x{cols} pixels (shape {tuple(shape)}) "
                f"are smaller than the {side}x{side} this run's network needs; expected "
                "(slices, rows, cols) with the axial axis first, e.g. (90, 512, 512) "
                "(np.moveaxis a volume stored otherwise, or use predict_nifti)"
            )

    def _predict(self, volume: Volume, case_id: str) -> np.ndarray:
        return self.inference.volume(
            volume, self.run.window, self.run.size, case_id, target_spacing=self.run.spacing
        )
