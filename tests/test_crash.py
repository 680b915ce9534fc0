"""The crash sweep (tests/crash.py): a short seeded `fit` and a small `build` killed at
every one of their named write, rename and fsync points in turn, each followed by the same
command with --resume, which must give the uninterrupted result (fit: the validations'
Dice, the exported weights, each step logged once, no temporary left; build: a store
equal to an uninterrupted build's that `verify --src` passes). The finer sweep kills the
build at each of HDF5's own writes of the final write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def work(tmp_path: Path):
    """In memory where there is a tmpfs: the fsyncs cost nothing there, and a kill -9
    needs no disk to leave its state."""
    if os.access("/dev/shm", os.W_OK):
        with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="kits-crash-") as d:
            yield Path(d)
    else:
        yield tmp_path


def sweep(what: str, work: Path, *extra: str) -> dict:
    p = subprocess.run(
        [sys.executable, "-m", "tests.crash", what, str(work), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    log = (work / "children.log").read_text()[-3000:] if (work / "children.log").is_file() else ""
    assert p.returncode == 0, p.stderr[-3000:] + log
    summary = json.loads(p.stdout)
    failed = [r for r in summary["swept"] if r["killed"] != -9 or not r["resumed"]]
    assert not failed, f"{failed}\n{log}"
    return summary


def test_a_build_resumes_to_the_same_store_from_every_kill_point(work: Path) -> None:
    summary = sweep("build", work)
    names = [r["name"] for r in summary["swept"]]
    assert len(names) == summary["points"] >= 30  # every point, not a sample
    for point in (
        "rename manifest.json",
        "write case_00000 slices 0-6",
        "fsync .case_00000.npz",  # a commit record before its rename
        "rename case_00003.npz",
        "rename finalize.journal",
        "h5 index",
        "h5 attributes",
        "rename s.h5",
        "remove partial build",
    ):
        assert any(n.startswith(point) for n in names), point


def test_a_fit_resumes_to_the_same_scores_and_weights_from_every_kill_point(work: Path) -> None:
    summary = sweep("fit", work)
    names = [r["name"] for r in summary["swept"]]
    assert len(names) == summary["points"] >= 25
    order = [n for n in names if n.startswith("rename ")]
    # the checkpoint set in the order that is consistent at every instant
    assert order[:5] == [
        "rename split.json",
        "rename config.json",
        "rename best.pt",
        "rename model.safetensors",
        "rename last.pt",
    ]
    assert sum(n == "write metrics.jsonl" for n in names) >= 5


@pytest.mark.slow
def test_a_build_resumes_from_every_hdf5_write_of_its_final_write(work: Path) -> None:
    summary = sweep("build", work, "--h5-writes")
    assert len(summary["swept"]) >= 50  # each of HDF5's writes in the final stretch
