"""A run's `metrics.jsonl`: one JSON object a line, appended as training goes. A line cut
short (a kill or a full disk in the middle of it) is skipped with one warning naming the
file and line, and a resumed run first cuts the log back to its checkpoint's step, so the
steps it redoes are logged once."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

from kitsprep import failpoints
from kitsprep.files import write_atomic

METRICS = "metrics.jsonl"

__all__ = [
    "METRICS",
    "append_metrics",
    "cut_metrics",
    "last_finite_loss",
    "last_validation",
    "read_metrics",
]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def append_metrics(run_dir: Path, record: dict) -> None:
    """One line per event; appended, so a kill loses at most the line being written."""
    failpoints.hit(f"write {METRICS}")
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(json.dumps(record, default=float) + "\n")


def _records(path: Path) -> tuple[list[tuple[str, dict]], list[int]]:
    """(line, record) of every readable line, and the numbers of the unreadable ones."""
    good, bad = [], []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            bad.append(n)
            continue
        if isinstance(rec, dict):
            good.append((line, rec))
        else:
            bad.append(n)
    return good, bad


def read_metrics(run_dir: Path, warn: Callable[[str], None] | None = _stderr) -> list[dict]:
    """Every readable record of metrics.jsonl, in order; none before the first. Unreadable
    lines are skipped, with one warning naming the file and the lines."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    good, bad = _records(path)
    if bad and warn is not None:
        shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        warn(
            f"warning: {path} line {shown} is not a JSON record (cut short by a kill or a "
            "full disk?); skipped"
        )
    return [rec for _, rec in good]


def cut_metrics(run_dir: Path, step: int) -> int:
    """Keep the records up to `step` (the checkpoint a run resumes from) and drop the rest,
    unreadable lines included: the resumed run logs the later steps again. Returns how many
    lines were dropped."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return 0
    good, bad = _records(path)
    keep = [
        line for line, rec in good if not (isinstance(rec.get("step"), int) and rec["step"] > step)
    ]
    dropped = len(good) - len(keep) + len(bad)
    if dropped:
        write_atomic(path, "".join(line + "\n" for line in keep))
    return dropped


def last_validation(run_dir: Path) -> dict | None:
    """The run's latest validation record, if it has one."""
    vals = [r for r in read_metrics(run_dir) if r.get("kind") == "val"]
    return vals[-1] if vals else None


def last_finite_loss(run_dir: Path) -> str:
    """'; last logged loss L at step S' for a divergence message, or ''."""
    logged = [
        r
        for r in read_metrics(run_dir)
        if r.get("kind") == "train"
        and isinstance(r.get("loss"), float)
        and math.isfinite(r["loss"])
    ]
    if not logged:
        return ""
    return f"; last logged loss {logged[-1]['loss']:.4g} at step {logged[-1]['step']}"
