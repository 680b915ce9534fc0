"""Predictions, one path for validation, `score`, `predict` and the Python API.

inference: `Inference`, the models and settings every case of one run of them shares;
engine: those models applied to slices in batches, in store or source geometry; cases: the
per-case loop over store cases or NIfTI volumes. Loading a finished run is `kitstrain.runs`.
"""
