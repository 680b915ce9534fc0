"""Scores as tables, CSV and JSON; overlays and training curves."""
