"""A finished run put to use: load it, predict with it, score it. Sits above training and
the report, which it uses."""
