"""Reports of predictions. score: per-case tables, CSV and JSON (`kitstrain score`); plots:
overlays and training curves (`--overlays`, `kitstrain plot`)."""
