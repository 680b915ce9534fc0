"""Predictions, one path for validation, `score`, `predict` and the Python API.

engine: a model applied to slices in batches, in store or source geometry; cases: the
per-case loop over store cases or NIfTI volumes. Loading a finished run is `kitstrain.runs`.
"""
