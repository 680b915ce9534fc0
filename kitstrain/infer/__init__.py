"""Predictions: per case, on store cases or source volumes, for validation, score and predict."""
