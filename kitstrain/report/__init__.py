"""Reports of predictions, formatting and drawing only. score: per-case tables, CSV and JSON;
plots: overlays and training curves. The jobs that produce them are `kitstrain.runs`."""
