"""A cross-validation's `splits.json` on disk: nnU-Net's `splits_final.json` form, read
from any file that holds it, written atomically once and then only read."""

from __future__ import annotations

import json
from pathlib import Path

from kitsprep.errors import KitsError
from kitsprep.files import write_atomic


def read_splits_file(path: Path) -> object:
    """The JSON in `path` as it is (`folds.check_folds` checks it against a store); a
    missing or unreadable file is one line."""
    path = Path(path)
    if not path.is_file():
        raise KitsError(
            f"splits file {path} does not exist; pass an nnU-Net splits_final.json or a "
            "splits.json written by kits"
        )
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise KitsError(
            f"splits file {path} is not readable JSON ({exc}); pass an nnU-Net "
            "splits_final.json or a splits.json written by kits"
        ) from None


def write_splits_file(path: Path, splits: list[dict]) -> Path:
    """`splits` as nnU-Net lays them out (a list of {"train", "val"}), atomically."""
    return write_atomic(path, json.dumps(splits, indent=2) + "\n")
