"""DDP that cannot hang: 2 gloo ranks, each fault on rank 1 alone, started by hand (the
environment torchrun would set) and under torchrun. One rank raises; one sleeps past
--dist-timeout; one alone sees a NaN loss; one reaches the time limit first. Every rank
ends within seconds with at most one line of its own, and the run stays resumable.
Every job has a hard timeout: a hang fails the test instead of blocking CI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kitsprep.synth import SynthConfig, write_cohort
from kitstrain.cli import main
from kitstrain.core import rundir
from tests.conftest import build

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")

HARD_TIMEOUT = 120  # a whole job, start-up included: beyond it the job hangs
TINY = [
    *("--workers", "0", "--batch-size", "2", "--samples-per-epoch", "16"),
    *("--width", "4", "--depth", "2", "--device", "cpu", "--dist-timeout", "4s"),
]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

FAULTS = {
    # fault on rank 1 -> (environment, extra flags)
    "raise": ({"KITS_INJECT_ERROR_AT_STEP": "2"}, ["--max-steps", "30", "--val-every", "2"]),
    "sleep": ({"KITS_INJECT_SLEEP_AT_STEP": "2"}, ["--max-steps", "30", "--val-every", "2"]),
    # the 4th step's loss, the last of a log window: rank 0's own loss is still finite
    "nan": (
        {"KITS_INJECT_NAN_AT_STEP": "3"},
        ["--max-steps", "30", "--val-every", "2", "--log-every", "4"],
    ),
    "time": ({"KITS_INJECT_CLOCK_SKEW_S": "5000"}, ["--max-steps", "30", "--time-limit", "1h"]),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    write_cohort(SynthConfig(cases=4, size=32, seed=5), root / "src")
    out = root / "s.h5"
    build(root / "src", out, size=32, workers=1)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _by_hand(args: list[str], env: dict, cwd: Path) -> tuple[list[tuple[int, str]], float]:
    """Both ranks started as plain processes; (rc, stderr) per rank and the seconds from
    the first rank's exit to the last one's."""
    port = _free_port()
    procs = []
    for rank in (0, 1):
        rank_env = {
            **env,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "kitstrain", "fit", *args],
                env=rank_env,
                cwd=cwd,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    out, ended = [], []
    deadline = time.monotonic() + HARD_TIMEOUT
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
            ended += [time.monotonic()] * (sum(p.poll() is not None for p in procs) - len(ended))
        for p in procs:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out, (ended[-1] - ended[0]) if len(ended) == 2 else 0.0


def _torchrun(args: list[str], env: dict, cwd: Path) -> tuple[list[tuple[int, str]], float]:
    """Both ranks under torchrun, each rank's output to its own file; (the job's rc, that
    rank's stderr) per rank."""
    logs = cwd / "torchrun-logs"
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",
        "--log-dir",
        str(logs),
        "--redirects",
        "3",
        "-m",
        "kitstrain",
        "fit",
        *args,
    ]
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=HARD_TIMEOUT)
    out = []
    for rank in (0, 1):
        found = sorted(logs.rglob(f"*/{rank}/stderr.log"))
        out.append((r.returncode, found[-1].read_text() if found else ""))
    return out, time.monotonic() - t0


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("Error:")]


@pytest.mark.parametrize("launch", ["by-hand", "torchrun"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_on_one_rank_stops_every_rank_and_the_run_resumes(
    store: Path, tmp_path: Path, fault: str, launch: str
) -> None:
    faults, flags = FAULTS[fault]
    env = {**ENV, "KITS_INJECT_RANK": "1", **faults}
    # no --out under torchrun: rank 0 names the run directory, and every rank uses it
    out = tmp_path / "run" if launch == "by-hand" else None
    args = [str(store), *TINY, *flags, *(["--out", str(out)] if out else [])]
    t0 = time.monotonic()
    ranks, spread = (_by_hand if launch == "by-hand" else _torchrun)(args, env, tmp_path)
    seconds = time.monotonic() - t0
    assert seconds < HARD_TIMEOUT - 5, f"{fault}/{launch} took {seconds:.0f} s"
    assert spread < 30, f"the ranks ended {spread:.0f} s apart"
    if out is None:
        runs = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
        assert len(runs) == 1, runs  # one run directory, not one per rank
        out = runs[0]
    (rc0, err0), (rc1, err1) = ranks
    if fault == "time":
        # rank 1's clock passed the limit first: both stop at the same step, cleanly
        assert rc0 == 0 and rc1 == 0, (err0[-2000:], err1[-2000:])
        end = [r for r in rundir.read_metrics(out) if r["kind"] == "end"]
        assert len(end) == 1 and end[0]["reason"] == "time_limit" and end[0]["step"] < 30
        step = end[0]["step"]
        # resumable: without the skewed clock the limit is far, so it trains on
        resumed = CliRunner().invoke(
            main,
            ["fit", *map(str, args), "--resume", "--out", str(out), "--max-steps", str(step + 1)],
        )
        assert resumed.exit_code == 0, resumed.output[-2000:]
        assert [r for r in rundir.read_metrics(out) if r["kind"] == "end"][-1]["step"] == step + 1
        return
    assert rc0 != 0 and rc1 != 0, (err0[-2000:], err1[-2000:])
    assert "Traceback" not in err0, err0[-3000:]
    mine = _errors(err0)
    if launch == "by-hand":
        assert len(mine) == 1, err0[-3000:]  # the watcher's line, or the collective's
    else:
        assert len(mine) <= 1, err0[-3000:]  # torchrun may stop it before it says so
    if fault == "raise":
        assert "failure injected for a test" in err1  # a bug's own traceback
        assert all("rank 1" in line for line in mine), mine
    elif fault == "sleep":
        assert not _errors(err1) or len(_errors(err1)) == 1, err1[-2000:]
        if launch == "by-hand":
            assert "--dist-timeout" in mine[0] or "rank 0" in mine[0], mine
    elif fault == "nan":
        assert len(_errors(err1)) == 1 and "diverged" in _errors(err1)[0], err1[-2000:]
        if mine:
            assert "diverged" in mine[0], mine
    # resumable: the record and a finite checkpoint are there, and no live lock holds it
    assert (out / "config.json").is_file()
    last = rundir.load_checkpoint(rundir.checkpoint_path(out, "last"))
    step = json.loads(last["state"])["step"]
    assert step >= 2
    if fault == "raise" and launch == "by-hand":
        resumed = CliRunner().invoke(
            main, ["fit", *map(str, args), "--resume", "--max-steps", str(step + 2)]
        )
        assert resumed.exit_code == 0, resumed.output[-2000:]
        assert [r for r in rundir.read_metrics(out) if r["kind"] == "end"][-1]["step"] == step + 2
