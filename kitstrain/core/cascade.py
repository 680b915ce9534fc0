"""A cascade run's record: RUN/config.json holds `{"cascade": {...}, "train": {...}}` instead
of a single run's record, and RUN/coarse/ and RUN/fine/ are ordinary run directories.
Training (`train.cascade`) writes it; loading (`runs.loaded`) and `fit --resume` read it."""

from __future__ import annotations

from pathlib import Path

from kitstrain.core import rundir

__all__ = ["CASCADE", "STAGES", "read_cascade", "write_cascade"]

CASCADE = "cascade"
STAGES = ("coarse", "fine")


def read_cascade(run_dir: Path) -> dict | None:
    """The run's whole config.json when it records a cascade; None for a single-stage run
    or a folder without a record."""
    if not (Path(run_dir) / rundir.CONFIG).is_file():
        return None
    raw = rundir.read_json(run_dir, rundir.CONFIG)
    return raw if isinstance(raw.get(CASCADE), dict) else None


def write_cascade(run_dir: Path, record: dict) -> None:
    rundir.write_json(Path(run_dir) / rundir.CONFIG, record)
